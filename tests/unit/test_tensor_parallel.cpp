// Tensor parallelism (parallel/tensor_parallel.h) checked against the
// single-rank computation: every rank builds the same full tensors from a
// fixed seed, runs the sharded computation over the world as its tp group,
// and compares its result with the unsharded one it computes alone.
//
// Runs under mpirun (CTest tensor_parallel_np2/np4); every rank runs every
// test in the same order, as the contract of process_group.h requires. The
// custom main at the bottom makes the run fail on every rank when any rank
// failed.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "tests/unit/mpi_test_main.h"
#include "parallel/tensor_parallel.h"
#include "util/error.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;

// The tp group of these tests: all ranks.
ProcessGroup& tp() { return *g_world; }
int64_t tp_rank() { return tp().rank(); }
int64_t tp_size() { return tp().size(); }

using test_support::expect_close;
at::Tensor random(at::IntArrayRef shape, uint64_t seed) { return test_support::seeded_randn(shape, seed); }

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

at::Tensor chunk_of(const at::Tensor& t, int64_t dim, int64_t rank, int64_t size) {
  const int64_t n = t.size(dim) / size;
  return t.narrow(dim, rank * n, n);
}
at::Tensor my_chunk(const at::Tensor& t, int64_t dim) { return chunk_of(t, dim, tp_rank(), tp_size()); }

// Every rank's `t` concatenated along `dim` (outside autograd: for gradients).
at::Tensor gather_dim(const at::Tensor& t, int64_t dim) {
  at::Tensor front = t.detach().movedim(dim, 0).contiguous();
  std::vector<int64_t> shape = front.sizes().vec();
  shape[0] *= tp_size();
  at::Tensor out = at::empty(shape, front.options());
  tp().all_gather(out, front)->wait();
  return out.movedim(0, dim).contiguous();
}

constexpr double kOpTol = 1e-6;     // operators: fp32, a few sums
constexpr double kLayerTol = 1e-5;  // layers: fp32 matmuls summed in another order

TEST(TensorParallelOps, CopyToTpIsTheIdentityForwardAndSumsTheGradientsBackward) {
  const at::Tensor x_full = random({2, 3, 8}, 1);
  const at::Tensor upstream = random({tp_size(), 2, 3, 8}, 2);  // a different upstream gradient per rank
  at::Tensor x = leaf(x_full);
  at::Tensor y = copy_to_tp(tp(), x);
  expect_close(y, x_full, 0, "forward");
  (y * upstream[tp_rank()]).sum().backward();
  expect_close(x.grad(), upstream.sum(0), kOpTol, "x.grad is the sum of every rank's gradient");
}

TEST(TensorParallelOps, ReduceFromTpSumsForwardAndPassesTheGradientBackward) {
  const at::Tensor partials = random({tp_size(), 2, 3, 8}, 3);  // every rank's partial sum
  const at::Tensor upstream = random({2, 3, 8}, 4);
  at::Tensor x = leaf(partials[tp_rank()]);
  at::Tensor y = reduce_from_tp(tp(), x);
  expect_close(y, partials.sum(0), kOpTol, "forward");
  (y * upstream).sum().backward();
  expect_close(x.grad(), upstream, 0, "x.grad");
  // The input keeps its value: the reduction works on a copy.
  expect_close(x, partials[tp_rank()], 0, "input unchanged");
}

TEST(TensorParallelOps, CopyThenALocalFunctionThenReduceEqualsTheFullComputation) {
  // Full: z = sum_r tanh(x * w_r). Rank r computes term r between f and g.
  const at::Tensor x_full = random({2, 3, 8}, 5);
  const at::Tensor w = random({tp_size(), 8}, 6);
  const at::Tensor upstream = random({2, 3, 8}, 7);

  at::Tensor x_ref = leaf(x_full);
  at::Tensor z_ref = at::tanh(x_ref.unsqueeze(0) * w.unsqueeze(1).unsqueeze(1)).sum(0);
  (z_ref * upstream).sum().backward();

  at::Tensor x = leaf(x_full);
  at::Tensor z = reduce_from_tp(tp(), at::tanh(copy_to_tp(tp(), x) * w[tp_rank()]));
  (z * upstream).sum().backward();
  expect_close(z, z_ref, kOpTol, "forward");
  expect_close(x.grad(), x_ref.grad(), kOpTol, "x.grad");
}

TEST(TensorParallelOps, GatherFromTpConcatenatesTheLastDimAndSlicesTheGradient) {
  const at::Tensor full = random({2, 3, 4 * tp_size()}, 8);
  const at::Tensor upstream = random({2, 3, 4 * tp_size()}, 9);
  at::Tensor x = leaf(my_chunk(full, -1));
  at::Tensor y = gather_from_tp(tp(), x);
  expect_close(y, full, 0, "forward");
  (y * upstream).sum().backward();
  expect_close(x.grad(), my_chunk(upstream, -1), 0, "x.grad is this rank's slice");
}

