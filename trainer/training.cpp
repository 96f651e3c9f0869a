#include "trainer/training.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <ATen/autocast_mode.h>
#include <torch/nn/functional/loss.h>

#include "checkpoints/hub.h"
#include "checkpoints/init_from.h"
#include "data/loader.h"
#include "parallel/data_parallel.h"
#include "parallel/mpi_process_group.h"
#ifdef LOOM_WITH_CUDA
#include "parallel/nccl_process_group.h"
#endif
#include "parallel/pipeline.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/tensor_parallel_model.h"
#include "parallel/zero.h"
#include "parallel/topology.h"
#include "parallel/vocab_parallel.h"
#include "trainer/loss_spike.h"
#include "optim/lr_schedule.h"
#include "trainer/metrics_log.h"
#include "model/compute_weights.h"
#include "trainer/device.h"
#include "model/kernels/fused_ops.h"
#include "optim/optimizer.h"
#include "trainer/profiler.h"
#include "trainer/tensor_memory.h"
#include "trainer/training_checkpoint.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The global batch's sequences, by default one micro-batch per replica.
int64_t global_batch_of(const Config& config, const ParallelDims& dims) {
  return config.batch.global_batch_size > 0 ? config.batch.global_batch_size
                                            : config.batch.micro_batch_size * dims.dp;
}

// The pipeline schedule of one step (parallel.pp_schedule over pp ranks and
// the step's micro-batches per replica); BadInput when they do not suit it.
PipeSchedule pipeline_schedule_of(const Config& config, const ParallelDims& dims) {
  const int64_t micro_batches = global_batch_of(config, dims) / (config.batch.micro_batch_size * dims.dp);
  return make_pipe_schedule(config.parallel.pp_schedule, dims.pp, micro_batches, config.parallel.virtual_stages);
}

// What this build can train; refused up front rather than after minutes of setup.
void check_supported(const Config& config, const ParallelDims& dims) {
  const int64_t per_step = config.batch.micro_batch_size * dims.dp;
  if (dims.pp > 1 && per_step > 0 && global_batch_of(config, dims) % per_step == 0) {
    pipeline_schedule_of(config, dims);  // (a batch that does not divide is the loader's to refuse)
  }
  if (config.precision.params != "fp32") {
    throw BadInput("precision.params: '" + config.precision.params +
                   "' is not supported yet (expected fp32); for bf16 training keep fp32 parameters and set "
                   "precision.compute bf16: the matmuls run in bf16, weights and gradients stay fp32");
  }
  if (config.schedule.train_steps <= 0) {
    throw BadInput("schedule.train_steps: " + std::to_string(config.schedule.train_steps) + " (expected > 0)");
  }
  if (config.data.train.empty()) throw BadInput("data.train: no datasets given (expected a list of {path, weight})");
  if (config.logging.interval <= 0) {
    throw BadInput("logging.interval: " + std::to_string(config.logging.interval) + " (expected > 0)");
  }
}

// precision.compute bf16: the forward runs under autocast, so matmuls and
// attention take bf16 copies of the fp32 weights and activations while the
// parameters, their gradients (accumulated over micro-batches) and the
// optimizer stay fp32, as torch.autocast does. Backward follows the forward's
// dtypes by itself; only the forward is inside the scope.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device_type, bool enabled) : device_type_(device_type), enabled_(enabled) {
    if (!enabled_) return;
    previous_enabled_ = at::autocast::is_autocast_enabled(device_type_);
    previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
    at::autocast::set_autocast_enabled(device_type_, true);
    at::autocast::set_autocast_dtype(device_type_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_type_, previous_enabled_);
    at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_type_;
  bool enabled_;
  bool previous_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kBFloat16;
};

// A micro-batch's rows as (inputs, targets) on `device`: [rows, cols - 1] each.
// A copy: autograd keeps the ids for the embedding's backward, and the tensor
// must own them rather than borrow the batch's buffer.
std::pair<torch::Tensor, torch::Tensor> to_inputs_targets(MicroBatch& batch, c10::Device device) {
  const auto rows_bt = torch::from_blob(batch.tokens.data(), {batch.rows, batch.cols}, torch::kLong)
                           .to(device, /*non_blocking=*/false, /*copy=*/true);
  return {rows_bt.slice(1, 0, batch.cols - 1), rows_bt.slice(1, 1, batch.cols)};
}

// The model's (or a pipeline chunk's) forward, under bf16 autocast when asked.
torch::Tensor autocast_forward(LlamaForCausalLM& model, const torch::Tensor& input, bool bf16) {
  AutocastScope autocast(input.device().type(), bf16);
  return model.forward(input);
}

// Mean cross-entropy of `logits_btv` against `targets_bt`, in fp32 whatever
// the compute dtype. With a tensor-parallel group the logits are this rank's
// slice of the vocabulary, and the loss is the vocabulary-parallel
// cross-entropy (the same number on every rank of the group).
torch::Tensor token_loss(const torch::Tensor& logits_btv, const torch::Tensor& targets_bt, ProcessGroup* tp) {
  const torch::Tensor logits_nv = logits_btv.reshape({-1, logits_btv.size(-1)});
  if (tp != nullptr) return vocab_parallel_cross_entropy(*tp, logits_nv, targets_bt.reshape({-1}));
  return kernels::cross_entropy(logits_nv, targets_bt.reshape({-1}));  // fused on a GPU (model/kernels/fused_ops.h)
}

// Mean next-token cross-entropy of `inputs_bt` -> `targets_bt`.
torch::Tensor next_token_loss(LlamaForCausalLM& model, const torch::Tensor& inputs_bt, const torch::Tensor& targets_bt,
                              bool bf16, ProcessGroup* tp) {
  return token_loss(autocast_forward(model, inputs_bt, bf16), targets_bt, tp);
}

// Mean loss over the first data.valid_batches validation micro-batches (the
// same ones every time), without gradients. NaN when there are none.
double validation_loss(LlamaForCausalLM& model, const Loader& loader, int64_t max_batches, c10::Device device,
                       bool bf16, ProcessGroup* tp) {
  torch::NoGradGuard no_grad;
  torch::Tensor total = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  int64_t count = 0;
  for (MicroBatch batch : loader.validation_batches(max_batches)) {
    auto [inputs_bt, targets_bt] = to_inputs_targets(batch, device);
    total += next_token_loss(model, inputs_bt, targets_bt, bf16, tp).to(torch::kDouble);
    ++count;
  }
  return count > 0 ? total.item<double>() / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
}

