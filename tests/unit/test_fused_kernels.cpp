// loom's fused SwiGLU, rotary, cross-entropy and residual add + RMSNorm
// kernels (model/kernels/fused_ops.h) against the unfused ATen ops they
// replace, forward and backward.
//
// On a GPU: fp32 agrees with the unfused ops to a few ulp; bf16 and fp16 agree
// with an fp32 reference of the same inputs to their rounding; the shapes are
// the model's and odd ones (vocabularies of 97 to 128256 columns), the inputs
// contiguous and the transposed views attention makes; the whole model
// (its loss through the fused cross-entropy) trains the same on the GPU as on
// the CPU.
// Without a GPU those tests are skipped, and the CPU tests check that the
// dispatch takes the unfused path (bit for bit) and that the backward
// formulas the kernels implement are autograd's.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "model/kernels/fused_ops.h"
#include "model/llama.h"
#include "model/rotary.h"
#include "parallel/cuda_runtime.h"

namespace loom {
namespace {

#define LOOM_SKIP_WITHOUT_GPU() \
  if (loom::cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible (the CPU tests cover the unfused path)"

// |actual - expected| <= atol + rtol * |expected| everywhere.
void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, double rtol, double atol,
                  const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  if (expected.numel() == 0) return;
  auto a = actual.detach().to(torch::kCPU, torch::kDouble);
  auto e = expected.detach().to(torch::kCPU, torch::kDouble);
  const double excess = ((a - e).abs() - (atol + rtol * e.abs())).max().item<double>();
  EXPECT_LE(excess, 0.0) << what << ": max |diff| " << (a - e).abs().max().item<double>() << " (rtol " << rtol
                         << ", atol " << atol << ")";
}

void expect_identical(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  EXPECT_TRUE(torch::equal(actual, expected)) << what;
}

// Tolerances of a fused result against the fp32 unfused reference: fp32 to
// a few ulp (the kernels fuse multiply-adds and the unfused ops round every
// step), bf16/fp16 to their rounding of one fp32 result.
struct Tolerance {
  double rtol, atol;
};
Tolerance tolerance_of(torch::ScalarType dtype) {
  if (dtype == torch::kFloat) return {1e-5, 1e-6};
  if (dtype == torch::kHalf) return {2e-3, 1e-3};
  return {1e-2, 1e-2};  // bf16: 8 bits of mantissa
}

std::string name_of(torch::ScalarType dtype) { return c10::toString(dtype); }

// --- SwiGLU --------------------------------------------------------------------

struct SwiGluResult {
  torch::Tensor out, d_gate, d_up;
};

// Runs `op` on leaf copies of gate and up, backward with `grad`.
template <typename Op>
SwiGluResult run_swiglu(Op op, const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& grad) {
  auto g = gate.detach().clone().requires_grad_(true);
  auto u = up.detach().clone().requires_grad_(true);
  auto out = op(g, u);
  out.backward(grad);
  return {out.detach(), g.grad(), u.grad()};
}

const std::vector<std::vector<int64_t>> kSwiGluShapes = {
    {7, 1000},      // 7 tokens, intermediate 1000: not a multiple of any pack
    {2, 7, 384},    // tiny.yaml's MLP
    {3, 5, 1376},
    {4097},         // one past a block multiple
    {1, 1},
    {0, 5},         // nothing to do
};

// A CUDA build calls its kernels: the library that holds fused_ops.cpp was
// compiled with LOOM_WITH_CUDA (once it was not, and every GPU run took the
// unfused ops without a word).
TEST(FusedKernels, ACudaBuildHasItsKernelsAndACpuBuildDoesNot) {
  EXPECT_EQ(kernels::fused_kernels_built(), LOOM_TEST_CUDA_BUILD == 1);
}

TEST(FusedSwiGlu, CpuTensorsTakeTheUnfusedPathBitForBit) {
  torch::manual_seed(1);
  auto gate = torch::randn({2, 7, 1000}), up = torch::randn({2, 7, 1000}), grad = torch::randn({2, 7, 1000});
  EXPECT_FALSE(kernels::swiglu_takes_fused_path(gate, up));
  auto dispatched = run_swiglu(kernels::swiglu, gate, up, grad);
  auto unfused = run_swiglu([](auto& g, auto& u) { return at::silu(g) * u; }, gate, up, grad);
  expect_identical(dispatched.out, unfused.out, "forward");
  expect_identical(dispatched.d_gate, unfused.d_gate, "d_gate");
  expect_identical(dispatched.d_up, unfused.d_up, "d_up");
}

TEST(FusedSwiGlu, BackwardFormulaOfTheKernelIsAutogradsOfTheUnfusedOps) {
  torch::manual_seed(2);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto gate = torch::randn({5, 33}, opts) * 4, up = torch::randn({5, 33}, opts), grad = torch::randn({5, 33}, opts);
  auto autograd = run_swiglu(kernels::swiglu_unfused, gate, up, grad);
  // What swiglu_backward computes (fused_cuda.h).
  auto s = torch::sigmoid(gate);
  expect_close(grad * up * s * (1 + gate * (1 - s)), autograd.d_gate, 1e-13, 1e-14, "d_gate");
  expect_close(grad * gate * s, autograd.d_up, 1e-13, 1e-14, "d_up");
}

TEST(FusedSwiGlu, MatchesTheUnfusedOpsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(kernels::fused_kernels_built()) << "a GPU is visible but loom was built without its CUDA kernels";
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (const auto& shape : kSwiGluShapes) {
      const std::string what = name_of(dtype) + " " + c10::str(at::IntArrayRef(shape));
      auto cuda = torch::TensorOptions().device(torch::kCUDA);
      auto gate = (torch::randn(shape, cuda) * 3).to(dtype), up = torch::randn(shape, cuda).to(dtype);
      auto grad = torch::randn(shape, cuda).to(dtype);
      ASSERT_TRUE(kernels::swiglu_takes_fused_path(gate, up)) << what;
      auto fused = run_swiglu(kernels::swiglu, gate, up, grad);
      EXPECT_EQ(fused.out.scalar_type(), dtype) << what;
      EXPECT_EQ(fused.d_gate.scalar_type(), dtype) << what;
      // The reference: the unfused ops in fp32 on the same (rounded) inputs.
      auto reference = run_swiglu(kernels::swiglu_unfused, gate.to(torch::kFloat), up.to(torch::kFloat),
                                  grad.to(torch::kFloat));
      const Tolerance tol = tolerance_of(dtype);
      expect_close(fused.out, reference.out, tol.rtol, tol.atol, what + " forward");
      expect_close(fused.d_gate, reference.d_gate, tol.rtol, tol.atol, what + " d_gate");
      expect_close(fused.d_up, reference.d_up, tol.rtol, tol.atol, what + " d_up");
    }
  }
}

TEST(FusedSwiGlu, NonContiguousAndMisalignedInputsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  torch::manual_seed(4);
  auto cuda = torch::TensorOptions().device(torch::kCUDA);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    // A transposed view, and a view one element into its storage (not 16-byte aligned).
    auto gate_t = torch::randn({1000, 7}, cuda).to(dtype).t(), up_t = torch::randn({1000, 7}, cuda).to(dtype).t();
    auto gate_o = torch::randn({7 * 1000 + 1}, cuda).to(dtype).narrow(0, 1, 7 * 1000).view({7, 1000});
    auto up_o = torch::randn({7 * 1000 + 1}, cuda).to(dtype).narrow(0, 1, 7 * 1000).view({7, 1000});
    for (auto [gate, up, what] : {std::tuple{gate_t, up_t, "transposed"}, std::tuple{gate_o, up_o, "offset"}}) {
      auto grad = torch::randn(gate.sizes(), cuda).to(dtype);
      auto fused = run_swiglu(kernels::swiglu, gate, up, grad);
      auto reference = run_swiglu(kernels::swiglu_unfused, gate.to(torch::kFloat), up.to(torch::kFloat),
                                  grad.to(torch::kFloat));
      const Tolerance tol = tolerance_of(dtype);
      const std::string label = name_of(dtype) + " " + what;
      expect_close(fused.out, reference.out, tol.rtol, tol.atol, label + " forward");
      expect_close(fused.d_gate, reference.d_gate, tol.rtol, tol.atol, label + " d_gate");
      expect_close(fused.d_up, reference.d_up, tol.rtol, tol.atol, label + " d_up");
    }
  }
}