TEST(TensorParallelOps, ScatterToTpSlicesTheLastDimAndGathersTheGradient) {
  const at::Tensor full = random({2, 3, 4 * tp_size()}, 10);
  const at::Tensor upstream = random({2, 3, 4 * tp_size()}, 11);  // rank r's gradient is its slice
  at::Tensor x = leaf(full);
  at::Tensor y = scatter_to_tp(tp(), x);
  expect_close(y, my_chunk(full, -1), 0, "forward");
  (y * my_chunk(upstream, -1)).sum().backward();
  expect_close(x.grad(), upstream, 0, "x.grad is every rank's slice, gathered");
}

TEST(TensorParallelOps, GatherFromSpConcatenatesTheSequenceAndReduceScattersTheGradient) {
  const int64_t seq = 2 * tp_size();
  const at::Tensor full = random({2, seq, 6}, 12);
  const at::Tensor upstream = random({tp_size(), 2, seq, 6}, 13);  // a different gradient per rank
  at::Tensor x = leaf(my_chunk(full, 1));
  at::Tensor y = gather_from_sp(tp(), x);
  expect_close(y, full, 0, "forward");
  (y * upstream[tp_rank()]).sum().backward();
  expect_close(x.grad(), my_chunk(upstream.sum(0), 1), kOpTol, "x.grad is this rank's slice of the sum");
}

TEST(TensorParallelOps, ReduceScatterToSpSumsAndSlicesTheSequenceAndGathersTheGradient) {
  const int64_t seq = 2 * tp_size();
  const at::Tensor partials = random({tp_size(), 2, seq, 6}, 14);
  const at::Tensor upstream = random({2, seq, 6}, 15);
  at::Tensor x = leaf(partials[tp_rank()]);
  at::Tensor y = reduce_scatter_to_sp(tp(), x);
  expect_close(y, my_chunk(partials.sum(0), 1), kOpTol, "forward");
  (y * my_chunk(upstream, 1)).sum().backward();
  expect_close(x.grad(), upstream, 0, "x.grad is every rank's slice, gathered");
}

