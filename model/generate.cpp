#include "model/generate.h"

#include <ATen/ATen.h>
#include <torch/types.h>

#include <limits>

#include "util/error.h"

namespace loom {

std::vector<int64_t> generate(LlamaForCausalLM& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options) {
  if (prompt.empty()) throw BadInput("generate: the prompt has no tokens");
  const int64_t vocab = model.config().vocab_size;
  for (int64_t id : prompt) {
    if (id < 0 || id >= vocab) {
      throw BadInput("generate: prompt token " + std::to_string(id) + " is outside the vocabulary [0, " +
                     std::to_string(vocab) + ")");
    }
  }
  if (!options.greedy && options.temperature <= 0) throw BadInput("generate: --temperature must be > 0");

  torch::NoGradGuard no_grad;
  model.eval();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  auto device = model.parameters().front().device();

  KVCache cache;
  auto input = torch::tensor(prompt, torch::kInt64).unsqueeze(0).to(device);
  int64_t position = 0;
  std::vector<int64_t> out;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    auto logits = model.forward(input, &cache, position);  // [1, T, V]
    position += input.size(1);
    // Only the vocabulary's columns: a head whose table carries padding rows
    // (Note [vocab padding] in parallel/vocab_parallel.h) has more, which
    // are no token and never chosen, whatever their logits.
    auto last = logits.select(1, -1).squeeze(0).narrow(0, 0, vocab).to(torch::kFloat).cpu();  // [V]
    int64_t next;
    if (options.greedy) {
      next = last.argmax().item<int64_t>();
    } else {
      auto scaled = last / options.temperature;
      if (options.top_k > 0 && options.top_k < vocab) {
        auto kth = std::get<0>(scaled.topk(options.top_k)).select(0, -1);
        scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<float>::infinity());
      }
      auto probs = at::softmax(scaled, -1);
      next = at::multinomial(probs, 1, /*replacement=*/false, generator).item<int64_t>();
    }
    out.push_back(next);
    if (next == options.stop_token) break;
    input = torch::tensor({next}, torch::kInt64).unsqueeze(0).to(device);
  }
  return out;
}

}  // namespace loom