// --- rotary ----------------------------------------------------------------------

struct RotaryShape {
  int64_t batch, heads, tokens, head_dim, start;
};
const std::vector<RotaryShape> kRotaryShapes = {
    {2, 4, 7, 64, 0},     // 7 tokens, head_dim 64
    {1, 3, 7, 128, 0},    // head_dim 128, an odd head count
    {3, 8, 33, 64, 5},    // positions from 5
    {1, 2, 1, 128, 40},   // one decoded token
    {2, 4, 128, 16, 0},   // tiny.yaml's heads
};

// A tensor's strides with those of size-1 dimensions set to 0: two tensors
// with equal results lay out their elements alike.
std::vector<int64_t> layout_of(const torch::Tensor& t) {
  std::vector<int64_t> strides(t.strides().begin(), t.strides().end());
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) == 1) strides[d] = 0;
  return strides;
}

ModelConfig rotary_config(int64_t head_dim) {
  ModelConfig m;
  m.hidden_size = head_dim * 4;
  m.num_heads = 4;
  m.head_dim = head_dim;
  m.rope_theta = 10000.0;
  return m;
}

struct RotaryResult {
  torch::Tensor out, dx;
};

// As attention calls it: x_bhtd is the [b, t, h*d] projection output viewed
// as [b, t, h, d] and transposed (a non-contiguous view); dx is the
// projection output's gradient.
template <typename Op>
RotaryResult run_rotary(Op op, const torch::Tensor& proj_btf, int64_t head_dim, const torch::Tensor& cos,
                        const torch::Tensor& sin, const torch::Tensor& grad_bhtd) {
  auto proj = proj_btf.detach().clone().requires_grad_(true);
  const int64_t batch = proj.size(0), tokens = proj.size(1);
  auto x = proj.view({batch, tokens, -1, head_dim}).transpose(1, 2);
  auto out = op(x, cos, sin);
  out.backward(grad_bhtd);
  return {out.detach(), proj.grad()};
}

TEST(FusedRotary, CpuTensorsTakeTheUnfusedPathBitForBit) {
  torch::manual_seed(5);
  const RotaryShape s{2, 4, 7, 64, 3};
  auto [cos, sin] = RotaryEmbedding(rotary_config(s.head_dim)).cos_sin(s.start, s.tokens, torch::kCPU);
  auto proj = torch::randn({s.batch, s.tokens, s.heads * s.head_dim});
  auto grad = torch::randn({s.batch, s.heads, s.tokens, s.head_dim});
  auto x = proj.view({s.batch, s.tokens, s.heads, s.head_dim}).transpose(1, 2);
  EXPECT_FALSE(kernels::rotary_takes_fused_path(x, cos, sin));
  // The code RotaryEmbedding::apply ran before the kernels existed.
  auto before = [](const torch::Tensor& x_bhtd, const torch::Tensor& cos_td, const torch::Tensor& sin_td) {
    const int64_t half = x_bhtd.size(-1) / 2;
    auto rotated = at::cat({-x_bhtd.narrow(-1, half, half), x_bhtd.narrow(-1, 0, half)}, -1);
    return x_bhtd * cos_td.to(x_bhtd.scalar_type()) + rotated * sin_td.to(x_bhtd.scalar_type());
  };
  auto dispatched = run_rotary(RotaryEmbedding::apply, proj, s.head_dim, cos, sin, grad);
  auto unfused = run_rotary(before, proj, s.head_dim, cos, sin, grad);
  expect_identical(dispatched.out, unfused.out, "forward");
  expect_identical(dispatched.dx, unfused.dx, "dx");
}

