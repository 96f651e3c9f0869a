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

// The launchers above, as the CUDA part hands them to the binary.
struct Launchers {
  decltype(&cuda::swiglu_forward) swiglu_forward;
  decltype(&cuda::swiglu_backward) swiglu_backward;
  decltype(&cuda::rotary) rotary;
  decltype(&cuda::cross_entropy_forward) cross_entropy_forward;
  decltype(&cuda::cross_entropy_backward) cross_entropy_backward;
};

// The part's extern "C" function that returns its Launchers.
inline constexpr const char* kLaunchersEntry = "loom_cuda_kernel_launchers";

// The CUDA part's launchers, loading the part on first use (a CUDA tensor
// exists, so it is loaded already). Defined in fused_ops.cpp.
const Launchers& launchers();

}  // namespace loom::kernels::cuda