TEST(TensorParallelOps, ShapesThatDoNotSplitOverTheGroupAreRefusedOnEveryRank) {
  const at::Tensor odd = at::zeros({2, 2 * tp_size() + 1, 2 * tp_size() + 1});
  for (auto [name, op] : std::vector<std::pair<std::string, std::function<at::Tensor()>>>{
           {"scatter_to_tp", [&] { return scatter_to_tp(tp(), odd); }},
           {"reduce_scatter_to_sp", [&] { return reduce_scatter_to_sp(tp(), odd); }},
           {"gather_from_sp", [&] { return gather_from_sp(tp(), at::zeros({4})); }}}) {
    try {
      op();
      ADD_FAILURE() << name << " accepted " << odd.sizes();
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  }
}

TEST(TensorParallelOps, AGroupOfOneIsTheIdentity) {
  auto solo = g_world->split(g_world->rank(), 0, "solo");
  const at::Tensor full = random({2, 4, 6}, 16);
  at::Tensor x = leaf(full);
  at::Tensor y = gather_from_tp(*solo, copy_to_tp(*solo, x));
  y = gather_from_sp(*solo, reduce_from_tp(*solo, scatter_to_tp(*solo, y)));
  y = reduce_scatter_to_sp(*solo, y);
  expect_close(y, full, 0, "forward");
  y.sum().backward();
  expect_close(x.grad(), at::ones_like(full), 0, "x.grad");
}

// --- layers ---------------------------------------------------------------

// A two-layer MLP, x [b, s, hidden] -> tanh(x W1^T + b1) W2^T + b2, once
// whole and once as column-parallel then row-parallel.
struct Mlp {
  static constexpr int64_t kHidden = 8;
  int64_t inner = 4 * tp_size();
  at::Tensor w1 = random({inner, kHidden}, 20), b1 = random({inner}, 21);
  at::Tensor w2 = random({kHidden, inner}, 22), b2 = random({kHidden}, 23);
};

void load(Linear& layer, const at::Tensor& full_weight, const at::Tensor& full_bias, LinearRole role) {
  torch::NoGradGuard no_grad;
  auto params = layer.named_parameters();
  params["weight"].copy_(shard_linear_weight(full_weight, role, tp_rank(), tp_size()));
  params["bias"].copy_(shard_linear_bias(full_bias, role, tp_rank(), tp_size()));
}

// The single-rank forward and backward; returns y and fills the grads.
struct MlpReference {
  at::Tensor x, w1, b1, w2, b2, y;
  MlpReference(const Mlp& mlp, const at::Tensor& x_full, const at::Tensor& upstream)
      : x(leaf(x_full)), w1(leaf(mlp.w1)), b1(leaf(mlp.b1)), w2(leaf(mlp.w2)), b2(leaf(mlp.b2)) {
    y = at::linear(at::tanh(at::linear(x, w1, b1)), w2, b2);
    (y * upstream).sum().backward();
  }
};

void expect_gathered_grads_match(ColumnParallelLinear& column, RowParallelLinear& row, const MlpReference& ref) {
  auto cp = column.named_parameters();
  auto rp = row.named_parameters();
  expect_close(gather_dim(cp["weight"].grad(), 0), ref.w1.grad(), kLayerTol, "column weight grad, gathered");
  expect_close(gather_dim(cp["bias"].grad(), 0), ref.b1.grad(), kLayerTol, "column bias grad, gathered");
  expect_close(gather_dim(rp["weight"].grad(), 1), ref.w2.grad(), kLayerTol, "row weight grad, gathered");
  expect_close(rp["bias"].grad(), ref.b2.grad(), kLayerTol, "row bias grad");
}

TEST(TensorParallelLayers, ParametersAreTheLocalShardsNamedLikeHuggingFace) {
  ColumnParallelLinear column(tp(), 8, 4 * tp_size(), /*bias=*/true);
  RowParallelLinear row(tp(), 4 * tp_size(), 8, /*bias=*/true);
  auto cp = column.named_parameters();
  auto rp = row.named_parameters();
  ASSERT_EQ(cp.size(), 2u);
  ASSERT_EQ(rp.size(), 2u);
  EXPECT_EQ(cp["weight"].sizes(), at::IntArrayRef({4, 8}));
  EXPECT_EQ(cp["bias"].sizes(), at::IntArrayRef({4}));
  EXPECT_EQ(rp["weight"].sizes(), at::IntArrayRef({8, 4}));
  EXPECT_EQ(rp["bias"].sizes(), at::IntArrayRef({8}));
  EXPECT_EQ(ColumnParallelLinear(tp(), 8, 4 * tp_size(), false).named_parameters().size(), 1u);
}

TEST(TensorParallelLayers, ColumnThenRowMatchesTheUnshardedMlpForwardAndBackward) {
  Mlp mlp;
  const at::Tensor x_full = random({2, 3, Mlp::kHidden}, 24);
  const at::Tensor upstream = random({2, 3, Mlp::kHidden}, 25);
  MlpReference ref(mlp, x_full, upstream);

  ColumnParallelLinear column(tp(), Mlp::kHidden, mlp.inner, /*bias=*/true);
  RowParallelLinear row(tp(), mlp.inner, Mlp::kHidden, /*bias=*/true);
  load(column, mlp.w1, mlp.b1, LinearRole::kColumn);
  load(row, mlp.w2, mlp.b2, LinearRole::kRow);
  at::Tensor x = leaf(x_full);
  at::Tensor y = row.forward(at::tanh(column.forward(x)));
  (y * upstream).sum().backward();

  expect_close(y, ref.y, kLayerTol, "y");
  expect_close(x.grad(), ref.x.grad(), kLayerTol, "x.grad");
  expect_gathered_grads_match(column, row, ref);
}

TEST(TensorParallelLayers, GatheredColumnOutputIntoAScatteringRowMatchesTheUnshardedMlp) {
  Mlp mlp;
  const at::Tensor x_full = random({2, 3, Mlp::kHidden}, 26);
  const at::Tensor upstream = random({2, 3, Mlp::kHidden}, 27);
  MlpReference ref(mlp, x_full, upstream);

  ColumnParallelLinear column(tp(), Mlp::kHidden, mlp.inner, true, {.gather_output = true});
  RowParallelLinear row(tp(), mlp.inner, Mlp::kHidden, true, {.input_is_parallel = false});
  load(column, mlp.w1, mlp.b1, LinearRole::kColumn);
  load(row, mlp.w2, mlp.b2, LinearRole::kRow);
  at::Tensor x = leaf(x_full);
  at::Tensor h = column.forward(x);
  EXPECT_EQ(h.size(-1), mlp.inner);
  at::Tensor y = row.forward(at::tanh(h));
  (y * upstream).sum().backward();

  expect_close(y, ref.y, kLayerTol, "y");
  expect_close(x.grad(), ref.x.grad(), kLayerTol, "x.grad");
  expect_gathered_grads_match(column, row, ref);
}

TEST(TensorParallelLayers, SequenceParallelMlpMatchesTheUnshardedMlpOnTheLocalSequenceSlice) {
  Mlp mlp;
  const int64_t seq = 2 * tp_size();
  const at::Tensor x_full = random({2, seq, Mlp::kHidden}, 28);
  const at::Tensor upstream = random({2, seq, Mlp::kHidden}, 29);
  MlpReference ref(mlp, x_full, upstream);

  ColumnParallelLinear column(tp(), Mlp::kHidden, mlp.inner, true, {.sequence_parallel = true});
  RowParallelLinear row(tp(), mlp.inner, Mlp::kHidden, true, {.sequence_parallel = true});
  load(column, mlp.w1, mlp.b1, LinearRole::kColumn);
  load(row, mlp.w2, mlp.b2, LinearRole::kRow);
  // Each rank holds its slice of the sequence, and of the loss's gradient.
  at::Tensor x = leaf(my_chunk(x_full, 1));
  at::Tensor y = row.forward(at::tanh(column.forward(x)));
  (y * my_chunk(upstream, 1)).sum().backward();

  expect_close(y, my_chunk(ref.y, 1), kLayerTol, "y is this rank's sequence slice");
  expect_close(x.grad(), my_chunk(ref.x.grad(), 1), kLayerTol, "x.grad is this rank's sequence slice");
  expect_gathered_grads_match(column, row, ref);
}

// Under bf16 autocast a linear layer's output is bf16, bias included (at::linear
// casts the bias with the weight). The row-parallel layer adds its bias after
// the reduction, by hand: it must join in the output's dtype, or an fp32 bias
// would turn the residual stream (and a pipeline stage's send) into fp32.
TEST(TensorParallelLayers, RowParallelOutputKeepsTheAutocastDtypeWithABias) {
  for (const bool sequence_parallel : {false, true}) {
    Mlp mlp;
    const int64_t seq = 2 * tp_size();
    const at::Tensor x_full = random({2, seq, Mlp::kHidden}, 30);
    RowParallelLinear row(tp(), mlp.inner, Mlp::kHidden, true,
                          {.input_is_parallel = false, .sequence_parallel = sequence_parallel});
    load(row, mlp.w2, mlp.b2, LinearRole::kRow);
    const at::Tensor h_full = random({2, seq, mlp.inner}, 31);
    at::Tensor y;
    at::Tensor expected;
    {
      at::autocast::set_autocast_enabled(at::kCPU, true);
      at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
      at::autocast::increment_nesting();
      y = row.forward(h_full);
      expected = at::linear(h_full, mlp.w2, mlp.b2);
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      at::autocast::set_autocast_enabled(at::kCPU, false);
    }
    const std::string label = sequence_parallel ? "sequence parallel" : "plain";
    EXPECT_EQ(y.scalar_type(), at::kBFloat16) << label;
    ASSERT_EQ(expected.scalar_type(), at::kBFloat16) << label;
    if (sequence_parallel) expected = my_chunk(expected, 1);
    // bf16 products summed per shard, then across ranks: a few bf16 ulps.
    expect_close(y.to(at::kFloat), expected.to(at::kFloat), 0.05, label + ": y");
    y.to(at::kFloat).sum().backward();
    const at::Tensor bias_grad = row.named_parameters()["bias"].grad();
    ASSERT_TRUE(bias_grad.defined()) << label;
    EXPECT_EQ(bias_grad.scalar_type(), at::kFloat) << label << ": the fp32 bias gets an fp32 gradient";
  }
}

// Expects `fn` to throw BadInput whose message contains every fragment.
void expect_bad_input(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "accepted";
  } catch (const BadInput& e) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << "'" << fragment << "' not in: " << e.what();
    }
  }
}

