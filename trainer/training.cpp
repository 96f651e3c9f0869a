#include "trainer/training.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <torch/nn/functional/loss.h>

#include "checkpoints/hub.h"
#include "checkpoints/init_from.h"
#include "data/loader.h"
#include "parallel/topology.h"
#include "trainer/lr_schedule.h"
#include "trainer/optimizer.h"
#include "trainer/training_checkpoint.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// What this build can train; refused up front rather than after minutes of setup.
void check_supported(const Config& config) {
  if (config.run.device != "cpu" && config.run.device != "auto") {
    throw BadInput("run.device: '" + config.run.device + "' is not supported by `loom train` yet (expected cpu or auto)");
  }
  if (config.precision.compute != "fp32" || config.precision.params != "fp32") {
    throw BadInput("precision.compute / precision.params: '" + config.precision.compute + "' / '" +
                   config.precision.params + "' is not supported on the CPU yet (expected fp32)");
  }
  if (config.schedule.train_steps <= 0) {
    throw BadInput("schedule.train_steps: " + std::to_string(config.schedule.train_steps) + " (expected > 0)");
  }
  if (config.data.train.empty()) throw BadInput("data.train: no datasets given (expected a list of {path, weight})");
  if (config.logging.interval <= 0) {
    throw BadInput("logging.interval: " + std::to_string(config.logging.interval) + " (expected > 0)");
  }
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

std::string format_double(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

}  // namespace

std::string checkpoint_folder_name(int64_t step) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "step-%07lld", static_cast<long long>(step));
  return buffer;
}

double flops_per_token(const ModelConfig& model, int64_t seq_len) {
  return 6.0 * static_cast<double>(count_non_embedding_parameters(model)) +
         12.0 * static_cast<double>(model.num_layers) * static_cast<double>(model.hidden_size) *
             static_cast<double>(seq_len);
}

double measure_cpu_matmul_peak_flops() {
  constexpr int64_t kSize = 1024;
  constexpr int kRepeats = 3;
  // torch::full, not randn: the measurement must not draw from the seeded RNG.
  const auto a = torch::full({kSize, kSize}, 0.5f);
  const auto b = torch::full({kSize, kSize}, 0.25f);
  auto c = torch::mm(a, b);  // warm-up: first-call allocation and BLAS set-up
  const auto start = Clock::now();
  for (int i = 0; i < kRepeats; ++i) torch::mm_out(c, a, b);
  const double seconds = std::max(seconds_since(start), 1e-9);
  return kRepeats * 2.0 * kSize * kSize * kSize / seconds;
}