// validation_loss through the pipeline: the last stage's mean, on every
// stage. Collective over pp.
double pipeline_validation_loss(PipelineExecutor& executor, ProcessGroup& pp, const Loader& loader,
                                int64_t max_batches, c10::Device device) {
  std::vector<torch::Tensor> inputs, targets;
  for (MicroBatch batch : loader.validation_batches(max_batches)) {
    auto [inputs_bt, targets_bt] = to_inputs_targets(batch, device);
    inputs.push_back(inputs_bt);
    targets.push_back(targets_bt);
  }
  if (inputs.empty()) return std::numeric_limits<double>::quiet_NaN();
  torch::Tensor loss = torch::tensor(executor.evaluate(inputs, targets), torch::kDouble);
  all_reduce_through_cpu(pp, loss);
  return loss.item<double>();
}

// The folder holding the tokenizer files, from data.tokenizer (a folder or a
// tokenizer.json). Checkpoints and exports copy files by their Hub names, so
// a tokenizer file under another name is staged as run_dir/tokenizer/tokenizer.json.
std::string tokenizer_dir_of(const Config& config, const fs::path& run_dir) {
  if (config.data.tokenizer.empty() || !fs::exists(config.data.tokenizer)) return "";
  const fs::path path(config.data.tokenizer);
  if (fs::is_directory(path)) return path.string();
  if (path.filename() != "tokenizer.json") {
    const fs::path staged = run_dir / "tokenizer";
    fs::create_directories(staged);
    write_file_atomic((staged / "tokenizer.json").string(), read_file(path.string()));
    return staged.string();
  }
  return path.has_parent_path() ? path.parent_path().string() : ".";
}

// Keeps the metrics of steps <= `step` (all of them are reproduced exactly by
// a resume from `step`); lines logged after the checkpoint by a run that then
// died would otherwise appear twice. step 0: start an empty file.
void truncate_metrics(const std::string& path, int64_t step) {
  std::string kept;
  if (step > 0 && fs::exists(path)) {
    std::istringstream lines(read_file(path));
    for (std::string line; std::getline(lines, line);) {
      const json record = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
          record["step"].get<int64_t>() <= step) {
        kept += line + "\n";
      }
    }
  }
  write_file_atomic(path, kept);
}

// Replaces run_dir/hf with a fresh export. export_hub writes through its own
// temporary folder; the old export is moved aside only once the new one is
// complete, so there is always one whole hf/ (or hf.new-PID) on disk.
void export_run_to_hub(const LlamaForCausalLM& model, const Config& config, const fs::path& run_dir, int64_t step) {
  const fs::path final_dir = run_dir / "hf";
  const std::string pid = std::to_string(::getpid());
  const fs::path fresh = run_dir / ("hf.new-" + pid);
  const fs::path old = run_dir / ("hf.old-" + pid);
  fs::remove_all(fresh);
  ExportOptions options;
  options.tokenizer_dir = tokenizer_dir_of(config, run_dir);
  options.model_name = config.run.name;
  options.card_notes = "Trained by loom for " + std::to_string(step) + " steps.";
  export_hub(model, fresh.string(), options);
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(fresh, final_dir);
  fsync_directory(run_dir.string());
  fs::remove_all(old);
}

// The global sample ids (SampleId::global_index) of a step's micro-batches,
// "[3, 17, ...]", at most `limit` of them then "... (N in all)".
std::string describe_samples(const std::vector<uint64_t>& samples, size_t limit) {
  std::string out = "[";
  for (size_t i = 0; i < samples.size() && i < limit; ++i) out += (i ? ", " : "") + std::to_string(samples[i]);
  if (samples.size() > limit) out += ", ... (" + std::to_string(samples.size()) + " in all)";
  return out + "]";
}

std::string signal_name(int signal) {
  switch (signal) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGUSR1: return "SIGUSR1";
    default: return "signal " + std::to_string(signal);
  }
}

std::string format_double(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// "2h05m", "3m07s", "42s".
std::string format_duration(double seconds) {
  const auto total = static_cast<long long>(std::max(0.0, std::round(seconds)));
  char buffer[32];
  if (total >= 3600) {
    std::snprintf(buffer, sizeof buffer, "%lldh%02lldm", total / 3600, total % 3600 / 60);
  } else if (total >= 60) {
    std::snprintf(buffer, sizeof buffer, "%lldm%02llds", total / 60, total % 60);
  } else {
    std::snprintf(buffer, sizeof buffer, "%llds", total);
  }
  return buffer;
}

// The progress bar of a run on a terminal, redrawn in place after every step:
//   [########............] 120/300  40% | 1m10s elapsed, 1m45s left
// Log lines erase it first (clear()) and it is drawn again after them, so the
// log itself stays one record per line. Disabled, it prints nothing.
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled) {}

  // What erases the bar ("" when none is shown).
  std::string clear() {
    if (!shown_) return "";
    shown_ = false;
    return "\r\033[K";
  }

  // `done_here` steps took `elapsed` seconds in this call; they set the pace.
  void draw(std::ostream& out, int64_t step, int64_t stop_step, double elapsed, int64_t done_here) {
    if (!enabled_ || stop_step <= 0) return;
    constexpr int kWidth = 30;
    const double fraction = std::clamp(static_cast<double>(step) / static_cast<double>(stop_step), 0.0, 1.0);
    const int filled = static_cast<int>(fraction * kWidth);
    const double left = done_here > 0 ? elapsed / static_cast<double>(done_here) * (stop_step - step) : 0.0;
    out << clear() << "[" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << step << "/"
        << stop_step << " " << format_double("%3.0f", fraction * 100) << "% | " << format_duration(elapsed)
        << " elapsed, " << format_duration(left) << " left" << std::flush;
    shown_ = true;
  }

 private:
  bool enabled_;
  bool shown_ = false;
};

}  // namespace

std::string checkpoint_folder_name(int64_t step) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "step-%07lld", static_cast<long long>(step));
  return buffer;
}

double measure_matmul_peak_flops(c10::Device device, torch::ScalarType dtype) {
  const int64_t size = device.is_cuda() ? 8192 : 1024;
  const int repeats = device.is_cuda() ? 10 : 3;
  // torch::full, not randn: the measurement must not draw from the seeded RNG.
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  const auto a = torch::full({size, size}, 0.5, options);
  const auto b = torch::full({size, size}, 0.25, options);
  auto c = torch::mm(a, b);  // warm-up: first-call allocation and BLAS set-up
  synchronize(device);
  const auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) torch::mm_out(c, a, b);
  synchronize(device);
  const double seconds = std::max(seconds_since(start), 1e-9);
  return repeats * 2.0 * static_cast<double>(size) * static_cast<double>(size) * static_cast<double>(size) / seconds;
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