TEST(FusedRotary, BackwardFormulaOfTheKernelIsAutogradsOfTheUnfusedOps) {
  torch::manual_seed(6);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const int64_t half = 8;
  // Arbitrary tables, not rotary's (whose halves repeat), so that a formula
  // mixing up sin_i and sin_{i+half} is caught.
  auto cos = torch::randn({5, 2 * half}, opts), sin = torch::randn({5, 2 * half}, opts);
  auto proj = torch::randn({2, 5, 3 * 2 * half}, opts);
  auto grad = torch::randn({2, 3, 5, 2 * half}, opts);
  auto autograd = run_rotary(kernels::rotary_unfused, proj, 2 * half, cos, sin, grad);
  // What rotary(..., backward=true) computes (fused_cuda.h):
  //   dx_i = g_i cos_i + g_{i+h} sin_{i+h} (i < h), g_i cos_i - g_{i-h} sin_{i-h} (i >= h).
  auto g_sin = grad * sin;
  auto dx_bhtd = grad * cos + at::cat({g_sin.narrow(-1, half, half), -g_sin.narrow(-1, 0, half)}, -1);
  auto dx_btf = dx_bhtd.transpose(1, 2).reshape({2, 5, -1});
  expect_close(dx_btf, autograd.dx, 1e-13, 1e-14, "dx");
}

TEST(FusedRotary, MatchesTheUnfusedOpsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(kernels::fused_kernels_built()) << "a GPU is visible but loom was built without its CUDA kernels";
  torch::manual_seed(7);
  auto cuda = torch::TensorOptions().device(torch::kCUDA);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (const RotaryShape& s : kRotaryShapes) {
      const std::string what = name_of(dtype) + " b" + std::to_string(s.batch) + " h" + std::to_string(s.heads) +
                               " t" + std::to_string(s.tokens) + " d" + std::to_string(s.head_dim) + " from " +
                               std::to_string(s.start);
      auto [cos, sin] = RotaryEmbedding(rotary_config(s.head_dim)).cos_sin(s.start, s.tokens, torch::kCUDA);
      auto proj = torch::randn({s.batch, s.tokens, s.heads * s.head_dim}, cuda).to(dtype);
      auto grad = torch::randn({s.batch, s.heads, s.tokens, s.head_dim}, cuda).to(dtype);
      auto x = proj.view({s.batch, s.tokens, s.heads, s.head_dim}).transpose(1, 2);
      ASSERT_TRUE(kernels::rotary_takes_fused_path(x, cos, sin)) << what;
      auto fused = run_rotary(kernels::rotary, proj, s.head_dim, cos, sin, grad);
      auto unfused = run_rotary(kernels::rotary_unfused, proj, s.head_dim, cos, sin, grad);
      // The output keeps the layout the unfused ops give SDPA (a size-1
      // dimension's stride is never used, so it may differ).
      EXPECT_EQ(layout_of(fused.out), layout_of(unfused.out)) << what;
      EXPECT_EQ(fused.out.scalar_type(), dtype) << what;
      auto reference = run_rotary(kernels::rotary_unfused, proj.to(torch::kFloat), s.head_dim, cos, sin,
                                  grad.to(torch::kFloat));
      const Tolerance tol = tolerance_of(dtype);
      expect_close(fused.out, reference.out, tol.rtol, tol.atol, what + " forward");
      expect_close(fused.dx, reference.dx, tol.rtol, tol.atol, what + " dx");
    }
  }
}

TEST(FusedRotary, ContiguousAndSlicedInputsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  torch::manual_seed(8);
  auto cuda = torch::TensorOptions().device(torch::kCUDA);
  auto [cos, sin] = RotaryEmbedding(rotary_config(64)).cos_sin(0, 9, torch::kCUDA);
  auto grad = torch::randn({2, 3, 9, 64}, cuda);
  // A contiguous [b, h, t, d], and the first half of a wider last dimension
  // (rows with a gap between them: not dense, so the output is contiguous).
  for (const int64_t width : {64, 128}) {
    const std::string what = width == 64 ? "contiguous" : "sliced";
    auto source = torch::randn({2, 3, 9, width}, cuda);
    auto wide = source.clone().requires_grad_(true), wide_ref = source.clone().requires_grad_(true);
    auto x = wide.narrow(-1, 0, 64), x_ref = wide_ref.narrow(-1, 0, 64);
    ASSERT_TRUE(kernels::rotary_takes_fused_path(x, cos, sin)) << what;
    auto out = kernels::rotary(x, cos, sin);
    out.backward(grad);
    auto ref = kernels::rotary_unfused(x_ref, cos, sin);
    ref.backward(grad);
    expect_close(out, ref, 1e-5, 1e-6, what + " forward");
    expect_close(wide.grad(), wide_ref.grad(), 1e-5, 1e-6, what + " dx");
  }
}

// --- cross-entropy -----------------------------------------------------------------

