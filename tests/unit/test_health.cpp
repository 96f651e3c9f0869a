// `loom health`'s verdict (launch/health.h, Note [slow against the median]):
// the ranks, nodes and groups below the threshold times the median are
// named, and nothing else is.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "launch/health.h"

namespace loom {
namespace {

bool any_contains(const std::vector<std::string>& lines, const std::string& fragment) {
  for (const std::string& line : lines) {
    if (line.find(fragment) != std::string::npos) return true;
  }
  return false;
}

std::vector<RankHealth> even_ranks(int count, int per_host) {
  std::vector<RankHealth> ranks;
  for (int r = 0; r < count; ++r) ranks.push_back({r, "node-" + std::to_string(r / per_host), 400e12, 40e9});
  return ranks;
}

TEST(JudgeHealth, EvenRanksAndGroupsAreHealthy) {
  const HealthVerdict verdict =
      judge_health(even_ranks(8, 4), {{"tp", {0, 1, 2, 3}, 200e9}, {"tp", {4, 5, 6, 7}, 190e9}}, 0.8);
  EXPECT_TRUE(verdict.healthy());
  EXPECT_TRUE(verdict.slow_nodes.empty());
}

TEST(JudgeHealth, ASlowMatmulOrSendNamesTheRankItsHostAndTheRatio) {
  std::vector<RankHealth> ranks = even_ranks(8, 4);
  ranks[5].matmul_flops = 200e12;   // a throttled GPU: 0.5 of the median
  ranks[2].send_bytes_per_s = 10e9; // a bad link: 0.25
  ranks[3].matmul_flops = 330e12;   // 0.825: within 0.8
  const HealthVerdict verdict = judge_health(ranks, {}, 0.8);
  ASSERT_EQ(verdict.slow_ranks.size(), 2u);
  EXPECT_TRUE(any_contains(verdict.slow_ranks, "world rank 5 (node-1): matmul 200 TFLOP/s, 0.50 of the median"));
  EXPECT_TRUE(any_contains(verdict.slow_ranks, "world rank 2 (node-0): send to the next rank 10 GB/s, 0.25"));
  EXPECT_TRUE(verdict.slow_nodes.empty());
  EXPECT_FALSE(verdict.healthy());
}

TEST(JudgeHealth, ANodeIsNamedWhenAllItsRanksAreSlow) {
  std::vector<RankHealth> ranks = even_ranks(12, 4);
  for (int r = 4; r < 8; ++r) ranks[static_cast<size_t>(r)].matmul_flops = 250e12;
  const HealthVerdict verdict = judge_health(ranks, {}, 0.8);
  EXPECT_EQ(verdict.slow_ranks.size(), 4u);
  ASSERT_EQ(verdict.slow_nodes.size(), 1u);
  EXPECT_EQ(verdict.slow_nodes[0], "node-1: all 4 ranks slow");
}

TEST(JudgeHealth, AGroupIsComparedWithTheGroupsOfItsKindOnly) {
  // The dp group is far slower than the tp groups (it crosses nodes), and
  // that is expected; one tp group slower than the other tp groups is not.
  const std::vector<GroupHealth> groups = {{"tp", {0, 1}, 200e9},
                                           {"tp", {2, 3}, 210e9},
                                           {"tp", {4, 5}, 60e9},
                                           {"dp", {0, 2, 4}, 20e9}};
  const HealthVerdict verdict = judge_health(even_ranks(6, 2), groups, 0.8);
  ASSERT_EQ(verdict.slow_groups.size(), 1u);
  EXPECT_EQ(verdict.slow_groups[0], "tp group [4 5]: all-reduce 60 GB/s, 0.30 of the median tp group");
}

TEST(JudgeHealth, MedianOfAnEvenCountIsTheMeanOfTheMiddleTwo) {
  EXPECT_EQ(median_of({}), 0);
  EXPECT_EQ(median_of({3, 1, 2}), 2);
  EXPECT_EQ(median_of({4, 1, 3, 2}), 2.5);
}

}  // namespace
}  // namespace loom
