// Expert parallelism on this machine, run under mpirun (the world is the ep
// group):
//
//   mpirun -np P build/bench_expert_parallel [--hidden H --intermediate I --experts E --top-k K
//                                             --tokens T --iters N]
//
// One Mixtral-style sparse block (a router and E SwiGLU experts of I
// features, top-k, fp32 on the CPU); every rank routes T tokens of its own.
// Three timings per iteration, each the mean over N after one warm-up, the
// slowest rank's:
//   all-to-all: the row exchanges of one forward and backward of the block
//     (dispatch and combine forward, their inverses backward: four exchanges
//     of T * k rows of H floats a rank, split evenly), through loom's
//     ProcessGroup::all_to_all on MPI;
//   experts: this rank's E / P experts' forward and backward over the rows
//     they receive when routing is balanced (T * k * P / E rows each);
//   block: the whole block's forward and backward with its experts spread
//     over the world (ExpertParallelExchange), which contains both.
// The first ratio, all-to-all over experts, says how much of the experts'
// compute the exchange costs; with P = 1 nothing is exchanged.
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

#include "model/init.h"
#include "model/llama.h"
#include "model/moe.h"
#include "parallel/expert_parallel.h"
#include "parallel/mpi_process_group.h"

namespace loom {
namespace {

struct Shape {
  int64_t hidden = 512, intermediate = 1024, experts = 8, top_k = 2, tokens = 1024, iters = 5;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The mean seconds of `iters` calls of `body` after one warm-up, the slowest rank's.
template <typename Body>
double timed(MpiProcessGroup& world, int64_t iters, Body body) {
  body();
  world.barrier()->wait();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) body();
  at::Tensor seconds = at::full({1}, seconds_since(start) / static_cast<double>(iters), at::kDouble);
  world.all_reduce(seconds, {ReduceOp::kMax})->wait();
  return seconds.item<double>();
}

void run(MpiProcessGroup& world, const Shape& s) {
  const int64_t ranks = world.size(), held = s.experts / ranks;
  ModelConfig config;
  config.architecture = "mixtral";
  config.hidden_size = s.hidden;
  config.intermediate_size = s.intermediate;
  config.num_layers = 1;
  config.num_heads = 8;
  config.num_kv_heads = 8;
  config.vocab_size = 64;
  config.max_seq_len = 64;
  config.num_experts = s.experts;
  config.num_experts_per_tok = s.top_k;
  LocalLayerFactory factory;
  if (ranks > 1) factory.use_expert_exchange(std::make_shared<ExpertParallelExchange>(world, world));
  SparseMoeBlock block(config, factory, /*layer=*/0);
  for (auto& named : block.named_parameters()) init_parameter(named.key(), named.value(), 0.02, 1);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(10 + world.rank());
  const at::Tensor x = at::randn({1, s.tokens, s.hidden}, gen, at::kFloat).requires_grad_(true);

  // 1. The row exchanges alone, at the block's sizes, routing balanced.
  const int64_t rows = s.tokens * s.top_k;
  const at::Tensor sending = at::randn({rows, s.hidden}, gen, at::kFloat);
  at::Tensor arriving = at::empty_like(sending);
  const double exchange = ranks == 1 ? 0.0 : timed(world, s.iters, [&] {
    for (int k = 0; k < 4; ++k) world.all_to_all(arriving, sending)->wait();
  });
  // 2. This rank's experts on the rows they receive.
  std::vector<std::shared_ptr<ExpertMlp>> experts;
  for (int64_t e = 0; e < held; ++e) {
    experts.push_back(std::make_shared<ExpertMlp>(s.hidden, s.intermediate, ExpertMlp::Names{"w1", "w3", "w2"},
                                                  factory));
  }
  const at::Tensor expert_rows = at::randn({rows * ranks / s.experts, s.hidden}, gen, at::kFloat).requires_grad_(true);
  const double compute = timed(world, s.iters, [&] {
    for (auto& expert : experts) expert->forward(expert_rows).sum().backward();
  });
  // 3. The whole block, experts spread over the ranks.
  const double whole = timed(world, s.iters, [&] { block.forward(x).sum().backward(); });

  if (world.rank() == 0) {
    const double mb = 4.0 * 4 * static_cast<double>(rows * s.hidden) * (ranks - 1) / ranks / 1e6;
    std::printf("%2d ranks: hidden %ld, %ld experts of %ld (%ld a rank), top-%ld, %ld tokens a rank, fp32\n",
                static_cast<int>(ranks), s.hidden, s.experts, s.intermediate, held, s.top_k, s.tokens);
    std::printf("  all-to-all %8.2f ms (%.1f MB sent a rank)  experts %8.2f ms  ratio %.3f  block %8.2f ms\n",
                1e3 * exchange, mb, 1e3 * compute, exchange / compute, 1e3 * whole);
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  loom::Shape shape;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    const int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--hidden") shape.hidden = value;
    else if (flag == "--intermediate") shape.intermediate = value;
    else if (flag == "--experts") shape.experts = value;
    else if (flag == "--top-k") shape.top_k = value;
    else if (flag == "--tokens") shape.tokens = value;
    else if (flag == "--iters") shape.iters = value;
    else {
      std::fprintf(stderr, "bench_expert_parallel: unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  auto world = session.world();
  if (shape.experts % world->size() != 0) {
    std::fprintf(stderr, "bench_expert_parallel: %ld experts do not split over %d ranks\n", shape.experts,
                 world->size());
    return 2;
  }
  loom::run(*world, shape);
  return 0;
}
