// The streaming loader: sample order, data-parallel slicing, blending,
// prefetch and exact resume.
#include "data/loader.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/hdf5_handle.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"
#include "tests/unit/bad_input.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kSeqLen = 4;

// A dataset whose token at stream position p is first_value + p, in documents
// of 1 to 23 tokens and shards of 97 tokens, so samples cross both kinds of
// boundary and every row says where it came from.
void write_counting_dataset(const std::string& dir, uint64_t num_tokens, int32_t first_value, uint32_t seed = 1) {
  DatasetWriter writer(dir, 65536, 0, "test-tokenizer", 97);
  std::mt19937 random(seed);
  std::vector<int32_t> document;
  for (uint64_t position = 0; position < num_tokens;) {
    const uint64_t length = std::min<uint64_t>(1 + random() % 23, num_tokens - position);
    document.clear();
    for (uint64_t i = 0; i < length; ++i) document.push_back(first_value + static_cast<int32_t>(position + i));
    writer.add_document(document);
    position += length;
  }
  writer.finish();
}

// As write_counting_dataset, with a loss mask: 1 where the token's value is a
// multiple of 3, so a row's mask can be checked against its tokens.
void write_counting_masked_dataset(const std::string& dir, uint64_t num_tokens, int32_t first_value) {
  DatasetWriter writer(dir, 65536, 0, "test-tokenizer", 97, /*with_loss_mask=*/true);
  std::mt19937 random(5);
  std::vector<int32_t> document;
  std::vector<uint8_t> mask;
  for (uint64_t position = 0; position < num_tokens;) {
    const uint64_t length = std::min<uint64_t>(1 + random() % 23, num_tokens - position);
    document.clear();
    mask.clear();
    for (uint64_t i = 0; i < length; ++i) {
      document.push_back(first_value + static_cast<int32_t>(position + i));
      mask.push_back(document.back() % 3 == 0 ? 1 : 0);
    }
    writer.add_document(document, mask);
    position += length;
  }
  writer.finish();
}

// Tokens for n samples of kSeqLen: n * seq_len + 1.
uint64_t tokens_for_samples(uint64_t n) { return n * kSeqLen + 1; }

class LoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("loom-test-loader-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string path(const std::string& name) const { return (root_ / name).string(); }

  // One dataset "a" of `samples` samples.
  LoaderConfig single(uint64_t samples, int64_t global_batch = 8, int64_t micro_batch = 2) {
    if (!fs::exists(path("a"))) write_counting_dataset(path("a"), tokens_for_samples(samples), 0);
    LoaderConfig config;
    config.datasets = {{path("a"), 1.0}};
    config.seq_len = kSeqLen;
    config.seed = 1234;
    config.global_batch = global_batch;
    config.micro_batch = micro_batch;
    return config;
  }

  // Three datasets of different sizes (values offset by 20000 per dataset).
  LoaderConfig blended(const std::vector<double>& weights) {
    const uint64_t samples[3] = {400, 150, 37};
    for (int d = 0; d < 3; ++d) {
      const std::string dir = path("blend" + std::to_string(d));
      if (!fs::exists(dir)) write_counting_dataset(dir, tokens_for_samples(samples[d]), 20000 * d, 10 + d);
    }
    LoaderConfig config;
    for (int d = 0; d < 3; ++d) config.datasets.push_back({path("blend" + std::to_string(d)), weights[d]});
    config.seq_len = kSeqLen;
    config.seed = 99;
    config.global_batch = 16;
    config.micro_batch = 2;
    return config;
  }

  fs::path root_;
};

std::vector<MicroBatch> take(Loader& loader, int count) {
  std::vector<MicroBatch> batches;
  for (int i = 0; i < count; ++i) batches.push_back(loader.next_micro_batch());
  return batches;
}

void expect_same_batches(const std::vector<MicroBatch>& a, const std::vector<MicroBatch>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens) << "batch " << i;
    EXPECT_EQ(a[i].samples, b[i].samples) << "batch " << i;
    EXPECT_EQ(a[i].step, b[i].step) << "batch " << i;
    EXPECT_EQ(a[i].micro_index, b[i].micro_index) << "batch " << i;
  }
}

