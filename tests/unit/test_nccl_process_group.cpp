// NcclProcessGroup (parallel/nccl_process_group.h), checked against results
// every rank computes alone: each rank's input is a function of its rank, in
// small integers and halves, so that every sum is exact in float32 and
// bfloat16 alike.
//
// Runs under mpirun (CTest nccl_process_group_np1/np2/np4), one GPU per rank:
// rank r uses device (node-local rank) % (visible devices). NCCL refuses two
// ranks of one communicator on one GPU, so when a node has fewer GPUs than
// ranks (or none, as on CI) every test is skipped, on every rank alike: the
// ranks agree on it first, since a rank that ran a collective alone would
// wait for the others until the timeout.
//
// With --missing-peer (CTest nccl_missing_peer, through
// tests/multirank/nccl_missing_peer.sh) it runs no test but a start-up on 2
// ranks whose rank 1 never joins the NCCL communicator: rank 0 must end the
// job at the deadline, naming world rank 1.
#include <ATen/ATen.h>
#include <ATen/cuda/Sleep.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/cuda.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/nccl_process_group.h"
#include "tests/unit/mpi_test_main.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;

// This rank's input: small integers and halves (see the top of the file).
at::Tensor input_of(int rank, at::IntArrayRef shape, c10::ScalarType dtype) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  at::Tensor values = at::arange(n, at::kDouble).remainder(13).sub(6).add(3 * rank).mul(0.5);
  return values.reshape(shape).to(dtype);
}

// The reduction of every rank's input, computed on this rank alone in
// float64 (exact for these inputs), then cast.
at::Tensor reduce_locally(at::IntArrayRef shape, c10::ScalarType dtype, ReduceOp op, int size) {
  at::Tensor out = input_of(0, shape, dtype).to(at::kDouble);
  for (int r = 1; r < size; ++r) {
    at::Tensor x = input_of(r, shape, dtype).to(at::kDouble);
    out = op == ReduceOp::kMax ? at::maximum(out, x) : op == ReduceOp::kMin ? at::minimum(out, x) : out + x;
  }
  if (op == ReduceOp::kAvg) out = out / size;
  return out.to(dtype);
}

std::string label(c10::ScalarType dtype, at::IntArrayRef shape, ReduceOp op = ReduceOp::kSum) {
  std::ostringstream os;
  os << dtype_name(dtype) << " " << shape << " " << to_string(op);
  return os.str();
}

// Expects `fn` to throw std::invalid_argument whose message contains every fragment.
void expect_refused(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  std::string message = "(no exception)";
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    message = e.what();
  } catch (const std::exception& e) {
    message = std::string("(not std::invalid_argument) ") + e.what();
  }
  EXPECT_FALSE(message.starts_with("(")) << message;
  for (const auto& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
  }
}

// One NCCL group over the world for the whole suite (making a communicator
// takes a while), or the reason every test is skipped.
class NcclProcessGroupTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    MpiProcessGroup& world = *g_world;
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(world.comm(), MPI_COMM_TYPE_SHARED, world.rank(), MPI_INFO_NULL, &node);
    int local_rank = 0, local_size = 1;
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    const int devices = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
    int ready = devices >= local_size ? 1 : 0;
    int all_ready = 0;
    MPI_Allreduce(&ready, &all_ready, 1, MPI_INT, MPI_MIN, world.comm());
    if (!all_ready) {
      skip_reason_ = "needs one CUDA device per rank; rank " + std::to_string(world.rank()) + " sees " +
                     std::to_string(devices) + " for the " + std::to_string(local_size) + " ranks on its node" +
                     (ready ? ", another rank sees too few" : "");
      return;
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(local_rank % devices));
    group_ = std::make_unique<NcclProcessGroup>(world);
  }

  static void TearDownTestSuite() { group_.reset(); }

  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }

  static NcclProcessGroup& nccl() { return *group_; }
  static at::TensorOptions on_gpu(c10::ScalarType dtype) {
    return at::TensorOptions().dtype(dtype).device(c10::kCUDA, group_->device());
  }
  static at::Tensor gpu(const at::Tensor& cpu) { return cpu.to(on_gpu(cpu.scalar_type())); }

  static inline std::unique_ptr<NcclProcessGroup> group_;
  static inline std::string skip_reason_;
};

TEST_F(NcclProcessGroupTest, HasTheRanksAndNameOfTheMpiGroupItWasMadeFrom) {
  EXPECT_EQ(nccl().backend(), "nccl");
  EXPECT_EQ(nccl().name(), g_world->name());
  EXPECT_EQ(nccl().rank(), g_world->rank());
  EXPECT_EQ(nccl().size(), g_world->size());
  EXPECT_EQ(nccl().world_ranks(), g_world->world_ranks());
  EXPECT_EQ(nccl().timeout(), g_world->timeout());
  EXPECT_EQ(nccl().device(), c10::cuda::current_device());
}

