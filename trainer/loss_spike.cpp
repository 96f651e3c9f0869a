#include "trainer/loss_spike.h"

#include <cmath>
#include <filesystem>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>

#include "trainer/training.h"
#include "trainer/training_checkpoint.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string number(double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.6g", value);
  return buffer;
}

}  // namespace

LossSpikeGuard::LossSpikeGuard(const OptimizerConfig& config, const std::string& run_dir)
    : config_(config),
      path_((fs::path(run_dir) / "loss_spikes.json").string()),
      last_mean_(std::numeric_limits<double>::quiet_NaN()) {
  json records = json::array();
  if (config_.loss_spike_policy == "rollback" && fs::exists(path_)) {
    const json file = json::parse(read_file(path_), nullptr, /*allow_exceptions=*/false);
    if (!file.is_object() || !file.contains("rollbacks") || !file["rollbacks"].is_array()) {
      throw BadInput(path_ + ": not a loom loss-spike record (expected {\"rollbacks\": [...]}); delete it to forget "
                     "the rolled-back steps");
    }
    for (const json& record : file["rollbacks"]) {
      if (!record.is_object() || !record.contains("step") || !record["step"].is_number_integer() ||
          !record.contains("loss") || !record["loss"].is_number()) {
        throw BadInput(path_ + ": a rollback record without an integer step and a loss: " + record.dump());
      }
      rolled_back_[record["step"].get<int64_t>()] = record["loss"].get<double>();
    }
    records = file["rollbacks"];
  }
  records_ = records.dump();
}

LossSpikeGuard::Action LossSpikeGuard::check(int64_t step, double loss) {
  if (config_.loss_spike_policy == "none") return Action::kTrain;
  const auto window = static_cast<size_t>(config_.loss_spike_window);
  last_mean_ = std::numeric_limits<double>::quiet_NaN();
  if (window_.size() == window) {
    // Summed in order every time: the same bits on every rank and every run.
    double sum = 0.0;
    for (const double l : window_) sum += l;
    last_mean_ = sum / static_cast<double>(window_.size());
    if (loss > config_.loss_spike_factor * last_mean_) {
      if (config_.loss_spike_policy == "skip") return Action::kSkip;
      if (static_cast<int64_t>(rolled_back_.size()) >= config_.max_loss_spike_rollbacks) {
        throw std::runtime_error("loss spike at step " + std::to_string(step) + ": loss " + number(loss) + " > " +
                                 number(config_.loss_spike_factor) + " x the running mean " + number(last_mean_) +
                                 ", and optimizer.max_loss_spike_rollbacks (" +
                                 std::to_string(config_.max_loss_spike_rollbacks) +
                                 ") rollbacks are used up (" + path_ + "); stopped before the update");
      }
      return Action::kRollback;
    }
  }
  window_.push_back(loss);
  if (window_.size() > window) window_.pop_front();
  return Action::kTrain;
}

void LossSpikeGuard::roll_back(int64_t step, double loss, const std::vector<uint64_t>& samples, bool writer) {
  if (writer) {
    json records = json::parse(records_);
    records.push_back({{"step", step}, {"loss", loss}, {"running_mean", last_mean_}, {"samples", samples}});
    write_file_atomic(path_, json{{"rollbacks", records}}.dump(1) + "\n");
  }
  throw LossSpikeRollback("loss spike at step " + std::to_string(step) + ": loss " + number(loss) + " > " +
                          number(config_.loss_spike_factor) + " x the running mean " + number(last_mean_) +
                          " (optimizer.loss_spike_policy rollback, " + std::to_string(rolled_back_.size() + 1) +
                          " of " + std::to_string(config_.max_loss_spike_rollbacks) +
                          " rollbacks): going back to the last checkpoint; step " + std::to_string(step) +
                          "'s samples will be skipped");
}

double LossSpikeGuard::rolled_back_loss(int64_t step) const {
  const auto it = rolled_back_.find(step);
  return it == rolled_back_.end() ? std::numeric_limits<double>::quiet_NaN() : it->second;
}

TrainResult train_with_rollbacks(Config& config, const TrainOptions& options, const TrainHooks* hooks) {
  const bool writer = options.world == nullptr || options.world->rank() == 0;
  const fs::path latest = fs::path(config.run.output_dir) / config.run.name / "checkpoints" / kLatestFile;
  while (true) {
    try {
      return train(config, options, hooks);
    } catch (const LossSpikeRollback& rollback) {
      if (writer && options.log != nullptr) *options.log << rollback.what() << std::endl;
      // The writer recorded the step before it threw: no rank reads the
      // record before it is there.
      if (options.world != nullptr && options.world->size() > 1) options.world->barrier()->wait();
      // Back to this run's last checkpoint; with none yet, to where the run
      // started (checkpoint.resume as given).
      if (fs::exists(latest)) config.checkpoint.resume = "auto";
    }
  }
}

}  // namespace loom
