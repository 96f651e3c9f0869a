// loom's CUDA kernels: SwiGLU and rotary embeddings, forward and backward,
// each one pass over memory where the unfused ATen ops take three to five;
// cross-entropy over the logits, forward and backward, each one pass over
// the logits in their own dtype where the unfused path first copies them to
// fp32 and runs log-softmax and NLL over the copy.
// See fused_cuda.h for the contracts and fused_ops.h for when they are used.
#include "model/kernels/fused_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace loom::kernels::cuda {

namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; the grid-stride
// loops cover the rest.
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t work) {
  return static_cast<int>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

// Threads an elementwise kernel over n elements needs: one per pack (and the
// tail of fewer than a pack fits in as many), or one per element.
template <typename scalar_t>
int64_t elementwise_work(int64_t n, bool packed) {
  return packed ? n / (16 / sizeof(scalar_t)) + 1 : n;
}

// N elements loaded or stored as one 16-byte access (8 bf16, 4 fp32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// --- SwiGLU ------------------------------------------------------------------

// The accurate exponentials (not __expf), as ATen's silu uses.
__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// silu(g) * u with silu(g) = g / (1 + exp(-g)), ATen's formula.
template <typename acc_t>
__device__ __forceinline__ acc_t swiglu_value(acc_t g, acc_t u) {
  return g / (acc_t(1) + exp_of(-g)) * u;
}

template <typename acc_t>
__device__ __forceinline__ void swiglu_grads(acc_t dy, acc_t g, acc_t u, acc_t& d_gate, acc_t& d_up) {
  const acc_t s = acc_t(1) / (acc_t(1) + exp_of(-g));
  d_gate = dy * u * s * (acc_t(1) + g * (acc_t(1) - s));
  d_up = dy * g * s;
}

// `packed`: every pointer is 16-byte aligned, so whole packs go through
// 16-byte loads; the last n % kPack elements (or all of them) one by one.
template <typename scalar_t>
__global__ void swiglu_forward_kernel(const scalar_t* __restrict__ gate, const scalar_t* __restrict__ up,
                                      scalar_t* __restrict__ out, int64_t n, bool packed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPack = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kPack>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = packed ? n / kPack : 0;
  for (int64_t p = first; p < packs; p += stride) {
    const P g = reinterpret_cast<const P*>(gate)[p];
    const P u = reinterpret_cast<const P*>(up)[p];
    P o;
#pragma unroll
    for (int k = 0; k < kPack; ++k) o.v[k] = swiglu_value<acc_t>(g.v[k], u.v[k]);
    reinterpret_cast<P*>(out)[p] = o;
  }
  for (int64_t i = packs * kPack + first; i < n; i += stride) out[i] = swiglu_value<acc_t>(gate[i], up[i]);
}

template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate,
                                       const scalar_t* __restrict__ up, scalar_t* __restrict__ d_gate,
                                       scalar_t* __restrict__ d_up, int64_t n, bool packed) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPack = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kPack>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = packed ? n / kPack : 0;
  for (int64_t p = first; p < packs; p += stride) {
    const P dy = reinterpret_cast<const P*>(grad)[p];
    const P g = reinterpret_cast<const P*>(gate)[p];
    const P u = reinterpret_cast<const P*>(up)[p];
    P dg, du;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      acc_t a, b;
      swiglu_grads<acc_t>(dy.v[k], g.v[k], u.v[k], a, b);
      dg.v[k] = a;
      du.v[k] = b;
    }
    reinterpret_cast<P*>(d_gate)[p] = dg;
    reinterpret_cast<P*>(d_up)[p] = du;
  }
  for (int64_t i = packs * kPack + first; i < n; i += stride) {
    acc_t a, b;
    swiglu_grads<acc_t>(grad[i], gate[i], up[i], a, b);
    d_gate[i] = a;
    d_up[i] = b;
  }
}

// --- rotary ------------------------------------------------------------------

struct Strides3 {
  int64_t b, h, t;  // elements; the last dimension is contiguous
};