TEST_F(NcclProcessGroupTest, AllReduceSumAvgMaxMinOfFloat32AndBFloat16MatchTheKnownResult) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {7}, {3, 5}, {1 << 14}};
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const auto& shape : shapes) {
      for (auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin}) {
        at::Tensor t = gpu(input_of(nccl().rank(), shape, dtype));
        nccl().all_reduce(t, {op})->wait();
        at::Tensor expected = reduce_locally(shape, dtype, op, nccl().size());
        ASSERT_EQ(t.sizes(), at::IntArrayRef(shape));
        ASSERT_EQ(t.scalar_type(), dtype);
        if (op == ReduceOp::kAvg) {
          // ncclAvg may scale each input before summing, rounding each
          // term: close to the exact mean, not equal (nor exactly 0 where
          // the sum is 0).
          const bool bf16 = dtype == at::kBFloat16;
          EXPECT_TRUE(at::allclose(t.cpu().to(at::kDouble), expected.to(at::kDouble), bf16 ? 1e-2 : 1e-6,
                                   bf16 ? 1e-1 : 1e-5))
              << label(dtype, shape, op);
        } else {
          EXPECT_TRUE(at::equal(t.cpu(), expected)) << label(dtype, shape, op);
        }
      }
    }
  }
}

TEST_F(NcclProcessGroupTest, AllReduceOfIntegersSumsExactly) {
  at::Tensor t = at::full({5}, 1000 + nccl().rank(), on_gpu(at::kLong));
  nccl().all_reduce(t)->wait();
  const int n = nccl().size();
  EXPECT_TRUE(at::equal(t.cpu(), at::full({5}, 1000 * n + n * (n - 1) / 2, at::kLong)));
}

TEST_F(NcclProcessGroupTest, AllGatherConcatenatesEveryRanksInputAlongDim0InRankOrder) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {3}, {2, 3}, {4096}};
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    for (const auto& shape : shapes) {
      std::vector<at::Tensor> parts;
      for (int r = 0; r < nccl().size(); ++r) parts.push_back(input_of(r, shape, dtype));
      at::Tensor expected = shape.empty() ? at::stack(parts) : at::cat(parts);
      at::Tensor output = at::full(expected.sizes(), -99, on_gpu(dtype));
      nccl().all_gather(output, gpu(input_of(nccl().rank(), shape, dtype)))->wait();
      EXPECT_TRUE(at::equal(output.cpu(), expected)) << label(dtype, shape);
    }
  }
}

TEST_F(NcclProcessGroupTest, ReduceScatterGivesRankRTheRthChunkOfTheReduction) {
  const int n = nccl().size();
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const std::vector<int64_t>& chunk : {std::vector<int64_t>{3}, std::vector<int64_t>{2, 3}}) {
      std::vector<int64_t> full = chunk;
      full[0] *= n;
      for (auto op : {ReduceOp::kSum, ReduceOp::kMax}) {
        at::Tensor output = at::full(chunk, -99, on_gpu(dtype));
        nccl().reduce_scatter(output, gpu(input_of(nccl().rank(), full, dtype)), {op})->wait();
        at::Tensor expected = reduce_locally(full, dtype, op, n).chunk(n, 0)[static_cast<size_t>(nccl().rank())];
        EXPECT_TRUE(at::equal(output.cpu(), expected)) << label(dtype, full, op);
      }
    }
  }
}

TEST_F(NcclProcessGroupTest, BroadcastGivesEveryRankTheRootsTensor) {
  for (int root = 0; root < nccl().size(); ++root) {
    for (auto dtype : {at::kFloat, at::kBFloat16, at::kInt}) {
      at::Tensor t = gpu(input_of(nccl().rank(), {4, 3}, dtype));
      nccl().broadcast(t, {.root = root})->wait();
      EXPECT_TRUE(at::equal(t.cpu(), input_of(root, {4, 3}, dtype))) << "root " << root << " " << dtype_name(dtype);
    }
  }
}

