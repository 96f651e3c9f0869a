// What the sparse decoder layers of a mixture of experts (model/moe.h) cost
// one rank, beside a dense layer's (docs/plan.md, "Mixtures of experts").
//
// Note [plan: mixture of experts]
// A sparse layer holds every expert (total parameters: the router, E
// experts, qwen2_moe's shared expert and its gate) but each token computes
// with k = num_experts_per_tok of them (active parameters). The plan
// counts:
//   - memory, checkpoints and optimizer state: the total parameters (each
//     expert cut by tp like an MLP), every expert on every rank at ep 1;
//   - FLOPs, compute time and MFU: the active ones. Per token and sparse
//     layer the router's [hidden, E] matmul, k experts' three matmuls of
//     moe_intermediate_size (mixtral: intermediate_size) and the shared
//     expert's; flops_per_token's 6 N uses the active N (model/llama.h);
//   - the ops of a sparse layer: each of the E experts runs every call, on
//     zero rows when no token chose it (its three linears and SwiGLU), and
//     the routing (softmax, top-k, sort, gathers, scatter);
//   - saved activations per token: the router's logits (compute dtype) and
//     fp32 probabilities, the top-k weights and three int64 index vectors of
//     k entries, k copies of the token's hidden row gathered for its experts
//     and k expert outputs (hidden each) kept for the weighting, and each
//     of the k experts' gate, silu(gate), up and product; qwen2_moe's shared
//     expert like a dense MLP of its width, its output and its gate;
//   - a sparse layer's backward transient: the experts' gradients over the
//     k x tokens rows, like a dense MLP's of width k x expert width.
// Expert parallelism (parallel.ep) keeps E / ep experts on a rank (their
// parameters, gradients, state and ops) and adds per sparse layer an
// all-to-all of the counts and two of k x tokens x hidden (dispatch and
// combine) in forward, two in backward (plan/time_model.h).
#pragma once

#include <cstdint>

#include "config/model_config.h"
#include "model/llama.h"

namespace loom::plan {

// Decoder layers of `stage` with a mixture of experts (ModelConfig::sparse_layer).
int64_t sparse_layers_of(const ModelConfig& model, const StageSpec& stage);

// Bytes autograd keeps per token for a sparse layer's feed-forward block on
// one tp rank (compute dtype `bf16`), in place of a dense MLP's four tensors
// of intermediate_size.
double sparse_block_saved_bytes_per_token(const ModelConfig& model, int64_t tp, bool bf16);

// Matmul FLOPs of a sparse layer's feed-forward block per token, forward, on one tp rank.
double sparse_block_matmul_flops_per_token(const ModelConfig& model, int64_t tp);

// Elementwise bytes a sparse layer's feed-forward block reads and writes per
// token in forward on one tp rank (SwiGLU over the k experts' rows, the
// router's softmax, the gathers, the weighting and the scatter).
double sparse_block_elementwise_bytes_per_token(const ModelConfig& model, int64_t tp, bool bf16);

// ATen ops of a sparse layer's feed-forward block beyond a dense MLP's,
// forward and backward, on a rank running num_experts / ep experts.
double sparse_block_extra_ops(const ModelConfig& model, bool backward, int64_t ep = 1);

// A sparse layer's backward transient for `tokens` tokens on one tp rank:
// the experts' gradients over their k x tokens rows and one expert's weight gradient.
double sparse_block_backward_bytes(const ModelConfig& model, int64_t tokens, int64_t tp, bool bf16);

}  // namespace loom::plan
