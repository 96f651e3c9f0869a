// ProcessGroup over MPI (parallel/mpi_process_group.h), checked against a
// single-rank computation: every rank builds every rank's input (a function
// of the rank), so it computes the expected result locally.
//
// Runs under mpirun (CTest process_group_np2/np3/np4); every rank runs every
// test in the same order, as the contract of process_group.h requires. The
// custom main at the bottom makes the run fail on every rank when any rank
// failed. Tests that need a layout the world size cannot give are skipped.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "tests/unit/mpi_test_main.h"
#include "parallel/topology.h"

namespace loom {
namespace {

MpiSession* g_session = nullptr;
MpiProcessGroup* g_world = nullptr;

MpiProcessGroup& world() { return *g_world; }

const std::vector<c10::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kBFloat16, at::kInt, at::kLong};
const std::vector<std::vector<int64_t>> kShapes = {{}, {1}, {7}, {3, 5}, {2, 3, 4}, {0}, {1 << 14}};

// Rank `rank`'s input: small integers (halves for floating dtypes), so that
// every sum over up to 8 ranks is exact in every dtype, bfloat16 included.
at::Tensor input_of(int rank, at::IntArrayRef shape, c10::ScalarType dtype, int salt = 0) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  at::Tensor values = at::arange(n, at::kDouble).remainder(13 + salt).sub(6).add(3 * rank + salt);
  if (at::isFloatingType(dtype)) values = values.mul(0.5);
  return values.reshape(shape).to(dtype);
}

// The reduction over all ranks' inputs, computed on this rank alone (in
// float64, exact for these inputs, then cast).
at::Tensor reduce_locally(at::IntArrayRef shape, c10::ScalarType dtype, ReduceOp op, int size, int salt = 0) {
  at::Tensor out = input_of(0, shape, dtype, salt).to(at::kDouble);
  for (int r = 1; r < size; ++r) {
    at::Tensor x = input_of(r, shape, dtype, salt).to(at::kDouble);
    if (op == ReduceOp::kMax) {
      out = at::maximum(out, x);
    } else if (op == ReduceOp::kMin) {
      out = at::minimum(out, x);
    } else {
      out = out + x;
    }
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

std::string this_rank() { return "rank " + std::to_string(world().world_rank()); }

TEST(MpiProcessGroup, WorldGroupHasEveryRankInOrder) {
  int world_size = 0, world_rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  EXPECT_EQ(world().size(), world_size);
  EXPECT_EQ(world().rank(), world_rank);
  EXPECT_EQ(world().name(), "world");
  EXPECT_EQ(world().backend(), "mpi");
  for (int r = 0; r < world_size; ++r) EXPECT_EQ(world().world_ranks()[static_cast<size_t>(r)], r);
  const char* level = std::getenv("LOOM_TEST_MPI_THREAD_LEVEL");
  const bool serialized = level && std::string(level) == "serialized";
  EXPECT_EQ(g_session->thread_level(), serialized ? MPI_THREAD_SERIALIZED : MPI_THREAD_MULTIPLE);
}

TEST(MpiProcessGroup, SecondSessionInOneProcessIsRefused) {
  try {
    MpiSession again;
    ADD_FAILURE() << "a second MpiSession was made";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("one per process"), std::string::npos) << e.what();
  }
}

TEST(MpiProcessGroup, AllReduceSumMaxMinMatchTheLocalReductionForEveryDtypeAndShape) {
  for (auto dtype : kDtypes) {
    for (const auto& shape : kShapes) {
      for (auto op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
        at::Tensor t = input_of(world().rank(), shape, dtype);
        world().all_reduce(t, {op})->wait();
        at::Tensor expected = reduce_locally(shape, dtype, op, world().size());
        EXPECT_TRUE(at::equal(t, expected)) << label(dtype, shape, op);
        EXPECT_EQ(t.sizes(), at::IntArrayRef(shape));
        EXPECT_EQ(t.scalar_type(), dtype);
      }
    }
  }
}

TEST(MpiProcessGroup, AllReduceAvgIsTheSumDividedByTheGroupSize) {
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    for (const auto& shape : kShapes) {
      at::Tensor t = input_of(world().rank(), shape, dtype);
      world().all_reduce(t, {ReduceOp::kAvg})->wait();
      at::Tensor expected = reduce_locally(shape, dtype, ReduceOp::kAvg, world().size());
      const double rtol = dtype == at::kBFloat16 ? 1e-2 : dtype == at::kFloat ? 1e-6 : 1e-12;
      EXPECT_TRUE(at::allclose(t.to(at::kDouble), expected.to(at::kDouble), rtol, 0)) << label(dtype, shape);
    }
  }
}

