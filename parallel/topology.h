// The dp x cp x pp x tp grid of ranks. Built once from the config and the
// world size, validated once, and passed explicitly to whatever needs it (no
// global).
//
// Rank order: tp varies fastest, then cp, then pp, then dp:
//   rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank
// The axes are ordered by how much they talk. A tensor-parallel group (two
// all-reduces per layer, forward and backward) sits on consecutive ranks,
// hence inside one node. Context parallelism passes every layer's keys and
// values around its ring, forward and backward (a few MB per layer at long
// sequences): next after tp, so that tp x cp fills a node where it can. The
// pipeline sends one activation per micro-batch and stage boundary, and dp
// reduces the gradients once per step, overlapped with backward: they can
// cross nodes. (Megatron-Core orders tp, cp, dp, pp for the same reason;
// here pp stays inside dp as it was before cp, so cp 1 keeps every rank's
// place.)
#pragma once

#include <cstdint>
#include <string>

#include "config/config.h"

namespace loom {

struct ParallelDims {
  int64_t world = 1;
  int64_t dp = 1;
  int64_t pp = 1;
  int64_t tp = 1;
  int64_t cp = 1;
  // Expert parallelism, carved out of dp (Note [expert groups] in
  // parallel/process_group.h): not an axis of the grid, dp ranks
  // b * ep .. b * ep + ep - 1 share one copy of the experts.
  int64_t ep = 1;

  // Resolves `parallel.dp: auto` and checks dp * cp * pp * tp == world and the
  // model-shape constraints (tp | heads, kv heads, intermediate size; the
  // vocabulary need not divide, Note [vocab padding] in vocab_parallel.h;
  // tp | seq_len under sequence parallelism; pp <= layers; batch).
  // With parallel.ep: ep | dp and ep | model.num_experts.
  // Throws BadInput naming every factor.
  static ParallelDims from_config(const Config& config, int64_t world_size);

  struct Coords {
    int64_t dp = 0, pp = 0, tp = 0, cp = 0;
  };
  Coords coords_of(int64_t rank) const;
  int64_t rank_of(Coords c) const { return ((c.dp * pp + c.pp) * cp + c.cp) * tp + c.tp; }

  // A picture of the grid for the start-up log, e.g.
  //   "world 8 = dp 2 x pp 2 x tp 2\n  dp0: pp0 [0 1] pp1 [2 3]\n  dp1: ..."
  // (with cp > 1: "world 8 = dp 2 x cp 2 x pp 1 x tp 2\n  dp0: pp0 cp0 [0 1] cp1 [2 3]...").
  std::string describe() const;
};

}  // namespace loom