// The message of the BadInput `fn` throws (tests/unit/bad_input.h).
const auto message_of = test_support::bad_input_message;

// --- the order ------------------------------------------------------------------

TEST(SamplePermutation, IsABijectionOfEverySize) {
  for (const uint64_t n : {1, 2, 3, 4, 5, 16, 17, 100, 1000, 4097}) {
    const SamplePermutation permutation(n, permutation_key(7, 0, 0));
    std::vector<uint64_t> values;
    for (uint64_t i = 0; i < n; ++i) values.push_back(permutation(i));
    std::sort(values.begin(), values.end());
    std::vector<uint64_t> expected(n);
    std::iota(expected.begin(), expected.end(), 0);
    EXPECT_EQ(values, expected) << "n = " << n;
  }
}

TEST(SamplePermutation, DependsOnSeedDatasetAndEpoch) {
  const auto order = [](uint64_t key) {
    const SamplePermutation permutation(1000, key);
    std::vector<uint64_t> values;
    for (uint64_t i = 0; i < 1000; ++i) values.push_back(permutation(i));
    return values;
  };
  const auto base = order(permutation_key(1, 0, 0));
  EXPECT_NE(base, order(permutation_key(2, 0, 0)));
  EXPECT_NE(base, order(permutation_key(1, 1, 0)));
  EXPECT_NE(base, order(permutation_key(1, 0, 1)));
  EXPECT_EQ(base, order(permutation_key(1, 0, 0)));
}

// Resume across loom versions and machines needs the order itself to stay
// fixed: these values are part of the format.
TEST(SamplePermutation, OrderIsFixedAcrossBuilds) {
  const SamplePermutation permutation(10, permutation_key(42, 0, 0));
  std::vector<uint64_t> values;
  for (uint64_t i = 0; i < 10; ++i) values.push_back(permutation(i));
  EXPECT_EQ(values, (std::vector<uint64_t>{5, 9, 0, 2, 8, 3, 1, 6, 4, 7}));
}

TEST(BlendSchedule, RealisedFractionsMatchWeightsWithinOnePercentOver10000Samples) {
  for (const std::vector<double>& weights :
       {std::vector<double>{5, 3, 2}, std::vector<double>{0.7, 0.2, 0.1}, std::vector<double>{1, 1},
        std::vector<double>{0.01, 0.99}, std::vector<double>{1, 2, 3, 4, 5, 6, 7}}) {
    BlendSchedule schedule(weights);
    std::vector<uint64_t> counts(weights.size());
    for (int i = 0; i < 10000; ++i) ++counts[schedule.next()];
    const double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
    for (size_t d = 0; d < weights.size(); ++d)
      EXPECT_NEAR(counts[d] / 10000.0, weights[d] / sum, 0.01) << "dataset " << d;
    EXPECT_EQ(schedule.counts(), counts);
  }
}

TEST(BlendSchedule, StaysWithinOneSampleOfItsTargetsAtEveryPrefix) {
  BlendSchedule schedule({0.5, 0.3, 0.2});
  for (uint64_t g = 1; g <= 1000; ++g) {
    schedule.next();
    const double targets[3] = {0.5 * g, 0.3 * g, 0.2 * g};
    for (int d = 0; d < 3; ++d) EXPECT_LT(std::abs(schedule.counts()[d] - targets[d]), 1.0 + 1e-9) << g;
  }
}

// --- samples and batches ------------------------------------------------------------

TEST_F(LoaderTest, RowsAreSeqLenPlusOneTokensOfThePackedStream) {
  Loader loader(single(96));
  for (int b = 0; b < 10; ++b) {
    const MicroBatch batch = loader.next_micro_batch();
    ASSERT_EQ(batch.rows, 2);
    ASSERT_EQ(batch.cols, kSeqLen + 1);
    ASSERT_EQ(batch.tokens.size(), 2u * (kSeqLen + 1));
    for (int64_t row = 0; row < batch.rows; ++row) {
      const uint64_t sample = batch.samples[row].sample;
      for (int64_t i = 0; i < batch.cols; ++i)
        EXPECT_EQ(batch.tokens[row * batch.cols + i], static_cast<int64_t>(sample * kSeqLen + i));
    }
  }
}