TEST_F(NcclProcessGroupTest, SendRecvAroundTheRingGivesEachRankItsPredecessorsTensor) {
  const int n = nccl().size();
  if (n < 2) GTEST_SKIP() << "a ring needs two ranks";
  const int next = (nccl().rank() + 1) % n;
  const int previous = (nccl().rank() + n - 1) % n;
  at::Tensor mine = gpu(input_of(nccl().rank(), {1000}, at::kFloat));
  at::Tensor received = at::full({1000}, -99, on_gpu(at::kFloat));
  // Each send holds the group's stream until its recv runs (Note [NCCL send
  // and recv]): even ranks send first, odd ranks receive first, so every
  // send meets a rank that is ready to receive. With an odd size, the last
  // (even) rank sends to rank 0, which receives right after its own send.
  if (nccl().rank() % 2 == 0) {
    nccl().send(mine, {.peer = next})->wait();
    nccl().recv(received, {.peer = previous})->wait();
  } else {
    nccl().recv(received, {.peer = previous})->wait();
    nccl().send(mine, {.peer = next})->wait();
  }
  EXPECT_TRUE(at::equal(received.cpu(), input_of(previous, {1000}, at::kFloat)));
}

TEST_F(NcclProcessGroupTest, SeveralOperationsInFlightAllCompleteWhenWaitedInReverseOrder) {
  std::vector<at::Tensor> tensors;
  std::vector<std::unique_ptr<Work>> works;
  for (int i = 0; i < 4; ++i) {
    tensors.push_back(at::full({256}, i + nccl().rank(), on_gpu(at::kFloat)));
    works.push_back(nccl().all_reduce(tensors.back()));
  }
  for (int i = 3; i >= 0; --i) works[static_cast<size_t>(i)]->wait();
  const int n = nccl().size();
  for (int i = 0; i < 4; ++i) {
    const double expected = i * n + n * (n - 1) / 2.0;
    EXPECT_TRUE(at::equal(tensors[static_cast<size_t>(i)].cpu(), at::full({256}, expected, at::kFloat)))
        << "operation " << i;
    EXPECT_TRUE(works[static_cast<size_t>(i)]->is_completed());
  }
}

TEST_F(NcclProcessGroupTest, InputsWrittenOnTheCallersSideStreamAreReadAfterTheyAreWritten) {
  // The input is produced on a stream other than the default one; the
  // operation must wait for it (the event on the caller's current stream),
  // and the caller's stream must see the result after wait.
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, nccl().device());
  c10::cuda::CUDAStreamGuard on_side(side);
  at::Tensor big = at::ones({1 << 20}, on_gpu(at::kFloat));
  for (int i = 0; i < 20; ++i) big.mul_(2);  // 2^20, queued on the side stream
  nccl().all_reduce(big)->wait();
  at::Tensor after = big.add(1);  // queued on the side stream after wait
  EXPECT_TRUE(at::equal(after.cpu(), at::full({1 << 20}, std::ldexp(1.0, 20) * nccl().size() + 1, at::kFloat)));
}

TEST_F(NcclProcessGroupTest, BarrierCompletesOnEveryRankOnceTheCallersStreamHasCaughtUp) {
  auto work = nccl().barrier();
  work->wait();  // the caller's stream waits; the host does not
  c10::cuda::getCurrentCUDAStream(nccl().device()).synchronize();
  EXPECT_TRUE(work->is_completed());
}

TEST_F(NcclProcessGroupTest, WaitReturnsBeforeTheGpuGetsThereAndTheStreamStillSeesTheResult) {
  // Half a second of GPU time queued before the collective: a wait that
  // spun on the host until the GPU finished would take at least that long.
  const int n = nccl().size();
  at::Tensor t = at::full({1024}, 1 + nccl().rank(), on_gpu(at::kFloat));
  at::cuda::sleep(int64_t{1} << 30);  // ~0.5 s at 2 GHz
  const auto start = std::chrono::steady_clock::now();
  auto work = nccl().all_reduce(t);
  work->wait();
  at::Tensor after = t.mul(2);  // queued after the wait: runs after the all_reduce
  const double host_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(host_seconds, 0.2) << "wait blocked the host";
  EXPECT_FALSE(work->is_completed()) << "the GPU was still sleeping";
  EXPECT_TRUE(at::equal(after.cpu(), at::full({1024}, n * (n + 1), at::kFloat)));  // .cpu() synchronizes
  EXPECT_TRUE(work->is_completed());
}

TEST_F(NcclProcessGroupTest, ADroppedWorkStillCompletesAndItsResultIsSeenByTheCallersStream) {
  // The Work goes at once; the watchdog keeps the tensor until NCCL is done
  // with it, and the destructor made the caller's stream wait.
  const int n = nccl().size();
  at::Tensor t = at::full({4096}, 1, on_gpu(at::kFloat));
  at::cuda::sleep(int64_t{1} << 26);
  nccl().all_reduce(t);
  EXPECT_TRUE(at::equal(t.add(0).cpu(), at::full({4096}, n, at::kFloat)));
}

