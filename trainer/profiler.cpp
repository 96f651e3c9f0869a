#include "trainer/profiler.h"

#include <kineto/ActivityType.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>

#include "trainer/device.h"
#include "util/file_io.h"

namespace loom {

namespace {

namespace kineto_api = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
using Clock = std::chrono::steady_clock;

constexpr size_t kSummaryRows = 30;  // in summary.txt
constexpr size_t kLogRows = 15;      // printed
constexpr size_t kLogNameWidth = 80;

std::set<ActivityType> activities_for(c10::Device device) {
  std::set<ActivityType> activities = {ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  return activities;
}

ProfilerConfig profiler_config() {
  // No shapes, stacks or memory: they multiply the trace's size and the
  // profiler's overhead, and the summary is by name.
  return ProfilerConfig(ProfilerState::KINETO);
}

bool is_device_activity(const kineto_api::KinetoEvent& event) {
  const auto type = static_cast<libkineto::ActivityType>(event.activityType());
  return type == libkineto::ActivityType::CONCURRENT_KERNEL || type == libkineto::ActivityType::GPU_MEMCPY ||
         type == libkineto::ActivityType::GPU_MEMSET;
}

bool is_cpu_op(const kineto_api::KinetoEvent& event) {
  return static_cast<libkineto::ActivityType>(event.activityType()) == libkineto::ActivityType::CPU_OP;
}

std::vector<ProfileRow> sorted_rows(std::map<std::string, ProfileRow> by_name) {
  std::vector<ProfileRow> rows;
  rows.reserve(by_name.size());
  for (auto& [name, row] : by_name) rows.push_back(std::move(row));
  std::stable_sort(rows.begin(), rows.end(),
                   [](const ProfileRow& a, const ProfileRow& b) { return a.total_ms > b.total_ms; });
  return rows;
}

// Kernels, copies and memsets on the GPU by name, with their device time.
std::vector<ProfileRow> device_time_by_name(const std::vector<kineto_api::KinetoEvent>& events) {
  std::map<std::string, ProfileRow> by_name;
  for (const auto& event : events) {
    if (!is_device_activity(event)) continue;
    ProfileRow& row = by_name[event.name()];
    row.name = event.name();
    row.count += 1;
    row.total_ms += static_cast<double>(event.durationNs()) * 1e-6;
  }
  return sorted_rows(std::move(by_name));
}

// CPU ops by name with their self time: an op's duration less that of the
// ops nested in it on the same thread (aten::linear holds aten::addmm; the
// total would count the matmul twice).
std::vector<ProfileRow> cpu_self_time_by_name(const std::vector<kineto_api::KinetoEvent>& events) {
  struct Span {
    const kineto_api::KinetoEvent* event;
    int64_t self_ns;
  };
  std::unordered_map<uint64_t, std::vector<Span>> by_thread;
  for (const auto& event : events) {
    if (!is_cpu_op(event)) continue;
    by_thread[event.startThreadId()].push_back({&event, static_cast<int64_t>(event.durationNs())});
  }
  std::map<std::string, ProfileRow> by_name;
  for (auto& [thread, spans] : by_thread) {
    // Parents before their children: earlier start first, and of two that
    // start together the longer one.
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      if (a.event->startNs() != b.event->startNs()) return a.event->startNs() < b.event->startNs();
      return a.event->endNs() > b.event->endNs();
    });
    std::vector<Span*> open;  // the enclosing ops of the current one, innermost last
    for (Span& span : spans) {
      while (!open.empty() && open.back()->event->endNs() <= span.event->startNs()) open.pop_back();
      if (!open.empty()) open.back()->self_ns -= static_cast<int64_t>(span.event->durationNs());
      open.push_back(&span);
    }
    for (const Span& span : spans) {
      ProfileRow& row = by_name[span.event->name()];
      row.name = span.event->name();
      row.count += 1;
      row.total_ms += static_cast<double>(std::max<int64_t>(span.self_ns, 0)) * 1e-6;
    }
  }
  return sorted_rows(std::move(by_name));
}

std::string format(const char* pattern, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, pattern, value);
  return buffer;
}

}  // namespace

