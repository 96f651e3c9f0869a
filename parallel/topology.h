// The dp x pp x tp grid of ranks. Built once from the config and the world
// size, validated once, and passed explicitly to whatever needs it (no global).
//
// Rank order: tp varies fastest, then pp, then dp, so that a tensor-parallel
// group (the chattiest) sits on consecutive ranks, hence inside one node:
//   rank = (dp_rank * pp + pp_rank) * tp + tp_rank
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

  // Resolves `parallel.dp: auto` and checks dp * pp * tp == world and the
  // model-shape constraints (tp | heads, kv heads, intermediate size; the
  // vocabulary need not divide, Note [vocab padding] in vocab_parallel.h;
  // tp | seq_len under sequence parallelism; pp <= layers; batch).
  // Throws BadInput naming every factor.
  static ParallelDims from_config(const Config& config, int64_t world_size);

  struct Coords {
    int64_t dp = 0, pp = 0, tp = 0;
  };
  Coords coords_of(int64_t rank) const;
  int64_t rank_of(Coords c) const { return (c.dp * pp + c.pp) * tp + c.tp; }

  // A picture of the grid for the start-up log, e.g.
  //   "world 8 = dp 2 x pp 2 x tp 2\n  dp0: pp0 [0 1] pp1 [2 3]\n  dp1: ..."
  std::string describe() const;
};

}  // namespace loom
