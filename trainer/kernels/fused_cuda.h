// Launchers of loom's CUDA kernels (fused_cuda.cu). Private to
// trainer/kernels/fused_ops.cpp, which checks every condition below before
// calling them; this header names no CUDA type so that host code includes it.
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

}  // namespace loom::kernels::cuda