struct CrossEntropyResult {
  torch::Tensor loss, d_logits;
};

// Runs `op` on a leaf copy of the logits, backward with the scalar `grad`.
template <typename Op>
CrossEntropyResult run_cross_entropy(Op op, const torch::Tensor& logits, const torch::Tensor& targets,
                                     double grad = 0.37) {
  auto x = logits.detach().clone().requires_grad_(true);
  auto loss = op(x, targets);
  loss.backward(torch::full({}, grad, loss.options()));
  return {loss.detach(), x.grad()};
}

// What token_loss computed before the fused kernel existed.
torch::Tensor cross_entropy_before(const torch::Tensor& logits_nv, const torch::Tensor& targets_n) {
  return torch::nn::functional::cross_entropy(logits_nv.to(torch::kFloat), targets_n);
}

TEST(FusedCrossEntropy, CpuTensorsOtherThanFp32TakeTheUnfusedPathBitForBit) {
  torch::manual_seed(10);
  for (auto dtype : {torch::kBFloat16, torch::kHalf, torch::kDouble}) {
    auto logits = (torch::randn({13, 97}) * 3).to(dtype);
    auto targets = torch::randint(0, 97, {13}, torch::kLong);
    EXPECT_FALSE(kernels::cross_entropy_takes_fused_path(logits, targets));
    EXPECT_FALSE(kernels::cross_entropy_takes_cpu_path(logits, targets));
    auto dispatched = run_cross_entropy(kernels::cross_entropy, logits, targets);
    auto before = run_cross_entropy(cross_entropy_before, logits, targets);
    EXPECT_EQ(dispatched.loss.scalar_type(), torch::kFloat);
    expect_identical(dispatched.loss, before.loss, name_of(dtype) + " loss");
    expect_identical(dispatched.d_logits, before.d_logits, name_of(dtype) + " d_logits");
  }
}

TEST(FusedCrossEntropy, FormulasOfTheKernelsAreTorchsCrossEntropyAndItsGradient) {
  torch::manual_seed(11);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const int64_t rows = 6, vocab = 37;
  const double grad = 0.37;
  auto logits = torch::randn({rows, vocab}, opts) * 4;
  auto targets = torch::randint(0, vocab, {rows}, torch::kLong);
  targets[2] = -100;  // torch's default ignore_index
  auto autograd = run_cross_entropy(
      [](const torch::Tensor& x, const torch::Tensor& t) { return torch::nn::functional::cross_entropy(x, t); },
      logits, targets, grad);
  // What cross_entropy_forward and _backward compute (fused_cuda.h), and the
  // mean and scale fused_ops.cpp puts around them.
  auto counted = (targets != -100).to(torch::kDouble);
  auto column = targets.clamp_min(0);
  auto lse = at::logsumexp(logits, 1);
  auto loss_rows = (lse - logits.gather(1, column.unsqueeze(1)).squeeze(1)) * counted;
  auto scale = grad / counted.sum();
  auto onehot = at::one_hot(column, vocab).to(torch::kDouble);
  auto d_logits = (at::exp(logits - lse.unsqueeze(1)) - onehot) * scale * counted.unsqueeze(1);
  expect_close(loss_rows.sum() / counted.sum(), autograd.loss, 1e-13, 1e-14, "loss");
  expect_close(d_logits, autograd.d_logits, 1e-13, 1e-14, "d_logits");
}

// A fused result against the fp32 unfused one of the same (rounded) logits.
// The loss is fp32 in both: they differ by summation order. The gradient is
// rounded once to the logits' dtype; atol covers fp32's p - 1 near the
// target (in units of the gradient's scale grad / rows) and fp16's
// subnormals (below 6e-5, where small probabilities over many rows land).
// `magnitude`: how far the logits sit from 0. The kernel keeps each row's
// logsumexp as one fp32 number (max + log sum), rounded to the spacing of
// fp32 near the logits, 2^-24 * magnitude relative to 1; every probability
// exp(x - lse) inherits that error, which torch's log-softmax (x - max -
// log sum) does not. At magnitude 1000 that is 6e-5 of each probability;
// in training the gradient is bf16, whose own rounding is 4e-3.
void expect_cross_entropy_close(const CrossEntropyResult& fused, const CrossEntropyResult& reference,
                                torch::ScalarType dtype, int64_t rows, const std::string& what,
                                double magnitude = 0) {
  EXPECT_EQ(fused.loss.scalar_type(), torch::kFloat) << what;
  EXPECT_EQ(fused.d_logits.scalar_type(), dtype) << what;
  expect_close(fused.loss, reference.loss, 2e-5, 1e-5, what + " loss");
  const double rtol = dtype == torch::kFloat ? 1e-5 : tolerance_of(dtype).rtol;
  const double scale = 0.37 / static_cast<double>(std::max<int64_t>(rows, 1));
  const double lse_rounding = 2 * std::ldexp(1.0, -24) * magnitude;
  const double atol = (1e-6 + lse_rounding) * scale + (dtype == torch::kHalf ? std::ldexp(1.0, -24) : 0.0);
  expect_close(fused.d_logits, reference.d_logits, rtol, atol, what + " d_logits");
}

struct CrossEntropyShape {
  int64_t rows, vocab;
};
const std::vector<CrossEntropyShape> kCrossEntropyShapes = {
    {7, 97},        // rows start off 16-byte boundaries in every dtype: heads and tails
    {5, 4099},
    {3, 128256},    // Llama 3's vocabulary
    {40, 49152},    // SmolLM's
    {2, 7},         // fewer columns than a pack
    {1, 1},         // one class: loss 0, gradient 0
};

