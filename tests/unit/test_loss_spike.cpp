// optimizer.loss_spike_policy (trainer/loss_spike.h): the detector alone, then
// training runs on one rank with a spike injected (TrainHooks::scale_loss):
// skipped, or rolled back to the last checkpoint, and logged with its samples;
// bit for bit the same as the policy off when no spike comes.
#include "trainer/loss_spike.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "tests/unit/random_dataset.h"
#include "trainer/training.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Action = LossSpikeGuard::Action;

constexpr int64_t kVocab = 64;

OptimizerConfig policy(const std::string& name, int64_t window = 3) {
  OptimizerConfig c;
  c.loss_spike_policy = name;
  c.loss_spike_factor = 3.0;
  c.loss_spike_window = window;
  c.max_loss_spike_rollbacks = 1;
  return c;
}

class LossSpikeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("loom_test_loss_spike_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Uniformly random tokens: the loss stays near log(63) step after step.
  std::string dataset() {
    const std::string dir = path("random");
    return fs::exists(dir) ? dir : test_support::write_random_dataset(dir, kVocab, 40);
  }

  Config config(const std::string& run_name, const std::string& spike_policy) {
    Config c;
    c.run.name = run_name;
    c.run.output_dir = path("runs");
    c.model.hidden_size = 32;
    c.model.intermediate_size = 64;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.vocab_size = kVocab;
    c.model.max_seq_len = 16;
    c.data.train = {{dataset(), 1.0}};
    c.data.seq_len = 16;
    c.batch.micro_batch_size = 2;
    c.batch.global_batch_size = 4;
    c.optimizer.lr = 1e-2;
    c.optimizer.loss_spike_policy = spike_policy;
    c.optimizer.loss_spike_window = 3;
    c.schedule.train_steps = 10;
    c.schedule.warmup_steps = 2;
    c.checkpoint.interval = 4;
    c.checkpoint.export_hf_at_end = false;
    return c;
  }

  // The first micro-batch of `spike_step` has its loss multiplied by 50.
  static TrainHooks spike_at(int64_t spike_step) {
    TrainHooks hooks;
    hooks.scale_loss = [spike_step](int64_t step) { return step == spike_step ? 50.0 : 1.0; };
    return hooks;
  }

  static TrainOptions quiet() {
    TrainOptions options;
    options.measure_peak = false;
    return options;
  }

  static std::vector<json> metrics(const TrainResult& result) {
    std::vector<json> out;
    std::istringstream lines(read_file(result.run_dir + "/metrics.jsonl"));
    for (std::string line; std::getline(lines, line);) out.push_back(json::parse(line));
    return out;
  }

  static void expect_same_weights(const TrainResult& a, const TrainResult& b) {
    const auto pa = a.model->named_parameters();
    const auto pb = b.model->named_parameters();
    ASSERT_EQ(pa.size(), pb.size());
    for (const auto& p : pa) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  }

  fs::path dir_;
};

TEST(LossSpikeGuardTest, ChecksNothingUntilTheWindowIsFullThenFlagsALossAboveFactorTimesTheMean) {
  LossSpikeGuard guard(policy("skip"), "/nonexistent");
  EXPECT_EQ(guard.check(1, 4.0), Action::kTrain);
  EXPECT_EQ(guard.check(2, 100.0), Action::kTrain);  // window not full yet: joins it
  EXPECT_EQ(guard.check(3, 4.0), Action::kTrain);
  // mean (4 + 100 + 4) / 3 = 36: 100 is no spike against it.
  EXPECT_EQ(guard.check(4, 100.0), Action::kTrain);
  EXPECT_DOUBLE_EQ(guard.running_mean(), 36.0);
  // window now 100, 4, 100: mean 68; 205 > 3 x 68 = 204.
  EXPECT_EQ(guard.check(5, 205.0), Action::kSkip);
  EXPECT_DOUBLE_EQ(guard.running_mean(), 68.0);
  // A skipped spike does not join the window.
  EXPECT_EQ(guard.check(6, 203.0), Action::kTrain);
}

TEST(LossSpikeGuardTest, PolicyNoneNeverFlags) {
  LossSpikeGuard guard(policy("none", 1), "/nonexistent");
  EXPECT_EQ(guard.check(1, 1.0), Action::kTrain);
  EXPECT_EQ(guard.check(2, 1e9), Action::kTrain);
}