// One thread per pair (i, i + half) of one row (b, h, t): both elements of a
// pair need both inputs, so each is read once.
template <typename scalar_t, bool kBackward>
__global__ void rotary_kernel(const scalar_t* __restrict__ x, const float* __restrict__ cos,
                              const float* __restrict__ sin, scalar_t* __restrict__ out, int64_t heads,
                              int64_t tokens, int64_t half, int64_t pairs, Strides3 xs, Strides3 os) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const int64_t i = p % half;
    const int64_t row = p / half;
    const int64_t t = row % tokens;
    const int64_t bh = row / tokens;
    const int64_t h = bh % heads, b = bh / heads;
    const scalar_t* x_row = x + b * xs.b + h * xs.h + t * xs.t;
    scalar_t* out_row = out + b * os.b + h * os.h + t * os.t;
    const float* cos_row = cos + t * 2 * half;
    const float* sin_row = sin + t * 2 * half;
    const acc_t lo = x_row[i], hi = x_row[i + half];
    const acc_t cos_lo = cos_row[i], cos_hi = cos_row[i + half];
    const acc_t sin_lo = sin_row[i], sin_hi = sin_row[i + half];
    if constexpr (!kBackward) {
      // out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x_hi, x_lo].
      out_row[i] = lo * cos_lo - hi * sin_lo;
      out_row[i + half] = hi * cos_hi + lo * sin_hi;
    } else {
      // The transpose: x_lo reached out_hi through +sin_hi, x_hi reached
      // out_lo through -sin_lo.
      out_row[i] = lo * cos_lo + hi * sin_hi;
      out_row[i + half] = hi * cos_hi - lo * sin_lo;
    }
  }
}

Strides3 outer_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename scalar_t, bool kBackward>
void launch_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                   int64_t pairs, cudaStream_t stream) {
  rotary_kernel<scalar_t, kBackward><<<blocks_for(pairs), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
      out.mutable_data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3) / 2, pairs, outer_strides(x),
      outer_strides(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// --- cross-entropy ---------------------------------------------------------------

// A running (max, sum of exp(x - max)) over part of a row: the online
// softmax normaliser (Milakov & Gimelshein, "Online normalizer calculation
// for softmax", 2018), so the row is read once, not once for the max and
// again for the sum.
struct MaxSum {
  float max;
  float sum;
};

// exp(x - m) for m >= x, with exp(-inf - m) = 0 also where m is -inf (a row
// of -inf so far), which x - m = NaN would get wrong. NaN in x still makes NaN.
__device__ __forceinline__ float exp_below(float x, float m) { return x == -INFINITY ? 0.f : expf(x - m); }

// Adds N values: one rescale of the sum for the lot.
template <int N>
__device__ __forceinline__ void add_values(MaxSum& state, const float (&v)[N]) {
  float m = state.max;
#pragma unroll
  for (int k = 0; k < N; ++k) m = fmaxf(m, v[k]);
  float sum = state.sum * exp_below(state.max, m);
#pragma unroll
  for (int k = 0; k < N; ++k) sum += exp_below(v[k], m);
  state = {m, sum};
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * exp_below(a.max, m) + b.sum * exp_below(b.max, m)};
}

// The block's combined state, in thread 0. blockDim.x is kThreads, a
// multiple of the warp size.
__device__ MaxSum block_combine(MaxSum state) {
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ MaxSum warps[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2)
    state = combine(state, {__shfl_xor_sync(kAll, state.max, offset), __shfl_xor_sync(kAll, state.sum, offset)});
  if (lane == 0) warps[warp] = state;
  __syncthreads();
  if (warp != 0) return state;
  state = lane < kThreads / 32 ? warps[lane] : MaxSum{-INFINITY, 0.f};
  for (int offset = 16; offset > 0; offset /= 2)
    state = combine(state, {__shfl_xor_sync(kAll, state.max, offset), __shfl_xor_sync(kAll, state.sum, offset)});
  return state;
}

// Elements of a row before its first 16-byte boundary, read one by one; the
// rest goes in 16-byte packs but for a tail of fewer than a pack. A row
// starts on a boundary only when vocab * sizeof(scalar_t) is a multiple of
// 16 (128256 and 49152 bf16 are; 97 is not). `packed` false: all one by one.
template <typename scalar_t>
__device__ __forceinline__ int64_t row_head(const scalar_t* row, int64_t vocab, bool packed) {
  constexpr int64_t kPack = 16 / sizeof(scalar_t);
  if (!packed) return vocab;
  const int64_t past = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(scalar_t);
  const int64_t head = past == 0 ? 0 : kPack - past;
  return head < vocab ? head : vocab;
}

// One block per row: the row's (max, sum) in one pass, then thread 0 writes
// logsumexp and the row's loss.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                                 float* __restrict__ loss_rows, float* __restrict__ lse_rows, int64_t vocab,
                                 int64_t ignore_index) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kPack>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  const int64_t head = row_head(x, vocab, /*packed=*/true);
  const int64_t packs = (vocab - head) / kPack;
  MaxSum state{-INFINITY, 0.f};
  for (int64_t j = threadIdx.x; j < head; j += kThreads) add_values<1>(state, {static_cast<float>(x[j])});
  const P* body = reinterpret_cast<const P*>(x + head);
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P pack = body[p];
    float v[kPack];