using CrossEntropyPath = bool (*)(const torch::Tensor&, const torch::Tensor&);

// kernels::cross_entropy on `device` against the unfused fp32 ops, for every
// shape of kCrossEntropyShapes in each dtype; `path` must take each case.
void expect_cross_entropy_shapes_match(const torch::TensorOptions& device,
                                       const std::vector<torch::ScalarType>& dtypes, CrossEntropyPath path) {
  for (auto dtype : dtypes) {
    for (const auto& [rows, vocab] : kCrossEntropyShapes) {
      const std::string what = name_of(dtype) + " rows " + std::to_string(rows) + " vocab " + std::to_string(vocab);
      auto logits = (torch::randn({rows, vocab}, device) * 3).to(dtype);
      auto targets = torch::randint(0, vocab, {rows}, device.dtype(torch::kLong));
      ASSERT_TRUE(path(logits, targets)) << what;
      auto fused = run_cross_entropy(kernels::cross_entropy, logits, targets);
      auto reference = run_cross_entropy(kernels::cross_entropy_unfused, logits.to(torch::kFloat), targets);
      expect_cross_entropy_close(fused, reference, dtype, rows, what);
    }
  }
}

TEST(FusedCrossEntropy, MatchesTheUnfusedOpsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  ASSERT_TRUE(kernels::fused_kernels_built()) << "a GPU is visible but loom was built without its CUDA kernels";
  torch::manual_seed(12);
  expect_cross_entropy_shapes_match(torch::TensorOptions().device(torch::kCUDA),
                                    {torch::kFloat, torch::kBFloat16, torch::kHalf},
                                    kernels::cross_entropy_takes_fused_path);
}

TEST(FusedCrossEntropy, CpuFp32MatchesTheUnfusedOps) {
  torch::manual_seed(12);
  expect_cross_entropy_shapes_match(torch::TensorOptions(), {torch::kFloat}, kernels::cross_entropy_takes_cpu_path);
}

// Logits far from 0, a target far above the rest, masked columns and ignored
// rows, on `device`, against the unfused fp32 ops.
void expect_cross_entropy_special_rows_match(const torch::TensorOptions& device,
                                             const std::vector<torch::ScalarType>& dtypes) {
  const int64_t rows = 9, vocab = 4099;
  auto targets = torch::randint(0, vocab, {rows}, device.dtype(torch::kLong));
  auto base = torch::randn({rows, vocab}, device) * 3;
  // Every row's logits far from 0 (the max must be subtracted); the target
  // far above the rest (p near 1: p - 1 cancels); columns at -inf (masked:
  // exp 0, gradient 0); rows whose target is -100 (ignored by torch's default).
  auto peaked = base.scatter_add(1, targets.unsqueeze(1), torch::full({rows, 1}, 40.0, device));
  auto masked = base.clone();
  masked.narrow(1, 0, 5).fill_(-std::numeric_limits<float>::infinity());
  auto ignored = targets.clone();
  ignored.narrow(0, 0, 4).fill_(-100);
  const std::vector<std::tuple<std::string, torch::Tensor, torch::Tensor>> cases = {
      {"shifted", base + 1000, targets},
      {"peaked", peaked, targets},
      {"masked", masked, targets.clamp_min(5)},
      {"ignored", base, ignored},
  };
  for (auto dtype : dtypes) {
    for (const auto& [label, logits_fp32, case_targets] : cases) {
      const std::string what = name_of(dtype) + " " + label;
      auto logits = logits_fp32.to(dtype);
      auto fused = run_cross_entropy(kernels::cross_entropy, logits, case_targets);
      auto reference = run_cross_entropy(kernels::cross_entropy_unfused, logits.to(torch::kFloat), case_targets);
      expect_cross_entropy_close(fused, reference, dtype, rows, what, label == "shifted" ? 1000 + 20 : 0);
    }
  }
}

TEST(FusedCrossEntropy, ShiftedPeakedMaskedAndIgnoredRowsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  torch::manual_seed(13);
  expect_cross_entropy_special_rows_match(torch::TensorOptions().device(torch::kCUDA),
                                          {torch::kFloat, torch::kBFloat16});
}

TEST(FusedCrossEntropy, ShiftedPeakedMaskedAndIgnoredRowsOnTheCpu) {
  torch::manual_seed(13);
  expect_cross_entropy_special_rows_match(torch::TensorOptions(), {torch::kFloat});
}

// kernels::cross_entropy of `logits` as torch's without a graph (validation's
// path), with no rows, and with every target ignored.
void expect_cross_entropy_without_gradients_and_counted_rows_as_torch(const torch::Tensor& logits,
                                                                      const torch::Tensor& targets) {
  {
    // Validation's path: no graph, the same number.
    torch::NoGradGuard no_grad;
    expect_close(kernels::cross_entropy(logits, targets), kernels::cross_entropy_unfused(logits, targets), 2e-5,
                 1e-5, "no_grad loss");
  }
  // No rows, or every target ignored: torch's mean is 0 / 0 = NaN, and the
  // ignored rows' gradient is 0.
  auto empty = torch::randn({0, logits.size(1)}, logits.options().dtype(torch::kFloat)).to(logits.scalar_type());
  EXPECT_TRUE(std::isnan(kernels::cross_entropy(empty, targets.narrow(0, 0, 0)).item<double>()));
  auto all_ignored = run_cross_entropy(kernels::cross_entropy, logits, torch::full_like(targets, -100));
  EXPECT_TRUE(std::isnan(all_ignored.loss.item<double>()));
  expect_identical(all_ignored.d_logits, torch::zeros_like(logits), "all ignored d_logits");
}

