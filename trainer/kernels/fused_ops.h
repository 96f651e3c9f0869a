// SwiGLU and rotary embeddings as the model calls them: loom's fused CUDA
// kernels (trainer/kernels/fused_cuda.cu) where they apply, ATen's ops
// everywhere else.
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
// On the CPU, and in builds without CUDA, these are exactly the unfused ops
// (bit-identical to calling *_unfused).
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

// True when loom was built with its CUDA kernels.
bool fused_kernels_built();

}  // namespace loom::kernels