TEST(MpiProcessGroup, ParametersThatRequireGradAreReducedInPlace) {
  // Gradient and parameter syncs reduce leaves that require grad; the
  // collective is not recorded by autograd.
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor parameter = at::full({6}, 1.0 + world().rank(), dtype).set_requires_grad(true);
    world().all_reduce(parameter, {ReduceOp::kAvg})->wait();
    const double mean = (world().size() + 1) / 2.0;
    EXPECT_TRUE(at::equal(parameter, at::full({6}, mean, dtype))) << dtype_name(dtype);
    EXPECT_TRUE(parameter.requires_grad());
    EXPECT_FALSE(parameter.grad_fn());
  }
}

TEST(MpiProcessGroup, AvgOfIntegerTensorsIsRefusedNamingTheOp) {
  at::Tensor t = at::ones({4}, at::kLong);
  expect_refused([&] { world().all_reduce(t, {ReduceOp::kAvg}); },
                 {this_rank(), "all_reduce", "AVG of an int64 tensor is refused"});
  at::Tensor out = at::empty({2}, at::kInt);
  at::Tensor in = at::ones({2 * world().size()}, at::kInt);
  expect_refused([&] { world().reduce_scatter(out, in, {ReduceOp::kAvg}); },
                 {"reduce_scatter", "AVG of an int32 tensor"});
}

TEST(MpiProcessGroup, BFloat16SumIsRoundedOnceFromAnExactFloat32Sum) {
  // Values 1 + k/128 times 1, 2 or 4 are exact in bfloat16; their sums need
  // more than bfloat16's 8 significant bits, so summing in bfloat16 would
  // round after each addition. Expected: the exact sum, rounded once.
  auto input = [](int rank) {
    at::Tensor i = at::arange(1000, at::kDouble);
    at::Tensor mantissa = 1 + (i * 37 + rank * 11).remainder(128) / 128;
    at::Tensor scale = at::pow(2.0, (i + rank).remainder(3));
    return (mantissa * scale).to(at::kBFloat16);
  };
  at::Tensor t = input(world().rank());
  world().all_reduce(t)->wait();
  at::Tensor exact = at::zeros({1000}, at::kDouble);
  for (int r = 0; r < world().size(); ++r) exact += input(r).to(at::kDouble);
  EXPECT_TRUE(at::equal(t, exact.to(at::kBFloat16)));
}

TEST(MpiProcessGroup, AllGatherConcatenatesEveryRanksInputAlongDim0InRankOrder) {
  for (auto dtype : kDtypes) {
    for (const auto& shape : kShapes) {
      at::Tensor input = input_of(world().rank(), shape, dtype);
      std::vector<at::Tensor> parts;
      for (int r = 0; r < world().size(); ++r) parts.push_back(input_of(r, shape, dtype));
      at::Tensor expected = shape.empty() ? at::stack(parts) : at::cat(parts);
      at::Tensor output = at::full(expected.sizes(), -99, dtype);
      world().all_gather(output, input)->wait();
      EXPECT_TRUE(at::equal(output, expected)) << label(dtype, shape);
    }
  }
}

TEST(MpiProcessGroup, ReduceScatterGivesRankRTheRthChunkOfTheReduction) {
  const std::vector<std::vector<int64_t>> chunk_shapes = {{1}, {3}, {2, 3}, {0, 4}, {4096}};
  const int n = world().size();
  for (auto dtype : kDtypes) {
    for (const auto& chunk : chunk_shapes) {
      std::vector<int64_t> full = chunk;
      full[0] *= n;
      for (auto op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kAvg}) {
        if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) continue;
        at::Tensor input = input_of(world().rank(), full, dtype, /*salt=*/1);
        at::Tensor output = at::full(chunk, -99, dtype);
        world().reduce_scatter(output, input, {op})->wait();
        at::Tensor expected =
            reduce_locally(full, dtype, op, n, /*salt=*/1).narrow(0, world().rank() * chunk[0], chunk[0]);
        const double rtol = dtype == at::kBFloat16 ? 1e-2 : 1e-6;
        EXPECT_TRUE(at::allclose(output.to(at::kDouble), expected.to(at::kDouble), rtol, 0)) << label(dtype, full, op);
        // The input is left as it was.
        EXPECT_TRUE(at::equal(input, input_of(world().rank(), full, dtype, 1))) << label(dtype, full, op);
      }
    }
  }
}

