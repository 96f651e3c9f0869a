#include "trainer/run_log.h"

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <ostream>
#include <sstream>

#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// A number, or its text when it is not finite (JSON has no NaN or inf).
json finite_or_text(double value) { return std::isfinite(value) ? json(value) : json(std::to_string(value)); }

}  // namespace

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

std::string format_double(const char* format, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

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

RunLog::RunLog(bool writer, std::ostream* out, bool progress_bar)
    : writer_(writer), out_(writer ? out : nullptr), progress_bar_(writer && progress_bar) {}

void RunLog::open_metrics(const std::string& run_dir, int64_t step) {
  if (!writer_) return;
  truncate_metrics((fs::path(run_dir) / "metrics.jsonl").string(), step);
  metrics_.open(run_dir, step);
}

void RunLog::close_metrics() {
  if (writer_) metrics_.close();
}

void RunLog::write(const json& record) {
  if (writer_) metrics_.write(record);
}

std::string RunLog::clear_bar() {
  if (!bar_shown_) return "";
  bar_shown_ = false;
  return "\r\033[K";
}

void RunLog::header(const RunHeader& h) {
  if (!out_) return;
  std::ostream& out = *out_;
  out << "train: " << h.run_dir << ", " << h.parameters << " parameters (" << h.non_embedding_parameters
      << " non-embedding), " << h.layout << "\n"
      << "train: " << h.device << ", compute " << h.compute << ", params " << h.params << ", recompute "
      << h.recompute << "\n"
      << "train: batch " << h.global_batch << " x " << h.seq_len << " tokens = " << h.micro_batches
      << " micro-batches of " << h.micro_batch << ", steps " << h.first_step << " -> " << h.stop_step << " of "
      << h.train_steps << (h.resumed_from.empty() ? "" : ", resumed from " + h.resumed_from) << "\n";
  out << "train: AdamW state " << format_double("%.2f", h.adamw_state_mib) << " MiB per rank";
  if (h.zero_dp > 0) {
    out << ", ZeRO-" << h.zero_stage << " over dp " << h.zero_dp;
    if (h.zero_edp > 0) out << " (experts over edp " << h.zero_edp << ")";
    out << ": " << format_double("%.2f", h.zero_state_mib)
        << " MiB on rank 0";
    // ZeRO-2/3: what else rank 0 keeps as shards instead of whole.
    if (h.zero_stage >= 2) out << "; gradient shard " << format_double("%.2f", h.zero_shard_mib) << " MiB";
    if (h.zero_stage >= 3) out << ", parameter shard " << format_double("%.2f", h.zero_shard_mib) << " MiB";
  }
  out << "\n";
  for (const std::string& failure : h.passed_over) {
    out << "warning: passed over a checkpoint that fails verification: " << failure << "\n";
  }
  if (h.peak_flops > 0) {
    out << "train: peak " << format_double("%.1f", h.peak_flops / 1e12) << " TFLOP/s from " << h.peak_source
        << " (mfu is relative to it)\n";
  }
  out.flush();
}

void RunLog::skipped_step(const StepReport& r, int64_t train_steps, double loss_spike_factor,
                          int64_t max_skipped_steps) {
  json record = {{"step", r.step},
                 {"skipped", true},
                 {"loss", finite_or_text(r.loss)},
                 {"grad_norm", finite_or_text(r.grad_norm)},
                 {"skipped_steps", r.skipped_steps},
                 {"samples", r.samples}};
  if (r.loss_spike) {
    record["loss_spike"] = true;
    record[r.rolled_back ? "rolled_back" : "running_mean"] = r.rolled_back ? json(true) : json(r.running_mean);
  }
  write(record);
  if (!out_) return;
  const std::string why = r.rolled_back ? "rolled back for a loss spike, loss "
                          : r.loss_spike ? "loss spike (" + format_double("%.4g", loss_spike_factor) +
                                               " x the running mean " + format_double("%.4f", r.running_mean) +
                                               "), loss "
                                         : "non-finite loss ";
  *out_ << clear_bar() << "step " << r.step << "/" << train_steps << " | skipped: " << why << r.loss
        << (r.loss_spike ? "" : " or grad_norm " + std::to_string(r.grad_norm)) << " | global samples "
        << describe_samples(r.samples, 16) << " | " << r.skipped_steps << " of " << max_skipped_steps
        << " skips used\n";
  out_->flush();
}

void RunLog::logged_step(const StepReport& r, const IntervalReport& in, int64_t train_steps, double elapsed,
                         double eta) {
  json record = {{"step", r.step},
                 {"loss", r.loss},
                 {"lr", r.lr},
                 {"grad_norm", r.grad_norm},
                 {"tokens_per_s", in.tokens_per_s},
                 {"mfu", in.mfu},
                 {"tokens", in.tokens},
                 {"loss_tokens", r.loss_tokens},
                 {"step_time_s", in.step_time_s},
                 {"peak_flops", in.peak_flops},
                 {"mem_peak_gib", in.mem_peak_bytes / kGiB},
                 {"mem_reserved_gib", in.mem_reserved_bytes / kGiB},
                 {"mem_tensor_peak_bytes", *std::max_element(in.tensor_peaks.begin(), in.tensor_peaks.end())}};
  if (in.tensor_peaks.size() > 1) record["mem_tensor_peak_bytes_per_rank"] = in.tensor_peaks;
  if (r.moe) {
    record["router_load_max_over_mean"] = r.router_load_max_over_mean;
    record["router_aux_loss"] = r.router_aux_loss;
    if (r.router_balance_loss >= 0) record["router_balance_loss"] = r.router_balance_loss;
  }
  write(record);
  if (!out_) return;
  *out_ << clear_bar() << "step " << r.step << "/" << train_steps << " | loss " << format_double("%.4f", r.loss)
        << " | lr " << format_double("%.3e", r.lr) << " | grad_norm " << format_double("%.3f", r.grad_norm) << " | "
        << format_double("%.0f", in.tokens_per_s) << " tok/s | mfu " << format_double("%.1f", in.mfu * 100)
        << "% | mem " << format_double("%.2f", in.mem_peak_bytes / kGiB) << " GiB | elapsed "
        << format_duration(elapsed) << ", eta " << format_duration(eta) << "\n";
  out_->flush();
}

void RunLog::validation(int64_t step, int64_t train_steps, double valid_loss, int64_t valid_batches,
                        double seconds) {
  write({{"step", step},
         {"valid_loss", finite_or_text(valid_loss)},
         {"valid_batches", valid_batches},
         {"valid_time_s", seconds}});
  if (!out_) return;
  *out_ << clear_bar() << "step " << step << "/" << train_steps << " | valid_loss "
        << format_double("%.4f", valid_loss) << "\n";
  out_->flush();
}

void RunLog::stop_requested(int signal, int64_t micro_done, int64_t micro_batches, int64_t step,
                            bool checkpointing) {
  if (!out_) return;
  *out_ << clear_bar() << "stop requested (" << signal_name(signal) << ") ";
  if (micro_done > 0) {
    *out_ << "at micro-batch " << micro_done << "/" << micro_batches << " of step " << (step + 1)
          << ": finishing the step, then ";
  } else {
    *out_ << "after step " << step << "'s micro-batches: ";
  }
  *out_ << (checkpointing ? "saving a checkpoint" : "stopping (checkpoint.enabled is false)") << "\n";
  out_->flush();
}

void RunLog::job_end_stop(int64_t step, double seconds_left, double step_seconds, double save_seconds,
                          double margin, bool checkpointing) {
  if (!out_) return;
  *out_ << clear_bar() << "stop before the job's end (LOOM_JOB_END_TIME) after step " << step << ": "
        << format_double("%.1f", seconds_left) << " s left, one more step (" << format_double("%.3f", step_seconds)
        << " s) + a save (" << format_double("%.3f", save_seconds) << " s) + launch.job_end_margin ("
        << format_double("%.1f", margin) << " s) would not fit; "
        << (checkpointing ? "saving a checkpoint" : "stopping (checkpoint.enabled is false)") << "\n";
  out_->flush();
}

void RunLog::checkpoint(const std::string& folder, double stall_seconds, bool async) {
  if (!out_) return;
  *out_ << clear_bar() << "checkpoint: " << folder << " (loop stalled " << format_double("%.3f", stall_seconds)
        << " s" << (async ? ", writing in the background" : "") << ")\n";
}

void RunLog::checkpoint_written(const std::string& folder, double seconds) {
  if (!out_ || folder.empty()) return;
  *out_ << "checkpoint: " << folder << " written in the background in " << format_double("%.3f", seconds)
        << " s\n";
}

void RunLog::exported(const std::string& folder) {
  if (out_) *out_ << "exported: " << folder << "\n";
}

void RunLog::profiler_report(const std::string& lines) {
  if (out_ && !lines.empty()) *out_ << clear_bar() << lines;
}

void RunLog::summary(const RunSummary& s) {
  if (!out_ || s.steps_here <= 0) return;
  std::ostream& out = *out_;
  out << "done: " << s.steps_here << " steps (" << s.step << "/" << s.train_steps << ") in "
      << format_duration(s.seconds) << ", " << format_double("%.0f", s.tokens_per_s) << " tok/s, mfu "
      << format_double("%.1f", s.mfu * 100) << "%, final loss " << format_double("%.4f", s.last_loss);
  if (std::isfinite(s.last_valid_loss)) out << ", valid loss " << format_double("%.4f", s.last_valid_loss);
  if (s.skipped_steps > 0) out << ", " << s.skipped_steps << " skipped steps";
  out << "\n";
  if (!s.last_checkpoint.empty()) out << "done: last checkpoint " << s.last_checkpoint << "\n";
  out << "done: metrics in " << s.metrics_path << " (plot them with `loom plot " << s.run_dir << "`)\n";
}

void RunLog::data_shards(const ShardCacheStats& stats) {
  if (!out_) return;
  *out_ << "data: opened " << stats.distinct_opened << " distinct shards of " << stats.shards << " (at most "
        << stats.peak_open << " open at once, limit " << stats.max_open << "), " << stats.checked
        << " checked on first use\n";
}

void RunLog::progress(int64_t step, int64_t stop_step, double elapsed, int64_t done_here) {
  if (!out_ || !progress_bar_ || stop_step <= 0) return;
  constexpr int kWidth = 30;
  const double fraction = std::clamp(static_cast<double>(step) / static_cast<double>(stop_step), 0.0, 1.0);
  const int filled = static_cast<int>(fraction * kWidth);
  const double left = done_here > 0 ? elapsed / static_cast<double>(done_here) * (stop_step - step) : 0.0;
  *out_ << clear_bar() << "[" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << step << "/"
        << stop_step << " " << format_double("%3.0f", fraction * 100) << "% | " << format_duration(elapsed)
        << " elapsed, " << format_duration(left) << " left" << std::flush;
  bar_shown_ = true;
}

void RunLog::end_progress() {
  if (out_) *out_ << clear_bar();
}

}  // namespace loom