TEST_F(LoaderTest, DatasetsOpenedByTheCallerAreTakenNotOpenedAgain) {
  // The preflight hands its datasets over (TrainOptions::datasets), so a
  // run checks and probes each once, rollbacks included.
  LoaderConfig config = single(96);
  config.valid_path = path("a");
  Loader fresh(config);
  const std::vector<MicroBatch> expected = take(fresh, 6);

  OpenedDatasets opened;
  opened[path("a")] = std::make_shared<const Dataset>(Dataset::open(path("a")));
  // Opening the folder again would now fail: only the handed-over Dataset
  // (whose shard files are open) can serve this loader.
  fs::remove(fs::path(path("a")) / "index.json");
  EXPECT_NE(message_of([&] { Loader again(config); }).find("index.json: missing"), std::string::npos);
  config.opened = &opened;
  Loader taken(config);
  expect_same_batches(take(taken, 6), expected);
  EXPECT_EQ(&taken.dataset(0), opened[path("a")].get());
  EXPECT_GT(taken.validation_batches().size(), 0);
}

TEST_F(LoaderTest, Dp1Dp2Dp4EachCoverEveryEpochSampleOnExactlyOneRank) {
  constexpr uint64_t kSamples = 96;  // 12 steps of 8
  std::map<int64_t, std::vector<std::set<uint64_t>>> batches_by_dp;  // dp -> per step, the samples of all ranks
  for (const int64_t dp : {1, 2, 4}) {
    std::multiset<uint64_t> seen;
    std::vector<std::set<uint64_t>> per_step(kSamples / 8);
    for (int64_t rank = 0; rank < dp; ++rank) {
      LoaderConfig config = single(kSamples, 8, 2);
      config.dp_size = dp;
      config.dp_rank = rank;
      Loader loader(config);
      const int64_t micro_batches = static_cast<int64_t>(kSamples / 8) * loader.micro_batches_per_step();
      for (int64_t i = 0; i < micro_batches; ++i) {
        const MicroBatch batch = loader.next_micro_batch();
        for (const SampleId& id : batch.samples) {
          EXPECT_EQ(id.epoch, 0u);
          seen.insert(id.sample);
          per_step[batch.step].insert(id.sample);
        }
      }
    }
    std::multiset<uint64_t> all;
    for (uint64_t s = 0; s < kSamples; ++s) all.insert(s);
    EXPECT_EQ(seen, all) << "dp " << dp;
    batches_by_dp[dp] = per_step;
  }
  // Same global batch, any dp: every step trains on the same samples.
  EXPECT_EQ(batches_by_dp[1], batches_by_dp[2]);
  EXPECT_EQ(batches_by_dp[1], batches_by_dp[4]);
}

TEST_F(LoaderTest, RankTakesStridedSlotsOfEachGlobalBatch) {
  LoaderConfig config = single(96, 8, 2);
  config.dp_size = 2;
  config.dp_rank = 1;
  Loader loader(config);
  const MicroBatch first = loader.next_micro_batch();
  const MicroBatch second = loader.next_micro_batch();
  EXPECT_EQ(first.samples[0].global_index, 1u);
  EXPECT_EQ(first.samples[1].global_index, 3u);
  EXPECT_EQ(second.samples[0].global_index, 5u);
  EXPECT_EQ(second.micro_index, 1);
  EXPECT_EQ(loader.next_micro_batch().samples[0].global_index, 9u);  // step 1
}

