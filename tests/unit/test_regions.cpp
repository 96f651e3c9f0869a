// The geometry of sharded checkpoints (checkpoints/regions.h): a region's
// runs and two regions' overlaps against an element-by-element count, on
// random shapes, boxes and flat ranges.
#include "checkpoints/regions.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <stdexcept>
#include <vector>

namespace loom {
namespace {

// Global row-major index of each element of `region`, in the region's order.
std::vector<int64_t> elements_of(const Region& region, const std::vector<int64_t>& shape) {
  std::vector<int64_t> out;
  const size_t dims = shape.size();
  std::vector<int64_t> index(dims, 0);
  const int64_t numel = region.box_numel();
  for (int64_t local = 0; local < numel; ++local) {
    int64_t global = 0;
    for (size_t d = 0; d < dims; ++d) global = global * shape[d] + region.box[d].first + index[d];
    out.push_back(global);
    for (size_t d = dims; d-- > 0;) {
      if (++index[d] < region.box[d].second - region.box[d].first) break;
      index[d] = 0;
    }
  }
  if (region.flat) out = std::vector<int64_t>(out.begin() + region.flat->first, out.begin() + region.flat->second);
  return out;
}

std::vector<int64_t> expand(const std::vector<Run>& runs) {
  std::vector<int64_t> out;
  int64_t expected_local = 0;
  for (const Run& run : runs) {
    EXPECT_EQ(run.local, expected_local);  // runs tile the region in its own order
    for (int64_t i = 0; i < run.length; ++i) out.push_back(run.global + i);
    expected_local += run.length;
  }
  return out;
}

Region random_region(std::mt19937& rng, const std::vector<int64_t>& shape, bool with_flat) {
  Region region;
  for (int64_t n : shape) {
    std::uniform_int_distribution<int64_t> pick(0, n);
    int64_t a = pick(rng), b = pick(rng);
    if (a > b) std::swap(a, b);
    if (rng() % 3 == 0) a = 0, b = n;  // often whole along a dim, as tp slices are
    region.box.push_back({a, b});
  }
  if (with_flat) {
    std::uniform_int_distribution<int64_t> pick(0, region.box_numel());
    int64_t a = pick(rng), b = pick(rng);
    if (a > b) std::swap(a, b);
    region.flat = Range{a, b};
  }
  return region;
}

TEST(Regions, RunsListTheRegionsElementsInOrder) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<int64_t> shape;
    const int dims = static_cast<int>(rng() % 4);  // scalars too
    for (int d = 0; d < dims; ++d) shape.push_back(1 + static_cast<int64_t>(rng() % 6));
    const Region region = random_region(rng, shape, rng() % 2 == 0);
    ASSERT_EQ(expand(runs_of(region, shape)), elements_of(region, shape)) << describe(region);
  }
}

TEST(Regions, OverlapsMapEveryCommonElementOnce) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<int64_t> shape;
    const int dims = 1 + static_cast<int>(rng() % 3);
    for (int d = 0; d < dims; ++d) shape.push_back(1 + static_cast<int64_t>(rng() % 7));
    const Region a = random_region(rng, shape, rng() % 2 == 0);
    const Region b = random_region(rng, shape, rng() % 2 == 0);
    std::map<int64_t, int64_t> local_a, local_b;  // global -> local
    const auto ea = elements_of(a, shape), eb = elements_of(b, shape);
    for (size_t i = 0; i < ea.size(); ++i) local_a[ea[i]] = static_cast<int64_t>(i);
    for (size_t i = 0; i < eb.size(); ++i) local_b[eb[i]] = static_cast<int64_t>(i);
    std::map<int64_t, int64_t> expected;  // local in a -> local in b
    for (const auto& [global, i] : local_a) {
      if (local_b.count(global)) expected[i] = local_b[global];
    }
    std::map<int64_t, int64_t> found;
    for (const Overlap& o : overlaps(runs_of(a, shape), runs_of(b, shape))) {
      ASSERT_GT(o.length, 0);
      for (int64_t i = 0; i < o.length; ++i) ASSERT_TRUE(found.emplace(o.a_local + i, o.b_local + i).second);
    }
    ASSERT_EQ(found, expected) << describe(a) << " and " << describe(b);
  }
}

TEST(Regions, ChunksAreTensorParallelSlices) {
  const Region r = Region::chunk({8, 6}, 1, 2, 3);
  EXPECT_EQ(r.box, (std::vector<Range>{{0, 8}, {4, 6}}));
  EXPECT_EQ(runs_of(r, {8, 6}).size(), 8u);  // one stretch per row
  EXPECT_EQ(runs_of(Region::chunk({8, 6}, 0, 1, 2), {8, 6}).size(), 1u);  // rows 4-7: contiguous
  EXPECT_EQ(Region::chunk({8, 6}, -1, 0, 4), Region::whole({8, 6}));
  EXPECT_THROW(Region::chunk({8, 6}, 1, 0, 4), std::invalid_argument);  // 6 does not split in 4
}

TEST(Regions, PaddedChunksAreTheRealRowsOfAPaddedVocabularysSlices) {
  // 9 rows over 4 ranks: padded to 12, 3 rows each; the last holds none.
  EXPECT_EQ(Region::padded_chunk({9, 5}, 0, 0, 4).box, (std::vector<Range>{{0, 3}, {0, 5}}));
  EXPECT_EQ(Region::padded_chunk({9, 5}, 0, 2, 4).box, (std::vector<Range>{{6, 9}, {0, 5}}));
  const Region empty = Region::padded_chunk({9, 5}, 0, 3, 4);
  EXPECT_EQ(empty.box, (std::vector<Range>{{9, 9}, {0, 5}}));
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_TRUE(runs_of(empty, {9, 5}).empty());
  // 11 rows over 2 ranks: 6 and 5.
  EXPECT_EQ(Region::padded_chunk({11, 5}, 0, 1, 2).box, (std::vector<Range>{{6, 11}, {0, 5}}));
  // Where parts divide the dim, the chunk itself.
  EXPECT_EQ(Region::padded_chunk({8, 6}, 0, 1, 2), Region::chunk({8, 6}, 0, 1, 2));
  EXPECT_THROW(Region::padded_chunk({8, 6}, 2, 0, 2), std::invalid_argument);
  EXPECT_THROW(Region::padded_chunk({8, 6}, 0, 2, 2), std::invalid_argument);
}

TEST(Regions, RefusesRegionsOutsideTheTensor) {
  EXPECT_THROW(runs_of(Region{{{0, 9}}, std::nullopt}, {8}), std::invalid_argument);
  EXPECT_THROW(runs_of(Region{{{2, 4}}, Range{0, 3}}, {8}), std::invalid_argument);
  EXPECT_THROW(runs_of(Region{{{0, 2}, {0, 2}}, std::nullopt}, {8}), std::invalid_argument);
}

}  // namespace
}  // namespace loom
