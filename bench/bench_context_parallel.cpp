// Context parallelism on this machine, run under mpirun (the world is the
// cp ring; 4 ranks for cp 1, 2 and 4):
//
//   mpirun -np P build/bench_context_parallel [--seq S --batch B --heads H --kv-heads K --head-dim D --iters N
//                                              --memory-seq S2 --hidden H2 --layers L --vocab V]
//
// 1. The ring against the attention it carries, per layer: ring attention
//    (parallel/context_parallel.h, Note [ring attention]) over all P ranks at
//    a sequence of S tokens, forward and backward, timed whole; the time it
//    blocked in a send or receive's wait (the transfer compute did not hide);
//    the rest, which is compute; and the same transfers alone, with no
//    compute beside them (forward P - 1 block shifts; backward P - 1 block
//    shifts and P shifts of the gradient accumulators). The ratio is the
//    transfers alone over the compute: below 1 the ring can hide them.
// 2. The activation memory per rank of one forward and backward of a small
//    Llama model through ContextParallelLayerFactory at S2 tokens, for each
//    cp that divides P (cp 1 is the ring over one rank: the same kernel, no
//    transfer), and of the one-device model (LocalLayerFactory, fused
//    attention) for reference: the most bytes of CPU tensors alive at once
//    (trainer/tensor_memory.h) less those alive before the forward (the
//    parameters and their gradients), the largest over the cp ranks. Only
//    the first cp ranks compute; the others wait.
//
// Figures are the slowest rank's (the ring waits for it). Results and the
// command that produced them: docs/performance.md.
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_shape.h"
#include "model/llama.h"
#include "parallel/context_parallel.h"
#include "parallel/mpi_process_group.h"
#include "trainer/tensor_memory.h"

namespace loom {
namespace {

struct Options {
  // The ring: one layer's attention.
  int64_t seq = 4096, batch = 1, heads = 8, kv_heads = 4, head_dim = 64, iters = 3;
  // The model whose activations are measured (bench_shape's Llama).
  int64_t memory_seq = 4096, hidden = 256, layers = 2, vocab = 4096;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double slowest(MpiProcessGroup& world, double value) {
  MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, world.comm());
  return value;
}

// A send or receive whose wait adds the time it blocked to a counter.
class TimedWork final : public Work {
 public:
  TimedWork(std::unique_ptr<Work> inner, double* waited)
      : Work(inner->default_timeout()), inner_(std::move(inner)), waited_(waited) {}
  bool is_completed() override { return inner_->is_completed(); }
  void wait(std::chrono::milliseconds timeout) override {
    const auto start = std::chrono::steady_clock::now();
    inner_->wait(timeout);
    *waited_ += seconds_since(start);
  }

 private:
  std::unique_ptr<Work> inner_;
  double* waited_;
};

// The world group, with the time spent waiting on sends and receives (all
// the ring issues) counted.
class TimedRingGroup final : public ProcessGroup {
 public:
  explicit TimedRingGroup(ProcessGroup& inner)
      : ProcessGroup("timed_cp", inner.rank(), inner.world_ranks(), inner.timeout()), inner_(inner) {}
  double waited() const { return waited_; }
  void reset() { waited_ = 0; }

  std::string_view backend() const override { return inner_.backend(); }
  std::unique_ptr<Work> all_reduce(const at::Tensor& t, const AllReduceOptions& o) override {
    return inner_.all_reduce(t, o);
  }
  std::unique_ptr<Work> all_gather(const at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    return inner_.all_gather(out, in, o);
  }
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                       const ReduceScatterOptions& o) override {
    return inner_.reduce_scatter(out, in, o);
  }
  std::unique_ptr<Work> broadcast(const at::Tensor& t, const BroadcastOptions& o) override {
    return inner_.broadcast(t, o);
  }
  std::unique_ptr<Work> barrier(const BarrierOptions& o) override { return inner_.barrier(o); }
  std::unique_ptr<Work> send(const at::Tensor& t, const SendOptions& o) override {
    return std::make_unique<TimedWork>(inner_.send(t, o), &waited_);
  }
  std::unique_ptr<Work> recv(const at::Tensor& t, const RecvOptions& o) override {
    return std::make_unique<TimedWork>(inner_.recv(t, o), &waited_);
  }