TEST(FusedCrossEntropy, CpuPathTakesViewsRefusesTargetsOutsideTheVocabularyAndAveragesLikeTorch) {
  torch::manual_seed(16);
  const int64_t rows = 6, vocab = 4096;
  auto targets = torch::randint(0, vocab, {rows}, torch::kLong);
  // A transposed view and a view one element into its storage.
  auto transposed = torch::randn({vocab, rows}).t();
  auto offset = torch::randn({rows * vocab + 1}).narrow(0, 1, rows * vocab).view({rows, vocab});
  for (const auto& [label, logits] : {std::pair{"transposed", transposed}, std::pair{"offset", offset}}) {
    ASSERT_TRUE(kernels::cross_entropy_takes_cpu_path(logits, targets)) << label;
    expect_cross_entropy_close(run_cross_entropy(kernels::cross_entropy, logits, targets),
                               run_cross_entropy(kernels::cross_entropy_unfused, logits, targets), torch::kFloat,
                               rows, label);
  }
  // torch refuses a target outside the vocabulary (other than -100).
  for (const int64_t bad : {vocab, int64_t{-1}}) {
    auto bad_targets = targets.clone();
    bad_targets[2] = bad;
    EXPECT_THROW(kernels::cross_entropy(offset, bad_targets), c10::Error) << bad;
    EXPECT_THROW(kernels::cross_entropy_unfused(offset, bad_targets), c10::Error) << bad;
  }
  expect_cross_entropy_without_gradients_and_counted_rows_as_torch(offset, targets);
}

TEST(FusedCrossEntropy, MisalignedAndNonContiguousLogitsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  torch::manual_seed(14);
  auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const int64_t rows = 6, vocab = 4096;
  auto targets = torch::randint(0, vocab, {rows}, cuda.dtype(torch::kLong));
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const std::string what = name_of(dtype);
    // A view one element into its storage: contiguous, but every row starts
    // off a 16-byte boundary, and the gradient (a fresh tensor) is not
    // alike, so backward reads and writes one element at a time.
    auto storage = torch::randn({rows * vocab + 1}, cuda).to(dtype).requires_grad_(true);
    auto offset = storage.narrow(0, 1, rows * vocab).view({rows, vocab});
    ASSERT_TRUE(kernels::cross_entropy_takes_fused_path(offset, targets)) << what;
    auto loss = kernels::cross_entropy(offset, targets);
    loss.backward(torch::full({}, 0.37, loss.options()));
    const CrossEntropyResult fused{loss.detach(), storage.grad().narrow(0, 1, rows * vocab).view({rows, vocab})};
    auto reference = run_cross_entropy(kernels::cross_entropy_unfused, offset.detach().to(torch::kFloat), targets);
    expect_cross_entropy_close(fused, reference, dtype, rows, what + " offset");
    // A transposed view (clone keeps its strides): copied once.
    auto transposed = torch::randn({vocab, rows}, cuda).to(dtype).t();
    ASSERT_TRUE(kernels::cross_entropy_takes_fused_path(transposed, targets)) << what;
    expect_cross_entropy_close(
        run_cross_entropy(kernels::cross_entropy, transposed, targets),
        run_cross_entropy(kernels::cross_entropy_unfused, transposed.to(torch::kFloat), targets), dtype, rows,
        what + " transposed");
  }
}

TEST(FusedCrossEntropy, WithoutGradientsAndWithoutCountedRowsAsTorchOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  torch::manual_seed(15);
  auto cuda = torch::TensorOptions().device(torch::kCUDA);
  auto logits = torch::randn({8, 97}, cuda).to(torch::kBFloat16);
  auto targets = torch::randint(0, 97, {8}, cuda.dtype(torch::kLong));
  expect_cross_entropy_without_gradients_and_counted_rows_as_torch(logits, targets);
}

// --- the model ---------------------------------------------------------------------

ModelConfig small_model() {
  ModelConfig m;
  m.hidden_size = 128;
  m.intermediate_size = 344;  // not a multiple of 8: the packed loads' tail
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.head_dim = 32;
  m.vocab_size = 97;
  m.max_seq_len = 64;
  m.init_std = 0.1;
  return m;
}

// Autocast to bf16 on `device` for a scope when `enabled` (as training's
// precision.compute bf16); on leaving, the state is put back and the cast
// cache cleared, as torch.autocast does.
class Bf16Autocast {
 public:
  Bf16Autocast(c10::DeviceType device, bool enabled)
      : device_(device),
        enabled_(enabled),
        was_enabled_(at::autocast::is_autocast_enabled(device)),
        was_dtype_(at::autocast::get_autocast_dtype(device)) {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(device_, at::kBFloat16);
  }
  ~Bf16Autocast() {
    if (!enabled_) return;
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
    at::autocast::clear_cache();
  }

 private:
  c10::DeviceType device_;
  bool enabled_, was_enabled_;
  at::ScalarType was_dtype_;
};

// The loss of one batch and every parameter's gradient; `bf16`: under bf16
// autocast as training runs it (precision.compute bf16).
std::pair<torch::Tensor, std::map<std::string, torch::Tensor>> loss_and_grads(const ModelConfig& m,
                                                                              torch::Device device,
                                                                              bool bf16 = false,
                                                                              bool fuse_add_norm = false) {
  torch::manual_seed(9);
  LocalLayerFactory factory;
  factory.fuse_residual_add_norm = fuse_add_norm;
  auto model = std::make_shared<LlamaForCausalLM>(m, factory);
  model->init_weights(9);
  model->to(device);
  auto ids = torch::randint(0, m.vocab_size, {2, 24}, torch::kLong);
  torch::Tensor loss;
  {
    Bf16Autocast autocast(device.type(), bf16);
    auto logits = model->forward(ids.to(device));
    // As token_loss: loom's fused cross-entropy on the GPU, torch's on the CPU.
    loss = kernels::cross_entropy(logits.reshape({-1, m.vocab_size}), ids.roll(-1, 1).reshape({-1}).to(device));
  }
  loss.backward();
  std::map<std::string, torch::Tensor> grads;
  for (const auto& p : model->named_parameters()) grads[p.key()] = p.value().grad().to(torch::kCPU);
  return {loss.detach().to(torch::kCPU), grads};
}