TEST_F(LossSpikeTest, RollbackPastTheLimitStopsAndAnUnreadableRecordIsBadInput) {
  const std::string run = path("run");
  fs::create_directories(run);
  write_file_atomic(run + "/loss_spikes.json", R"({"rollbacks": [{"step": 7, "loss": 80.5}]})");
  LossSpikeGuard guard(policy("rollback", 1), run);  // max_loss_spike_rollbacks 1, used
  EXPECT_TRUE(guard.rolled_back(7));
  EXPECT_FALSE(guard.rolled_back(6));
  EXPECT_DOUBLE_EQ(guard.rolled_back_loss(7), 80.5);
  EXPECT_EQ(guard.check(1, 1.0), Action::kTrain);
  try {
    guard.check(2, 10.0);
    ADD_FAILURE() << "no exception";
  } catch (const BadInput& e) {
    ADD_FAILURE() << "BadInput: " << e.what();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_loss_spike_rollbacks (1)"), std::string::npos) << e.what();
  }
  write_file_atomic(run + "/loss_spikes.json", R"({"rollbacks": [{"step": "seven"}]})");
  EXPECT_THROW(LossSpikeGuard(policy("rollback"), run), BadInput);
}

TEST_F(LossSpikeTest, PolicyOnWithoutASpikeIsBitIdenticalToPolicyOff) {
  TrainOptions plain;
  plain.measure_peak = false;
  Config off = config("off", "none");
  const TrainResult reference = train(off, plain);
  for (const std::string name : {"skip", "rollback"}) {
    Config on = config(name, name);
    const TrainResult result = train_with_rollbacks(on, plain);
    expect_same_weights(result, reference);
    for (const json& record : metrics(result)) EXPECT_FALSE(record.contains("skipped")) << record.dump();
  }
}

TEST_F(LossSpikeTest, SkipDropsTheSpikeLikeANonFiniteSkipAndLogsItsSamples) {
  Config c = config("skip", "skip");
  const TrainHooks spike = spike_at(6);
  const TrainResult result = train(c, quiet(), &spike);
  EXPECT_EQ(result.final_step, 10);
  for (const json& record : metrics(result)) {
    const bool spike = record["step"] == 6;
    EXPECT_EQ(record.value("skipped", false), spike) << record.dump();
    if (!spike) continue;
    EXPECT_EQ(record["loss_spike"], true);
    EXPECT_GT(record["loss"].get<double>(), 3.0 * record["running_mean"].get<double>());
    EXPECT_EQ(record["samples"].size(), 4u);  // global batch 4
  }
  // The same step dropped for a non-finite loss leaves the same weights.
  Config nonfinite = config("nonfinite", "none");
  nonfinite.optimizer.nonfinite_policy = "skip";
  TrainHooks poisoned;
  poisoned.poison_step = [](int64_t step) { return step == 6; };
  expect_same_weights(result, train(nonfinite, quiet(), &poisoned));
}

TEST_F(LossSpikeTest, RollbackReturnsToTheLastCheckpointSkipsTheSpikesDataAndMatchesSkip) {
  Config skip = config("skip", "skip");
  const TrainHooks spike = spike_at(6);
  const TrainResult skipped = train(skip, quiet(), &spike);
  Config rollback = config("rollback", "rollback");
  std::ostringstream log;
  TrainOptions options = quiet();
  options.log = &log;
  const TrainResult result = train_with_rollbacks(rollback, options, &spike);
  EXPECT_EQ(result.final_step, 10);
  EXPECT_EQ(result.resumed_from_step, 4) << "the second attempt starts from checkpoint step 4";
  EXPECT_NE(log.str().find("loss spike at step 6"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("going back to the last checkpoint"), std::string::npos) << log.str();
  const json record = json::parse(read_file(result.run_dir + "/loss_spikes.json"));
  ASSERT_EQ(record["rollbacks"].size(), 1u);
  EXPECT_EQ(record["rollbacks"][0]["step"], 6);
  EXPECT_EQ(record["rollbacks"][0]["samples"].size(), 4u);
  int64_t logged = 0;
  for (const json& line : metrics(result)) {
    ++logged;
    EXPECT_EQ(line.value("skipped", false), line["step"] == 6) << line.dump();
    if (line["step"] == 6) {
      EXPECT_EQ(line["rolled_back"], true) << line.dump();
    }
  }
  EXPECT_EQ(logged, 10) << "the steps redone after the rollback are logged once";
  // Exact resume: rolling back and skipping step 6 is skipping step 6.
  expect_same_weights(result, skipped);
}

}  // namespace
}  // namespace loom
