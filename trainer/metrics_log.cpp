#include "trainer/metrics_log.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "util/tfevents.h"

namespace loom {

namespace fs = std::filesystem;

MetricsLog::MetricsLog() = default;
MetricsLog::~MetricsLog() = default;

void MetricsLog::open(const std::string& run_dir, int64_t resumed_step) {
  jsonl_path_ = (fs::path(run_dir) / "metrics.jsonl").string();
  jsonl_.open(jsonl_path_, std::ios::app);
  if (!jsonl_) throw std::runtime_error("cannot open " + jsonl_path_ + " for appending");
  if (resumed_step == 0) {
    for (const auto& entry : fs::directory_iterator(run_dir)) {
      if (entry.path().filename().string().starts_with("events.out.tfevents.")) fs::remove(entry.path());
    }
  }
  events_ = std::make_unique<TfEventsWriter>(run_dir);
  if (resumed_step > 0) events_->add_session_start(resumed_step + 1);
  events_->flush();
}

void MetricsLog::write(const nlohmann::json& record) {
  jsonl_ << record.dump() << "\n";
  jsonl_.flush();
  if (!jsonl_) throw std::runtime_error("cannot write " + jsonl_path_);
  if (!events_ || !record.contains("step") || !record["step"].is_number_integer()) return;
  const int64_t step = record["step"].get<int64_t>();
  for (const auto& [key, value] : record.items()) {
    // is_number() is false for booleans ("skipped": true) and strings ("nan").
    if (key == "step" || !value.is_number()) continue;
    events_->add_scalar(key, static_cast<float>(value.get<double>()), step);
  }
  events_->flush();
}

void MetricsLog::close() {
  if (jsonl_.is_open()) jsonl_.close();
  events_.reset();
}

}  // namespace loom