TEST(FusedKernels, ModelLossAndGradientsOnTheGpuMatchTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  for (const std::string recompute : {"none", "full"}) {
    ModelConfig m = small_model();
    m.recompute = recompute;
    auto [cpu_loss, cpu_grads] = loss_and_grads(m, torch::kCPU);
    auto [gpu_loss, gpu_grads] = loss_and_grads(m, torch::kCUDA);
    // fp32 on both; TF32 matmuls are off by default in libtorch, so the
    // differences are summation order.
    expect_close(gpu_loss, cpu_loss, 1e-5, 1e-6, "loss, recompute " + recompute);
    for (const auto& [name, grad] : cpu_grads)
      expect_close(gpu_grads.at(name), grad, 1e-3, 1e-5, name + ", recompute " + recompute);
  }
}

TEST(FusedKernels, ModelTrainingInBf16OnTheGpuStaysCloseToFp32OnTheCpu) {
  LOOM_SKIP_WITHOUT_GPU();
  // The training path (bf16 autocast, fused kernels in bf16) against fp32:
  // bf16 rounding of every matmul, so a loose bound on the whole.
  ModelConfig m = small_model();
  auto [cpu_loss, cpu_grads] = loss_and_grads(m, torch::kCPU);
  auto [gpu_loss, gpu_grads] = loss_and_grads(m, torch::kCUDA, /*bf16=*/true);
  expect_close(gpu_loss, cpu_loss, 2e-2, 0.0, "loss");
  for (const auto& [name, grad] : cpu_grads) {
    const double relative = (gpu_grads.at(name).to(torch::kDouble) - grad.to(torch::kDouble)).norm().item<double>() /
                            std::max(grad.to(torch::kDouble).norm().item<double>(), 1e-12);
    EXPECT_LE(relative, 5e-2) << name << ": relative L2 difference of the gradient";
  }
}

// --- residual add + RMSNorm (fusion.add_rmsnorm) ---------------------------------

struct AddNormResult {
  torch::Tensor h, y, d_residual, d_branch, d_weight;
};

// `op` on leaf copies of residual, branch and an fp32 weight (as the model's
// parameter), then backward through y with grad_y and, unless grad_h is
// undefined, through h with grad_h (the residual path's gradient).
template <typename Op>
AddNormResult run_add_norm(Op op, const torch::Tensor& residual, const torch::Tensor& branch,
                           const torch::Tensor& weight, const torch::Tensor& grad_y, const torch::Tensor& grad_h) {
  auto r = residual.detach().clone().requires_grad_(true);
  auto b = branch.detach().clone().requires_grad_(true);
  auto w = weight.detach().clone().requires_grad_(true);
  const kernels::AddNorm out = op(r, b, w);
  if (grad_h.defined()) {
    torch::autograd::backward({out.y, out.h}, {grad_y, grad_h});
  } else {
    out.y.backward(grad_y);
  }
  return {out.h.detach(), out.y.detach(), r.grad(), b.grad(), w.grad()};
}

constexpr double kNormEps = 1e-5;

AddNormResult add_norm_of(bool fused, const torch::Tensor& residual, const torch::Tensor& branch,
                          const torch::Tensor& weight, const torch::Tensor& grad_y, const torch::Tensor& grad_h) {
  return run_add_norm(
      [fused](const auto& r, const auto& b, const auto& w) {
        return fused ? kernels::add_rms_norm(r, b, w, kNormEps) : kernels::add_rms_norm_unfused(r, b, w, kNormEps);
      },
      residual, branch, weight, grad_y, grad_h);
}

TEST(FusedAddRmsNorm, CpuTensorsTakeTheUnfusedPathBitForBit) {
  torch::manual_seed(21);
  auto r = torch::randn({2, 7, 48}).to(torch::kBFloat16), b = torch::randn({2, 7, 48}).to(torch::kBFloat16);
  auto w = torch::rand({48}) + 0.5, gy = torch::randn({2, 7, 48}).to(torch::kBFloat16);
  auto gh = torch::randn({2, 7, 48}).to(torch::kBFloat16);
  EXPECT_FALSE(kernels::add_rms_norm_takes_fused_path(r, b, w));
  const auto dispatched = add_norm_of(true, r, b, w, gy, gh);
  const auto unfused = add_norm_of(false, r, b, w, gy, gh);
  expect_identical(dispatched.h, unfused.h, "h");
  expect_identical(dispatched.y, unfused.y, "y");
  expect_identical(dispatched.d_residual, unfused.d_residual, "d_residual");
  expect_identical(dispatched.d_weight, unfused.d_weight, "d_weight");
  // And the unfused op is the two ops a decoder layer ran before: the add, then the norm.
  expect_identical(unfused.h, r + b, "h is the add");
  expect_identical(unfused.y, at::rms_norm(r + b, {48}, w.to(torch::kBFloat16), kNormEps), "y is the norm");
}