TEST(MpiProcessGroup, ReduceScatterOfAnInputNotDivisibleByTheGroupSizeIsRefused) {
  if (world().size() == 1) GTEST_SKIP() << "every size is divisible by 1";
  const int64_t rows = 2 * world().size() + 1;
  at::Tensor input = at::ones({rows, 3});
  at::Tensor output = at::empty({2, 3});
  expect_refused([&] { world().reduce_scatter(output, input); },
                 {this_rank(), "group 'world'", "reduce_scatter", "input dim 0 (" + std::to_string(rows) + ")",
                  "not divisible by the group size (" + std::to_string(world().size()) + ")"});
}

TEST(MpiProcessGroup, ShapeMismatchesAndOverlapsAreRefusedBeforeAnythingIsSent) {
  const int n = world().size();
  at::Tensor input = at::ones({3, 2});
  expect_refused(
      [&] {
        world().all_gather(at::empty({3 * n + 1, 2}), input);
      },
      {"all_gather", "output shape must be [" + std::to_string(3 * n) + ", 2]"});
  expect_refused(
      [&] {
        world().all_gather(at::empty({3 * n, 2}, at::kDouble), input);
      },
      {"all_gather", "dtypes differ"});
  at::Tensor gathered = at::empty({3 * n, 2});
  expect_refused([&] { world().all_gather(gathered, gathered.narrow(0, 3 * world().rank(), 3)); },
                 {"all_gather", "overlap"});
  expect_refused(
      [&] {
        world().reduce_scatter(at::empty({2, 2}), at::ones({3 * n, 2}));
      },
      {"reduce_scatter", "output shape must be [3, 2]"});
  expect_refused([&] { world().reduce_scatter(at::empty({}), at::ones({})); },
                 {"reduce_scatter", "at least one dimension"});
}

TEST(MpiProcessGroup, TensorsTheMpiBackendCannotUseAreRefusedNamingTheOp) {
  at::Tensor transposed = at::zeros({4, 3}).t();
  expect_refused([&] { world().all_reduce(transposed); },
                 {this_rank(), "all_reduce", "float32 [3, 4] on cpu and not contiguous"});
  at::Tensor on_meta = at::empty({4}, at::TensorOptions().device(at::kMeta));
  expect_refused([&] { world().broadcast(on_meta); }, {"broadcast", "meta", "mpi backend needs dense cpu tensors"});
  at::Tensor half = at::zeros({4}, at::kHalf);
  expect_refused([&] { world().all_reduce(half); },
                 {"all_reduce", "float16 [4] on cpu", "supported dtypes: float32, float64, bfloat16, int32, int64"});
  expect_refused([&] { world().all_gather(at::zeros({4 * world().size()}), at::Tensor()); },
                 {"all_gather", "undefined"});
  at::Tensor ok = at::zeros({4});
  expect_refused([&] { world().broadcast(ok, {.root = 99}); }, {"broadcast", "root 99 is not a rank of group 'world'"});
  expect_refused([&] { world().send(ok, {.peer = -1}); }, {"send", "peer -1"});
  expect_refused([&] { world().recv(ok, {.peer = 0, .tag = 40000}); }, {"recv", "tag 40000"});
}

TEST(MpiProcessGroup, BroadcastGivesEveryRankTheRootsTensorFromEveryRoot) {
  for (int root = 0; root < world().size(); ++root) {
    for (auto dtype : kDtypes) {
      at::Tensor t = input_of(world().rank(), {5, 3}, dtype);
      world().broadcast(t, {.root = root})->wait();
      EXPECT_TRUE(at::equal(t, input_of(root, {5, 3}, dtype))) << "root " << root << " " << dtype_name(dtype);
    }
  }
}

