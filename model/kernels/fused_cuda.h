// Launchers of loom's CUDA kernels (fused_cuda.cu, in loom's CUDA part:
// Note [the CUDA part] in util/cuda_part.h). Private to
// model/kernels/fused_ops.cpp, which checks every condition below before
// calling them through `launchers()`; this header names no CUDA type so that
// host code includes it.
//
// All tensors are on one CUDA device; the kernels run on that device's
// current stream (ordered with the ATen ops around them, no synchronisation).
// Arithmetic is in fp32 (fp64 for double), results are stored in the
// tensors' dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace loom::kernels::cuda {

// out = silu(gate) * up. gate, up, out: contiguous, same shape and dtype.
void swiglu_forward(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);

// d_gate = grad * up * s * (1 + gate * (1 - s)), d_up = grad * silu(gate),
// s = sigmoid(gate). All contiguous, same shape and dtype.
void swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& d_gate,
                     const at::Tensor& d_up);

// Rotate-half rotary embedding of x [b, h, t, d] (any strides with stride(3)
// == 1; d even) with cos, sin [t, d] fp32 contiguous, into out (same shape
// and dtype as x, its own strides, stride(3) == 1):
//   forward:  out_i = x_i cos_i - x_{i+d/2} sin_i          (i < d/2)
//             out_i = x_i cos_i + x_{i-d/2} sin_i          (i >= d/2)
//   backward (x is the output's gradient, out the input's):
//             out_i = x_i cos_i + x_{i+d/2} sin_{i+d/2}    (i < d/2)
//             out_i = x_i cos_i - x_{i-d/2} sin_{i-d/2}    (i >= d/2)
void rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out, bool backward);

// Cross-entropy of logits x [rows, vocab] (contiguous; fp32, bf16 or fp16)
// against targets t [rows] (int64, contiguous; each in [0, vocab) or
// ignore_index, else a device-side assertion fails, as in ATen's nll_loss).
// One block per row; the logits are read once by each.
//   forward:  lse_i = log sum_j exp(x_ij)                  (fp32 [rows])
//             loss_i = lse_i - x_{i, t_i}, 0 where t_i == ignore_index   (fp32 [rows])
//   backward: d_ij = (exp(x_ij - lse_i) - [j == t_i]) * scale, 0 on ignored rows,
//             scale: an fp32 scalar on the device (the loss's gradient over
//             the rows counted); d: contiguous, the logits' shape and dtype.
void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                           const at::Tensor& loss_rows, const at::Tensor& lse_rows);
void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                            const at::Tensor& lse_rows, const at::Tensor& scale, const at::Tensor& d_logits);

// weight_grad += grad_out^T @ input: the weight gradient of y = x W^T summed
// over the rows, added into weight_grad in its own fp32 by one cuBLAS GEMM
// (bf16 or fp16 inputs, fp32 accumulation and output, beta = 1), on the
// current stream. grad_out [rows, out] and input [rows, in]: contiguous, one
// dtype (bf16 or fp16); weight_grad [out, in]: contiguous fp32.
// (weight_gradient_cuda.cpp; Note [weight-gradient accumulation] in
// model/compute_weights.h.)
void accumulate_weight_gradient(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight_grad);

// A decoder layer's residual add and the RMSNorm after it, over rows of
// `hidden` (the last dimension) of residual and branch (contiguous, one shape
// and dtype; weight [hidden] in that dtype, contiguous):
//   forward:  h = residual + branch (rounded to the dtype, as the unfused
//             add), rstd_i = 1 / sqrt(mean_j h_ij^2 + eps) (fp32 [rows]),
//             y = h * rstd * weight; h and y contiguous like residual.
//   backward: d_h = grad_h + rstd g w - rstd^3 h sum_j(g w h) / hidden with
//             g = grad_y (grad_h may be undefined: 0), and each block's
//             share of the weight's gradient sum_rows g h rstd in fp32 in its
//             row of dw_partial [blocks, hidden] (contiguous; the caller sums
//             the rows). Needs hidden * 4 bytes of shared memory per block
//             (the caller keeps hidden <= 8192).
void add_rms_norm_forward(const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& weight,
                          double eps, const at::Tensor& h, const at::Tensor& y, const at::Tensor& rstd);
void add_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_h, const at::Tensor& h,
                           const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& d_h,
                           const at::Tensor& dw_partial);

// The launchers above, as the CUDA part hands them to the binary.
struct Launchers {
  decltype(&cuda::swiglu_forward) swiglu_forward;
  decltype(&cuda::swiglu_backward) swiglu_backward;
  decltype(&cuda::rotary) rotary;
  decltype(&cuda::cross_entropy_forward) cross_entropy_forward;
  decltype(&cuda::cross_entropy_backward) cross_entropy_backward;
  decltype(&cuda::accumulate_weight_gradient) accumulate_weight_gradient;
  decltype(&cuda::add_rms_norm_forward) add_rms_norm_forward;
  decltype(&cuda::add_rms_norm_backward) add_rms_norm_backward;
};

// The part's extern "C" function that returns its Launchers.
inline constexpr const char* kLaunchersEntry = "loom_cuda_kernel_launchers";

// The CUDA part's launchers, loading the part on first use (a CUDA tensor
// exists, so it is loaded already). Defined in fused_ops.cpp.
const Launchers& launchers();

}  // namespace loom::kernels::cuda