TEST(FusedAddRmsNorm, BackwardFormulaOfTheKernelIsAutogradsOfTheUnfusedOps) {
  torch::manual_seed(22);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto r = torch::randn({5, 3, 40}, opts), b = torch::randn({5, 3, 40}, opts), w = torch::rand({40}, opts) + 0.5;
  auto gy = torch::randn({5, 3, 40}, opts), gh = torch::randn({5, 3, 40}, opts);
  const auto autograd = add_norm_of(false, r, b, w, gy, gh);
  // What add_rms_norm_backward computes (fused_cuda.h).
  auto h = r + b;
  auto rstd = (h.square().mean(-1, true) + kNormEps).rsqrt();
  auto s = (gy * w * h).sum(-1, true);
  auto d_h = gh + rstd * gy * w - rstd.pow(3) * h * s / 40;
  expect_close(d_h, autograd.d_residual, 1e-12, 1e-13, "d_residual");
  expect_close(d_h, autograd.d_branch, 1e-12, 1e-13, "d_branch");
  expect_close((gy * h * rstd).sum(std::vector<int64_t>{0, 1}), autograd.d_weight, 1e-12, 1e-13, "d_weight");
  // Without the residual path's gradient the gh term is all that goes.
  const auto y_only = add_norm_of(false, r, b, w, gy, torch::Tensor());
  expect_close(d_h - gh, y_only.d_residual, 1e-12, 1e-13, "d_residual without grad_h");
}

TEST(FusedAddRmsNorm, MatchesTheUnfusedOpsOnTheGpu) {
  LOOM_SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 7, 384},   // tiny.yaml's hidden: packed
      {3, 5, 1001},  // not a multiple of a pack: element by element
      {1, 1, 2048},  // one row
      {600, 2048},   // more rows than the backward's blocks
      {0, 64},       // nothing to do
  };
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    for (const auto& shape : shapes) {
      for (const bool with_grad_h : {true, false}) {
        torch::manual_seed(23);
        const int64_t hidden = shape.back();
        const auto cuda = torch::TensorOptions().device(torch::kCUDA);
        auto r = torch::randn(shape, cuda).to(dtype), b = torch::randn(shape, cuda).to(dtype);
        auto w = torch::rand({hidden}, cuda) + 0.5, gy = torch::randn(shape, cuda).to(dtype);
        auto gh = with_grad_h ? torch::randn(shape, cuda).to(dtype) : torch::Tensor();
        const std::string what = name_of(dtype) + " " + c10::str(c10::IntArrayRef(shape)) +
                                 (with_grad_h ? "" : " without grad_h");
        ASSERT_TRUE(kernels::add_rms_norm_takes_fused_path(r, b, w)) << what;
        const auto fused = add_norm_of(true, r, b, w, gy, gh);
        const auto unfused = add_norm_of(false, r, b, w, gy, gh);
        expect_identical(fused.h, unfused.h, what + ": h");  // the same rounding of the same sum
        // The rest against fp32 arithmetic on the same (rounded) values.
        const auto f32 = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kFloat) : t; };
        const auto reference = add_norm_of(false, f32(r), f32(b), w.to(dtype).to(torch::kFloat), f32(gy), f32(gh));
        const Tolerance tol = tolerance_of(dtype);
        expect_close(fused.y, reference.y, tol.rtol, tol.atol, what + ": y");
        expect_close(fused.d_residual, reference.d_residual, tol.rtol, tol.atol, what + ": d_residual");
        expect_close(fused.d_branch, reference.d_branch, tol.rtol, tol.atol, what + ": d_branch");
        if (fused.d_weight.numel() > 0) {
          const double relative = (fused.d_weight.to(torch::kDouble) - reference.d_weight.to(torch::kDouble)).norm()
                                      .item<double>() /
                                  std::max(reference.d_weight.to(torch::kDouble).norm().item<double>(), 1e-12);
          EXPECT_LE(relative, 1e-2) << what << ": d_weight, relative L2";
        }
        EXPECT_EQ(fused.d_weight.scalar_type(), torch::kFloat) << what;
      }
    }
  }
}

// The decoder layers with the fused add and norm: on the CPU the dispatch
// runs the unfused ops, so the model's loss and gradients are those of the
// layers without it, bit for bit; on the GPU they agree to bf16 rounding.
TEST(FusedAddRmsNorm, TheModelWithTheFusionMatchesTheModelWithout) {
  ModelConfig m = small_model();
  {
    auto [plain_loss, plain_grads] = loss_and_grads(m, torch::kCPU, /*bf16=*/true);
    auto [fused_loss, fused_grads] = loss_and_grads(m, torch::kCPU, /*bf16=*/true, /*fuse_add_norm=*/true);
    expect_identical(fused_loss, plain_loss, "loss on the CPU");
    for (const auto& [name, grad] : plain_grads) expect_identical(fused_grads.at(name), grad, name + " on the CPU");
  }
  if (cuda_device_count() == 0) return;
  auto [plain_loss, plain_grads] = loss_and_grads(m, torch::kCUDA, /*bf16=*/true);
  auto [fused_loss, fused_grads] = loss_and_grads(m, torch::kCUDA, /*bf16=*/true, /*fuse_add_norm=*/true);
  expect_close(fused_loss, plain_loss, 1e-2, 0.0, "loss on the GPU");
  for (const auto& [name, grad] : plain_grads) {
    const double relative = (fused_grads.at(name).to(torch::kDouble) - grad.to(torch::kDouble)).norm().item<double>() /
                            std::max(grad.to(torch::kDouble).norm().item<double>(), 1e-12);
    EXPECT_LE(relative, 3e-2) << name << ": relative L2 difference of the gradient on the GPU";
  }
}

}  // namespace
}  // namespace loom
