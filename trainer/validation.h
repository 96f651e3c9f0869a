// Validation during training (data.valid, data.valid_interval,
// data.valid_batches): the mean loss over the same validation micro-batches
// every time, averaged over the data-parallel replicas.
#pragma once

#include <cstdint>

#include "config/config.h"
#include "data/loader.h"
#include "parallel/process_group.h"
#include "parallel/topology.h"
#include "trainer/forward_backward.h"

namespace loom {

// Whether step `step` (completed steps) validates: every data.valid_interval
// steps and at the last step of the schedule, when data.valid is set.
bool validation_due(const Config& config, int64_t step);

// The validation loss on every rank. data.valid_batches counts micro-batches
// over all replicas: each evaluates its share of the same samples a single
// rank reads, and the replicas' means are averaged (collective over `dp`,
// null with one replica; over pp too with a pipeline).
double validation_loss(ForwardBackward& forward_backward, const Loader& loader, const Config& config,
                       const ParallelDims& dims, ProcessGroup* dp);

}  // namespace loom
