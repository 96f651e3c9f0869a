#include "trainer/job_end.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>

#include "util/error.h"

namespace loom {

bool must_stop_before_job_end(double now, double end_time, double step_seconds, double save_seconds,
                              double margin_seconds) {
  return now + step_seconds + save_seconds + margin_seconds >= end_time;
}

void JobEndWatch::record_iteration(double seconds) {
  if (iterations_ == 0) first_iteration_ = seconds;
  else slowest_after_first_ = std::max(slowest_after_first_, seconds);
  ++iterations_;
}

void JobEndWatch::record_save(double seconds) { slowest_save_ = std::max(slowest_save_, seconds); }

double unix_seconds_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double job_end_time_from_environment() {
  for (const char* variable : {"LOOM_JOB_END_TIME", "SLURM_JOB_END_TIME"}) {
    const char* value = std::getenv(variable);
    if (value == nullptr || *value == '\0') continue;
    char* end = nullptr;
    const double seconds = std::strtod(value, &end);
    if (end == value || *end != '\0' || !(seconds > 0))
      throw BadInput(std::string(variable) + "=" + value +
                     ": expected the job's end time in Unix seconds (e.g. $(date -d '+2 hours' +%s))");
    return seconds;
  }
  return 0.0;
}

}  // namespace loom
