// What `loom health` concludes from its measurements (launch/health_command.cpp):
// which ranks, nodes and groups are slow against the others. Torch-free.
//
// Note [slow against the median]
// A cluster has no reference rate that fits every card, cable and clock, but
// its ranks should match each other: a rank whose matmul rate or send
// bandwidth is below `threshold` times the median of all ranks' is slow (a
// throttled GPU, a card in a slower slot, a bad link), and so is a group
// whose all-reduce bandwidth is below `threshold` times the median of the
// groups of its kind (every tp group against the other tp groups). A node
// is named when all of its ranks are slow: the fault is then likely the
// node's (its power, cooling, or NIC), not one card's.
#pragma once

#include <string>
#include <vector>

namespace loom {

struct RankHealth {
  int rank = 0;
  std::string host;
  double matmul_flops = 0;       // FLOP/s
  double send_bytes_per_s = 0;   // to the next rank of the world ring; 0 = not measured
};

struct GroupHealth {
  std::string kind;           // "world", "tp", "cp", "pp", "dp"
  std::vector<int> ranks;     // world ranks
  double bus_bytes_per_s = 0; // all-reduce bus bandwidth
};

struct HealthVerdict {
  std::vector<std::string> slow_ranks;   // "world rank 3 (node-2): matmul 1.2e+14 FLOP/s, 0.52 of the median"
  std::vector<std::string> slow_nodes;   // "node-2: all 4 ranks slow"
  std::vector<std::string> slow_groups;  // "tp group [4 5]: all-reduce 12 GB/s, 0.31 of the median tp group"
  bool healthy() const { return slow_ranks.empty() && slow_groups.empty(); }
};

// Note [slow against the median]. `threshold` in (0, 1].
HealthVerdict judge_health(const std::vector<RankHealth>& ranks, const std::vector<GroupHealth>& groups,
                           double threshold);

// "[0 2 4]": world ranks as the tables and messages show them.
std::string rank_list(const std::vector<int>& ranks);

// The median of `values` (the mean of the middle two for an even count);
// 0 for none.
double median_of(std::vector<double> values);

}  // namespace loom