 private:
  ProcessGroup& inner_;
  double waited_ = 0;
};

// `shifts` ring steps of `block` with nothing computed beside them: each
// sends this rank's tensor to the next rank and receives the previous
// rank's, in the ring's order (even ranks send first).
void shift_alone(ProcessGroup& cp, at::Tensor block, int64_t shifts) {
  const int next = (cp.rank() + 1) % cp.size(), previous = (cp.rank() + cp.size() - 1) % cp.size();
  for (int64_t s = 0; s < shifts; ++s) {
    at::Tensor incoming = at::empty_like(block);
    std::unique_ptr<Work> sent, received;
    if (cp.rank() % 2 == 0) {
      sent = cp.send(block, {next, 0});
      received = cp.recv(incoming, {previous, 0});
    } else {
      received = cp.recv(incoming, {previous, 0});
      sent = cp.send(block, {next, 0});
    }
    received->wait();
    sent->wait();
    block = incoming;
  }
}

void ring_against_compute(MpiProcessGroup& world, const Options& o) {
  const int64_t n = world.size(), local = o.seq / n;
  TimedRingGroup cp(world);
  RingAttentionCore core(cp, o.seq, {});
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1 + world.rank());
  const at::Tensor q = at::randn({o.batch, o.heads, local, o.head_dim}, gen).requires_grad_(true);
  const at::Tensor k = at::randn({o.batch, o.kv_heads, local, o.head_dim}, gen).requires_grad_(true);
  const at::Tensor v = at::randn({o.batch, o.kv_heads, local, o.head_dim}, gen).requires_grad_(true);
  const at::Tensor grad_out = at::randn({o.batch, o.heads, local, o.head_dim}, gen);
  double forward_s = 0, forward_wait_s = 0, backward_s = 0, backward_wait_s = 0;
  for (int64_t i = -1; i < o.iters; ++i) {  // i -1: warm-up, not timed
    MPI_Barrier(world.comm());
    cp.reset();
    auto start = std::chrono::steady_clock::now();
    const at::Tensor out = core.forward(q, k, v, nullptr, nullptr);
    const double f = seconds_since(start), fw = cp.waited();
    MPI_Barrier(world.comm());
    cp.reset();
    start = std::chrono::steady_clock::now();
    out.backward(grad_out);
    const double b = seconds_since(start), bw = cp.waited();
    if (i < 0) continue;
    forward_s += f / o.iters;
    forward_wait_s += fw / o.iters;
    backward_s += b / o.iters;
    backward_wait_s += bw / o.iters;
  }
  // The same transfers alone: the forward's blocks (keys and values), and
  // the backward's blocks and their fp32 gradient accumulators.
  const at::Tensor block = at::stack({k.detach(), v.detach()}).contiguous();
  double forward_alone_s = 0, backward_alone_s = 0;
  for (int64_t i = -1; i < o.iters; ++i) {
    MPI_Barrier(world.comm());
    auto start = std::chrono::steady_clock::now();
    shift_alone(world, block, n - 1);
    const double f = seconds_since(start);
    MPI_Barrier(world.comm());
    start = std::chrono::steady_clock::now();
    shift_alone(world, block, n - 1);
    shift_alone(world, at::zeros_like(block), n);
    const double b = seconds_since(start);
    if (i < 0) continue;
    forward_alone_s += f / o.iters;
    backward_alone_s += b / o.iters;
  }
  for (double* value : {&forward_s, &forward_wait_s, &backward_s, &backward_wait_s, &forward_alone_s,
                        &backward_alone_s}) {
    *value = slowest(world, *value);
  }
  if (world.rank() != 0) return;
  std::printf("ring attention, one layer: cp %ld, %ld x %ld tokens (%ld per rank), heads %ld/%ld of %ld, fp32, "
              "block %.2f MB, mean of %ld\n",
              static_cast<long>(n), static_cast<long>(o.batch), static_cast<long>(o.seq), static_cast<long>(local),
              static_cast<long>(o.heads), static_cast<long>(o.kv_heads), static_cast<long>(o.head_dim),
              static_cast<double>(block.numel() * block.element_size()) / 1e6, static_cast<long>(o.iters));
  std::printf("%-9s %10s %14s %12s %18s %22s\n", "pass", "ring ms", "blocked ms", "compute ms",
              "transfers alone ms", "transfers / compute");
  const auto row = [](const char* pass, double ring, double blocked, double alone) {
    const double compute = ring - blocked;
    std::printf("%-9s %10.1f %14.1f %12.1f %18.1f %22.3f\n", pass, ring * 1e3, blocked * 1e3, compute * 1e3,
                alone * 1e3, alone / compute);
  };
  row("forward", forward_s, forward_wait_s, forward_alone_s);
  row("backward", backward_s, backward_wait_s, backward_alone_s);
}