TEST_F(LoaderTest, NewEpochReshufflesAndRepeatsEverySample) {
  Loader loader(single(24, 8, 2));
  std::vector<uint64_t> epochs[2];
  for (int i = 0; i < 24; ++i) {  // 48 samples: two epochs
    for (const SampleId& id : loader.next_micro_batch().samples) epochs[id.epoch].push_back(id.sample);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  for (auto& epoch : epochs) {
    std::sort(epoch.begin(), epoch.end());
    std::vector<uint64_t> all(24);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(epoch, all);
  }
}

TEST_F(LoaderTest, SameSeedGivesIdenticalBatchesAndAnotherSeedDifferentOnes) {
  LoaderConfig config = blended({0.5, 0.3, 0.2});
  Loader a(config);
  Loader b(config);
  config.seed += 1;
  Loader c(config);
  const auto batches_a = take(a, 30);
  expect_same_batches(batches_a, take(b, 30));
  const auto batches_c = take(c, 30);
  int differing = 0;
  for (size_t i = 0; i < batches_a.size(); ++i) differing += batches_a[i].tokens != batches_c[i].tokens;
  EXPECT_GT(differing, 20);
}

TEST_F(LoaderTest, ReadingWithoutPrefetchGivesTheSameBatches) {
  LoaderConfig config = blended({0.5, 0.3, 0.2});
  Loader prefetching(config);
  config.prefetch_depth = 0;
  Loader synchronous(config);
  expect_same_batches(take(prefetching, 25), take(synchronous, 25));
}

TEST_F(LoaderTest, BlendedFractionsMatchWeightsWithinOnePercentOver10000Samples) {
  LoaderConfig config = blended({0.5, 0.3, 0.2});
  config.global_batch = 100;
  config.micro_batch = 10;
  Loader loader(config);
  std::vector<int> counts(3);
  std::map<std::pair<uint32_t, uint64_t>, int> reads;  // (dataset, epoch) -> samples read
  for (int i = 0; i < 1000; ++i) {
    const MicroBatch batch = loader.next_micro_batch();
    for (int64_t row = 0; row < batch.rows; ++row) {
      const SampleId& id = batch.samples[row];
      ++counts[id.dataset];
      ++reads[{id.dataset, id.epoch}];
      // The row holds the claimed sample of the claimed dataset.
      EXPECT_EQ(batch.tokens[row * batch.cols], 20000 * static_cast<int64_t>(id.dataset) +
                                                    static_cast<int64_t>(id.sample) * kSeqLen);
    }
  }
  EXPECT_NEAR(counts[0] / 10000.0, 0.5, 0.01);
  EXPECT_NEAR(counts[1] / 10000.0, 0.3, 0.01);
  EXPECT_NEAR(counts[2] / 10000.0, 0.2, 0.01);
  // The 37-sample dataset went through many epochs, each complete.
  EXPECT_GT(reads.count({2u, 50u}), 0u);
  EXPECT_EQ((reads[{2u, 10u}]), 37);
}

// --- resume ------------------------------------------------------------------------

TEST_F(LoaderTest, RestoredLoaderContinuesExactlyWhereTheSavedOneStopped) {
  const LoaderConfig config = blended({0.5, 0.3, 0.2});  // 8 micro-batches per step
  for (const int stop_after : {0, 8, 13}) {                // start, step boundary, mid-step
    Loader uninterrupted(config);
    const auto expected = take(uninterrupted, stop_after + 100);

    json saved;
    {
      Loader first_run(config);
      take(first_run, stop_after);
      saved = json::parse(first_run.state().dump());  // as stored in a checkpoint
    }  // destroyed with its prefetch thread mid-stream
    Loader resumed(config);
    resumed.restore(saved);
    expect_same_batches(take(resumed, 100), std::vector<MicroBatch>(expected.begin() + stop_after, expected.end()));
  }
}

TEST_F(LoaderTest, RestoreAtAStepBoundaryWithAnotherDpContinuesTheGlobalOrder) {
  LoaderConfig config = blended({0.5, 0.3, 0.2});
  // Saved by a dp=2 run after 3 steps (rank 0's state; every rank's is the same).
  config.dp_size = 2;
  Loader dp2(config);
  take(dp2, 3 * dp2.micro_batches_per_step());
  const json saved = dp2.state();

  // Reference: one rank with the same global batch, never stopped.
  LoaderConfig single_rank = config;
  single_rank.dp_size = 1;
  single_rank.dp_rank = 0;
  Loader reference(single_rank);
  const auto expected = take(reference, 5 * reference.micro_batches_per_step());

  Loader resumed(single_rank);
  resumed.restore(saved);
  const auto got = take(resumed, 2 * resumed.micro_batches_per_step());
  expect_same_batches(got, std::vector<MicroBatch>(expected.begin() + 3 * reference.micro_batches_per_step(),
                                                   expected.end()));
}

TEST_F(LoaderTest, RestoreRefusesAStateThatWouldChangeTheSamples) {
  LoaderConfig config = blended({0.5, 0.3, 0.2});
  Loader saver(config);
  take(saver, 5);  // mid-step
  const json saved = saver.state();

  const auto refused = [&](LoaderConfig changed, const std::string& key) {
    Loader loader(changed);
    const std::string message = message_of([&] { loader.restore(saved, "ckpt/trainer_state.json"); });
    EXPECT_NE(message.find("ckpt/trainer_state.json: key '" + key + "'"), std::string::npos) << message;
  };
  LoaderConfig other = config;
  other.seq_len = 3;
  refused(other, "seq_len");
  other = config;
  other.seed = 7;
  refused(other, "seed");
  other = config;
  other.datasets[1].weight = 0.4;
  refused(other, "datasets[1].weight");
  other = config;
  std::swap(other.datasets[0].path, other.datasets[1].path);
  refused(other, "datasets[0].fingerprint");
  other = config;
  other.datasets.pop_back();
  refused(other, "datasets");
  other = config;
  other.dp_size = 2;  // fine at a step boundary, not mid-step
  refused(other, "dp_size");
}

// --- the prefetch thread -----------------------------------------------------------------

TEST_F(LoaderTest, PrefetchThreadShutsDownCleanlyMidEpoch) {
  const auto start = std::chrono::steady_clock::now();
  for (const int64_t depth : {1, 2, 8}) {
    LoaderConfig config = single(96);
    config.prefetch_depth = depth;
    { Loader never_used(config); }
    {
      Loader loader(config);
      take(loader, 3);
      // Give the thread time to fill the queue and block on it.
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    {
      Loader loader(config);
      loader.next_micro_batch();
    }  // destroyed while the thread is still reading ahead
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// Rewrites an integer root attribute of a shard in place.
void set_root_attribute(const std::string& path, const char* name, int64_t value) {
  hdf5::Lock lock;
  hdf5::FileId file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  hdf5::AttrId attr(H5Aopen(file.get(), name, H5P_DEFAULT));
  ASSERT_TRUE(attr.valid());
  ASSERT_GE(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), 0);
}

TEST_F(LoaderTest, BadTokenInAShardSurfacesFromNextMicroBatchNotAHang) {
  // Token values run 0, 1, 2, ...: claiming vocab_size 200 makes every
  // sample past token 200 invalid, which only a read can find.
  write_counting_dataset(path("a"), tokens_for_samples(96), 0);
  json index = json::parse(read_file(path("a/index.json")));
  index["vocab_size"] = 200;
  for (json& shard : index["shards"]) {
    const std::string file = path("a/" + shard["file"].get<std::string>());
    set_root_attribute(file, "vocab_size", 200);
    shard["bytes"] = fs::file_size(file);
    shard["file_crc32c"] = crc32c_hex(crc32c_file(file));
  }
  write_file_atomic(path("a/index.json"), index.dump());

  for (const int64_t depth : {0, 3}) {
    LoaderConfig config = single(96);
    config.prefetch_depth = depth;
    config.open_options.scan_token_range = TokenRangeScan::kNever;
    Loader loader(config);
    std::string message;
    for (int i = 0; i < 48 && message.empty(); ++i) {
      try {
        loader.next_micro_batch();
      } catch (const BadInput& e) {
        message = e.what();
      }
    }
    EXPECT_NE(message.find(".h5: /tokens["), std::string::npos) << message;
    EXPECT_NE(message.find("vocab_size 200"), std::string::npos) << message;
    // The loader stays failed rather than skipping the bad sample.
    EXPECT_THROW(loader.next_micro_batch(), BadInput);
  }
}

// Note [Lazy shard checks]: a rank checks and opens exactly the shards its own
// samples read: with check_shard_files always in a probe process a step at a
// time, with never in this process as each read needs its shard.
TEST_F(LoaderTest, Dp2RankChecksAndOpensExactlyTheShardsOfItsOwnSamples) {
  for (const ShardFileCheck check : {ShardFileCheck::kAlways, ShardFileCheck::kNever}) {
    SCOPED_TRACE(check == ShardFileCheck::kAlways ? "always" : "never");
    LoaderConfig config = single(2000);  // about 80 shards of 97 tokens
    config.dp_size = 2;
    config.dp_rank = 1;
    config.prefetch_depth = 0;  // no read-ahead: the counts are those of the batches read
    config.open_options.check_shard_files = check;
    config.open_options.max_open_shards = 3;
    Loader loader(config);
    const Dataset& dataset = loader.dataset(0);
    ASSERT_GE(dataset.num_shards(), 60u);
    EXPECT_EQ(dataset.checks_in_probe(), check == ShardFileCheck::kAlways);
    EXPECT_EQ(loader.shard_cache_stats().checked, 0u);
    std::set<size_t> read;
    for (int i = 0; i < 3 * loader.micro_batches_per_step(); ++i) {
      for (const SampleId& id : loader.next_micro_batch().samples)
        for (const size_t s : dataset.shards_of(id.sample * kSeqLen, kSeqLen + 1)) read.insert(s);
    }
    const ShardCacheStats stats = loader.shard_cache_stats();
    EXPECT_EQ(stats.checked, read.size());
    EXPECT_EQ(stats.distinct_opened, read.size());
    EXPECT_LT(read.size(), dataset.num_shards());
    EXPECT_LE(stats.peak_open, 3u);
    EXPECT_EQ(stats.shards, dataset.num_shards());
  }
}

// --- configuration and validation ------------------------------------------------------

TEST_F(LoaderTest, RefusesConfigurationsThatCannotWork) {
  LoaderConfig config = single(96);
  config.global_batch = 6;
  config.dp_size = 4;
  EXPECT_NE(message_of([&] { Loader loader(config); }).find("batch.global_batch_size 6"), std::string::npos);

  write_counting_dataset(path("tiny"), kSeqLen, 0);  // one token short of a sample
  config = single(96);
  config.datasets.push_back({path("tiny"), 1.0});
  EXPECT_NE(message_of([&] { Loader loader(config); }).find("data.train[1]: " + path("tiny")), std::string::npos);

  config = single(96);
  config.datasets[0].weight = 0;
  EXPECT_NE(message_of([&] { Loader loader(config); }).find("data.train[0].weight"), std::string::npos);

  {
    DatasetWriter writer(path("other-tokenizer"), 65536, 0, "another-tokenizer");
    writer.add_document(std::vector<int32_t>(20, 1));
    writer.finish();
  }
  config = single(96);
  config.datasets.push_back({path("other-tokenizer"), 1.0});
  EXPECT_NE(message_of([&] { Loader loader(config); }).find("tokenized differently"), std::string::npos);
}

TEST_F(LoaderTest, ValidationBatchesCoverTheValidSetInOrderOnceAcrossRanks) {
  write_counting_dataset(path("valid"), tokens_for_samples(30), 0, 5);
  std::multiset<uint64_t> seen;
  int64_t batches_per_rank = -1;
  for (int64_t rank = 0; rank < 2; ++rank) {
    LoaderConfig config = single(96, 8, 2);
    config.valid_path = path("valid");
    config.dp_size = 2;
    config.dp_rank = rank;
    const Loader loader(config);
    const ValidationBatches batches = loader.validation_batches();
    // 30 samples in groups of micro_batch x dp = 4: 7 batches per rank, the
    // 2 left over are dropped so every rank runs the same number.
    EXPECT_EQ(batches.size(), 7);
    batches_per_rank = 0;
    for (const MicroBatch& batch : batches) {
      for (int64_t row = 0; row < batch.rows; ++row) {
        const uint64_t sample = batch.samples[row].sample;
        seen.insert(sample);
        EXPECT_EQ(batch.tokens[row * batch.cols], static_cast<int64_t>(sample * kSeqLen));
      }
      ++batches_per_rank;
    }
    EXPECT_EQ(batches_per_rank, 7);
    EXPECT_EQ(loader.validation_batches(3).size(), 3);
    // The same batches every evaluation.
    EXPECT_EQ(batches.at(2).tokens, loader.validation_batches().at(2).tokens);
  }
  std::multiset<uint64_t> expected;
  for (uint64_t s = 0; s < 28; ++s) expected.insert(s);
  EXPECT_EQ(seen, expected);
}

TEST_F(LoaderTest, NoValidationSetMeansNoValidationBatches) {
  const Loader loader(single(96));
  EXPECT_EQ(loader.validation_batches().size(), 0);
  EXPECT_TRUE(loader.validation_batches().begin() == loader.validation_batches().end());
}

// --- loss mask -------------------------------------------------------------------

TEST_F(LoaderTest, BatchesCarryNoLossMaskWhenNoDatasetHasOne) {
  LoaderConfig config = single(40);
  write_counting_dataset(path("valid"), tokens_for_samples(20), 50000);
  config.valid_path = path("valid");
  Loader loader(config);
  for (const MicroBatch& batch : take(loader, 6)) EXPECT_TRUE(batch.loss_mask.empty());
  for (const MicroBatch& batch : loader.validation_batches()) EXPECT_TRUE(batch.loss_mask.empty());
}

TEST_F(LoaderTest, BlendOfMaskedAndPlainDatasetsGivesEachRowItsDatasetsMaskAndAllOnesForPlainRows) {
  write_counting_masked_dataset(path("chat"), tokens_for_samples(300), 30000);
  write_counting_dataset(path("plain"), tokens_for_samples(200), 0);
  LoaderConfig config;
  config.datasets = {{path("chat"), 1.0}, {path("plain"), 1.0}};
  config.seq_len = kSeqLen;
  config.seed = 7;
  config.global_batch = 8;
  config.micro_batch = 2;
  config.prefetch_depth = 2;
  Loader loader(config);
  std::set<uint32_t> seen;
  for (const MicroBatch& batch : take(loader, 40)) {
    ASSERT_EQ(batch.loss_mask.size(), batch.tokens.size());
    for (int64_t row = 0; row < batch.rows; ++row) {
      const uint32_t dataset = batch.samples[static_cast<size_t>(row)].dataset;
      seen.insert(dataset);
      for (int64_t col = 0; col < batch.cols; ++col) {
        const auto i = static_cast<size_t>(row * batch.cols + col);
        const int expected = dataset == 1 ? 1 : (batch.tokens[i] % 3 == 0 ? 1 : 0);
        ASSERT_EQ(batch.loss_mask[i], expected) << "dataset " << dataset << " token " << batch.tokens[i];
      }
    }
  }
  EXPECT_EQ(seen, (std::set<uint32_t>{0, 1}));
}

TEST_F(LoaderTest, ValidationBatchesOfAMaskedSetCarryItsMask) {
  LoaderConfig config = single(40);
  write_counting_masked_dataset(path("valid"), tokens_for_samples(20), 3000);
  config.valid_path = path("valid");
  Loader loader(config);
  // The training set has no mask: its rows count every token.
  for (const MicroBatch& batch : take(loader, 4))
    EXPECT_EQ(batch.loss_mask, std::vector<uint8_t>(batch.tokens.size(), 1));
  int64_t batches = 0;
  for (const MicroBatch& batch : loader.validation_batches()) {
    ++batches;
    ASSERT_EQ(batch.loss_mask.size(), batch.tokens.size());
    for (size_t i = 0; i < batch.tokens.size(); ++i) EXPECT_EQ(batch.loss_mask[i], batch.tokens[i] % 3 == 0 ? 1 : 0);
  }
  EXPECT_GT(batches, 0);
}

}  // namespace
}  // namespace loom
