#include "trainer/training.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include <torch/types.h>

#include "trainer/device.h"
#include "trainer/model_parts.h"
#include "trainer/trainer.h"
#include "util/error.h"

namespace loom {

namespace {

// What this build can train; refused up front rather than after minutes of setup.
void check_supported(const Config& config, const ParallelDims& dims) {
  const int64_t per_step = config.batch.micro_batch_size * dims.dp;
  if (dims.pp > 1 && per_step > 0 && global_batch_of(config, dims) % per_step == 0) {
    pipeline_schedule_of(config, dims);  // (a batch that does not divide is the loader's to refuse)
  }
  check_precision(config, dims);
  if (config.schedule.train_steps <= 0) {
    throw BadInput("schedule.train_steps: " + std::to_string(config.schedule.train_steps) + " (expected > 0)");
  }
  if (config.data.train.empty()) throw BadInput("data.train: no datasets given (expected a list of {path, weight})");
  if (config.logging.interval <= 0) {
    throw BadInput("logging.interval: " + std::to_string(config.logging.interval) + " (expected > 0)");
  }
}

}  // namespace

void check_precision(const Config& config, const ParallelDims& dims) {
  if (config.precision.params == "bf16") {
    if (config.precision.compute != "bf16") {
      throw BadInput("precision.params: bf16 parameters compute in bf16; set precision.compute bf16 too");
    }
  }
  // fusion.*: a switch the run would not take is refused, rather than left
  // to run unfused under a config that says otherwise.
  if (config.fusion.wgrad_accumulation &&
      (config.precision.compute != "bf16" || config.precision.params != "fp32" || dims.world != 1)) {
    throw BadInput("fusion.wgrad_accumulation: needs precision.compute bf16 with precision.params fp32 on one rank "
                   "(got compute " + config.precision.compute + ", params " + config.precision.params + ", " +
                   std::to_string(dims.world) + " ranks): on several ranks the gradients must pass the hooks "
                   "that data and pipeline parallelism wait on; set it false");
  }
  if (config.fusion.add_rmsnorm) {
    const ModelConfig& m = config.model;
    if (config.precision.compute != "bf16" || dims.tp != 1) {
      throw BadInput("fusion.add_rmsnorm: needs precision.compute bf16 and parallel.tp 1 (got compute " +
                     config.precision.compute + ", tp " + std::to_string(dims.tp) +
                     "): the fused op is for a bf16 residual stream, and tensor parallelism makes norms of its own; "
                     "set it false");
    }
    if (m.one_plus_norms() || m.post_norms() || m.sandwich_norms()) {
      throw BadInput("fusion.add_rmsnorm: architecture " + m.architecture +
                     " does not add the attention output to the residual stream and then take a plain RMSNorm of "
                     "it; set it false");
    }
  }
  if (config.fusion.clip_in_adamw) {
    if (!(config.optimizer.clip_grad_norm > 0)) {
      throw BadInput("fusion.clip_in_adamw: optimizer.clip_grad_norm is 0, so there is no clipping to fold into "
                     "AdamW; set it false");
    }
    if (config.parallel.zero_stage > 0 && dims.dp > 1) {
      throw BadInput("fusion.clip_in_adamw: not supported with parallel.zero_stage " +
                     std::to_string(config.parallel.zero_stage) + " yet (ZeRO's sharded step clips its shards " +
                     "itself); set it false, or use zero_stage 0");
    }
  }
}

DatasetOpenOptions dataset_open_options(const Config& config) {
  DatasetOpenOptions options;
  options.check_shard_files = parse_shard_file_check(config.data.check_shard_files);
  return options;
}

ParallelDims check_training_layout(const Config& config, int64_t world_size) {
  const ParallelDims dims = ParallelDims::from_config(config, world_size);
  check_supported(config, dims);
  return dims;
}

TrainResult train(Config& config, const TrainOptions& options, const TrainHooks* hooks) {
  Trainer trainer(config, options, hooks);
  return trainer.run();
}

std::string checkpoint_folder_name(int64_t step) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "step-%07lld", static_cast<long long>(step));
  return buffer;
}

double measure_matmul_peak_flops(c10::Device device, torch::ScalarType dtype) {
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point start) {
    return std::max(std::chrono::duration<double>(Clock::now() - start).count(), 1e-9);
  };
  // torch::full, not randn: the measurement must not draw from the seeded RNG.
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  const auto square = [&](int64_t size, double value) { return torch::full({size, size}, value, options); };
  int64_t size = device.is_cuda() ? 8192 : 128;
  const int64_t largest = device.is_cuda() ? 8192 : 1024;
  const int repeats = device.is_cuda() ? 10 : 3;
  // On the CPU the product grows while one takes under 20 ms: 1024 in fp32,
  // but bf16 without native CPU support runs ~20x slower, and 1024 there
  // held every bf16 run's start for seconds per rank.
  auto a = square(size, 0.5);
  auto b = square(size, 0.25);
  auto c = torch::mm(a, b);  // warm-up: first-call allocation and BLAS set-up
  synchronize(device);
  while (size < largest) {
    const auto start = Clock::now();
    torch::mm_out(c, a, b);
    if (seconds_since(start) >= 0.02) break;
    size *= 2;
    a = square(size, 0.5);
    b = square(size, 0.25);
    c = torch::mm(a, b);
  }
  synchronize(device);
  const auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) torch::mm_out(c, a, b);
  synchronize(device);
  return repeats * 2.0 * static_cast<double>(size) * static_cast<double>(size) * static_cast<double>(size) /
         seconds_since(start);
}

double datasheet_peak_flops(const std::string& device_name, bool bf16) {
  // Dense (no sparsity) tensor-core rates of the SXM parts, FLOP/s.
  struct Card {
    const char* name;
    double bf16, fp32;
  };
  static const Card kCards[] = {{"H100", 989e12, 67e12}, {"H200", 989e12, 67e12}, {"A100", 312e12, 19.5e12}};
  for (const Card& card : kCards) {
    if (device_name.find(card.name) != std::string::npos) return bf16 ? card.bf16 : card.fp32;
  }
  return 0.0;
}

}  // namespace loom
