// Sampling from a model, for sanity checks (`loom generate`): greedy, or
// temperature with optional top-k, with a KV cache so each new token costs one
// position of attention.
#pragma once

#include <cstdint>
#include <vector>

#include "model/llama.h"

namespace loom {

struct SamplingOptions {
  int64_t max_new_tokens = 32;
  bool greedy = true;
  double temperature = 1.0;  // > 0; only when !greedy
  int64_t top_k = 0;         // 0 = whole vocabulary
  uint64_t seed = 0;
  int64_t stop_token = -1;   // stop after emitting it (-1: never)
};

// Returns only the new tokens, each an id below the model's vocab_size (a
// head with padding columns past it never has them chosen). The prompt must
// be non-empty.
std::vector<int64_t> generate(LlamaForCausalLM& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options);

}  // namespace loom