TEST(MpiProcessGroup, SendRecvAroundARingDeliversEachRanksTensorToTheNext) {
  const int n = world().size();
  const int next = (world().rank() + 1) % n;
  const int previous = (world().rank() + n - 1) % n;
  for (auto dtype : kDtypes) {
    at::Tensor outgoing = input_of(world().rank(), {4, 6}, dtype);
    at::Tensor incoming = at::full({4, 6}, -99, dtype);
    // Both started before either is waited for: with blocking calls every
    // rank would send first and, for large messages, wait for a receiver.
    auto receiving = world().recv(incoming, {.peer = previous, .tag = 7});
    auto sending = world().send(outgoing, {.peer = next, .tag = 7});
    receiving->wait();
    sending->wait();
    EXPECT_TRUE(at::equal(incoming, input_of(previous, {4, 6}, dtype))) << dtype_name(dtype);
  }
}

TEST(MpiProcessGroup, RecvMatchesSendsByTagNotByOrder) {
  const int n = world().size();
  const int next = (world().rank() + 1) % n;
  const int previous = (world().rank() + n - 1) % n;
  at::Tensor first = at::full({3}, 100.0 + world().rank());
  at::Tensor second = at::full({3}, 200.0 + world().rank());
  auto send_first = world().send(first, {.peer = next, .tag = 1});
  auto send_second = world().send(second, {.peer = next, .tag = 2});
  at::Tensor got_second = at::zeros({3});
  at::Tensor got_first = at::zeros({3});
  auto recv_second = world().recv(got_second, {.peer = previous, .tag = 2});
  auto recv_first = world().recv(got_first, {.peer = previous, .tag = 1});
  recv_second->wait();
  recv_first->wait();
  send_first->wait();
  send_second->wait();
  EXPECT_TRUE(at::equal(got_first, at::full({3}, 100.0 + previous)));
  EXPECT_TRUE(at::equal(got_second, at::full({3}, 200.0 + previous)));
}

TEST(MpiProcessGroup, BarrierCompletesOnEveryRank) {
  auto work = world().barrier();
  work->wait();
  EXPECT_TRUE(work->is_completed());
}

TEST(MpiProcessGroup, WaitWithATimeoutReturnsOnceDoneAndIsCompletedStaysTrue) {
  at::Tensor t = at::full({8}, 1.0);
  auto work = world().all_reduce(t);
  work->wait(std::chrono::seconds(20));
  EXPECT_TRUE(work->is_completed());
  EXPECT_TRUE(at::equal(t, at::full({8}, static_cast<double>(world().size()))));
  work->wait(std::chrono::milliseconds(1));  // already done: returns at once
  EXPECT_TRUE(work->is_completed());
}

TEST(MpiProcessGroup, PollingIsCompletedAloneDrivesTheOperationToCompletion) {
  at::Tensor t = input_of(world().rank(), {1 << 12}, at::kFloat);
  auto work = world().all_reduce(t);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!work->is_completed() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_TRUE(work->is_completed());
  EXPECT_TRUE(at::equal(t, reduce_locally({1 << 12}, at::kFloat, ReduceOp::kSum, world().size())));
}

TEST(MpiProcessGroup, LargeMessagesCompleteThroughTheWaitLoop) {
  // 8 MiB per tensor: past every eager limit, so MPI runs its multi-round
  // protocols, which advance only while wait() keeps calling MPI_Test.
  const int64_t n = 1 << 21;
  at::Tensor t = input_of(world().rank(), {n}, at::kFloat);
  world().all_reduce(t)->wait();
  EXPECT_TRUE(at::equal(t, reduce_locally({n}, at::kFloat, ReduceOp::kSum, world().size())));
  const int size = world().size();
  at::Tensor outgoing = input_of(world().rank(), {n}, at::kFloat);
  at::Tensor incoming = at::empty({n}, at::kFloat);
  auto receiving = world().recv(incoming, {.peer = (world().rank() + size - 1) % size});
  auto sending = world().send(outgoing, {.peer = (world().rank() + 1) % size});
  sending->wait();
  receiving->wait();
  EXPECT_TRUE(at::equal(incoming, input_of((world().rank() + size - 1) % size, {n}, at::kFloat)));
}

TEST(MpiProcessGroup, SeveralOutstandingCollectivesCompleteWhateverTheOrderOfWaits) {
  at::Tensor a = input_of(world().rank(), {100}, at::kFloat);
  at::Tensor b = input_of(world().rank(), {3, 3}, at::kLong);
  at::Tensor c = input_of(world().rank(), {7}, at::kDouble);
  auto work_a = world().all_reduce(a);
  auto work_b = world().all_reduce(b, {ReduceOp::kMax});
  auto barrier = world().barrier();
  auto work_c = world().broadcast(c, {.root = world().size() - 1});
  work_c->wait();
  barrier->wait();
  work_b->wait();
  work_a->wait();
  EXPECT_TRUE(at::equal(a, reduce_locally({100}, at::kFloat, ReduceOp::kSum, world().size())));
  EXPECT_TRUE(at::equal(b, reduce_locally({3, 3}, at::kLong, ReduceOp::kMax, world().size())));
  EXPECT_TRUE(at::equal(c, input_of(world().size() - 1, {7}, at::kDouble)));
}

