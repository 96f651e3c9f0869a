// Tensor-parallel communication on this machine, run under mpirun (the world
// is the tp group):
//
//   mpirun -np P build/bench_tp_comm [--hidden H --layers L --heads N --kv-heads K
//                                     --intermediate I --vocab V --seq S --micro B]
//
// 1. Bytes each rank sends for one micro-batch's forward and backward of the
//    model through TensorParallelLayerFactory (sequence parallelism off and
//    on), counted at the process group, against the analytic count of the
//    collectives Megatron's layout needs. Bytes are counted as a ring
//    algorithm sends them (what NCCL calls bus bytes): an all-reduce of n
//    bytes sends 2 (p-1)/p n per rank, an all-gather or reduce-scatter of n
//    bytes in all (p-1)/p n. A ratio of 1 means loom issues exactly the
//    collectives the layout needs and no more.
// 2. All-reduce bus bandwidth, 2 (p-1)/p bytes / time, of loom's MPI process
//    group (ProcessGroup::all_reduce + Work::wait on a CPU tensor) against a
//    plain MPI_Allreduce loop on a raw buffer of the same size: the ratio is
//    loom's overhead.
//
// Results and the command that produced them: docs/performance.md.
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/tensor_parallel_model.h"
#include "parallel/vocab_parallel.h"
#include "model/llama.h"
#include "optim/optimizer.h"

namespace loom {
namespace {

// A ProcessGroup that forwards every operation to another one and counts the
// bytes this rank sends in it, as a ring algorithm would (see the top).
class CountingGroup final : public ProcessGroup {
 public:
  explicit CountingGroup(ProcessGroup& inner)
      : ProcessGroup(inner.name(), inner.rank(), inner.world_ranks(), inner.timeout()), inner_(&inner) {}

  std::string_view backend() const override { return inner_->backend(); }
  double bytes() const { return bytes_; }
  void reset() { bytes_ = 0; }

  std::unique_ptr<Work> all_reduce(const at::Tensor& t, const AllReduceOptions& o) override {
    bytes_ += 2.0 * share() * bytes_of(t);
    return inner_->all_reduce(t, o);
  }
  std::unique_ptr<Work> all_gather(const at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    bytes_ += share() * bytes_of(out);
    return inner_->all_gather(out, in, o);
  }
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                       const ReduceScatterOptions& o) override {
    bytes_ += share() * bytes_of(in);
    return inner_->reduce_scatter(out, in, o);
  }
  std::unique_ptr<Work> broadcast(const at::Tensor& t, const BroadcastOptions& o) override {
    bytes_ += bytes_of(t);
    return inner_->broadcast(t, o);
  }
  std::unique_ptr<Work> send(const at::Tensor& t, const SendOptions& o) override {
    bytes_ += bytes_of(t);
    return inner_->send(t, o);
  }
  std::unique_ptr<Work> recv(const at::Tensor& t, const RecvOptions& o) override { return inner_->recv(t, o); }
  std::unique_ptr<Work> barrier(const BarrierOptions& o) override { return inner_->barrier(o); }

 private:
  double share() const { return static_cast<double>(size() - 1) / size(); }
  static double bytes_of(const at::Tensor& t) { return static_cast<double>(t.numel() * t.element_size()); }

