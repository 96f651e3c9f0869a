// The small Llama that the data-parallel benchmarks train (bench_dp_overlap,
// bench_zero_gathers), and the command-line flags that size it.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "config/model_config.h"

namespace loom::bench {

struct BenchShape {
  int64_t hidden = 256, layers = 4, vocab = 4096, seq = 128;
  int64_t micro = 2;         // sequences per micro-batch
  int64_t accumulation = 2;  // micro-batches per step
  int64_t steps = 10;        // timed steps (after one warm-up step)
};

// Takes --hidden, --layers, --vocab, --seq, --micro, --accumulation or
// --steps into `shape`; false for any other flag.
inline bool read_shape_flag(BenchShape& shape, const std::string& flag, const char* value) {
  int64_t* field = flag == "--hidden"         ? &shape.hidden
                   : flag == "--layers"       ? &shape.layers
                   : flag == "--vocab"        ? &shape.vocab
                   : flag == "--seq"          ? &shape.seq
                   : flag == "--micro"        ? &shape.micro
                   : flag == "--accumulation" ? &shape.accumulation
                   : flag == "--steps"        ? &shape.steps
                                              : nullptr;
  if (field == nullptr) return false;
  *field = std::atoll(value);
  return true;
}

// Heads of 32 dimensions over kv heads of 64, an MLP three times as wide.
inline ModelConfig model_config_of(const BenchShape& shape) {
  ModelConfig config;
  config.hidden_size = shape.hidden;
  config.intermediate_size = 3 * shape.hidden;
  config.num_layers = shape.layers;
  config.num_heads = shape.hidden / 32;
  config.num_kv_heads = shape.hidden / 64;
  config.vocab_size = shape.vocab;
  config.max_seq_len = shape.seq;
  return config;
}

}  // namespace loom::bench
