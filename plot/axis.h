// Axis ranges and tick marks at "nice" values (1, 2 or 5 times a power of
// ten), after Paul Heckbert, "Nice Numbers for Graph Labels", Graphics Gems
// (1990). The axis is widened to whole ticks around the data, so every point
// lies inside it.
#pragma once

#include <string>
#include <vector>

namespace loom::plot {

struct Axis {
  double min = 0.0;        // the first tick
  double max = 1.0;        // the last tick; always > min
  double tick_step = 1.0;  // distance between ticks
  std::vector<double> ticks;
  // Labels print value / label_scale with label_decimals decimals and
  // label_suffix: 250000 on a 0..1M axis reads "250k".
  double label_scale = 1.0;
  int label_decimals = 0;
  std::string label_suffix;

  std::string label(double value) const;
};

// An axis holding [data_min, data_max] with about `target_ticks` ticks (at
// least 2). Equal ends (one point, or a constant series) are widened by 10%
// of the value (1 if the value is 0), so the range is never zero.
// `integer_ticks` keeps the tick step at 1 or more (training steps). Throws
// std::invalid_argument on a non-finite end or data_min > data_max.
Axis nice_axis(double data_min, double data_max, int target_ticks, bool integer_ticks = false);

}  // namespace loom::plot
