#include "launch/health.h"

#include <algorithm>
#include <cstdio>
#include <map>

namespace loom {

namespace {

std::string number(double value, const char* format) {
  char text[64];
  std::snprintf(text, sizeof text, format, value);
  return text;
}

}  // namespace

std::string rank_list(const std::vector<int>& ranks) {
  std::string text;
  for (const int r : ranks) text += (text.empty() ? "" : " ") + std::to_string(r);
  return "[" + text + "]";
}

double median_of(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t middle = values.size() / 2;
  return values.size() % 2 == 1 ? values[middle] : (values[middle - 1] + values[middle]) / 2;
}

HealthVerdict judge_health(const std::vector<RankHealth>& ranks, const std::vector<GroupHealth>& groups,
                           double threshold) {
  HealthVerdict verdict;
  std::vector<double> matmul, send;
  for (const RankHealth& r : ranks) {
    matmul.push_back(r.matmul_flops);
    if (r.send_bytes_per_s > 0) send.push_back(r.send_bytes_per_s);
  }
  const double matmul_median = median_of(matmul);
  const double send_median = median_of(send);
  std::map<std::string, std::pair<int, int>> per_host;  // host -> (slow ranks, ranks)
  for (const RankHealth& r : ranks) {
    std::string why;
    if (matmul_median > 0 && r.matmul_flops < threshold * matmul_median) {
      why += "matmul " + number(r.matmul_flops / 1e12, "%.3g") + " TFLOP/s, " +
             number(r.matmul_flops / matmul_median, "%.2f") + " of the median";
    }
    if (send_median > 0 && r.send_bytes_per_s > 0 && r.send_bytes_per_s < threshold * send_median) {
      why += std::string(why.empty() ? "" : "; ") + "send to the next rank " +
             number(r.send_bytes_per_s / 1e9, "%.3g") + " GB/s, " +
             number(r.send_bytes_per_s / send_median, "%.2f") + " of the median";
    }
    auto& [slow, all] = per_host[r.host];
    ++all;
    if (!why.empty()) {
      ++slow;
      verdict.slow_ranks.push_back("world rank " + std::to_string(r.rank) + " (" + r.host + "): " + why);
    }
  }
  // A node only when several ranks share it and all are slow: one slow rank
  // alone on its node says nothing more than the rank's own line.
  for (const auto& [host, counts] : per_host) {
    if (counts.second > 1 && counts.first == counts.second) {
      verdict.slow_nodes.push_back(host + ": all " + std::to_string(counts.second) + " ranks slow");
    }
  }
  std::map<std::string, std::vector<double>> by_kind;
  for (const GroupHealth& g : groups) by_kind[g.kind].push_back(g.bus_bytes_per_s);
  for (const GroupHealth& g : groups) {
    const double median = median_of(by_kind[g.kind]);
    if (median > 0 && g.bus_bytes_per_s < threshold * median) {
      verdict.slow_groups.push_back(g.kind + " group " + rank_list(g.ranks) + ": all-reduce " +
                                    number(g.bus_bytes_per_s / 1e9, "%.3g") + " GB/s, " +
                                    number(g.bus_bytes_per_s / median, "%.2f") + " of the median " + g.kind +
                                    " group");
    }
  }
  return verdict;
}

}  // namespace loom