  ProcessGroup* inner_;
  double bytes_ = 0;
};

struct Shape {
  int64_t hidden = 128, layers = 8, heads = 8, kv_heads = 4, intermediate = 384, vocab = 2048, seq = 128, micro = 2;
};

// The bytes one rank sends for one micro-batch (fp32), as the layout needs them:
// A = B S H activation elements, N = B S tokens, p = tp.
//   without sequence parallelism: all-reduces of A: the embedding (g), two
//     per layer forward (g after o_proj and down_proj), the head's f and two
//     per layer backward (one f for q/k/v, one for gate/up);
//   with it: as many all-gathers and reduce-scatters of A, twice over (each
//     is the other's backward), plus an all-reduce of H per norm (its
//     weight's f) in backward;
//   both: the vocab-parallel cross-entropy's all-reduces of N (max) and 2N.
double analytic_bytes(const Shape& s, int64_t p, bool sequence_parallel) {
  if (p == 1) return 0;
  const double ring = static_cast<double>(p - 1) / p, f32 = 4;
  const double a = static_cast<double>(s.micro * s.seq * s.hidden), n = static_cast<double>(s.micro * s.seq);
  // Collectives of A per micro-batch: 1 + 2L forward (embedding, two per
  // layer) and 1 + 2L backward (head, two per layer).
  const double ops = 2 + 4 * static_cast<double>(s.layers);
  const double cross_entropy = 2 * ring * f32 * 3 * n;
  if (!sequence_parallel) return ops * 2 * ring * f32 * a + cross_entropy;  // all-reduces
  // Each all-reduce becomes an all-gather and a reduce-scatter (one forward,
  // the other backward, or the reverse): the same bytes.
  const double norms = 2 * static_cast<double>(s.layers) + 1;
  return 2 * ops * ring * f32 * a + norms * 2 * ring * f32 * static_cast<double>(s.hidden) + cross_entropy;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void model_bytes(MpiProcessGroup& world, const Shape& s) {
  CountingGroup tp(world);
  ModelConfig config;
  config.hidden_size = s.hidden;
  config.intermediate_size = s.intermediate;
  config.num_layers = s.layers;
  config.num_heads = s.heads;
  config.num_kv_heads = s.kv_heads;
  config.vocab_size = s.vocab;
  config.max_seq_len = s.seq;
  if (world.rank() == 0) {
    std::printf("model: hidden %ld, %ld layers, heads %ld/%ld, intermediate %ld, vocab %ld; micro-batch %ld x %ld tokens, fp32\n",
                s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab, s.micro, s.seq);
    std::printf("%-4s %-5s %18s %18s %8s\n", "tp", "sp", "counted MB/rank", "analytic MB/rank", "ratio");
  }
  for (const bool sp : {false, true}) {
    if (sp && world.size() == 1) continue;
    torch::manual_seed(1);
    TensorParallelLayerFactory factory(tp, sp);
    LlamaForCausalLM model(config, factory);
    model.init_weights(1);
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
    const at::Tensor ids = at::randint(s.vocab, {s.micro, s.seq + 1}, gen, at::kLong);
    tp.reset();
    const at::Tensor logits = model.forward(ids.narrow(1, 0, s.seq));
    const at::Tensor loss = vocab_parallel_cross_entropy(tp, logits.reshape({-1, logits.size(-1)}),
                                                         ids.narrow(1, 1, s.seq).reshape({-1}));
    loss.backward();
    const double counted = tp.bytes(), analytic = analytic_bytes(s, world.size(), sp);
    if (world.rank() == 0) {
      std::printf("%-4d %-5s %18.4f %18.4f %8.4f\n", world.size(), sp ? "on" : "off", counted / 1e6, analytic / 1e6,
                  analytic > 0 ? counted / analytic : 1.0);
    }
  }
}

void bus_bandwidth(MpiProcessGroup& world) {
  const int p = world.size();
  if (p == 1) return;
  if (world.rank() == 0) {
    std::printf("\nall-reduce bus bandwidth, float32, %d ranks, GB/s of 2 (p-1)/p bytes / time: loom's\n"
                "all_reduce + wait, a raw MPI_Allreduce loop, a raw MPI_Iallreduce + MPI_Wait loop\n", p);
    std::printf("%10s %8s %12s %12s %12s %10s %10s\n", "size", "iters", "loom", "Allreduce", "Iallreduce",
                "loom/All", "loom/Iall");
  }
  for (const int64_t bytes : {int64_t{4} << 10, int64_t{256} << 10, int64_t{4} << 20, int64_t{32} << 20}) {
    const int64_t n = bytes / 4;
    const int iters = static_cast<int>(std::max<int64_t>(5, std::min<int64_t>(200, (int64_t{64} << 20) / bytes)));
    at::Tensor t = at::ones({n}, at::kFloat);
    std::vector<float> raw(static_cast<size_t>(n), 1.0f);
    double loom_s = 1e30, mpi_s = 1e30, nonblocking_s = 1e30;
    // Alternate the two, best of 3 rounds each, so both see the same machine state.
    for (int round = 0; round < 3; ++round) {
      world.all_reduce(t)->wait();  // warm-up
      MPI_Barrier(world.comm());
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) world.all_reduce(t)->wait();
      MPI_Barrier(world.comm());
      loom_s = std::min(loom_s, seconds_since(start) / iters);
      MPI_Allreduce(MPI_IN_PLACE, raw.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, world.comm());
      MPI_Barrier(world.comm());
      start = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) {
        MPI_Allreduce(MPI_IN_PLACE, raw.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, world.comm());
      }
      MPI_Barrier(world.comm());
      mpi_s = std::min(mpi_s, seconds_since(start) / iters);
      // What loom's MPI backend calls underneath, without loom around it.
      MPI_Barrier(world.comm());
      start = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) {
        MPI_Request request;
        MPI_Iallreduce(MPI_IN_PLACE, raw.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, world.comm(), &request);
        MPI_Wait(&request, MPI_STATUS_IGNORE);
      }
      MPI_Barrier(world.comm());
      nonblocking_s = std::min(nonblocking_s, seconds_since(start) / iters);
    }
    const double bus = 2.0 * (p - 1) / p * static_cast<double>(bytes);
    if (world.rank() == 0) {
      std::printf("%8ldKB %8d %12.3f %12.3f %12.3f %10.3f %10.3f\n", bytes >> 10, iters, bus / loom_s / 1e9,
                  bus / mpi_s / 1e9, bus / nonblocking_s / 1e9, mpi_s / loom_s, nonblocking_s / loom_s);
    }
  }
}

Shape parse(int argc, char** argv) {
  Shape s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--hidden") s.hidden = value;
    else if (flag == "--layers") s.layers = value;
    else if (flag == "--heads") s.heads = value;
    else if (flag == "--kv-heads") s.kv_heads = value;
    else if (flag == "--intermediate") s.intermediate = value;
    else if (flag == "--vocab") s.vocab = value;
    else if (flag == "--seq") s.seq = value;
    else if (flag == "--micro") s.micro = value;
    else {
      std::fprintf(stderr, "bench_tp_comm: unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return s;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  const loom::Shape shape = loom::parse(argc, argv);
  auto world = session.world();
  try {
    loom::model_bytes(*world, shape);
  } catch (const std::exception& e) {  // e.g. a vocab that does not split over this many ranks
    loom::MpiSession::abort(std::string("bench_tp_comm: ") + e.what(), 2);
  }
  loom::bus_bandwidth(*world);
  return 0;
}
