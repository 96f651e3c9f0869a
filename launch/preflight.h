// Preflight: what every rank of a run needs, checked before step 1 (and by
// `loom launch --check` / `loom train --check` alone). Each rank checks that
// it reads the same config as rank 0, opens every dataset the config names
// (index.json; its share of the shard files exist with the right sizes, the
// shards' contents being checked when first read) and the tokenizer file, can write into the run folder and has room there
// for a checkpoint, and completes a small all-reduce on the world and on each
// of its dp, pp and tp groups. A failing rank prints one line per problem
// naming its rank and host; every rank then returns the same verdict.
#pragma once

#include <ostream>

#include "data/loader.h"
#include "parallel/process_group.h"
#include "config/config.h"

namespace loom {

// Collective over `world` (and each group of `grid`). Returns true when every
// rank passed; false on every rank when any failed (the failures were printed
// to `errors` by the ranks that saw them). Rank 0 logs a one-line summary.
// world == nullptr: one rank without MPI (no group checks). The datasets it
// opened go to `opened` (for TrainOptions::datasets) when given.
bool run_preflight(const Config& config, ProcessGroup* world, const GridGroups* grid, std::ostream& log,
                   std::ostream& errors, OpenedDatasets* opened = nullptr);

// The start-up log's memory forecast: for each pipeline rank, the bytes of
// tensors `loom plan` predicts it holds at its peak in this config's layout
// (plan/memory_model.h; on a GPU the device memory, on the CPU the process's
// tensors, the process itself coming on top), one line each:
//   memory: pp rank 0 predicted to peak at 1.02 GiB (1095216660 bytes) of tensors, in the optimizer step
// `dp`: the resolved data-parallel degree; parallel.cp and a mixture of
// experts' sparse layers are counted as `loom plan` counts them. Nothing when
// the model's shape is unknown (a model.init_from folder that cannot be read
// says so later).
void log_memory_forecast(const Config& config, int64_t dp, std::ostream& log);

}  // namespace loom