TEST(MpiProcessGroup, DroppingAnUnfinishedWorkWaitsForIt) {
  at::Tensor t = at::ones({16});
  world().all_reduce(t);  // the returned Work is destroyed here, which waits
  EXPECT_TRUE(at::equal(t, at::full({16}, static_cast<double>(world().size()))));
}

TEST(MpiProcessGroup, CollectivesIssuedFromAnotherThreadComplete) {
  // Autograd hooks run collectives from the engine's threads.
  at::Tensor t = input_of(world().rank(), {32}, at::kFloat);
  std::thread worker([&] { world().all_reduce(t)->wait(); });
  worker.join();
  EXPECT_TRUE(at::equal(t, reduce_locally({32}, at::kFloat, ReduceOp::kSum, world().size())));
}

// --- sub-groups of the dp x pp x tp grid ------------------------------------------

ParallelDims dims_of(int64_t dp, int64_t pp, int64_t tp) {
  ParallelDims dims;
  dims.world = dp * pp * tp;
  dims.dp = dp;
  dims.pp = pp;
  dims.tp = tp;
  return dims;
}

std::vector<int> members(const ParallelDims& dims, ParallelDims::Coords me, int64_t ParallelDims::Coords::*axis,
                         int64_t extent) {
  std::vector<int> out;
  for (int64_t i = 0; i < extent; ++i) {
    ParallelDims::Coords c = me;
    c.*axis = i;
    out.push_back(static_cast<int>(dims.rank_of(c)));
  }
  return out;
}

TEST(MpiProcessGroup, Dp2Tp2GridGivesTpGroups01And23AndDpGroups02And13) {
  if (world().size() != 4) GTEST_SKIP() << "needs 4 ranks";
  GridGroups grid = split_grid(world(), dims_of(2, 1, 2));
  const int me = world().rank();
  const std::vector<std::vector<int>> tp_groups = {{0, 1}, {0, 1}, {2, 3}, {2, 3}};
  const std::vector<std::vector<int>> dp_groups = {{0, 2}, {1, 3}, {0, 2}, {1, 3}};
  EXPECT_EQ(grid.tp->world_ranks(), tp_groups[static_cast<size_t>(me)]);
  EXPECT_EQ(grid.dp->world_ranks(), dp_groups[static_cast<size_t>(me)]);
  EXPECT_EQ(grid.pp->world_ranks(), std::vector<int>{me});
  EXPECT_EQ(grid.tp->rank(), me % 2);
  EXPECT_EQ(grid.dp->rank(), me / 2);

  // Independent collectives on the two axes, both outstanding at once, each
  // summing the world ranks of its own members only.
  at::Tensor tp_sum = at::full({5}, me, at::kLong);
  at::Tensor dp_sum = at::full({5}, 10 * me, at::kLong);
  auto tp_work = grid.tp->all_reduce(tp_sum);
  auto dp_work = grid.dp->all_reduce(dp_sum);
  dp_work->wait();
  tp_work->wait();
  const auto& tp = tp_groups[static_cast<size_t>(me)];
  const auto& dp = dp_groups[static_cast<size_t>(me)];
  EXPECT_TRUE(at::equal(tp_sum, at::full({5}, tp[0] + tp[1], at::kLong)));
  EXPECT_TRUE(at::equal(dp_sum, at::full({5}, 10 * (dp[0] + dp[1]), at::kLong)));

  // An all-gather over tp and a reduce-scatter over dp, interleaved.
  at::Tensor gathered = at::empty({4}, at::kFloat);
  auto gather = grid.tp->all_gather(gathered, at::full({2}, static_cast<float>(me)));
  at::Tensor chunk = at::empty({2}, at::kFloat);
  auto scatter = grid.dp->reduce_scatter(chunk, at::arange(4, at::kFloat) + me);
  gather->wait();
  scatter->wait();
  EXPECT_TRUE(at::equal(gathered, at::tensor({tp[0], tp[0], tp[1], tp[1]}, at::kFloat)));
  const int64_t offset = 2 * grid.dp->rank();
  EXPECT_TRUE(at::equal(chunk, at::arange(offset, offset + 2, at::kFloat) * 2 + (dp[0] + dp[1])));
}

