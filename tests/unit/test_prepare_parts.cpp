// `loom prepare` in parts (data/prepare_parts.h): how the inputs are split,
// and the merge's refusals and its renaming (Note [Preparing in parts]).
#include "data/prepare_parts.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "util/error.h"
#include "util/file_io.h"
#include "tests/unit/bad_input.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

#define EXPECT_BAD_INPUT(statement, ...) test_support::expect_bad_input([&] { statement; }, {__VA_ARGS__})

std::vector<std::string> names(size_t count) {
  std::vector<std::string> out;
  for (size_t i = 0; i < count; ++i) out.push_back("f" + std::to_string(i));
  return out;
}

TEST(PrepareParts, PartsAreContiguousRunsOfWholeFilesThatConcatenateToTheInputs) {
  std::mt19937 random(7);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t files = 1 + random() % 40;
    const int parts = 1 + static_cast<int>(random() % files);
    std::vector<uint64_t> bytes(files);
    for (uint64_t& size : bytes) size = random() % 3 == 0 ? 0 : random() % 100000;
    const std::vector<std::string> inputs = names(files);
    std::vector<std::string> joined;
    for (int part = 0; part < parts; ++part) {
      const std::vector<std::string> mine = inputs_of_part(inputs, bytes, {part, parts});
      ASSERT_FALSE(mine.empty()) << files << " files, part " << part << " of " << parts;
      joined.insert(joined.end(), mine.begin(), mine.end());
    }
    EXPECT_EQ(joined, inputs);
  }
}

TEST(PrepareParts, PartsAreBalancedByBytes) {
  // 100 files of equal size in 4 parts: 25 each; a big first file is a part alone.
  const std::vector<uint64_t> equal(100, 1000);
  for (int part = 0; part < 4; ++part) EXPECT_EQ(inputs_of_part(names(100), equal, {part, 4}).size(), 25u);
  std::vector<uint64_t> skewed(10, 10);
  skewed[0] = 1000;
  EXPECT_EQ(inputs_of_part(names(10), skewed, {0, 2}), std::vector<std::string>{"f0"});
  EXPECT_EQ(inputs_of_part(names(10), skewed, {1, 2}).size(), 9u);
}

TEST(PrepareParts, PartSpecIsIOfNAndMoreFilesThanPartsAreNeeded) {
  EXPECT_EQ(parse_part_spec("3/16").part, 3);
  EXPECT_EQ(parse_part_spec("3/16").parts, 16);
  for (const char* bad : {"16/16", "-1/4", "1", "a/4", "1/0", "1/", "/4", "1/4/5"})
    EXPECT_BAD_INPUT(parse_part_spec(bad), "--part", bad);
  EXPECT_BAD_INPUT(inputs_of_part(names(3), std::vector<uint64_t>(3, 1), {0, 4}), "3 input files",
                   "cannot be split into 4 parts");
  EXPECT_EQ(part_folder_name({3, 16}), "part-00003-of-00016");
}

class MergeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("loom-test-merge-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Part `part` of `parts` holding the documents, as `loom prepare --part` writes it.
  void write_part(int part, int parts, const std::vector<std::vector<int32_t>>& documents,
                  const std::string& fingerprint = "inputs", const std::string& tokenizer_hash = "sha256:t") {
    const std::string folder = (dir_ / part_folder_name({part, parts})).string();
    DatasetWriter writer(folder, 1000, 0, tokenizer_hash, 4);
    for (const auto& document : documents) writer.add_document(document);
    write_part_record(folder, {part, parts}, fingerprint, 4, writer.finish_part());
  }

  fs::path dir_;
};

TEST_F(MergeTest, MergeRenamesShardsInPartOrderAndWritesIndexJsonLast) {
  write_part(0, 2, {{1, 2, 0}, {3, 0}});  // shards of 3 and 2 tokens
  write_part(1, 2, {{4, 0}, {5, 6, 7, 0}});
  const MergeSummary merged = merge_parts(dir_.string());
  EXPECT_EQ(merged.parts, 2);
  EXPECT_EQ(merged.documents, 4u);
  EXPECT_EQ(merged.tokens, 11u);
  const Dataset dataset = Dataset::open(dir_.string(), {.check_shard_files = ShardFileCheck::kAlways});
  std::vector<int64_t> tokens(dataset.num_tokens());
  dataset.read_tokens(0, tokens);
  EXPECT_EQ(tokens, (std::vector<int64_t>{1, 2, 0, 3, 0, 4, 0, 5, 6, 7, 0}));
  EXPECT_EQ(dataset.index().shards.front().file, "shard-00000.h5");
  EXPECT_FALSE(fs::exists(dir_ / part_folder_name({0, 2})));
  EXPECT_BAD_INPUT(merge_parts(dir_.string()), "index.json exists");
}

TEST_F(MergeTest, MergeRefusesAMissingUnfinishedOrInconsistentPart) {
  write_part(0, 3, {{1, 0}});
  write_part(2, 3, {{2, 0}});
  EXPECT_BAD_INPUT(merge_parts(dir_.string()), "part-00001-of-00003", "--part 1/3");
  fs::create_directories(dir_ / part_folder_name({1, 3}));  // started, not finished
  EXPECT_BAD_INPUT(merge_parts(dir_.string()), "part-00001-of-00003/part.json", "did not finish");
  fs::remove_all(dir_ / part_folder_name({1, 3}));
  write_part(1, 3, {{3, 0}}, "inputs", "sha256:other");
  EXPECT_BAD_INPUT(merge_parts(dir_.string()), "part-00001-of-00003", "tokenizer_hash", "sha256:other");
  fs::remove_all(dir_ / part_folder_name({1, 3}));
  write_part(1, 3, {{3, 0}}, "other inputs");
  EXPECT_BAD_INPUT(merge_parts(dir_.string()), "part-00001-of-00003", "not prepared from the same inputs");
  EXPECT_FALSE(fs::exists(dir_ / "index.json"));
}

TEST_F(MergeTest, AnInterruptedMergeFinishesWhenRunAgain) {
  write_part(0, 2, {{1, 2, 0}, {3, 0}});
  write_part(1, 2, {{4, 0}});
  // As if the first merge stopped after renaming part 0's first shard.
  fs::rename(dir_ / part_folder_name({0, 2}) / "shard-00000.h5", dir_ / "shard-00000.h5");
  const MergeSummary merged = merge_parts(dir_.string());
  EXPECT_EQ(merged.shards, 3u);
  const Dataset dataset = Dataset::open(dir_.string(), {.check_shard_files = ShardFileCheck::kAlways});
  dataset.check_all_shards();
  EXPECT_EQ(dataset.num_tokens(), 7u);
}

}  // namespace
}  // namespace loom
