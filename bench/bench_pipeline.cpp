// The pipeline bubble of a real run, under mpirun (the world is the pp group):
//
//   mpirun -np P build/bench_pipeline [--micro-batches M --layers L --hidden H --seq S --steps N]
//
// For each schedule (afab, 1f1b, interleaved with 2 chunks when M is a
// multiple of P), one step of M micro-batches through PipelineExecutor
// (parallel/pipeline.h) on a Llama model of L layers; per rank, the fraction
// of the step spent waiting for received activations and gradients, next to
// the formula's bubble (p-1)/(m+p-1), or (p-1)/(v m+p-1) interleaved. The
// median over N steps after one warm-up. With more ranks than cores the ranks
// also wait for each other's CPU, so compare the rows, not the absolute values.
// Results and the command that produced them: docs/performance.md.
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/pipeline.h"
#include "parallel/tensor_parallel_model.h"

namespace loom {
namespace {

struct Options {
  int64_t micro_batches = 8, layers = 8, hidden = 128, seq = 128, steps = 5;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--micro-batches") o.micro_batches = value;
    else if (flag == "--layers") o.layers = value;
    else if (flag == "--hidden") o.hidden = value;
    else if (flag == "--seq") o.seq = value;
    else if (flag == "--steps") o.steps = value;
    else {
      std::fprintf(stderr, "bench_pipeline: unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return o;
}

void run(MpiProcessGroup& pp, const Options& o, const char* kind, int64_t v) {
  ModelConfig config;
  config.hidden_size = o.hidden;
  config.intermediate_size = 3 * o.hidden;
  config.num_layers = o.layers;
  config.num_heads = o.hidden / 32;
  config.num_kv_heads = o.hidden / 64;
  config.vocab_size = 2048;
  config.max_seq_len = o.seq;
  torch::manual_seed(1);
  LocalLayerFactory factory;
  LlamaForCausalLM whole(config, factory);
  whole.init_weights(1);
  const PipeSchedule schedule = make_pipe_schedule(kind, pp.size(), o.micro_batches, v);
  auto chunks = build_pipeline_chunks(config, factory, schedule, pp.rank());
  for (auto& chunk : chunks) load_tensor_parallel_shards(*chunk, to_named_tensors(whole.named_parameters()), 0, 1);
  PipeGroups groups(pp);
  PipelineExecutor executor(groups, schedule, chunks, {1, o.seq, o.hidden});
  std::vector<at::Tensor> inputs, targets;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int64_t mb = 0; mb < o.micro_batches; ++mb) {
    const at::Tensor ids = at::randint(config.vocab_size, {1, o.seq + 1}, gen, at::kLong);
    inputs.push_back(ids.narrow(1, 0, o.seq).contiguous());
    targets.push_back(ids.narrow(1, 1, o.seq).contiguous());
  }
  std::vector<double> idle;
  for (int64_t step = -1; step < o.steps; ++step) {
    MPI_Barrier(pp.comm());
    executor.run(inputs, targets);
    if (step >= 0) idle.push_back(executor.last_recv_wait_seconds() / executor.last_run_seconds());
  }
  std::sort(idle.begin(), idle.end());
  double mine = idle[idle.size() / 2];
  std::vector<double> all(static_cast<size_t>(pp.size()));
  MPI_Gather(&mine, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, 0, pp.comm());
  if (pp.rank() == 0) {
    const double p = static_cast<double>(pp.size()), m = static_cast<double>(o.micro_batches);
    const double formula = (p - 1) / (static_cast<double>(v) * m + p - 1);
    std::printf("%-12s v %ld | formula %5.1f%% | idle per rank:", kind, v, 100 * formula);
    for (double x : all) std::printf(" %5.1f%%", 100 * x);
    std::printf("\n");
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  const loom::Options o = loom::parse(argc, argv);
  auto world = session.world();
  if (world->rank() == 0) {
    std::printf("pp %d, %ld micro-batches of 1 x %ld tokens, %ld layers of hidden %ld, median of %ld steps\n",
                world->size(), o.micro_batches, o.seq, o.layers, o.hidden, o.steps);
  }
  loom::run(*world, o, "afab", 1);
  loom::run(*world, o, "1f1b", 1);
  if (o.micro_batches % world->size() == 0 && o.layers >= 2 * world->size()) loom::run(*world, o, "interleaved", 2);
  return 0;
}