// The peak activation bytes of one forward and backward (see the top) on
// this rank, through `factory`, of a sequence of `seq` tokens over `cp`
// ranks (this rank holds seq / cp of them).
int64_t activation_bytes(const Options& o, const LayerFactory& factory, int64_t cp_rank, int64_t cp) {
  bench::BenchShape shape;
  shape.hidden = o.hidden;
  shape.layers = o.layers;
  shape.vocab = o.vocab;
  shape.seq = o.memory_seq;
  const ModelConfig config = bench::model_config_of(shape);
  LlamaForCausalLM model(config, factory);
  model.init_weights(1);
  const at::Tensor tokens =
      at::randint(o.vocab, {1, o.memory_seq + 1}, at::make_generator<at::CPUGeneratorImpl>(7), at::kLong);
  const at::Tensor inputs = zigzag_tokens(tokens.narrow(1, 0, o.memory_seq), cp_rank, cp);
  const at::Tensor targets = zigzag_tokens(tokens.narrow(1, 1, o.memory_seq), cp_rank, cp);
  const auto step = [&] {
    const at::Tensor logits = model.forward(inputs);
    at::cross_entropy_loss(logits.reshape({-1, o.vocab}), targets.reshape({-1})).backward();
  };
  step();  // the parameters' gradients now exist: they are not activations
  for (auto& p : model.parameters()) p.mutable_grad().zero_();
  const int64_t before = tensor_memory_live_bytes();
  reset_tensor_memory_peak();
  step();
  return tensor_memory_peak_bytes() - before;
}

void activation_memory(MpiProcessGroup& world, const Options& o) {
  if (world.rank() == 0) {
    std::printf("\nactivation memory per rank, one forward and backward: hidden %ld, %ld layers, vocab %ld, "
                "1 x %ld tokens, fp32\n",
                static_cast<long>(o.hidden), static_cast<long>(o.layers), static_cast<long>(o.vocab),
                static_cast<long>(o.memory_seq));
    std::printf("%-28s %12s %12s %14s\n", "layout", "tokens/rank", "peak MB", "ratio to cp1");
  }
  LocalLayerFactory local;
  double one_device = 0;
  if (world.rank() == 0) one_device = static_cast<double>(activation_bytes(o, local, 0, 1));
  double cp1 = 0;
  for (int64_t cp = 1; cp <= world.size(); cp *= 2) {
    if (world.size() % cp != 0) break;
    // Collective over the world; only the first ring computes.
    const bool computes = world.rank() < cp;
    std::unique_ptr<MpiProcessGroup> ring = world.split(computes ? 0 : 1, world.rank(), "cp");
    double bytes = 0;
    if (computes) {
      ContextParallelLayerFactory factory(local, *ring, o.memory_seq);
      bytes = static_cast<double>(activation_bytes(o, factory, ring->rank(), cp));
    }
    bytes = slowest(world, bytes);
    if (cp == 1) cp1 = bytes;
    if (world.rank() == 0) {
      if (cp == 1) {
        std::printf("%-28s %12ld %12.1f %14s\n", "one device (fused attention)", static_cast<long>(o.memory_seq),
                    one_device / 1e6, "");
      }
      std::printf("%-28s %12ld %12.1f %14.3f\n", ("cp " + std::to_string(cp) + " (ring)").c_str(),
                  static_cast<long>(o.memory_seq / cp), bytes / 1e6, bytes / cp1);
    }
  }
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    int64_t* field = flag == "--seq"          ? &o.seq
                     : flag == "--batch"      ? &o.batch
                     : flag == "--heads"      ? &o.heads
                     : flag == "--kv-heads"   ? &o.kv_heads
                     : flag == "--head-dim"   ? &o.head_dim
                     : flag == "--iters"      ? &o.iters
                     : flag == "--memory-seq" ? &o.memory_seq
                     : flag == "--hidden"     ? &o.hidden
                     : flag == "--layers"     ? &o.layers
                     : flag == "--vocab"      ? &o.vocab
                                              : nullptr;
    if (field == nullptr) {
      std::fprintf(stderr, "bench_context_parallel: unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
    *field = std::atoll(argv[i + 1]);
  }
  return o;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  const loom::Options options = loom::parse(argc, argv);
  auto world = session.world();
  // Every CPU tensor from here on is counted (the activation figures).
  loom::install_tensor_memory_counter();
  try {
    loom::ring_against_compute(*world, options);
    loom::activation_memory(*world, options);
  } catch (const std::exception& e) {  // e.g. a sequence 2 cp does not divide
    loom::MpiSession::abort(std::string("bench_context_parallel: ") + e.what(), 2);
  }
  return 0;
}
