// The weight-gradient GEMM that adds into an fp32 gradient (fused_cuda.h,
// accumulate_weight_gradient), in loom's CUDA part. ATen has no public call
// for it: at::cuda::blas::gemm<at::BFloat16, float> is not exported from
// libtorch_cuda, and addmm with out_dtype float first copies its bf16 `self`
// into the output, so it cannot add to what the output holds. cuBLAS can:
// bf16 (or fp16) A and B, an fp32 C read and written with beta = 1, fp32
// accumulation, on torch's handle for the current stream.
#include "model/kernels/fused_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>

#include <cstdint>
#include <limits>

namespace loom::kernels::cuda {

namespace {

int as_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), "accumulate_weight_gradient: ", what, " (",
              value, ") exceeds cuBLAS's int");
  return static_cast<int>(value);
}

}  // namespace

void accumulate_weight_gradient(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight_grad) {
  const int64_t rows = grad_out.size(0), out = grad_out.size(1), in = input.size(1);
  TORCH_CHECK(input.size(0) == rows && weight_grad.size(0) == out && weight_grad.size(1) == in,
              "accumulate_weight_gradient: shapes ", grad_out.sizes(), " and ", input.sizes(), " do not give ",
              weight_grad.sizes());
  TORCH_CHECK(grad_out.is_contiguous() && input.is_contiguous() && weight_grad.is_contiguous(),
              "accumulate_weight_gradient: tensors must be contiguous");
  TORCH_CHECK(weight_grad.scalar_type() == at::kFloat, "accumulate_weight_gradient: the gradient must be fp32");
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() &&
                  (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf),
              "accumulate_weight_gradient: inputs must be both bf16 or both fp16");
  if (rows == 0 || out == 0 || in == 0) return;
  const c10::cuda::CUDAGuard guard(weight_grad.device());
  const cudaDataType_t type = input.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  // Row-major [out, in] is column-major [in, out]: C^T = X^T G, where the
  // row-major X [rows, in] reads as column-major X^T [in, rows] (lda = in) and
  // the row-major G [rows, out] as column-major G^T [out, rows] (ldb = out), of
  // which the product takes the transpose.
  const float alpha = 1.0f, beta = 1.0f;
  const cublasStatus_t status =
      cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_N, CUBLAS_OP_T, as_int(in, "in"),
                   as_int(out, "out"), as_int(rows, "rows"), &alpha, input.data_ptr(), type, as_int(in, "in"),
                   grad_out.data_ptr(), type, as_int(out, "out"), &beta, weight_grad.data_ptr(), CUDA_R_32F,
                   as_int(in, "in"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "accumulate_weight_gradient: cublasGemmEx failed: ",
              cublasGetStatusString(status));
}

}  // namespace loom::kernels::cuda