#pragma unroll
    for (int k = 0; k < kPack; ++k) v[k] = static_cast<float>(pack.v[k]);
    add_values(state, v);
  }
  for (int64_t j = head + packs * kPack + threadIdx.x; j < vocab; j += kThreads)
    add_values<1>(state, {static_cast<float>(x[j])});
  state = block_combine(state);
  if (threadIdx.x != 0) return;
  const float lse = state.max + logf(state.sum);
  lse_rows[row] = lse;
  const int64_t target = targets[row];
  if (target == ignore_index) {
    loss_rows[row] = 0.f;
    return;
  }
  CUDA_KERNEL_ASSERT(target >= 0 && target < vocab);
  loss_rows[row] = lse - static_cast<float>(x[target]);
}

__device__ __forceinline__ float cross_entropy_grad(float x, float lse, bool is_target, float scale) {
  return (exp_below(x, lse) - (is_target ? 1.f : 0.f)) * scale;
}

// One block per row: d = (softmax - onehot) * scale, one pass reading the
// logits and writing d. `packed`: logits and d are alike modulo 16 bytes,
// so a row's head is the same count for both.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ targets,
                                  const float* __restrict__ lse_rows, const float* __restrict__ scale_ptr,
                                  scalar_t* __restrict__ d_logits, int64_t vocab, int64_t ignore_index,
                                  bool packed) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kPack>;
  const int64_t row = blockIdx.x;
  const scalar_t* x = logits + row * vocab;
  scalar_t* d = d_logits + row * vocab;
  const int64_t target = targets[row];
  // An ignored row's gradient is 0: scale 0 and no target (-1 matches no
  // column) give exactly that through the same code.
  const bool ignored = target == ignore_index;
  const int64_t column = ignored ? -1 : target;
  const float scale = ignored ? 0.f : *scale_ptr;
  const float lse = lse_rows[row];
  const int64_t head = row_head(x, vocab, packed);
  const int64_t packs = (vocab - head) / kPack;
  for (int64_t j = threadIdx.x; j < head; j += kThreads)
    d[j] = cross_entropy_grad(static_cast<float>(x[j]), lse, j == column, scale);
  const P* x_body = reinterpret_cast<const P*>(x + head);
  P* d_body = reinterpret_cast<P*>(d + head);
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const P pack = x_body[p];
    const int64_t first = head + p * kPack;
    P out;
#pragma unroll
    for (int k = 0; k < kPack; ++k)
      out.v[k] = cross_entropy_grad(static_cast<float>(pack.v[k]), lse, first + k == column, scale);
    d_body[p] = out;
  }
  for (int64_t j = head + packs * kPack + threadIdx.x; j < vocab; j += kThreads)
    d[j] = cross_entropy_grad(static_cast<float>(x[j]), lse, j == column, scale);
}

// --- residual add + RMSNorm ---------------------------------------------------

// The sum of v over the block, in every thread. blockDim.x is kThreads.
__device__ float block_sum(float v) {
  constexpr unsigned kAll = 0xffffffffu;
  __shared__ float warps[kThreads / 32];
  __shared__ float total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kAll, v, offset);
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warps[lane] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kAll, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  const float sum = total;
  __syncthreads();  // before a next call writes warps and total again
  return sum;
}

// One block per row. A thread takes units of kVec elements (one 16-byte pack,
// or one element when the rows are not aligned for packs): h = residual +
// branch rounded to the dtype as the unfused add rounds it, the row's
// sum of h^2 in fp32, then y = h * rstd * w.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    add_rms_norm_forward_kernel(const scalar_t* __restrict__ residual, const scalar_t* __restrict__ branch,
                                const scalar_t* __restrict__ weight, scalar_t* __restrict__ h_out,
                                scalar_t* __restrict__ y_out, float* __restrict__ rstd_out, int64_t hidden,
                                float eps) {
  using V = Pack<scalar_t, kVec>;
  const int64_t row = blockIdx.x, units = hidden / kVec;
  const V* r = reinterpret_cast<const V*>(residual + row * hidden);
  const V* b = reinterpret_cast<const V*>(branch + row * hidden);
  const V* w = reinterpret_cast<const V*>(weight);
  V* h = reinterpret_cast<V*>(h_out + row * hidden);
  V* y = reinterpret_cast<V*>(y_out + row * hidden);
  float squares = 0.f;
  for (int64_t u = threadIdx.x; u < units; u += kThreads) {
    const V rv = r[u], bv = b[u];
    V hv;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      hv.v[k] = static_cast<scalar_t>(static_cast<float>(rv.v[k]) + static_cast<float>(bv.v[k]));
      const float x = static_cast<float>(hv.v[k]);
      squares += x * x;
    }
    h[u] = hv;
  }
  const float rstd = rsqrtf(block_sum(squares) / static_cast<float>(hidden) + eps);
  if (threadIdx.x == 0) rstd_out[row] = rstd;
  for (int64_t u = threadIdx.x; u < units; u += kThreads) {
    const V hv = h[u], wv = w[u];  // this thread's own writes above
    V yv;
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      yv.v[k] = static_cast<scalar_t>(static_cast<float>(hv.v[k]) * rstd * static_cast<float>(wv.v[k]));
    y[u] = yv;
  }
}

