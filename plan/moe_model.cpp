#include "plan/moe_model.h"

namespace loom::plan {

namespace {

constexpr double kFp32 = 4, kBf16 = 2, kInt64 = 8;
// Note [plan: mixture of experts]: per expert its three linears, SwiGLU and
// the slice of the sorted rows; backward about twice as many. The routing:
// the router, softmax, top-k, renormalization, sort, bincount and its copy
// to the host, the gathers, the weighting, the scatter.
constexpr double kExpertOpsForward = 5, kExpertOpsBackward = 10;
constexpr double kRoutingOpsForward = 20, kRoutingOpsBackward = 20;

bool has_shared_expert(const ModelConfig& m) { return m.architecture == "qwen2_moe"; }

// The sizes the counts below read, the intermediate features as a tp rank
// holds them; `shared` is 0 without a shared expert.
struct BlockShape {
  double hidden, experts, top_k, expert, shared;
};

BlockShape shape_of(const ModelConfig& m, int64_t tp) {
  const double ranks = static_cast<double>(tp);
  return {static_cast<double>(m.hidden_size), static_cast<double>(m.num_experts),
          static_cast<double>(m.num_experts_per_tok), static_cast<double>(m.expert_intermediate_size()) / ranks,
          has_shared_expert(m) ? static_cast<double>(m.shared_expert_intermediate_size) / ranks : 0.0};
}

}  // namespace

int64_t sparse_layers_of(const ModelConfig& model, const StageSpec& stage) {
  const int64_t layers = stage.num_layers < 0 ? model.num_layers - stage.first_layer : stage.num_layers;
  int64_t sparse = 0;
  for (int64_t layer = stage.first_layer; layer < stage.first_layer + layers; ++layer) {
    if (model.sparse_layer(layer)) ++sparse;
  }
  return sparse;
}

double sparse_block_saved_bytes_per_token(const ModelConfig& m, int64_t tp, bool bf16) {
  const double act = bf16 ? kBf16 : kFp32;
  const auto [h, experts, k, expert, shared] = shape_of(m, tp);
  double bytes = act * experts /* logits */ + kFp32 * experts /* probabilities */ + kFp32 * 2 * k /* weights */ +
                 kInt64 * 3 * k /* top-k indices, sort order, token of each pair */ +
                 act * k * (2 * h + 4 * expert) /* gathered rows, outputs; gate, silu, up, product */;
  if (shared > 0) bytes += act * (4 * shared + h + 1);
  return bytes;
}

double sparse_block_matmul_flops_per_token(const ModelConfig& m, int64_t tp) {
  const auto [h, experts, k, expert, shared] = shape_of(m, tp);
  double flops = 2 * (h * experts + k * 3 * h * expert);
  if (shared > 0) flops += 2 * (3 * h * shared + h);
  return flops;
}

double sparse_block_elementwise_bytes_per_token(const ModelConfig& m, int64_t tp, bool bf16) {
  const auto [h, experts, k, expert, shared] = shape_of(m, tp);
  // SwiGLU 5 passes per element as a dense MLP's; softmax about 5 over the
  // experts; gather, weighting and scatter 2 each over k hidden rows.
  double elements = 5 * k * expert + 5 * experts + 6 * k * h;
  if (shared > 0) elements += 5 * shared + 3 * h;
  return (bf16 ? kBf16 : kFp32) * elements;
}

double sparse_block_extra_ops(const ModelConfig& m, bool backward, int64_t ep) {
  const double experts = static_cast<double>(m.num_experts / ep) + (has_shared_expert(m) ? 1 : 0);
  return backward ? experts * kExpertOpsBackward + kRoutingOpsBackward : experts * kExpertOpsForward + kRoutingOpsForward;
}

double sparse_block_backward_bytes(const ModelConfig& m, int64_t tokens, int64_t tp, bool bf16) {
  const double act = bf16 ? kBf16 : kFp32;
  const auto [h, experts, k, expert, shared] = shape_of(m, tp);
  const double rows = static_cast<double>(tokens) * k;
  return 2 * act * rows * expert + kFp32 * h * expert;
}

}  // namespace loom::plan