TEST_F(NcclProcessGroupTest, RefusesCpuNonContiguousAndUnsupportedTensorsNamingRankGroupAndOp) {
  // Refused on the calling rank before anything is queued; every rank makes
  // the same refused calls, so the groups' operation counts stay equal.
  const std::string me = "rank " + std::to_string(nccl().world_rank());
  expect_refused([&] { nccl().all_reduce(at::ones({4}, at::kFloat)); },
                 {me, "group 'world'", "all_reduce", "on cpu", "the nccl backend needs dense cuda tensors"});
  at::Tensor square = at::ones({4, 3}, on_gpu(at::kFloat));
  expect_refused([&] { nccl().all_reduce(square.t()); }, {"all_reduce", "not contiguous"});
  expect_refused([&] { nccl().broadcast(square.t()); }, {"broadcast", "not contiguous"});
  expect_refused([&] { nccl().all_reduce(at::ones({4}, on_gpu(at::kHalf))); }, {"float16", "supported dtypes"});
  expect_refused([&] { nccl().all_reduce(at::ones({4}, on_gpu(at::kLong)), {ReduceOp::kAvg}); },
                 {"AVG of an int64 tensor is refused"});
  at::Tensor gathered = at::empty({4 * nccl().size() + 1}, on_gpu(at::kFloat));
  expect_refused([&] { nccl().all_gather(gathered, at::ones({4}, on_gpu(at::kFloat))); },
                 {"all_gather", "output shape must be"});
  at::Tensor gathered_on_cpu = at::empty({4 * nccl().size()}, at::kFloat);
  expect_refused([&] { nccl().all_gather(gathered_on_cpu, at::ones({4}, on_gpu(at::kFloat))); },
                 {"all_gather", "output", "on cpu"});
  expect_refused([&] { nccl().broadcast(square, {.root = nccl().size()}); }, {"broadcast", "root"});
  expect_refused([&] { nccl().send(square, {.peer = nccl().rank()}); }, {"send", "is this rank"});
  expect_refused([&] { nccl().recv(square, {.peer = -1}); }, {"recv", "peer -1"});
}

// The one test that runs where there is no GPU (as on CI).
TEST(NcclProcessGroupWithoutGpu, ConstructionThrowsNamingTheRankBeforeAnyCommunication) {
  if (c10::cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is visible";
  try {
    NcclProcessGroup group(*g_world);
    ADD_FAILURE() << "made an NCCL group without a CUDA device";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("rank " + std::to_string(g_world->world_rank())), std::string::npos) << message;
    EXPECT_NE(message.find("none is visible"), std::string::npos) << message;
  }
  // Nothing was sent: the world group's next collective still pairs up.
  at::Tensor t = at::ones({2}, at::kInt);
  g_world->all_reduce(t)->wait();
  EXPECT_TRUE(at::equal(t, at::full({2}, g_world->size(), at::kInt)));
}

}  // namespace
}  // namespace loom

namespace loom {
namespace {

// --missing-peer: a 2-rank NCCL start-up whose rank 1 plays its part of the
// MPI broadcast of the ncclUniqueId (the constructor's one MPI step, an int64
// tensor of sizeof(ncclUniqueId) / 8 elements from group rank 0), then never
// calls ncclCommInitRankConfig. Rank 0's constructor must end the job (exit
// non-zero, through MpiSession::abort) at its 5 s deadline, naming world
// rank 1; the script checks the message and the time. Prints "SKIPPED" and
// returns 0 on every rank where rank 0 sees no GPU.
int missing_peer_check(MpiSession& session) {
  auto world = session.world(std::chrono::seconds(5));
  if (world->size() != 2) {
    std::fprintf(stderr, "--missing-peer needs 2 ranks, got %d\n", world->size());
    return 1;
  }
  at::Tensor has_gpu = at::full({1}, c10::cuda::device_count() > 0 ? 1 : 0, at::kInt);
  world->broadcast(has_gpu, {.root = 0})->wait();
  if (has_gpu.item<int>() == 0) {
    if (world->rank() == 0) std::printf("SKIPPED: rank 0 sees no CUDA device\n");
    return 0;
  }
  if (world->rank() == 0) {
    c10::cuda::set_device(0);
    NcclProcessGroup group(*world);  // must not return
    std::printf("FAILED: rank 0 made an NCCL group although rank 1 never joined\n");
    return 1;
  }
  at::Tensor id_bytes = at::zeros({16}, at::kLong);  // sizeof(ncclUniqueId) == 128
  world->broadcast(id_bytes, {.root = 0})->wait();
  // Never joins; rank 0's abort ends this process too. The sleep is longer
  // than the script's limit, so a rank 0 that did not end the job fails it.
  std::this_thread::sleep_for(std::chrono::seconds(120));
  return 1;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  if (argc > 1 && std::string(argv[1]) == "--missing-peer") return loom::missing_peer_check(session);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_nccl_process_group");
}