std::string format_profile_summary(const std::vector<ProfileRow>& rows, const std::string& header, double steps_ms,
                                   size_t top, size_t max_name) {
  std::string out = header + "\n";
  char line[160];
  std::snprintf(line, sizeof line, "%4s %11s %7s %8s %11s  %s\n", "#", "total ms", "%", "count", "avg us", "name");
  out += line;
  double shown_ms = 0.0;
  for (size_t i = 0; i < rows.size() && i < top; ++i) {
    const ProfileRow& row = rows[i];
    std::string name = row.name;
    if (max_name > 0 && name.size() > max_name) name = name.substr(0, max_name - 3) + "...";
    const double percent = steps_ms > 0 ? 100.0 * row.total_ms / steps_ms : 0.0;
    const double average_us = row.count > 0 ? 1000.0 * row.total_ms / static_cast<double>(row.count) : 0.0;
    std::snprintf(line, sizeof line, "%4zu %11.3f %6.1f%% %8lld %11.1f  ", i + 1, row.total_ms, percent,
                  static_cast<long long>(row.count), average_us);
    out += line + name + "\n";
    shown_ms += row.total_ms;
  }
  double all_ms = 0.0;
  for (const ProfileRow& row : rows) all_ms += row.total_ms;
  out += "shown: " + format("%.3f", shown_ms) + " of " + format("%.3f", all_ms) + " ms in " +
         std::to_string(rows.size()) + " names\n";
  return out;
}

StepProfiler::StepProfiler(const ProfileConfig& config, c10::Device device, std::filesystem::path out_dir,
                           bool enabled)
    : config_(config), device_(device), out_dir_(std::move(out_dir)), enabled_(enabled && config.start_step > 0) {}

StepProfiler::~StepProfiler() {
  if (!recording_) return;
  // The run ended inside the window (an exception or a stop signal): the
  // profiler is global state of the process and must not stay on.
  try {
    kineto_api::disableProfiler();
  } catch (...) {
  }
}

void StepProfiler::step_begin(int64_t step) {
  const int64_t last = config_.start_step + config_.steps - 1;
  if (!enabled_ || recording_ || done_ || step < config_.start_step || step > last) return;
  // Work queued before the window would otherwise run (and be recorded)
  // inside it.
  synchronize(device_);
  const std::set<ActivityType> activities = activities_for(device_);
  kineto_api::prepareProfiler(profiler_config(), activities);
  kineto_api::enableProfiler(profiler_config(), activities);
  recording_ = true;
  first_step_ = step;
  window_start_ = Clock::now();
}

std::string StepProfiler::step_end(int64_t step) {
  const int64_t last = config_.start_step + config_.steps - 1;
  if (!recording_ || step < last) return "";
  // Kernels still queued at this point belong to the window: without the
  // wait their device time would be missing from the trace.
  synchronize(device_);
  const double window_ms = std::chrono::duration<double, std::milli>(Clock::now() - window_start_).count();
  std::unique_ptr<kineto_api::ProfilerResult> result = kineto_api::disableProfiler();
  recording_ = false;
  done_ = true;

  std::filesystem::create_directories(out_dir_);
  const std::string trace_path = (out_dir_ / "trace.json").string();
  result->save(trace_path);

  const bool on_device = device_.is_cuda();
  const std::vector<ProfileRow> rows =
      on_device ? device_time_by_name(result->events()) : cpu_self_time_by_name(result->events());
  const std::string steps = first_step_ == step ? "step " + std::to_string(step)
                                                : "steps " + std::to_string(first_step_) + "-" + std::to_string(step);
  const std::string header = "profile: " + steps + " on " + device_name(device_) + " in " +
                             format("%.1f", window_ms) + " ms; top ops by " +
                             (on_device ? "GPU time (kernels, copies, memsets)" : "CPU self time") +
                             ", % of that wall time";
  write_file_atomic((out_dir_ / "summary.txt").string(),
                    format_profile_summary(rows, header, window_ms, kSummaryRows));
  return format_profile_summary(rows, header, window_ms, kLogRows, kLogNameWidth) + "profile: " + trace_path +
         " (chrome://tracing or https://ui.perfetto.dev), " + (out_dir_ / "summary.txt").string() + "\n";
}

}  // namespace loom