TrainResult train(Config& config, const TrainOptions& options) {
  check_supported(config);
  // One rank: parallel.dp auto resolves to 1; anything else is refused here
  // with the factors named.
  const ParallelDims dims = ParallelDims::from_config(config, 1);
  const int64_t micro_batch = config.batch.micro_batch_size;
  const int64_t global_batch = config.batch.global_batch_size > 0 ? config.batch.global_batch_size : micro_batch * dims.dp;
  const int64_t seq_len = config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
  const int64_t train_steps = config.schedule.train_steps;
  const int64_t stop_step =
      options.stop_after_step >= 0 ? std::min(options.stop_after_step, train_steps) : train_steps;
  std::ostream* log = options.log;

  TrainResult result;
  const fs::path run_dir = fs::path(config.run.output_dir) / config.run.name;
  const fs::path checkpoints_dir = run_dir / "checkpoints";
  const std::string metrics_path = (run_dir / "metrics.jsonl").string();
  result.run_dir = run_dir.string();

  // The checkpoint to resume from is decided before anything is written, so
  // a refused resume leaves the run folder as it was.
  const std::string resume_from = resume_checkpoint_path(config.checkpoint, checkpoints_dir.string());
  if (resume_from.empty() && fs::exists(checkpoints_dir / kLatestFile)) {
    throw BadInput(checkpoints_dir.string() + " already holds checkpoints and checkpoint.resume is none: use "
                   "checkpoint.resume auto to continue, or another run.name");
  }

  if (options.measure_peak) result.peak_flops = measure_cpu_matmul_peak_flops();

  // Model and optimizer. build_initial_model seeds torch with run.seed before
  // drawing the initial weights; seeding here too covers model.init_from.
  torch::manual_seed(config.run.seed);
  LocalLayerFactory factory;
  auto model = build_initial_model(config, factory);
  model->train();
  AdamW optimizer(to_named_tensors(model->named_parameters()), AdamWOptions::from_config(config.optimizer));
  const std::vector<torch::Tensor> params = optimizer.params();

  LoaderConfig loader_config;
  for (const auto& source : config.data.train) loader_config.datasets.push_back({source.path, source.weight});
  loader_config.seq_len = seq_len;
  loader_config.seed = config.run.seed;
  loader_config.global_batch = global_batch;
  loader_config.micro_batch = micro_batch;
  loader_config.dp_rank = 0;
  loader_config.dp_size = 1;
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
  if (!resume_from.empty()) {
    step = load_training_checkpoint(resume_from, *model, optimizer, loader, &skipped_steps);
    if (step > train_steps) {
      throw BadInput(resume_from + ": is at step " + std::to_string(step) + ", past schedule.train_steps " +
                     std::to_string(train_steps));
    }
  }
  result.resumed_from_step = step;

  fs::create_directories(run_dir);
  write_file_atomic((run_dir / "config.yaml").string(), config_to_yaml(config));
  truncate_metrics(metrics_path, step);
  std::ofstream metrics(metrics_path, std::ios::app);
  if (!metrics) throw std::runtime_error("cannot open " + metrics_path + " for appending");

  const double step_flops_per_token = flops_per_token(config.model, seq_len);
  const int64_t tokens_per_step = global_batch * seq_len;
  if (log) {
    *log << "train: " << run_dir.string() << ", " << count_parameters(config.model) << " parameters ("
         << count_non_embedding_parameters(config.model) << " non-embedding), " << dims.describe() << "\n"
         << "train: batch " << global_batch << " x " << seq_len << " tokens = " << micro_batches
         << " micro-batches of " << micro_batch << ", steps " << step << " -> " << stop_step << " of "
         << train_steps << (resume_from.empty() ? "" : ", resumed from " + resume_from) << "\n";
    if (result.peak_flops > 0) {
      *log << "train: measured CPU fp32 matmul peak " << format_double("%.1f", result.peak_flops / 1e9)
           << " GFLOP/s (mfu is relative to it)\n";
    }
    log->flush();
  }

  const TrainingCheckpointOptions checkpoint_options{tokenizer_dir_of(config, run_dir), config_to_yaml(config),
                                                     config.checkpoint.keep_last};
  double interval_seconds = 0.0, total_seconds = 0.0;
  int64_t interval_steps = 0;
  const auto run_start = Clock::now();

  while (step < stop_step) {
    const auto step_start = Clock::now();
    optimizer.zero_grad();
    double loss_sum = 0.0;
    bool finite = true;             // every micro-batch's loss, then the grad norm
    std::vector<uint64_t> samples;  // global sample ids of this step, for a non-finite report
    const bool poison = options.poison_step && options.poison_step(step + 1);
    for (int64_t m = 0; m < micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      // A copy: autograd keeps the ids for the embedding's backward, and the
      // tensor must own them rather than borrow the batch's buffer.
      const auto rows_bt = torch::from_blob(batch.tokens.data(), {batch.rows, batch.cols}, torch::kLong).clone();
      const auto inputs_bt = rows_bt.slice(1, 0, batch.cols - 1);
      const auto targets_bt = rows_bt.slice(1, 1, batch.cols);
      const auto logits_btv = model->forward(inputs_bt);
      // Mean over this micro-batch's tokens, divided by the number of
      // micro-batches: the accumulated gradient is then that of the mean
      // over the whole global batch (every micro-batch has as many tokens).
      auto loss = torch::nn::functional::cross_entropy(logits_btv.reshape({-1, logits_btv.size(-1)}),
                                                       targets_bt.reshape({-1})) /
                  static_cast<double>(micro_batches);
      if (poison && m == 0) loss = loss * std::numeric_limits<double>::quiet_NaN();  // TrainOptions::poison_step
      loss.backward();
      const double micro_loss = loss.item<double>();
      finite = finite && std::isfinite(micro_loss);
      loss_sum += micro_loss;
    }
    const double clip = config.optimizer.clip_grad_norm;
    const double norm = clip > 0 ? clip_grad_norm(params, clip) : grad_norm(params);
    finite = finite && std::isfinite(norm);
    if (!finite) {
      const bool skip = config.optimizer.nonfinite_policy == "skip";
      if (!skip || skipped_steps + 1 > config.optimizer.max_skipped_steps) {
        // Thrown before the update and before any checkpoint of this step,
        // so the last checkpoint (and `latest`) stays the last good state.
        // Not BadInput: the input is not known to be at fault (exit 1).
        const std::string why = skip ? " (optimizer.nonfinite_policy skip: " + std::to_string(skipped_steps) +
                                           " steps already skipped, optimizer.max_skipped_steps " +
                                           std::to_string(config.optimizer.max_skipped_steps) + ")"
                                     : " (optimizer.nonfinite_policy stop)";
        throw std::runtime_error("non-finite loss (" + std::to_string(loss_sum) + ") or gradient norm (" +
                                 std::to_string(norm) + ") at step " + std::to_string(step + 1) +
                                 ", global samples " + describe_samples(samples, 64) + why +
                                 "; stopped before the update, the last checkpoint in " + checkpoints_dir.string() +
                                 " is intact");
      }
      // Skip: drop the gradients and the update; the step and the data
      // still advance, so the offending batch is not seen again.
      optimizer.zero_grad();
      ++skipped_steps;
      ++step;
      const double step_seconds = seconds_since(step_start);
      interval_seconds += step_seconds;
      total_seconds += step_seconds;
      ++interval_steps;
      const json record = {{"step", step},
                           {"skipped", true},
                           {"loss", std::isfinite(loss_sum) ? json(loss_sum) : json(std::to_string(loss_sum))},
                           {"grad_norm", std::isfinite(norm) ? json(norm) : json(std::to_string(norm))},
                           {"skipped_steps", skipped_steps},
                           {"samples", samples}};
      metrics << record.dump() << "\n";
      metrics.flush();
      if (log) {
        *log << "step " << step << "/" << train_steps << " | skipped: non-finite loss " << loss_sum
             << " or grad_norm " << norm << " | global samples " << describe_samples(samples, 16) << " | "
             << skipped_steps << " of " << config.optimizer.max_skipped_steps << " skips used\n";
        log->flush();
      }
    } else {
      const double lr = learning_rate(config.optimizer, config.schedule, step);
      optimizer.step(lr);
      ++step;
      const double step_seconds = seconds_since(step_start);
      interval_seconds += step_seconds;
      total_seconds += step_seconds;
      ++interval_steps;
      result.last_loss = loss_sum;

      if (step % config.logging.interval == 0 || step == stop_step) {
        const double tokens_per_s = interval_steps * tokens_per_step / std::max(interval_seconds, 1e-9);
        const double mfu = result.peak_flops > 0 ? tokens_per_s * step_flops_per_token / result.peak_flops : 0.0;
        const json record = {{"step", step},           {"loss", loss_sum},
                             {"lr", lr},               {"grad_norm", norm},
                             {"tokens_per_s", tokens_per_s}, {"mfu", mfu},
                             {"tokens", step * tokens_per_step}, {"step_time_s", interval_seconds / interval_steps},
                             {"peak_flops", result.peak_flops}};
        metrics << record.dump() << "\n";
        metrics.flush();
        if (log) {
          const double elapsed = seconds_since(run_start);
          const double eta = (stop_step - step) * (interval_seconds / interval_steps);
          *log << "step " << step << "/" << train_steps << " | loss " << format_double("%.4f", loss_sum) << " | lr "
               << format_double("%.3e", lr) << " | grad_norm " << format_double("%.3f", norm) << " | "
               << format_double("%.0f", tokens_per_s) << " tok/s | mfu " << format_double("%.1f", mfu * 100)
               << "% | elapsed " << format_double("%.0f", elapsed) << " s, eta " << format_double("%.0f", eta)
               << " s\n";
          log->flush();
        }
        interval_seconds = 0.0;
        interval_steps = 0;
      }
    }

    const bool interval_due = config.checkpoint.interval > 0 && step % config.checkpoint.interval == 0;
    if (interval_due || step == stop_step) {
      result.last_checkpoint = save_training_checkpoint(checkpoints_dir.string(), step, *model, optimizer, loader,
                                                        checkpoint_options, skipped_steps);
      if (log) *log << "checkpoint: " << result.last_checkpoint << "\n";
    }
  }
  metrics.close();

  result.final_step = step;
  result.tokens_per_s = total_seconds > 0 ? (step - result.resumed_from_step) * tokens_per_step / total_seconds : 0.0;
  if (step == train_steps && config.checkpoint.export_hf_at_end) {
    export_run_to_hub(*model, config, run_dir, step);
    if (log) *log << "exported: " << (run_dir / "hf").string() << "\n";
  }
  if (log && step > result.resumed_from_step) {
    *log << "done: " << (step - result.resumed_from_step) << " steps in " << format_double("%.1f", total_seconds)
         << " s, " << format_double("%.0f", result.tokens_per_s) << " tok/s, final loss "
         << format_double("%.4f", result.last_loss) << "\n";
  }
  result.model = model;
  return result;
}

}  // namespace loom
