// Expert parallelism (parallel.ep): each sparse layer's experts split over
// the ep ranks of a block of data-parallel ranks (Note [expert groups] in
// parallel/process_group.h), tokens sent to their experts' ranks and back by
// all-to-all (Note [expert exchange] in model/moe.h).
//
// Note [expert all-to-all]
// One sparse layer's call on each ep rank, with E experts, E/ep a rank:
//   1. counts: each rank routes its own tokens and knows how many of its rows
//      go to each expert; an all-to-all of these counts (int64 [E], on the
//      host: MPI even on CUDA) tells each rank how many rows each peer sends
//      for each of its experts. No capacity factor: every row is sent, none
//      dropped, so the result is the single-rank one.
//   2. dispatch: the rows, sorted by expert and so grouped by destination,
//      go out in one all-to-all with those splits; they arrive grouped by
//      source rank, and are regrouped by local expert (an index_select).
//   3. the local experts run on their rows;
//   4. combine: the outputs regrouped by source and sent back by the inverse
//      all-to-all, so each rank gets its rows' outputs in the order it sent
//      them.
// Backward runs the two all-to-alls the other way (AllToAllRows): the
// gradient of a dispatched row goes back to the rank it came from, that of
// a combined output to the expert's rank. Every rank of the ep group calls
// every sparse layer once per forward (and once per backward), in the same
// order: the pipeline schedule, recomputation and validation are the same
// on every rank of the group, so the collectives pair up.
//
// The gradients: a rank's expert gradient sums the contributions of every
// ep rank's tokens (their rows came here), so the ep ranks of a block need
// no reduction between them; the copies of an expert in other blocks (and
// their cp ranks) are averaged over `edp` and divided by ep, which gives the
// mean over the dp x cp ranks that a dense parameter's gradient gets
// (trainer/update.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "model/moe.h"
#include "optim/optimizer.h"
#include "parallel/process_group.h"

namespace loom {

// `input` [n, ...] split along dim 0 by `input_splits`, exchanged over
// `group` into [sum(output_splits), ...] (ProcessGroup::all_to_all);
// backward the inverse exchange. Blocking.
torch::Tensor all_to_all_rows(ProcessGroup& group, const torch::Tensor& input, const std::vector<int64_t>& input_splits,
                              const std::vector<int64_t>& output_splits);

// The named tensors of `local` (one ep rank's: the dense ones and its
// experts', on any device) with every ep rank's experts, as CPU tensors:
// each expert tensor is all-gathered over `ep` (every rank's j-th expert
// tensor has the same shape) and named after its global expert. Dense
// tensors are kept as this rank holds them (every ep rank holds the same).
// Collective over `ep` (an MPI group), in `local`'s order.
NamedTensors gather_experts(ProcessGroup& ep, const NamedTensors& local);

class ExpertParallelExchange : public ExpertExchange {
 public:
  // `ep` carries the rows (NCCL's twin on CUDA), `ep_host` the counts (the
  // same ranks over MPI; the same group on the CPU). Both must outlive the
  // layers that use the exchange.
  ExpertParallelExchange(ProcessGroup& ep, ProcessGroup& ep_host);

  int64_t rank() const override { return ep_.rank(); }
  int64_t size() const override { return ep_.size(); }
  torch::Tensor exchange(const torch::Tensor& rows, const std::vector<int64_t>& rows_per_expert,
                         const LocalExperts& local_experts) override;

 private:
  ProcessGroup& ep_;
  ProcessGroup& ep_host_;
};

}  // namespace loom