namespace {

// A single-device model holding `params` (full tensors by name), for the
// rank that writes a checkpoint or an export of a tensor-parallel run.
std::shared_ptr<LlamaForCausalLM> whole_model(const ModelConfig& shape, const NamedTensors& params) {
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(shape, factory);
  load_tensor_parallel_shards(*model, params, /*rank=*/0, /*size=*/1);
  return model;
}

}  // namespace

ParallelDims check_training_layout(const Config& config, int64_t world_size) {
  const ParallelDims dims = ParallelDims::from_config(config, world_size);
  check_supported(config, dims);
  return dims;
}

TrainResult train(Config& config, const TrainOptions& options) {
  // parallel.dp auto resolves here; a layout that does not fit the world
  // size or the model is refused with the factors named.
  const int64_t world_size = options.world ? options.world->size() : 1;
  const ParallelDims dims = check_training_layout(config, world_size);
  // Every CPU tensor from here on is counted (mem_tensor_peak_bytes), so a
  // layout's memory can be compared with `loom plan`'s prediction.
  install_tensor_memory_counter();
  if (world_size > 1 && (options.grid == nullptr || !options.grid->tp)) {
    throw std::logic_error("train: a world of " + std::to_string(world_size) + " ranks needs TrainOptions::grid");
  }
  // The tensor-parallel group, or null when every rank holds the whole model.
  ProcessGroup* tp = dims.tp > 1 ? options.grid->tp.get() : nullptr;
  // The data-parallel group (this rank's replicas), or null with one replica.
  ProcessGroup* dp = dims.dp > 1 ? options.grid->dp.get() : nullptr;
  // The pipeline group (this rank's stages), or null when every rank holds every layer.
  ProcessGroup* pp = dims.pp > 1 ? options.grid->pp.get() : nullptr;
  // Whether this rank holds the whole model (no tp or pp): then checkpoints
  // need no gathering.
  const bool model_is_whole = tp == nullptr && pp == nullptr;
  const ParallelDims::Coords coords = dims.coords_of(options.world ? options.world->rank() : 0);
  // One rank writes the run folder, the metrics, checkpoints and the export;
  // with tensor parallelism the others take part in gathering what it writes.
  const bool writer = options.world == nullptr || options.world->rank() == 0;
  const int64_t micro_batch = config.batch.micro_batch_size;
  const int64_t global_batch = global_batch_of(config, dims);
  const int64_t seq_len = config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
  const int64_t train_steps = config.schedule.train_steps;
  const int64_t stop_step =
      options.stop_after_step >= 0 ? std::min(options.stop_after_step, train_steps) : train_steps;
  std::ostream* log = writer ? options.log : nullptr;

  TrainResult result;
  const fs::path run_dir = fs::path(config.run.output_dir) / config.run.name;
  const fs::path checkpoints_dir = run_dir / "checkpoints";
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  result.run_dir = run_dir.string();

  // The checkpoint to resume from is decided before anything is written, so
  // a refused resume leaves the run folder as it was.
  // With checkpoint.resume auto, a checkpoint that fails verification is
  // passed over for the newest older one that passes.
  std::vector<std::string> resume_fallbacks;
  const std::string resume_from =
      resume_checkpoint_path(config.checkpoint, checkpoints_dir.string(), &resume_fallbacks);
  if (resume_from.empty() && fs::exists(checkpoints_dir / kLatestFile)) {
    throw BadInput(checkpoints_dir.string() + " already holds checkpoints and checkpoint.resume is none: use "
                   "checkpoint.resume auto to continue, or another run.name");
  }

  const c10::Device device = resolve_device(config.run.device, options.local_rank);
  if (dims.world > 1 && device.is_cuda() && options.device_grid == nullptr) {
    throw std::logic_error("train: CUDA on " + std::to_string(dims.world) +
                           " ranks needs TrainOptions::device_grid (the NCCL groups)");
  }
  // The groups that carry the model's own tensors (tp activations and the
  // vocabulary-parallel loss, dp gradients and ZeRO shards): NCCL's on CUDA,
  // the MPI groups on the CPU. What goes through the host (the loss and the
  // metrics, flags, gradient norms, checkpoint gathers) stays on `dp`, `tp`
  // and `pp` (Note [host and device groups]); the pipeline's own groups are
  // made below (Note [pipeline links]).
  ProcessGroup* tp_data = tp != nullptr && device.is_cuda() ? options.device_grid->tp.get() : tp;
  ProcessGroup* dp_data = dp != nullptr && device.is_cuda() ? options.device_grid->dp.get() : dp;
  const bool bf16 = config.precision.compute == "bf16";
  std::string peak_source = "logging.peak_tflops";
  if (config.logging.peak_tflops > 0) {
    result.peak_flops = config.logging.peak_tflops * 1e12;
  } else if (device.is_cuda()) {
    result.peak_flops = datasheet_peak_flops(device_name(device), bf16);
    peak_source = "the datasheet's dense peak";
  }
  if (result.peak_flops == 0 && options.measure_peak) {
    result.peak_flops = measure_matmul_peak_flops(device, bf16 ? torch::kBFloat16 : torch::kFloat);
    peak_source = "a measured matmul";
  }

  // Model and optimizer. build_initial_model seeds torch with run.seed before
  // drawing the initial weights; seeding here too covers model.init_from.
  // The weights are drawn on the CPU and then moved, so every device starts
  // from the same ones.
  // With tensor or pipeline parallelism every rank draws the whole model,
  // exactly as one rank would, and keeps its part of it (its tp shards of its
  // stages' layers): any layout starts from the same weights.
  torch::manual_seed(config.run.seed);
  LocalLayerFactory local_factory;
  std::shared_ptr<LlamaForCausalLM> whole = build_initial_model(config, local_factory);
  std::unique_ptr<TensorParallelLayerFactory> tp_factory;
  if (tp != nullptr) tp_factory = std::make_unique<TensorParallelLayerFactory>(*tp_data, config.parallel.sequence_parallel);
  const LayerFactory& factory = tp_factory ? static_cast<const LayerFactory&>(*tp_factory) : local_factory;
  // The whole model, or (pp) null; `modules` are what this rank trains: the
  // model, or its pipeline chunks.
  std::shared_ptr<LlamaForCausalLM> model = whole;
  std::vector<std::shared_ptr<LlamaForCausalLM>> modules;
  std::optional<PipeSchedule> schedule;
  if (pp != nullptr) {
    schedule.emplace(pipeline_schedule_of(config, dims));
    modules = build_pipeline_chunks(config.model, factory, *schedule, pp->rank());
    model.reset();
  } else if (tp != nullptr) {
    model = std::make_shared<LlamaForCausalLM>(config.model, factory);
    modules = {model};
  } else {
    modules = {model};
  }
  // This rank's part of `whole`'s weights, into the modules.
  auto load_from_whole = [&] {
    if (model_is_whole) return;
    const NamedTensors whole_params = to_named_tensors(whole->named_parameters());
    for (auto& module : modules) {
      load_tensor_parallel_shards(*module, whole_params, tp ? tp->rank() : 0, tp ? tp->size() : 1);
    }
  };
  load_from_whole();
  NamedTensors named_params;
  std::map<std::string, int64_t> param_dims;
  for (auto& module : modules) {
    module->to(device);
    module->train();
    for (auto& named : to_named_tensors(module->named_parameters())) named_params.push_back(std::move(named));
    param_dims.merge(tensor_parallel_shard_dims(*module));
  }
  const AdamWOptions adamw_options = AdamWOptions::from_config(config.optimizer);
  std::vector<torch::Tensor> params;
  for (const auto& [name, param] : named_params) params.push_back(param);
  // ZeRO-1 (parallel.zero_stage 1, parallel/zero.h) replaces the whole AdamW
  // with one whose state is split over dp; it is made once the weights are
  // final (after a resume, below).
  const bool zero_1 = dp != nullptr && config.parallel.zero_stage == 1;
  std::optional<AdamW> optimizer;
  if (!zero_1) optimizer.emplace(named_params, adamw_options);
  std::optional<ShardedAdamW> zero;
  // The gradient norm of all shards and stages together: a parameter every
  // rank of the tp group holds whole (norm weights, row-parallel biases) is
  // counted once, and so is the tied embedding whose copy the last pipeline
  // stage holds.
  const std::string tied_copy = pp != nullptr && pp->rank() != 0 && config.model.tie_embeddings
                                    ? "model.embed_tokens.weight" : "";
  std::vector<ProcessGroup*> model_groups;
  if (tp != nullptr) model_groups.push_back(tp);
  if (pp != nullptr) model_groups.push_back(pp);
  const GradNormReduction model_norm =
      model_is_whole ? GradNormReduction{} : sharded_grad_norm(model_groups, coords.tp, named_params, param_dims, tied_copy);
  // Data parallelism: each replica trains on its own samples of every global
  // batch, and the gradients are averaged over the replicas, bucket by bucket
  // while the last micro-batch's backward runs (parallel/data_parallel.h).
  // After that every replica holds the same gradients, so the norm needs no
  // dp reduction and every replica takes the same step. Under ZeRO-1 the
  // gradients are reduce-scattered instead, after backward.
  std::unique_ptr<GradientReducer> reducer;
  if (dp != nullptr && !zero_1) {
    GradientReducer::Options reducer_options;
    reducer_options.bucket_mb = config.parallel.bucket_mb;
    // A pipeline interleaves the micro-batches' backwards, so the last
    // gradient of a parameter is not known in advance: reduce after them.
    reducer_options.overlap = pp == nullptr;
    reducer = std::make_unique<GradientReducer>(*dp_data, params, reducer_options);
  }

  LoaderConfig loader_config;
  for (const auto& source : config.data.train) loader_config.datasets.push_back({source.path, source.weight});
  loader_config.seq_len = seq_len;
  loader_config.seed = config.run.seed;
  loader_config.global_batch = global_batch;
  loader_config.micro_batch = micro_batch;
  loader_config.dp_rank = coords.dp;
  loader_config.dp_size = dims.dp;
  loader_config.valid_path = config.data.valid;
  loader_config.open_options = dataset_open_options(config);
  loader_config.opened = options.datasets;
  Loader loader(loader_config);
  const int64_t micro_batches = loader.micro_batches_per_step();
  for (size_t d = 0; d < config.data.train.size(); ++d) {
    if (loader.dataset(d).vocab_size() > config.model.vocab_size) {
      throw BadInput(config.data.train[d].path + ": dataset vocab_size " + std::to_string(loader.dataset(d).vocab_size()) +
                     " exceeds model.vocab_size " + std::to_string(config.model.vocab_size));
    }
  }

  int64_t step = 0;  // completed optimizer steps
  int64_t skipped_steps = 0;  // of those, steps skipped as non-finite (optimizer.nonfinite_policy skip)
  NamedTensors resumed_state;  // the optimizer state of this rank's model shard, whole over dp
  if (!resume_from.empty()) {
    if (model_is_whole && !zero_1) {
      step = load_training_checkpoint(resume_from, *model, *optimizer, loader, &skipped_steps);
    } else {
      // Checkpoints hold whole tensors (see save_checkpoint below): load them
      // as one rank would, then keep this rank's shards.
      AdamW whole_optimizer(to_named_tensors(whole->named_parameters()), adamw_options);
      step = load_training_checkpoint(resume_from, *whole, whole_optimizer, loader, &skipped_steps);
      resumed_state = whole_optimizer.state_dict();
      load_from_whole();
      if (pp != nullptr) resumed_state = AdamW::state_for(resumed_state, named_params);
      if (tp != nullptr) {
        resumed_state = shard_tensor_parallel(resumed_state, optimizer_state_shard_dims(resumed_state, param_dims),
                                              tp->rank(), tp->size());
      }
      if (optimizer) optimizer->load_state_dict(resumed_state);
    }
    if (step > train_steps) {
      throw BadInput(resume_from + ": is at step " + std::to_string(step) + ", past schedule.train_steps " +
                     std::to_string(train_steps));
    }
  }
  result.resumed_from_step = step;
  if (!model_is_whole) whole.reset();
  if (zero_1) {
    zero.emplace(*dp_data, named_params, adamw_options);
    if (!resumed_state.empty()) zero->load_state_dict(resumed_state);
  }
  resumed_state.clear();
  // The gradients the norm and the clipping see: the model's, or under
  // ZeRO-1 this rank's shard of the averaged ones, whose squares are summed
  // over every rank (each element is in one dp shard; a parameter every tp
  // rank holds whole counts on tp rank 0 only).
  const std::vector<torch::Tensor> norm_params = zero ? zero->shard_params() : params;
  const GradNormReduction zero_norm =
      zero ? sharded_grad_norm({options.world}, coords.tp, zero->shard_named_params(), param_dims, tied_copy)
           : GradNormReduction{};
  const GradNormReduction* norm_reduction = zero ? &zero_norm : model_is_whole ? nullptr : &model_norm;

  // The pipeline: this rank's chunks run the schedule's forwards and
  // backwards, under autocast as the whole model would, with the same loss.
  std::unique_ptr<PipeGroups> pipe_groups;
  std::unique_ptr<PipelineExecutor> executor;
  if (pp != nullptr) {
    PipelineExecutor::Shape shape;
    shape.batch = micro_batch;
    // A sequence-parallel residual stream holds a slice of the tokens.
    shape.tokens = tp != nullptr && config.parallel.sequence_parallel ? seq_len / tp->size() : seq_len;
    shape.hidden = config.model.hidden_size;
    shape.dtype = bf16 ? torch::kBFloat16 : torch::kFloat;
    PipelineExecutor::Hooks hooks;
    hooks.forward = [bf16](LlamaForCausalLM& chunk, const torch::Tensor& input) {
      return autocast_forward(chunk, input, bf16);
    };
    hooks.loss = [tp_data](const torch::Tensor& logits, const torch::Tensor& targets) {
      return token_loss(logits, targets, tp_data);
    };
    // Activations and gradients go over a group per link between neighbours
    // (Note [pipeline links]): MPI's on the CPU, their NCCL twins on CUDA.
    auto* pp_mpi = dynamic_cast<MpiProcessGroup*>(pp);
    if (pp_mpi == nullptr) throw std::logic_error("train: the pp group must be an MPI group");
    PipeGroups::Twin twin;
#ifdef LOOM_WITH_CUDA
    if (device.is_cuda()) {
      twin = [](MpiProcessGroup& group) -> std::unique_ptr<ProcessGroup> {
        return std::make_unique<NcclProcessGroup>(group);
      };
    }
#endif
    pipe_groups = std::make_unique<PipeGroups>(*pp_mpi, twin);
    executor = std::make_unique<PipelineExecutor>(*pipe_groups, *schedule, modules, shape, std::move(hooks));
  }

  // Only the writer has a metrics file; the other ranks write to nothing.
  MetricsLog metrics;  // metrics.jsonl and its TensorBoard scalars (trainer/metrics_log.h)
  if (writer) {
    fs::create_directories(run_dir);
    write_file_atomic((run_dir / "config.yaml").string(), config_to_yaml(config));
    if (!resume_fallbacks.empty()) {
      // `latest` names the checkpoint resumed from, so that the failed ones
      // after it are replaced when training reaches their steps again.
      write_file_atomic((checkpoints_dir / kLatestFile).string(), fs::path(resume_from).filename().string() + "\n");
    }
    truncate_metrics(metrics_path, step);
    metrics.open(run_dir.string(), step);
  }
  LossSpikeGuard spike_guard(config.optimizer, run_dir.string());  // optimizer.loss_spike_policy

  // (Only the writer stages the tokenizer in the run folder.)
  const TrainingCheckpointOptions checkpoint_options{
      writer ? tokenizer_dir_of(config, run_dir) : "", config_to_yaml(config), config.checkpoint.keep_last,
      {{"dp", dims.dp}, {"tp", dims.tp}, {"pp", dims.pp}, {"world", dims.world}, {"zero_stage", config.parallel.zero_stage}}};

  // The whole model (and optimizer) as one rank holds them, on the writer:
  // with tensor parallelism the shards are gathered first, then the stages
  // on the first (collective over the groups, so every rank calls these),
  // and the writer writes the same files a single-rank run writes. Every
  // data-parallel replica holds the same weights, so only dp rank 0 gathers,
  // and every tp rank then holds the same stage, so only tp rank 0's pp
  // group goes on.
  auto gather_whole = [&](const NamedTensors& local, const std::map<std::string, int64_t>& dims_of) {
    NamedTensors gathered = tp != nullptr ? gather_tensor_parallel(*tp, local, dims_of) : local;
    if (pp != nullptr && coords.tp == 0) gathered = gather_pipeline_stages(*pp, gathered);
    return gathered;
  };
  auto gathered_model = [&]() -> std::shared_ptr<LlamaForCausalLM> {
    if (coords.dp != 0) return nullptr;
    if (model_is_whole) return model;
    NamedTensors whole_params = gather_whole(named_params, param_dims);
    return writer ? whole_model(config.model, whole_params) : nullptr;
  };
  // checkpoint.async: the writer rank hands each snapshot to a background
  // thread, which writes and commits it while training goes on.
  std::unique_ptr<AsyncCheckpointWriter> async_writer;
  if (writer && config.checkpoint.enabled && config.checkpoint.async) {
    async_writer = std::make_unique<AsyncCheckpointWriter>(checkpoints_dir.string(), checkpoint_options);
  }
  // Writes (or, async, starts writing) the checkpoint of `step`, returning
  // its folder on the writer and "" elsewhere.
  auto commit = [&](const LlamaForCausalLM& whole, const AdamW& whole_optimizer, bool live) -> std::string {
    // An async snapshot of tensors that training goes on updating (`live`)
    // must be a copy; gathered tensors are fresh and are not touched again.
    // (The previous async save is waited for here, and its host buffers
    // are copied into.)
    TrainingSnapshot spare = async_writer ? async_writer->take_spare() : TrainingSnapshot{};
    TrainingSnapshot snapshot = snapshot_training_state(step, whole, whole_optimizer, loader, skipped_steps,
                                                        /*copy=*/async_writer != nullptr && live, &spare);
    if (async_writer) return async_writer->start(std::move(snapshot));
    return write_training_checkpoint(checkpoints_dir.string(), snapshot, checkpoint_options);
  };
  auto save_checkpoint = [&]() -> std::string {
    // ZeRO-1 gathers its state over dp first (collective: every replica).
    NamedTensors state = zero ? zero->state_dict() : NamedTensors{};
    if (coords.dp != 0) return "";
    if (model_is_whole && !zero) return commit(*model, *optimizer, /*live=*/true);
    if (!zero) state = optimizer->state_dict();
    if (!model_is_whole) state = gather_whole(state, optimizer_state_shard_dims(state, param_dims));
    std::shared_ptr<LlamaForCausalLM> whole_now = gathered_model();
    if (!writer) return "";
    AdamW whole_optimizer(to_named_tensors(whole_now->named_parameters()), adamw_options);
    whole_optimizer.load_state_dict(state);
    // With a whole model (dp and ZeRO-1 only), its parameters are the live ones.
    return commit(*whole_now, whole_optimizer, /*live=*/model_is_whole);
  };

  const double step_flops_per_token = flops_per_token(config.model, seq_len);
  // Model FLOPs utilization of all the job's devices together.
  auto mfu_of = [&](double tokens_per_s) {
    return result.peak_flops > 0 ? tokens_per_s * step_flops_per_token / (result.peak_flops * dims.world) : 0.0;
  };
  const int64_t tokens_per_step = global_batch * seq_len;
  if (log) {
    *log << "train: " << run_dir.string() << ", " << count_parameters(config.model) << " parameters ("
         << count_non_embedding_parameters(config.model) << " non-embedding), " << dims.describe() << "\n"
         << "train: " << device_name(device) << ", compute " << config.precision.compute << ", params "
         << config.precision.params << ", recompute " << config.model.recompute << "\n"
         << "train: batch " << global_batch << " x " << seq_len << " tokens = " << micro_batches
         << " micro-batches of " << micro_batch << ", steps " << step << " -> " << stop_step << " of "
         << train_steps << (resume_from.empty() ? "" : ", resumed from " + resume_from) << "\n";
    // AdamW's exp_avg and exp_avg_sq: fp32, two per parameter element this rank holds.
    int64_t local_elements = 0;
    for (const auto& p : params) local_elements += p.numel();
    const double unsharded_mib = 2.0 * 4.0 * static_cast<double>(local_elements) / (1024.0 * 1024.0);
    *log << "train: AdamW state " << format_double("%.2f", unsharded_mib) << " MiB per rank";
    if (zero) {
      *log << ", ZeRO-1 over dp " << dims.dp << ": " << format_double("%.2f", zero->state_bytes() / (1024.0 * 1024.0))
           << " MiB on rank 0";
    }
    *log << "\n";
    for (const std::string& failure : resume_fallbacks) {
      *log << "warning: passed over a checkpoint that fails verification: " << failure << "\n";
    }
    if (result.peak_flops > 0) {
      *log << "train: peak " << format_double("%.1f", result.peak_flops / 1e12) << " TFLOP/s from " << peak_source
           << " (mfu is relative to it)\n";
    }
    log->flush();
  }

  ProgressBar progress(writer && options.progress_bar);
  int stop_requested = 0;  // the signal of a graceful stop, once the loop has seen it
  // Records a pending TrainOptions::stop_signal (once) and logs it:
  // `micro_done` micro-batches of the step in progress are done, or 0 after
  // the step's optimizer update.
  auto notice_stop_request = [&](int64_t micro_done) {
    if (stop_requested != 0 || options.stop_signal == nullptr) return;
    stop_requested = options.stop_signal->load();
    if (stop_requested == 0 || !log) return;
    *log << progress.clear() << "stop requested (" << signal_name(stop_requested) << ") ";
    if (micro_done > 0) {
      *log << "at micro-batch " << micro_done << "/" << micro_batches << " of step " << (step + 1)
           << ": finishing the step, then ";
    } else {
      *log << "after step " << step << "'s micro-batches: ";
    }
    *log << (config.checkpoint.enabled ? "saving a checkpoint" : "stopping (checkpoint.enabled is false)") << "\n";
    log->flush();
  };
  double interval_seconds = 0.0, total_seconds = 0.0;
  int64_t interval_steps = 0;
  const auto run_start = Clock::now();

  auto zero_grad = [&] { zero ? zero->zero_grad() : optimizer->zero_grad(); };
  StepProfiler profiler(config.profile, device, run_dir / "profile", writer);  // profile.* (trainer/profiler.h)
  // bf16 weights cast once per step, gradients added straight into the fp32
  // .grad (model/compute_weights.h); on one rank only, as no
  // reducer may wait on the weights' accumulation hooks.
  ComputeWeights compute_weights(bf16 && dims.world == 1);
  // The memory peaks in metrics.jsonl are those of the steps, not of the
  // set-up before them (which draws the whole model on every rank).
  reset_peak_memory(device);
  while (step < stop_step) {
    profiler.step_begin(step + 1);
    const auto step_start = Clock::now();
    zero_grad();
    std::vector<uint64_t> samples;  // global sample ids of this step, for a non-finite report
    const bool poison = options.poison_step && options.poison_step(step + 1);
    const double loss_scale = options.scale_loss ? options.scale_loss(step + 1) : 1.0;  // TrainOptions::scale_loss
    // The micro-batch losses are summed on the device and read once per step,
    // so a GPU is not made to wait after every micro-batch.
    torch::Tensor step_loss = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
    if (executor) {
      // The pipeline runs the whole step's micro-batches at once (the schedule
      // interleaves them); its loss is the last stage's, shared with all.
      std::vector<torch::Tensor> inputs, targets;
      for (int64_t m = 0; m < micro_batches; ++m) {
        MicroBatch batch = loader.next_micro_batch();
        for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
        auto [inputs_bt, targets_bt] = to_inputs_targets(batch, device);
        inputs.push_back(inputs_bt);
        targets.push_back(targets_bt);
      }
      step_loss += executor->run(inputs, targets);
      all_reduce_through_cpu(*pp, step_loss);
      if (poison) step_loss = step_loss * std::numeric_limits<double>::quiet_NaN();  // TrainOptions::poison_step
      if (loss_scale != 1.0) step_loss = step_loss * loss_scale;
      notice_stop_request(micro_batches);
    }
    for (int64_t m = 0; !executor && m < micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      auto [inputs_bt, targets_bt] = to_inputs_targets(batch, device);
      // Mean over this micro-batch's tokens, divided by the number of
      // micro-batches: the accumulated gradient is then that of the mean
      // over the whole global batch (every micro-batch has as many tokens).
      auto loss = next_token_loss(*model, inputs_bt, targets_bt, bf16, tp_data) / static_cast<double>(micro_batches);
      if (poison && m == 0) loss = loss * std::numeric_limits<double>::quiet_NaN();  // TrainOptions::poison_step
      if (loss_scale != 1.0 && m == 0) loss = loss * loss_scale;
      if (reducer && m == micro_batches - 1) reducer->arm();
      loss.backward();
      step_loss += loss.detach().to(torch::kDouble);
      // A stop request is honoured at the next step boundary: a checkpoint
      // cannot hold half-accumulated gradients, and dropping them would make
      // the resumed run differ. So the step is finished first.
      notice_stop_request(m + 1);
    }
    if (reducer) reducer->finish();
    if (zero) zero->reduce_gradients();
    if (dp != nullptr) {
      // The replicas' means over the same number of samples: their mean is
      // the global batch's.
      all_reduce_through_cpu(*dp, step_loss, ReduceOp::kAvg);
    }
    // A NaN or inf in any micro-batch's loss makes the sum non-finite.
    const double loss_sum = step_loss.item<double>();
    bool finite = std::isfinite(loss_sum);
    const double clip = config.optimizer.clip_grad_norm;
    const double norm =
        clip > 0 ? clip_grad_norm(norm_params, clip, norm_reduction) : grad_norm(norm_params, norm_reduction);
    finite = finite && std::isfinite(norm);
    // optimizer.loss_spike_policy (trainer/loss_spike.h): a spike is skipped
    // as a non-finite step is, or sends every rank back to the last
    // checkpoint; a step rolled back earlier is skipped now.
    const bool rolled_back = spike_guard.rolled_back(step + 1);
    const LossSpikeGuard::Action spike =
        finite && !rolled_back ? spike_guard.check(step + 1, loss_sum) : LossSpikeGuard::Action::kTrain;
    if (spike == LossSpikeGuard::Action::kRollback) spike_guard.roll_back(step + 1, loss_sum, samples, writer);
    const bool spike_skip = rolled_back || spike == LossSpikeGuard::Action::kSkip;
    if (!finite || spike_skip) {
      const bool skip = spike_skip || config.optimizer.nonfinite_policy == "skip";
      if (!skip || skipped_steps + 1 > config.optimizer.max_skipped_steps) {
        // Thrown before the update and before any checkpoint of this step,
        // so the last checkpoint (and `latest`) stays the last good state.
        // Not BadInput: the input is not known to be at fault (exit 1).
        const std::string why = skip ? " (optimizer." + std::string(spike_skip ? "loss_spike" : "nonfinite") +
                                           "_policy: " + std::to_string(skipped_steps) +
                                           " steps already skipped, optimizer.max_skipped_steps " +
                                           std::to_string(config.optimizer.max_skipped_steps) + ")"
                                     : " (optimizer.nonfinite_policy stop)";
        throw std::runtime_error(std::string(spike_skip ? "loss spike: loss (" : "non-finite loss (") +
                                 std::to_string(loss_sum) + ") or gradient norm (" +
                                 std::to_string(norm) + ") at step " + std::to_string(step + 1) +
                                 ", global samples " + describe_samples(samples, 64) + why +
                                 "; stopped before the update, the last checkpoint in " + checkpoints_dir.string() +
                                 " is intact");
      }
      // Skip: drop the gradients and the update; the step and the data
      // still advance, so the offending batch is not seen again.
      zero_grad();
      ++skipped_steps;
      ++step;
      const double step_seconds = seconds_since(step_start);
      interval_seconds += step_seconds;
      total_seconds += step_seconds;
      ++interval_steps;
      json record = {{"step", step},
                     {"skipped", true},
                     {"loss", std::isfinite(loss_sum) ? json(loss_sum) : json(std::to_string(loss_sum))},
                     {"grad_norm", std::isfinite(norm) ? json(norm) : json(std::to_string(norm))},
                     {"skipped_steps", skipped_steps},
                     {"samples", samples}};
      if (spike_skip) {
        record["loss_spike"] = true;
        record[rolled_back ? "rolled_back" : "running_mean"] = rolled_back ? json(true) : json(spike_guard.running_mean());
      }
      if (writer) {
        metrics.write(record);
      }
      if (log) {
        *log << progress.clear() << "step " << step << "/" << train_steps << " | skipped: "
             << (rolled_back ? "rolled back for a loss spike, loss "
                 : spike_skip ? "loss spike (" + format_double("%.4g", config.optimizer.loss_spike_factor) +
                                    " x the running mean " + format_double("%.4f", spike_guard.running_mean()) +
                                    "), loss "
                              : "non-finite loss ")
             << loss_sum << (spike_skip ? "" : " or grad_norm " + std::to_string(norm))
             << " | global samples " << describe_samples(samples, 16) << " | "
             << skipped_steps << " of " << config.optimizer.max_skipped_steps << " skips used\n";
        log->flush();
      }
    } else {
      const double lr = learning_rate(config.optimizer, config.schedule, step);
      zero ? zero->step(lr) : optimizer->step(lr);
      compute_weights.weights_changed();
      ++step;
      const double step_seconds = seconds_since(step_start);
      interval_seconds += step_seconds;
      total_seconds += step_seconds;
      ++interval_steps;
      result.last_loss = loss_sum;

      if (step % config.logging.interval == 0 || step == stop_step) {
        const double tokens_per_s = interval_steps * tokens_per_step / std::max(interval_seconds, 1e-9);
        const double mfu = mfu_of(tokens_per_s);
        const MemoryStats memory = memory_stats(device);
        // Each rank's tensor peak (ranks of different pipeline stages hold
        // different amounts): collective over the world, at the same steps
        // on every rank.
        std::vector<int64_t> tensor_peaks{static_cast<int64_t>(memory.tensor_peak_bytes)};
        if (options.world != nullptr && options.world->size() > 1) {
          torch::Tensor peaks = torch::zeros({options.world->size()}, torch::kLong);
          peaks[options.world->rank()] = tensor_peaks[0];
          all_reduce_through_cpu(*options.world, peaks);
          tensor_peaks.assign(peaks.data_ptr<int64_t>(), peaks.data_ptr<int64_t>() + peaks.numel());
        }
        json record = {{"step", step},
                             {"loss", loss_sum},
                             {"lr", lr},
                             {"grad_norm", norm},
                             {"tokens_per_s", tokens_per_s},
                             {"mfu", mfu},
                             {"tokens", step * tokens_per_step},
                             {"step_time_s", interval_seconds / interval_steps},
                             {"peak_flops", result.peak_flops},
                             {"mem_peak_gib", memory.peak_bytes / kGiB},
                             {"mem_reserved_gib", memory.reserved_bytes / kGiB},
                             {"mem_tensor_peak_bytes", *std::max_element(tensor_peaks.begin(), tensor_peaks.end())}};
        if (tensor_peaks.size() > 1) record["mem_tensor_peak_bytes_per_rank"] = tensor_peaks;
        if (writer) {
          metrics.write(record);
        }
        if (log) {
          const double elapsed = seconds_since(run_start);
          const double eta = (stop_step - step) * (interval_seconds / interval_steps);
          *log << progress.clear() << "step " << step << "/" << train_steps << " | loss "
               << format_double("%.4f", loss_sum) << " | lr " << format_double("%.3e", lr) << " | grad_norm "
               << format_double("%.3f", norm) << " | " << format_double("%.0f", tokens_per_s) << " tok/s | mfu "
               << format_double("%.1f", mfu * 100) << "% | mem " << format_double("%.2f", memory.peak_bytes / kGiB)
               << " GiB | elapsed " << format_duration(elapsed) << ", eta " << format_duration(eta) << "\n";
          log->flush();
        }
        reset_peak_memory(device);
        interval_seconds = 0.0;
        interval_steps = 0;
      }
    }
    if (std::string report = profiler.step_end(step); log && !report.empty()) *log << progress.clear() << report;
    if (options.on_step_done) options.on_step_done(step);
    // The pipeline's links wait as long as pp does (on_step_done may have
    // shortened it after the first step).
    if (pipe_groups) pipe_groups->set_timeout(pp->timeout());

    const bool valid_due = (config.data.valid_interval > 0 && step % config.data.valid_interval == 0) ||
                           step == train_steps;
    if (!config.data.valid.empty() && valid_due) {
      const auto valid_start = Clock::now();
      // data.valid_batches counts micro-batches over all replicas: each
      // evaluates its share of the same samples a single rank reads.
      const int64_t batches_here = (config.data.valid_batches + dims.dp - 1) / dims.dp;
      double valid_loss = executor ? pipeline_validation_loss(*executor, *pp, loader, batches_here, device)
                                   : validation_loss(*model, loader, batches_here, device, bf16, tp_data);
      if (dp != nullptr) {
        // Every replica evaluates as many batches of its own: the mean of the means.
        torch::Tensor mean = torch::tensor(valid_loss, torch::kDouble);
        all_reduce_through_cpu(*dp, mean, ReduceOp::kAvg);
        valid_loss = mean.item<double>();
      }
      result.last_valid_loss = valid_loss;
      const json record = {{"step", step},
                           {"valid_loss", std::isfinite(valid_loss) ? json(valid_loss) : json(std::to_string(valid_loss))},
                           {"valid_batches", config.data.valid_batches},
                           {"valid_time_s", seconds_since(valid_start)}};
      if (writer) {
        metrics.write(record);
      }
      if (log) {
        *log << progress.clear() << "step " << step << "/" << train_steps << " | valid_loss "
             << format_double("%.4f", valid_loss) << "\n";
        log->flush();
      }
    }

    // A request that came after the last micro-batch's check.
    notice_stop_request(0);
    // Every rank must stop at the same step (the others would wait for it
    // in the next collective): the signal may have reached them at
    // different moments, so they agree on the largest.
    if (options.world != nullptr && options.world->size() > 1) {
      torch::Tensor agreed = torch::tensor(static_cast<int64_t>(stop_requested));
      all_reduce_through_cpu(*options.world, agreed, ReduceOp::kMax);
      stop_requested = static_cast<int>(agreed.item<int64_t>());
    }
    const bool interval_due = config.checkpoint.interval > 0 && step % config.checkpoint.interval == 0;
    if (config.checkpoint.enabled && (interval_due || step == stop_step || stop_requested != 0)) {
      const auto save_start = Clock::now();
      result.last_checkpoint = save_checkpoint();
      // The time the loop stood still for the save: with checkpoint.async
      // only the gather and the copy to host memory (and any wait for the
      // previous save); without, the whole write.
      const double stall = seconds_since(save_start);
      result.checkpoint_stall_seconds += stall;
      if (log) {
        *log << progress.clear() << "checkpoint: " << result.last_checkpoint << " (loop stalled "
             << format_double("%.3f", stall) << " s" << (async_writer ? ", writing in the background" : "") << ")\n";
      }
    }
    if (stop_requested != 0) {
      result.stopped_by_signal = stop_requested;
      break;
    }
    if (log) progress.draw(*log, step, stop_step, seconds_since(run_start), step - result.resumed_from_step);
  }
  if (log) *log << progress.clear();
  if (writer) metrics.close();
  if (async_writer) {
    // The run is not over until its last checkpoint is committed; a write
    // that failed is reported here (its folder absent, `latest` unchanged).
    const double seconds = async_writer->wait();
    if (log && !result.last_checkpoint.empty()) {
      *log << "checkpoint: " << result.last_checkpoint << " written in the background in "
           << format_double("%.3f", seconds) << " s\n";
    }
  }

  result.final_step = step;
  result.tokens_per_s = total_seconds > 0 ? (step - result.resumed_from_step) * tokens_per_step / total_seconds : 0.0;
  if (step == train_steps && config.checkpoint.export_hf_at_end) {
    std::shared_ptr<LlamaForCausalLM> whole_now = gathered_model();
    if (writer) export_run_to_hub(*whole_now, config, run_dir, step);
    if (log) *log << "exported: " << (run_dir / "hf").string() << "\n";
  }
  if (log && step > result.resumed_from_step) {
    // The end-of-run summary.
    const double mfu = mfu_of(result.tokens_per_s);
    *log << "done: " << (step - result.resumed_from_step) << " steps (" << step << "/" << train_steps << ") in "
         << format_duration(total_seconds) << ", " << format_double("%.0f", result.tokens_per_s) << " tok/s, mfu "
         << format_double("%.1f", mfu * 100) << "%, final loss " << format_double("%.4f", result.last_loss);
    if (std::isfinite(result.last_valid_loss)) *log << ", valid loss " << format_double("%.4f", result.last_valid_loss);
    if (skipped_steps > 0) *log << ", " << skipped_steps << " skipped steps";
    *log << "\n";
    if (!result.last_checkpoint.empty()) *log << "done: last checkpoint " << result.last_checkpoint << "\n";
    *log << "done: metrics in " << metrics_path << " (plot them with `loom plot " << run_dir.string() << "`)\n";
  }
  // No rank returns (and ends the job) while the writer is still writing.
  if (options.world != nullptr && options.world->size() > 1) options.world->barrier()->wait();
  result.model = model;  // null with pipeline parallelism (no rank holds it all)
  return result;
}

DatasetOpenOptions dataset_open_options(const Config& config) {
  DatasetOpenOptions options;
  options.check_shard_files = parse_shard_file_check(config.data.check_shard_files);
  return options;
}

}  // namespace loom
