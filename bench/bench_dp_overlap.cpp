// How much of data parallelism's gradient reduction hides behind backward,
// run under mpirun (the world is the dp group):
//
//   mpirun -np P build/bench_dp_overlap [--hidden H --layers L --vocab V --seq S
//                                        --micro B --accumulation M --steps N --bucket-mb X]
//
// Each step runs M micro-batches of forward and backward of a Llama model and
// then GradientReducer::finish() (parallel/data_parallel.h), first with
// overlap off (every bucket's all-reduce starts in finish(), after backward)
// and then on (buckets start from the gradient hooks of the last
// micro-batch's backward), three rounds each. It prints the median over the
// rounds of the mean time a step waits in finish() for each, and the
// fraction of the reduction hidden: 1 - wait(on) / wait(off).
// Results and the command that produced them: docs/performance.md.
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/bench_shape.h"
#include "parallel/data_parallel.h"
#include "parallel/mpi_process_group.h"
#include "model/llama.h"

namespace loom {
namespace {

struct Options : bench::BenchShape {
  double bucket_mb = 4.0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--bucket-mb") {
      o.bucket_mb = std::atof(argv[i + 1]);
    } else if (!bench::read_shape_flag(o, flag, argv[i + 1])) {
      std::fprintf(stderr, "bench_dp_overlap: unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return o;
}

struct Timing {
  double wait = 0, step = 0;
  int64_t buckets = 0, started_early = 0;
};

Timing run(MpiProcessGroup& dp, const Options& o, bool overlap) {
  const ModelConfig config = bench::model_config_of(o);
  torch::manual_seed(1);
  LocalLayerFactory factory;
  LlamaForCausalLM model(config, factory);
  model.init_weights(1);
  std::vector<at::Tensor> params;
  for (const auto& p : model.parameters()) params.push_back(p);
  GradientReducer reducer(dp, params, {.bucket_mb = o.bucket_mb, .overlap = overlap});
  Timing timing;
  timing.buckets = reducer.num_buckets();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + dp.rank());
  for (int64_t step = -1; step < o.steps; ++step) {  // step -1: warm-up, not timed
    MPI_Barrier(dp.comm());
    const auto start = std::chrono::steady_clock::now();
    for (auto& p : params) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    for (int64_t m = 0; m < o.accumulation; ++m) {
      const at::Tensor ids = at::randint(o.vocab, {o.micro, o.seq + 1}, gen, at::kLong);
      const at::Tensor logits = model.forward(ids.narrow(1, 0, o.seq));
      const at::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, o.vocab}),
                                                                   ids.narrow(1, 1, o.seq).reshape({-1}));
      if (m == o.accumulation - 1) reducer.arm();
      loss.backward();
    }
    reducer.finish();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step >= 0) {
      timing.wait += reducer.last_wait_seconds() / o.steps;
      timing.step += seconds / o.steps;
      timing.started_early += reducer.last_started_early();
    }
  }
  // The slowest rank's numbers: the step waits for it.
  MPI_Allreduce(MPI_IN_PLACE, &timing.wait, 1, MPI_DOUBLE, MPI_MAX, dp.comm());
  MPI_Allreduce(MPI_IN_PLACE, &timing.step, 1, MPI_DOUBLE, MPI_MAX, dp.comm());
  return timing;
}

// Median of the rounds, field by field.
Timing median(std::vector<Timing> rounds) {
  auto mid = [&](auto field) {
    std::vector<double> v;
    for (const Timing& t : rounds) v.push_back(static_cast<double>(t.*field));
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  Timing t;
  t.wait = mid(&Timing::wait);
  t.step = mid(&Timing::step);
  t.buckets = rounds.front().buckets;
  t.started_early = static_cast<int64_t>(mid(&Timing::started_early));
  return t;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  const loom::Options o = loom::parse(argc, argv);
  auto world = session.world();
  // Three rounds of off then on; each figure is the median of its rounds,
  // so that a burst of noise on the shared cores moves neither much.
  std::vector<loom::Timing> offs, ons;
  for (int round = 0; round < 3; ++round) {
    offs.push_back(loom::run(*world, o, /*overlap=*/false));
    ons.push_back(loom::run(*world, o, /*overlap=*/true));
  }
  const loom::Timing off = loom::median(offs), on = loom::median(ons);
  if (world->rank() == 0) {
    const int64_t params = loom::count_parameters(loom::bench::model_config_of(o));
    std::printf("dp %d: %ld parameters (%.1f MB of fp32 gradients), %ld micro-batches of %ld x %ld, "
                "buckets of %.1f MB (%ld), %ld timed steps\n",
                world->size(), params, params * 4 / 1e6, o.accumulation, o.micro, o.seq, o.bucket_mb, on.buckets,
                o.steps);
    std::printf("%-12s %14s %14s %22s\n", "overlap", "step ms", "wait ms", "buckets started early");
    std::printf("%-12s %14.1f %14.1f %22.1f\n", "off", off.step * 1e3, off.wait * 1e3, 0.0);
    std::printf("%-12s %14.1f %14.1f %22.1f\n", "on", on.step * 1e3, on.wait * 1e3,
                static_cast<double>(on.started_early) / o.steps);
    std::printf("reduction hidden behind backward: %.1f%% (1 - wait on / wait off)\n",
                100.0 * (1.0 - on.wait / std::max(off.wait, 1e-12)));
  }
  return 0;
}
