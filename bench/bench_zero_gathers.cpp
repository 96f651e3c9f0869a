// ZeRO-3's parameter gathers against the compute they are meant to hide
// behind, run under mpirun (the world is the dp group):
//
//   mpirun -np P build/bench_zero_gathers [--hidden H --layers L --vocab V --seq S
//                                          --micro B --accumulation M --steps N]
//
// Each step runs M micro-batches of forward and backward of a Llama model
// whose decoder layers run through ZeroLayerWrapper (parallel/zero.h, Note
// [ZeRO-3]: each layer gathered before its forward and backward, the next
// layer's gather posted first), then the reduction of the remaining units
// and the sharded AdamW step. It prints the mean step time, the time the
// step waited for gathers to complete (what prefetch did not hide), the
// time it waited for the layers' reduce-scatters, and what is left: compute.
// No threshold: on 2 shared cores the ranks' compute and MPI's progress
// compete for the same cores, so the figures show where the time goes,
// not how much a GPU would hide. Results: docs/performance.md.
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_shape.h"
#include "model/llama.h"
#include "parallel/mpi_process_group.h"
#include "parallel/zero.h"

namespace loom {
namespace {

using Options = bench::BenchShape;

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!bench::read_shape_flag(o, argv[i], argv[i + 1])) {
      std::fprintf(stderr, "bench_zero_gathers: unknown flag %s\n", argv[i]);
      std::exit(2);
    }
  }
  return o;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  using namespace loom;
  MpiSession session(&argc, &argv);
  const Options o = parse(argc, argv);
  auto world = session.world();
  torch::manual_seed(1);
  auto wrapper = std::make_shared<ZeroLayerWrapper>(/*recompute=*/false);
  LocalLayerFactory factory;
  factory.use_layer_wrapper(wrapper);
  LlamaForCausalLM model(bench::model_config_of(o), factory);
  model.init_weights(1);
  const NamedTensors params = to_named_tensors(model.named_parameters());
  ZeroOptions zero_options;
  zero_options.stage = 3;
  zero_options.units = zero_units_by_layer(params);
  ShardedAdamW zero(*world, params, AdamWOptions{}, zero_options);
  wrapper->attach(&zero);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + world->rank());
  double step_s = 0, gather_s = 0, reduce_s = 0;
  for (int64_t step = -1; step < o.steps; ++step) {  // step -1: warm-up, not timed
    MPI_Barrier(world->comm());
    const double gather_before = zero.gather_wait_seconds(), reduce_before = zero.reduce_wait_seconds();
    const auto start = std::chrono::steady_clock::now();
    zero.zero_grad();
    for (int64_t m = 0; m < o.accumulation; ++m) {
      const at::Tensor ids = at::randint(o.vocab, {o.micro, o.seq + 1}, gen, at::kLong);
      const at::Tensor logits = model.forward(ids.narrow(1, 0, o.seq));
      torch::nn::functional::cross_entropy(logits.reshape({-1, o.vocab}), ids.narrow(1, 1, o.seq).reshape({-1}))
          .backward();
    }
    zero.reduce_gradients();
    zero.step(1e-4);
    if (step >= 0) {
      step_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / o.steps;
      gather_s += (zero.gather_wait_seconds() - gather_before) / o.steps;
      reduce_s += (zero.reduce_wait_seconds() - reduce_before) / o.steps;
    }
  }
  // The slowest rank's numbers: the step waits for it.
  for (double* v : {&step_s, &gather_s, &reduce_s}) {
    MPI_Allreduce(MPI_IN_PLACE, v, 1, MPI_DOUBLE, MPI_MAX, world->comm());
  }
  wrapper->attach(nullptr);
  if (world->rank() == 0) {
    std::printf("dp %d ZeRO-3: %ld parameters in %ld units, %ld micro-batches of %ld x %ld, %ld timed steps\n",
                world->size(), static_cast<long>(count_parameters(bench::model_config_of(o))), static_cast<long>(zero.num_units()),
                static_cast<long>(o.accumulation), static_cast<long>(o.micro), static_cast<long>(o.seq),
                static_cast<long>(o.steps));
    std::printf("%14s %16s %16s %16s\n", "step ms", "gather wait ms", "reduce wait ms", "compute ms");
    std::printf("%14.1f %16.1f %16.1f %16.1f\n", step_s * 1e3, gather_s * 1e3, reduce_s * 1e3,
                (step_s - gather_s - reduce_s) * 1e3);
  }
  return 0;
}
