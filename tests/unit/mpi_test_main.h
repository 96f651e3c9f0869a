// What loom's multi-rank GoogleTest binaries, which mpirun starts on every
// rank (test_process_group, test_tensor_parallel, test_vocab_parallel, ...),
// share: seeded inputs that are the same on every rank, the comparison of a
// result with the one a rank computes alone, and the end of main(). Every
// rank runs every test in the same order, as the contract of
// parallel/process_group.h requires.
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include "parallel/mpi_process_group.h"

namespace loom::test_support {

// Standard normal float32 values, the same on every rank for the same seed.
inline at::Tensor seeded_randn(at::IntArrayRef shape, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::kFloat);
}

// max |actual - expected| (in float64) within `rtol` of max |expected|.
inline void expect_close(const at::Tensor& actual, const at::Tensor& expected, double rtol, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const at::Tensor a = actual.detach().to(at::kDouble);
  const at::Tensor e = expected.detach().to(at::kDouble);
  const double scale = std::max(1e-30, e.abs().max().item<double>());
  const double err = (a - e).abs().max().item<double>();
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_LE(err / scale, rtol) << what << ": max error " << err << " against max |expected| " << scale << " (rank "
                               << rank << " of " << size << ")";
}

// On ranks other than 0, prints failures only (each prefixed with the rank)
// instead of GoogleTest's full report, so the log shows one report.
class FailuresOnly : public ::testing::EmptyTestEventListener {
 public:
  explicit FailuresOnly(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

// Runs all tests (after ::testing::InitGoogleTest) with `*world` pointing at
// a group of every rank while they run, and returns main's exit code: non-zero
// on every rank when any rank failed, so mpirun's exit code does not depend on
// which rank it reports. `name` prefixes the failure line.
inline int run_tests_on_every_rank(MpiSession& session, MpiProcessGroup** world, const char* name) {
  int failed = 0;
  {
    // A test that fails on one rank can leave the others in a collective:
    // this timeout then ends the run instead of CTest's.
    auto group = session.world(std::chrono::seconds(60));
    *world = group.get();
    if (session.world_rank() != 0) {
      auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new FailuresOnly(session.world_rank()));
    }
    failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
    *world = nullptr;
  }
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed && session.world_rank() == 0) std::fprintf(stderr, "%s: a rank failed\n", name);
  return any_failed;
}

}  // namespace loom::test_support
