#include "plot/axis.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <stdexcept>

namespace loom::plot {
namespace {

// Heckbert's nicenum: a 1, 2, 5 (or 10) times a power of ten near `x`;
// rounded to the nearest when `round`, else the next one up.
double nice_number(double x, bool round) {
  const double exponent = std::floor(std::log10(x));
  const double power = std::pow(10.0, exponent);
  const double fraction = x / power;
  double nice;
  if (round) {
    nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10;
  } else {
    nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  }
  return nice * power;
}

// Enough decimals to tell ticks `step` apart: a nice step is 1, 2 or 5 x
// 10^k, so -k decimals (none for k >= 0).
int decimals_for_step(double step) {
  return std::clamp(static_cast<int>(-std::floor(std::log10(step) + 1e-9)), 0, 12);
}

}  // namespace

std::string Axis::label(double value) const {
  // Ticks computed as min + i * step can land at -1e-17 instead of 0.
  if (std::abs(value) < tick_step * 1e-9) value = 0.0;
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", label_decimals, value / label_scale);
  return text + label_suffix;
}

Axis nice_axis(double data_min, double data_max, int target_ticks, bool integer_ticks) {
  if (!std::isfinite(data_min) || !std::isfinite(data_max) || data_min > data_max) {
    throw std::invalid_argument("nice_axis: bad data range [" + std::to_string(data_min) + ", " +
                                std::to_string(data_max) + "]");
  }
  if (!std::isfinite(data_max - data_min)) {
    throw std::invalid_argument("nice_axis: data range [" + std::to_string(data_min) + ", " +
                                std::to_string(data_max) + "] overflows a double");
  }
  target_ticks = std::max(target_ticks, 2);
  if (data_max - data_min <= std::abs(data_max) * 1e-12) {
    // One point or a constant series: the range would be zero (a division by
    // zero when mapping to pixels), so give the value some room either side.
    // Treating a range below 1e-12 of the value as constant also keeps
    // value / tick_step well inside 2^53, where the tick loop below counts
    // exactly.
    double pad = data_min != 0.0 ? std::abs(data_min) * 0.1 : 1.0;
    if (integer_ticks) pad = std::max(pad, 1.0);
    data_min -= pad;
    data_max += pad;
  }
  Axis axis;
  const double range = nice_number(data_max - data_min, false);
  axis.tick_step = nice_number(range / (target_ticks - 1), true);
  if (integer_ticks) axis.tick_step = std::max(axis.tick_step, 1.0);
  const double first = std::floor(data_min / axis.tick_step);
  const double last = std::ceil(data_max / axis.tick_step);
  axis.min = first * axis.tick_step;
  axis.max = last * axis.tick_step;
  for (double i = 0; first + i <= last; ++i) axis.ticks.push_back((first + i) * axis.tick_step);

  const double magnitude = std::max(std::abs(axis.min), std::abs(axis.max));
  // Plain numbers up to 99999; beyond that k, M, G keep labels short.
  struct Unit {
    double from, scale;
    const char* suffix;
  };
  for (const Unit& unit : {Unit{1e9, 1e9, "G"}, Unit{1e6, 1e6, "M"}, Unit{1e5, 1e3, "k"}}) {
    if (magnitude >= unit.from) {
      axis.label_scale = unit.scale;
      axis.label_suffix = unit.suffix;
      break;
    }
  }
  axis.label_decimals = decimals_for_step(axis.tick_step / axis.label_scale);
  return axis;
}

}  // namespace loom::plot