// Rows blockIdx.x, blockIdx.x + gridDim.x, ...: with r = rstd and
// s = sum_j gy_j w_j h_j over the row,
//   dh_j = gh_j + r gy_j w_j - r^3 h_j s / hidden
// (gh, the gradient h gets from the residual path, may be absent: 0), and
// the weight's gradient sum_rows gy_j h_j r, this block's rows' share in
// fp32 in shared memory (a thread owns its columns: no atomics), written to
// row blockIdx.x of dw_partial [gridDim.x, hidden] at the end.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    add_rms_norm_backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ grad_h,
                                 const scalar_t* __restrict__ h_in, const scalar_t* __restrict__ weight,
                                 const float* __restrict__ rstd_in, scalar_t* __restrict__ d_h,
                                 float* __restrict__ dw_partial, int64_t rows, int64_t hidden) {
  using V = Pack<scalar_t, kVec>;
  extern __shared__ float dw[];  // hidden floats
  const int64_t units = hidden / kVec;
  const V* w = reinterpret_cast<const V*>(weight);
  for (int64_t u = threadIdx.x; u < units; u += kThreads) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dw[u * kVec + k] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const V* gy = reinterpret_cast<const V*>(grad_y + row * hidden);
    const V* h = reinterpret_cast<const V*>(h_in + row * hidden);
    const V* gh = grad_h != nullptr ? reinterpret_cast<const V*>(grad_h + row * hidden) : nullptr;
    V* d = reinterpret_cast<V*>(d_h + row * hidden);
    const float r = rstd_in[row];
    float s = 0.f;
    for (int64_t u = threadIdx.x; u < units; u += kThreads) {
      const V gv = gy[u], wv = w[u], hv = h[u];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        s += static_cast<float>(gv.v[k]) * static_cast<float>(wv.v[k]) * static_cast<float>(hv.v[k]);
    }
    const float c = r * r * r * block_sum(s) / static_cast<float>(hidden);
    for (int64_t u = threadIdx.x; u < units; u += kThreads) {
      const V gv = gy[u], wv = w[u], hv = h[u];
      float from_residual[kVec];
      if (gh != nullptr) {
        const V ghv = gh[u];
#pragma unroll
        for (int k = 0; k < kVec; ++k) from_residual[k] = static_cast<float>(ghv.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) from_residual[k] = 0.f;
      }
      V dv;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float g = static_cast<float>(gv.v[k]), x = static_cast<float>(hv.v[k]);
        dv.v[k] = static_cast<scalar_t>(from_residual[k] + r * g * static_cast<float>(wv.v[k]) - c * x);
        dw[u * kVec + k] += g * x * r;
      }
      d[u] = dv;
    }
  }
  for (int64_t u = threadIdx.x; u < units; u += kThreads) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) dw_partial[blockIdx.x * hidden + u * kVec + k] = dw[u * kVec + k];
  }
}

// fp32, bf16 and fp16 only: the arithmetic is fp32 whatever the dtype, which
// would be a silent loss for double.
#define LOOM_DISPATCH_FP32_BF16_FP16(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

}  // namespace

