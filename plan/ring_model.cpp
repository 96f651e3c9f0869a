#include "plan/ring_model.h"

#include <algorithm>

namespace loom::plan {

namespace {

constexpr double kFp32 = 4, kBf16 = 2;

// Note [ring attention costs]: per pair of one head, forward and backward.
constexpr double kForwardFlopsPerPairAndDim = 4, kBackwardFlopsPerPairAndDim = 10;
constexpr double kForwardScorePasses = 8, kBackwardScorePasses = 12;
constexpr double kForwardOpsPerSlice = 15, kBackwardOpsPerSlice = 20;

struct RankDims {
  double batch, heads, kv_heads, head_dim, chunk;  // chunk: c = seq / (2 cp) tokens
};

RankDims dims_of(const ModelConfig& m, const RingShape& shape) {
  return {static_cast<double>(shape.micro_batch), static_cast<double>(m.num_heads) / static_cast<double>(shape.tp),
          static_cast<double>(m.kv_heads()) / static_cast<double>(shape.tp), static_cast<double>(m.head_size()),
          static_cast<double>(shape.seq_len) / static_cast<double>(2 * shape.cp)};
}

}  // namespace

double ring_block_bytes(const ModelConfig& model, const RingShape& shape) {
  const RankDims r = dims_of(model, shape);
  return (shape.bf16 ? kBf16 : kFp32) * 2 * r.batch * r.kv_heads * 2 * r.chunk * r.head_dim;
}

RingMemory ring_attention_memory(const ModelConfig& model, const RingShape& shape) {
  RingMemory memory;
  if (shape.cp <= 1) return memory;
  const RankDims r = dims_of(model, shape);
  const double block = ring_block_bytes(model, shape);
  const double tokens = 2 * r.chunk;
  // The widest slice's scores: c queries over 2c keys, per head, fp32.
  const double scores = kFp32 * r.batch * r.heads * r.chunk * 2 * r.chunk;
  // [batch, heads, 2c, head_dim] in fp32: the output (forward), the output's
  // gradient and dQ (backward), and a slice's expanded keys and values.
  const double per_query = kFp32 * r.batch * r.heads * tokens * r.head_dim;
  const double lse = kFp32 * r.batch * r.heads * tokens;
  const double block_grad = kFp32 * 2 * r.batch * r.kv_heads * tokens * r.head_dim;
  memory.forward = 2 * block + per_query + lse + 2 * per_query + 3 * scores;
  memory.backward = 2 * block + block_grad + 2 * per_query + 2 * per_query + 4 * scores;
  return memory;
}

RingTime ring_attention_time(const ModelConfig& model, const RingShape& shape, const MachineProfile& machine,
                             const LinkProfile& link) {
  RingTime time;
  if (shape.cp <= 1) return time;
  const RankDims r = dims_of(model, shape);
  const double matmul_rate = machine.matmul_flops(false), bandwidth = machine.memory_bytes_per_s;
  const double op = machine.op_overhead_s;
  const double steps = static_cast<double>(shape.cp);
  // Pairs over all heads of the micro-batch: the own block's step, any other's.
  const double head_pairs = r.batch * r.heads * r.chunk * r.chunk;
  const double own = 3 * head_pairs, other = 2 * head_pairs;
  const auto forward = [&](double pairs) {
    return kForwardFlopsPerPairAndDim * r.head_dim * pairs / matmul_rate +
           kForwardScorePasses * kFp32 * pairs / bandwidth + 2 * kForwardOpsPerSlice * op;
  };
  const auto backward = [&](double pairs) {
    return kBackwardFlopsPerPairAndDim * r.head_dim * pairs / matmul_rate +
           kBackwardScorePasses * kFp32 * pairs / bandwidth + 2 * kBackwardOpsPerSlice * op;
  };
  const double transfer = link.latency_s + ring_block_bytes(model, shape) / link.bytes_per_s;
  const double grad_transfer = link.latency_s + kFp32 * 2 * r.batch * r.kv_heads * 2 * r.chunk * r.head_dim / link.bytes_per_s;
  // Steps 0 .. cp - 2 post the next block's transfer before their compute
  // and wait for it after: each takes the longer. The last step sends nothing.
  const auto walk = [&](double own_s, double other_s) {
    return std::max(own_s, transfer) + (steps - 2) * std::max(other_s, transfer) + other_s;
  };
  time.forward_compute = forward(own) + (steps - 1) * forward(other);
  time.forward_exposed_comm = walk(forward(own), forward(other)) - time.forward_compute;
  time.backward_compute = backward(own) + (steps - 1) * backward(other);
  // After every step the gradient accumulator goes on, waited for at once.
  time.backward_exposed_comm =
      walk(backward(own), backward(other)) - time.backward_compute + steps * grad_transfer;
  return time;
}

}  // namespace loom::plan
