// GradientReducer (parallel/data_parallel.h) under mpirun, with the world as
// the dp group: every rank computes gradients of its own data through a real
// autograd graph over several micro-batches, the reducer averages them over
// the ranks, and each rank checks the result against the average it computes
// alone from every rank's data.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "parallel/data_parallel.h"
#include "parallel/mpi_process_group.h"
#include "tests/unit/mpi_test_main.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& dp() { return *g_world; }

at::Tensor random(at::IntArrayRef shape, uint64_t seed) { return test_support::seeded_randn(shape, seed); }

// A chain of layers y = tanh(x W_k + b_k), so that backward produces the
// last layers' gradients first, and a loss that depends on `rank`'s data.
struct Chain {
  std::vector<at::Tensor> params;  // W_0, b_0, W_1, b_1, ... in forward order
  explicit Chain(int64_t layers, int64_t width) {
    for (int64_t k = 0; k < layers; ++k) {
      params.push_back(random({width, width}, 100 + k).mul_(0.3).set_requires_grad(true));
      params.push_back(random({width}, 200 + k).set_requires_grad(true));
    }
  }
  at::Tensor loss(int64_t rank, int64_t micro) const {
    at::Tensor x = random({4, params[0].size(0)}, 1000 + 10 * rank + micro);
    for (size_t k = 0; k < params.size(); k += 2) x = at::tanh(at::matmul(x, params[k]) + params[k + 1]);
    return x.square().mean();
  }
};

constexpr int64_t kLayers = 6, kWidth = 64, kMicro = 3;

// What the reducer must produce: the mean over ranks of each rank's
// accumulated gradient (sum over its micro-batches), computed on this rank alone.
std::vector<at::Tensor> expected_average(const Chain& chain) {
  std::vector<at::Tensor> sum;
  for (int64_t r = 0; r < dp().size(); ++r) {
    Chain copy(kLayers, kWidth);
    for (int64_t m = 0; m < kMicro; ++m) copy.loss(r, m).backward();
    for (size_t k = 0; k < copy.params.size(); ++k) {
      if (sum.size() <= k) sum.push_back(at::zeros_like(copy.params[k]));
      sum[k] += copy.params[k].grad();
    }
  }
  for (auto& s : sum) s /= static_cast<double>(dp().size());
  return sum;
}

void run_and_check(double bucket_mb, bool overlap, int64_t expected_buckets, bool expect_early_start) {
  Chain chain(kLayers, kWidth);
  GradientReducer reducer(dp(), chain.params, {.bucket_mb = bucket_mb, .overlap = overlap});
  if (dp().size() > 1) {
    EXPECT_EQ(reducer.num_buckets(), expected_buckets);
  }
  const std::vector<at::Tensor> expected = expected_average(chain);
  for (int step = 0; step < 2; ++step) {  // twice: the reducer resets between steps
    for (auto& p : chain.params) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    for (int64_t m = 0; m < kMicro; ++m) {
      if (m == kMicro - 1) reducer.arm();
      chain.loss(dp().rank(), m).backward();
    }
    reducer.finish();
    for (size_t k = 0; k < chain.params.size(); ++k) {
      EXPECT_TRUE(at::allclose(chain.params[k].grad(), expected[k], 1e-5, 1e-6))
          << "parameter " << k << ", step " << step << ": max diff "
          << (chain.params[k].grad() - expected[k]).abs().max().item<double>();
    }
    if (dp().size() > 1) {
      if (expect_early_start) {
        EXPECT_GT(reducer.last_started_early(), 0) << "no bucket started during backward";
      } else {
        EXPECT_EQ(reducer.last_started_early(), 0);
      }
    }
  }
}

// 6 layers of 64x64 + 64 floats = 16,640 bytes each.
TEST(GradientReducer, ManySmallBucketsStartDuringBackwardAndAverage) {
  run_and_check(/*bucket_mb=*/0.01, /*overlap=*/true, /*expected_buckets=*/6, /*expect_early_start=*/true);
}

TEST(GradientReducer, OneBucketForEverything) {
  run_and_check(/*bucket_mb=*/25, /*overlap=*/true, /*expected_buckets=*/1, /*expect_early_start=*/true);
}

TEST(GradientReducer, WithoutOverlapEverythingIsReducedInFinish) {
  run_and_check(/*bucket_mb=*/0.01, /*overlap=*/false, /*expected_buckets=*/6, /*expect_early_start=*/false);
}

// parallel.reduce_dtype bf16: each rank's gradient is rounded to bf16 and
// the average comes back in bf16 (here into fp32 .grad, where it shows as
// values bf16 can hold), within bf16's rounding of the fp32 average.
TEST(GradientReducer, ReducesInBf16WhenAsked) {
  Chain chain(kLayers, kWidth);
  GradientReducer::Options options;
  options.reduce_dtype = at::kBFloat16;
  GradientReducer reducer(dp(), chain.params, options);
  const std::vector<at::Tensor> expected = expected_average(chain);
  for (int64_t m = 0; m < kMicro; ++m) {
    if (m == kMicro - 1) reducer.arm();
    chain.loss(dp().rank(), m).backward();
  }
  reducer.finish();
  for (size_t k = 0; k < chain.params.size(); ++k) {
    const at::Tensor grad = chain.params[k].grad();
    EXPECT_TRUE(at::allclose(grad, expected[k], 2e-2, 1e-4)) << "parameter " << k;
    if (dp().size() > 1) {
      EXPECT_TRUE(at::equal(grad, grad.to(at::kBFloat16).to(at::kFloat))) << "parameter " << k << " not bf16";
    }
  }
}

TEST(GradientReducer, RefusesFp16ParametersMismatchedHoldersAndEmptyBuckets) {
  std::vector<at::Tensor> fp16{at::zeros({4}, at::kHalf).set_requires_grad(true)};
  EXPECT_THROW(GradientReducer(dp(), fp16, {.bucket_mb = 25}), std::invalid_argument);
  std::vector<at::Tensor> fp32{at::zeros({4}).set_requires_grad(true)};
  EXPECT_THROW(GradientReducer(dp(), fp32, {.bucket_mb = 0}), std::invalid_argument);
  GradientReducer::Options two_holders;
  two_holders.grad_holders = {at::zeros({4}), at::zeros({4})};
  EXPECT_THROW(GradientReducer(dp(), fp32, two_holders), std::invalid_argument);
  GradientReducer::Options misshapen;
  misshapen.grad_holders = {at::zeros({5})};
  EXPECT_THROW(GradientReducer(dp(), fp32, misshapen), std::invalid_argument);
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_data_parallel");
}