void swiglu_forward(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  const int64_t n = gate.numel();
  if (n == 0) return;
  const bool packed = aligned16(gate.data_ptr()) && aligned16(up.data_ptr()) && aligned16(out.data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "loom_swiglu_forward", [&] {
    swiglu_forward_kernel<scalar_t><<<blocks_for(elementwise_work<scalar_t>(n, packed)), kThreads, 0, stream>>>(
        gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, packed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& d_gate,
                     const at::Tensor& d_up) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  const int64_t n = gate.numel();
  if (n == 0) return;
  const bool packed = aligned16(grad.data_ptr()) && aligned16(gate.data_ptr()) && aligned16(up.data_ptr()) &&
                      aligned16(d_gate.data_ptr()) && aligned16(d_up.data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "loom_swiglu_backward", [&] {
    swiglu_backward_kernel<scalar_t><<<blocks_for(elementwise_work<scalar_t>(n, packed)), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
        d_gate.mutable_data_ptr<scalar_t>(), d_up.mutable_data_ptr<scalar_t>(), n, packed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out, bool backward) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t pairs = x.size(0) * x.size(1) * x.size(2) * (x.size(3) / 2);
  if (pairs == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "loom_rotary", [&] {
    if (backward) {
      launch_rotary<scalar_t, true>(x, cos, sin, out, pairs, stream);
    } else {
      launch_rotary<scalar_t, false>(x, cos, sin, out, pairs, stream);
    }
  });
}

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                           const at::Tensor& loss_rows, const at::Tensor& lse_rows) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LOOM_DISPATCH_FP32_BF16_FP16(logits.scalar_type(), "loom_cross_entropy_forward", [&] {
    cross_entropy_forward_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), loss_rows.mutable_data_ptr<float>(),
        lse_rows.mutable_data_ptr<float>(), vocab, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                            const at::Tensor& lse_rows, const at::Tensor& scale, const at::Tensor& d_logits) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const bool packed =
      reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == reinterpret_cast<uintptr_t>(d_logits.data_ptr()) % 16;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LOOM_DISPATCH_FP32_BF16_FP16(logits.scalar_type(), "loom_cross_entropy_backward", [&] {
    cross_entropy_backward_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), lse_rows.const_data_ptr<float>(),
        scale.const_data_ptr<float>(), d_logits.mutable_data_ptr<scalar_t>(), vocab, ignore_index, packed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

// Whole 16-byte packs when every row of every tensor starts on a 16-byte
// boundary, else element by element.
template <typename scalar_t>
bool rows_packed(int64_t hidden, std::initializer_list<const at::Tensor*> tensors) {
  if (hidden % (16 / sizeof(scalar_t)) != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && !aligned16(t->data_ptr())) return false;
  }
  return true;
}

}  // namespace

void add_rms_norm_forward(const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& weight,
                          double eps, const at::Tensor& h, const at::Tensor& y, const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard device_guard(residual.device());
  const int64_t hidden = residual.size(-1), rows = hidden == 0 ? 0 : residual.numel() / hidden;
  if (rows == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LOOM_DISPATCH_FP32_BF16_FP16(residual.scalar_type(), "loom_add_rms_norm_forward", [&] {
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      add_rms_norm_forward_kernel<scalar_t, kVec><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          residual.const_data_ptr<scalar_t>(), branch.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
          h.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>(), hidden,
          static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows_packed<scalar_t>(hidden, {&residual, &branch, &weight, &h, &y})) {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

void add_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& grad_h, const at::Tensor& h,
                           const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& d_h,
                           const at::Tensor& dw_partial) {
  const c10::cuda::CUDAGuard device_guard(h.device());
  const int64_t hidden = h.size(-1), rows = hidden == 0 ? 0 : h.numel() / hidden;
  const int64_t blocks = dw_partial.size(0);
  if (rows == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = static_cast<size_t>(hidden) * sizeof(float);
  LOOM_DISPATCH_FP32_BF16_FP16(h.scalar_type(), "loom_add_rms_norm_backward", [&] {
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      add_rms_norm_backward_kernel<scalar_t, kVec><<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), grad_h.defined() ? grad_h.const_data_ptr<scalar_t>() : nullptr,
          h.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), rstd.const_data_ptr<float>(),
          d_h.mutable_data_ptr<scalar_t>(), dw_partial.mutable_data_ptr<float>(), rows, hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows_packed<scalar_t>(hidden, {&grad_y, &grad_h, &h, &weight, &d_h})) {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace loom::kernels::cuda

// The binary reaches the launchers through this table (fused_cuda.h).
extern "C" __attribute__((visibility("default"))) const void* loom_cuda_kernel_launchers() {
  using namespace loom::kernels::cuda;
  static const Launchers table{&swiglu_forward, &swiglu_backward, &rotary, &cross_entropy_forward,
                               &cross_entropy_backward, &accumulate_weight_gradient, &add_rms_norm_forward,
                               &add_rms_norm_backward};
  return &table;
}
