// SwiGLU and rotary embeddings as the model calls them, and the training
// loss's cross-entropy: loom's fused CUDA kernels
// (model/kernels/fused_cuda.cu) where they apply, ATen's ops everywhere
// else.
//
// The fused path is taken when the build has CUDA (LOOM_WITH_CUDA), the
// tensors are CUDA tensors of fp32, bf16 or fp16, and the shapes are the
// model's (see the *_takes_fused_path functions). It is an autograd Function
// whose backward is fused too (one kernel), and it keeps fewer tensors for
// backward than the unfused ops (SwiGLU: gate and up, not also silu(gate)).
// The arithmetic is fp32 in registers with one rounding to the tensor's dtype
// per output, so in bf16 the results differ from the unfused ops' (which
// round after every op) by bf16 rounding; in fp32 they agree to a few ulp.
// Double backward is not supported (loom never differentiates twice).
//
// On the CPU, and in builds without CUDA, SwiGLU and rotary are exactly the
// unfused ops (bit-identical to calling *_unfused). The cross-entropy of fp32
// CPU logits has a path of its own (Note [Cross-entropy on the CPU] in
// fused_ops.cpp): ATen ops over blocks of rows that write no [rows, vocab]
// tensor but the gradient; it agrees with the unfused one to fp32 rounding.
#pragma once

#include <torch/types.h>

namespace loom::kernels {

// silu(gate) * up: the SwiGLU MLP's activation (gate = gate_proj(x), up = up_proj(x)).
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);
torch::Tensor swiglu_unfused(const torch::Tensor& gate, const torch::Tensor& up);
// gate and up are CUDA tensors of one shape and dtype (fp32, bf16, fp16) in a CUDA build.
bool swiglu_takes_fused_path(const torch::Tensor& gate, const torch::Tensor& up);

// x_bhtd * cos + rotate_half(x_bhtd) * sin, rotate_half(x) = [-x2, x1] for
// x = [x1, x2] split in halves of the last dimension; cos_td, sin_td are
// [tokens, head_dim] fp32 (RotaryEmbedding::cos_sin). x may be a transposed
// view (as attention makes it from the projections); the fused result has
// x's strides, like the unfused one.
torch::Tensor rotary(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td);
torch::Tensor rotary_unfused(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td);
// x is a 4-d CUDA tensor (fp32, bf16, fp16) with an even last dimension,
// cos and sin fp32 [x.size(2), x.size(3)] on its device without gradients,
// in a CUDA build.
bool rotary_takes_fused_path(const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td);

// Mean cross-entropy of logits_nv [rows, vocab] against targets_n [rows]
// (int64), in fp32 whatever the logits' dtype: what
// torch::nn::functional::cross_entropy(logits_nv.to(kFloat), targets_n)
// computes (reduction mean, targets equal to -100 ignored, as torch's
// default; loom's data has none).
//
// The fused path reads the logits in their own dtype, once in forward
// (online max and sum of exponentials per row, in fp32) and once in
// backward, and keeps only the logits and one fp32 logsumexp per row for
// backward; the gradient is written in the logits' dtype. The unfused path
// first copies [rows, vocab] to fp32 (twice the bytes of bf16) and keeps
// log-softmax's fp32 output for backward. The loss agrees with the unfused
// one to fp32 summation order, the gradient to one rounding in the logits'
// dtype (both are fp32 arithmetic rounded once to that dtype at the end).
torch::Tensor cross_entropy(const torch::Tensor& logits_nv, const torch::Tensor& targets_n);
torch::Tensor cross_entropy_unfused(const torch::Tensor& logits_nv, const torch::Tensor& targets_n);
// logits is a 2-d CUDA tensor (fp32, bf16, fp16) with at least one column,
// targets int64 [logits.size(0)] on its device, in a CUDA build.
bool cross_entropy_takes_fused_path(const torch::Tensor& logits_nv, const torch::Tensor& targets_n);
// logits is a 2-d fp32 CPU tensor with at least one column, targets int64
// [logits.size(0)] on the CPU. A target outside [0, vocab) that is not -100
// is refused, as torch refuses it.
bool cross_entropy_takes_cpu_path(const torch::Tensor& logits_nv, const torch::Tensor& targets_n);

// A decoder layer's residual add and the RMSNorm that follows it:
// h = residual + branch and y = at::rms_norm(h, weight) with the weight cast
// to h's dtype (RMSNorm::normalize's path for a bf16 or fp16 stream). The
// fused path (fusion.add_rmsnorm) is one kernel forward, reading residual and
// branch once and writing h and y, and one backward, which adds the gradient
// h gets from the residual path into the norm's input gradient in the same
// pass (the unfused graph adds them in a kernel of its own); the weight's
// gradient is summed in fp32 per block of rows. h is the unfused add's bit
// for bit; y and the gradients agree with the unfused ops' to fp32 summation
// order, rounded once to the dtype.
struct AddNorm {
  torch::Tensor h;  // residual + branch: the residual stream after the add
  torch::Tensor y;  // the norm of h
};
AddNorm add_rms_norm(const torch::Tensor& residual, const torch::Tensor& branch, const torch::Tensor& weight,
                     double eps);
AddNorm add_rms_norm_unfused(const torch::Tensor& residual, const torch::Tensor& branch, const torch::Tensor& weight,
                             double eps);
// residual and branch are CUDA tensors of one shape and dtype (bf16 or
// fp16), weight a 1-D tensor of their last dimension (at most 8192) on
// their device, in a CUDA build.
bool add_rms_norm_takes_fused_path(const torch::Tensor& residual, const torch::Tensor& branch,
                                   const torch::Tensor& weight);

// weight_grad += grad_out^T @ input: a linear layer's weight gradient, summed
// over the rows of grad_out [rows, out] and input [rows, in] (one dtype),
// added into weight_grad [out, in] (fp32, defined) with fp32 accumulation and
// no rounding to the inputs' dtype on the way. The fused path is one cuBLAS
// GEMM with an fp32 output and beta = 1 (Note [weight-gradient accumulation]
// in model/compute_weights.h); elsewhere an addmm over fp32 copies of the
// inputs, which gives the same sum to fp32 summation order.
void accumulate_weight_gradient(torch::Tensor& weight_grad, const torch::Tensor& grad_out, const torch::Tensor& input);
// weight_grad is a contiguous fp32 CUDA tensor and grad_out, input bf16 or
// fp16 of one dtype on its device, in a CUDA build.
bool weight_gradient_takes_fused_path(const torch::Tensor& weight_grad, const torch::Tensor& grad_out,
                                      const torch::Tensor& input);

// True when loom was built with its CUDA kernels.
bool fused_kernels_built();

}  // namespace loom::kernels