TEST(MpiProcessGroup, EveryLayoutOfTheWorldGivesGroupsAlongEachAxisOfTheGrid) {
  const int n = world().size();
  for (int64_t dp = 1; dp <= n; ++dp) {
    for (int64_t pp = 1; pp <= n; ++pp) {
      if (n % (dp * pp) != 0) continue;
      const int64_t tp = n / (dp * pp);
      const ParallelDims dims = dims_of(dp, pp, tp);
      const std::string layout = "dp" + std::to_string(dp) + " pp" + std::to_string(pp) + " tp" + std::to_string(tp);
      GridGroups grid = split_grid(world(), dims);
      const ParallelDims::Coords me = dims.coords_of(world().rank());
      EXPECT_EQ(grid.tp->world_ranks(), members(dims, me, &ParallelDims::Coords::tp, tp)) << layout;
      EXPECT_EQ(grid.pp->world_ranks(), members(dims, me, &ParallelDims::Coords::pp, pp)) << layout;
      EXPECT_EQ(grid.dp->world_ranks(), members(dims, me, &ParallelDims::Coords::dp, dp)) << layout;
      EXPECT_EQ(grid.tp->rank(), me.tp) << layout;
      EXPECT_EQ(grid.pp->rank(), me.pp) << layout;
      EXPECT_EQ(grid.dp->rank(), me.dp) << layout;
      EXPECT_EQ(grid.tp->name(), "tp");
      for (ProcessGroup* group : {grid.tp.get(), grid.pp.get(), grid.dp.get()}) {
        at::Tensor t = at::full({3}, world().rank(), at::kInt);
        group->all_reduce(t)->wait();
        int expected = 0;
        for (int r : group->world_ranks()) expected += r;
        EXPECT_TRUE(at::equal(t, at::full({3}, expected, at::kInt))) << layout << " group " << group->name();
      }
    }
  }
}

// The tests run every rank on this host, so a rank's place on the node is
// its place in the group, for the world and for a group whose order is the
// world's reversed (the GPU a rank would take follows the group's order).
TEST(MpiProcessGroup, NodeLocalRankCountsTheGroupsRanksOnThisNodeInGroupOrder) {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  MPI_Get_processor_name(name, &length);
  at::Tensor hash = at::tensor({static_cast<int64_t>(std::hash<std::string>{}(std::string(name, length)) >> 1)});
  at::Tensor lowest = hash.clone(), highest = hash.clone();
  world().all_reduce(lowest, {ReduceOp::kMin})->wait();
  world().all_reduce(highest, {ReduceOp::kMax})->wait();
  if (!at::equal(lowest, highest)) GTEST_SKIP() << "the ranks are on several nodes";  // every rank skips
  const auto place = world().node_ranks();
  EXPECT_EQ(place.local_rank, world().rank());
  EXPECT_EQ(place.size, world().size());
  auto reversed = world().split(0, world().size() - world().rank(), "reversed");
  EXPECT_EQ(reversed->rank(), world().size() - 1 - world().rank());
  EXPECT_EQ(reversed->node_ranks().local_rank, reversed->rank());
}

TEST(MpiProcessGroup, SplitGridRefusesDimsThatDoNotMatchTheWorld) {
  ParallelDims dims = dims_of(1, 1, world().size() + 1);
  expect_refused([&] { split_grid(world(), dims); }, {"split_grid", "dp (1) * pp (1) * tp (", "group 'world'"});
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  // LOOM_TEST_MPI_THREAD_LEVEL=serialized runs everything on the locked path
  // (MpiSession in parallel/mpi_process_group.h) that an MPI without
  // MPI_THREAD_MULTIPLE takes.
  const char* level = std::getenv("LOOM_TEST_MPI_THREAD_LEVEL");
  const bool serialized = level && std::string(level) == "serialized";
  loom::MpiSession session(&argc, &argv, serialized ? MPI_THREAD_SERIALIZED : MPI_THREAD_MULTIPLE);
  ::testing::InitGoogleTest(&argc, argv);
  loom::g_session = &session;
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_process_group");
}