TEST(TensorParallelLayers, SizesNotDivisibleByTpAreRefusedNamingTheSizesAndTp) {
  const int64_t odd = 2 * tp_size() + 1;
  const std::string tp_is = "tp (" + std::to_string(tp_size()) + ")";
  expect_bad_input([&] { ColumnParallelLinear(tp(), 8, odd, true); },
                   {"ColumnParallelLinear", "out_features (" + std::to_string(odd) + ")", tp_is});
  expect_bad_input([&] { RowParallelLinear(tp(), odd, 8, true); },
                   {"RowParallelLinear", "in_features (" + std::to_string(odd) + ")", tp_is});
  expect_bad_input([&] { shard_linear_weight(at::zeros({odd, 8}), LinearRole::kColumn, 0, tp_size()); },
                   {"out_features (" + std::to_string(odd) + ")", tp_is});
  expect_bad_input([&] { shard_linear_weight(at::zeros({8, odd}), LinearRole::kRow, 0, tp_size()); },
                   {"in_features (" + std::to_string(odd) + ")", tp_is});
  expect_bad_input([&] { shard_linear_bias(at::zeros({odd}), LinearRole::kColumn, 0, tp_size()); },
                   {"out_features (" + std::to_string(odd) + ")", tp_is});
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_tensor_parallel");
}
