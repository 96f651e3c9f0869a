// The single-rank training loop: exact resume, learning, metrics, checkpoints.
#include "trainer/training.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <c10/core/CPUAllocator.h>
#include <torch/nn/functional/loss.h>

#include "checkpoints/hub.h"
#include "tests/unit/bad_input.h"
#include "tests/unit/random_dataset.h"
#include "data/dataset.h"
#include "parallel/cuda_runtime.h"
#include "trainer/run_checkpoints.h"
#include "trainer/tensor_memory.h"
#include "trainer/training_checkpoint.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kVocab = 64;

class TrainingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("loom_test_training_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // 3000 uniformly random tokens in documents of 50: nothing to learn beyond
  // the unigram distribution, but every batch differs.
  std::string random_dataset() {
    const std::string dir = path("random");
    return fs::exists(dir) ? dir : test_support::write_random_dataset(dir, kVocab, 60);
  }

  // A short pattern repeated: the next token is a function of the current one.
  std::string pattern_dataset() {
    const std::string dir = path("pattern");
    DatasetWriter writer(dir, kVocab, 0, "test-tokenizer");
    std::vector<int32_t> document;
    for (int i = 0; i < 3000; ++i) document.push_back(1 + (i * 7) % 11);
    writer.add_document(document);
    writer.finish();
    return dir;
  }

  Config config(const std::string& run_name, const std::string& dataset) const {
    Config c;
    c.run.name = run_name;
    c.run.output_dir = path("runs");
    c.run.seed = 1234;
    c.model.hidden_size = 32;
    c.model.intermediate_size = 64;
    c.model.num_layers = 2;
    c.model.num_heads = 4;
    c.model.num_kv_heads = 2;
    c.model.vocab_size = kVocab;
    c.model.max_seq_len = 16;
    c.data.train = {{dataset, 1.0}};
    c.data.seq_len = 16;
    c.batch.micro_batch_size = 2;
    c.batch.global_batch_size = 4;
    c.optimizer.lr = 1e-2;
    c.schedule.train_steps = 20;
    c.schedule.warmup_steps = 2;
    c.checkpoint.interval = 10;
    c.checkpoint.keep_last = 2;
    c.checkpoint.resume = "auto";
    c.checkpoint.export_hf_at_end = false;
    c.logging.interval = 1;
    return c;
  }

  static TrainOptions fast(int64_t stop_after_step = -1) {
    TrainOptions options;
    options.measure_peak = false;
    options.stop_after_step = stop_after_step;
    return options;
  }

  static std::vector<json> metrics(const TrainResult& result) {
    std::vector<json> out;
    std::istringstream lines(read_file(result.run_dir + "/metrics.jsonl"));
    for (std::string line; std::getline(lines, line);) out.push_back(json::parse(line));
    return out;
  }

  // Runs 20 steps straight, and 10 then 10 more resumed from the step-10
  // checkpoint, with configs from `make`: the losses, gradient norms and
  // final weights must be the same bits.
  void expect_bit_identical_resume(const std::function<Config(const std::string&)>& make) {
    Config straight_config = make("straight");
    const TrainResult straight = train(straight_config, fast());
    ASSERT_EQ(straight.final_step, 20);
    Config first_config = make("resumed");
    ASSERT_EQ(train(first_config, fast(/*stop_after_step=*/10)).final_step, 10);
    Config second_config = make("resumed");
    const TrainResult second = train(second_config, fast());
    EXPECT_EQ(second.resumed_from_step, 10);
    ASSERT_EQ(second.final_step, 20);

    const auto straight_metrics = metrics(straight);
    const auto resumed_metrics = metrics(second);
    ASSERT_EQ(straight_metrics.size(), 20u);
    ASSERT_EQ(resumed_metrics.size(), 20u);
    for (size_t i = 0; i < 20; ++i) {
      EXPECT_EQ(resumed_metrics[i]["step"], straight_metrics[i]["step"]);
      EXPECT_EQ(resumed_metrics[i]["loss"].get<double>(), straight_metrics[i]["loss"].get<double>()) << "step " << i + 1;
      EXPECT_EQ(resumed_metrics[i]["grad_norm"].get<double>(), straight_metrics[i]["grad_norm"].get<double>());
    }
    auto resumed_params = second.model->named_parameters();
    for (const auto& p : straight.model->named_parameters()) {
      EXPECT_TRUE(torch::equal(p.value(), resumed_params[p.key()])) << p.key();
    }
  }

  fs::path dir_;
};

TEST_F(TrainingTest, ResumeAfterStopGivesBitIdenticalLossesAndWeights) {
  expect_bit_identical_resume([&](const std::string& name) { return config(name, random_dataset()); });
}

TEST_F(TrainingTest, LossFallsOnALearnablePattern) {
  Config c = config("pattern", pattern_dataset());
  c.schedule.train_steps = 40;
  c.checkpoint.interval = 0;
  const TrainResult result = train(c, fast());
  const auto records = metrics(result);
  ASSERT_EQ(records.size(), 40u);
  const double first = records.front()["loss"].get<double>();
  const double last = records.back()["loss"].get<double>();
  EXPECT_NEAR(first, std::log(static_cast<double>(kVocab)), 0.5);  // about uniform at the start
  EXPECT_LT(last, first / 2) << "first " << first << ", last " << last;
}

TEST_F(TrainingTest, MetricsHaveTheContractFieldsAndLossesRoundTrip) {
  Config c = config("metrics", random_dataset());
  c.schedule.train_steps = 6;
  c.logging.interval = 2;
  TrainOptions options = fast();
  options.measure_peak = true;
  const TrainResult result = train(c, options);
  const auto records = metrics(result);
  ASSERT_EQ(records.size(), 3u);
  for (size_t i = 0; i < records.size(); ++i) {
    for (const char* key : {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}) {
      EXPECT_TRUE(records[i].contains(key)) << key;
    }
    EXPECT_EQ(records[i]["step"].get<int64_t>(), static_cast<int64_t>(2 * (i + 1)));
    EXPECT_GT(records[i]["tokens_per_s"].get<double>(), 0.0);
    EXPECT_GT(records[i]["mfu"].get<double>(), 0.0);
    EXPECT_GT(records[i]["lr"].get<double>(), 0.0);
  }
  // The file's text holds the double exactly.
  EXPECT_EQ(records.back()["loss"].get<double>(), result.last_loss);
  EXPECT_GT(result.peak_flops, 0.0);
  EXPECT_TRUE(fs::exists(result.run_dir + "/config.yaml"));
}

TEST(MatmulPeak, EveryCpuDtypeGivesARateAndDrawsNothingFromTheSeededGenerator) {
  torch::manual_seed(7);
  const auto expected = torch::randn({4});
  torch::manual_seed(7);
  // bf16 included: it grows the product only while one takes under 20 ms.
  EXPECT_GT(measure_matmul_peak_flops(torch::kCPU, torch::kFloat), 0.0);
  EXPECT_GT(measure_matmul_peak_flops(torch::kCPU, torch::kBFloat16), 0.0);
  EXPECT_TRUE(torch::equal(torch::randn({4}), expected));
}

TEST(TensorMemory, CountsLiveCpuTensorBytesAndTheirPeak) {
  install_tensor_memory_counter();
  ASSERT_TRUE(tensor_memory_counter_installed());
  const int64_t before = tensor_memory_live_bytes();
  reset_tensor_memory_peak();
  {
    torch::Tensor a = torch::empty({1000}, torch::kFloat);   // 4000 bytes
    torch::Tensor b = torch::empty({250}, torch::kDouble);   // 2000 bytes
    EXPECT_EQ(tensor_memory_live_bytes() - before, 6000);
    b = torch::Tensor();
    EXPECT_EQ(tensor_memory_live_bytes() - before, 4000);
    // Memory handed out raw (Allocator::raw_allocate) is counted and freed too.
    void* raw = c10::GetCPUAllocator()->raw_allocate(100);
    EXPECT_EQ(tensor_memory_live_bytes() - before, 4100);
    c10::GetCPUAllocator()->raw_deallocate(raw);
  }
  EXPECT_EQ(tensor_memory_live_bytes(), before);
  EXPECT_EQ(tensor_memory_peak_bytes() - before, 6000);
  reset_tensor_memory_peak();
  EXPECT_EQ(tensor_memory_peak_bytes(), before);
}

TEST_F(TrainingTest, MetricsReportTheStepsPeakTensorBytes) {
  Config c = config("tensor-peak", random_dataset());
  c.schedule.train_steps = 2;
  c.logging.interval = 1;
  const TrainResult result = train(c, fast());
  // At least the parameters, their gradients and AdamW's two moments, all fp32.
  int64_t parameters = 0;
  for (const auto& p : result.model->parameters()) parameters += p.numel();
  for (const auto& record : metrics(result)) {
    EXPECT_GE(record["mem_tensor_peak_bytes"].get<int64_t>(), 16 * parameters) << record.dump();
    EXPECT_FALSE(record.contains("mem_tensor_peak_bytes_per_rank"));  // one rank
  }
}

TEST_F(TrainingTest, KeepsTheLastCheckpointsAndLatestNamesTheNewest) {
  Config c = config("keep", random_dataset());
  c.checkpoint.interval = 5;
  c.checkpoint.keep_last = 2;
  const TrainResult result = train(c, fast());
  const fs::path checkpoints = fs::path(result.run_dir) / "checkpoints";
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(checkpoints)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-0000015", "step-0000020"}));
  EXPECT_EQ(read_file((checkpoints / "latest").string()), "step-0000020\n");
  const json manifest = json::parse(read_file((checkpoints / "step-0000020" / "manifest.json").string()));
  EXPECT_EQ(manifest["step"], 20);
  EXPECT_EQ(manifest["files"][kOptimizerStateFile]["kind"], "optimizer");
  EXPECT_EQ(manifest["files"][kTrainerStateFile]["kind"], "trainer_state");
}

TEST_F(TrainingTest, CorruptLatestCheckpointIsRefusedNamingTheFile) {
  Config c = config("corrupt", random_dataset());
  train(c, fast(/*stop_after_step=*/10));
  const std::string optimizer_file = path("runs/corrupt/checkpoints/step-0000010/") + kOptimizerStateFile;
  {
    std::fstream file(optimizer_file, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(-3, std::ios::end);
    file.put('\x7f');
  }
  Config again = config("corrupt", random_dataset());
  try {
    train(again, fast());
    ADD_FAILURE() << "no BadInput thrown";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find(optimizer_file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("CRC32C"), std::string::npos) << e.what();
  }
}

TEST_F(TrainingTest, ResumeNoneRefusesARunFolderWithCheckpoints) {
  Config c = config("none", random_dataset());
  train(c, fast(/*stop_after_step=*/10));
  Config fresh = config("none", random_dataset());
  fresh.checkpoint.resume = "none";
  EXPECT_THROW(train(fresh, fast()), BadInput);
}

TEST_F(TrainingTest, ExportsAHubFolderAtTheEndReplacingAnEarlierOne) {
  Config c = config("export", random_dataset());
  c.schedule.train_steps = 2;
  c.checkpoint.export_hf_at_end = true;
  const TrainResult result = train(c, fast());
  EXPECT_TRUE(fs::exists(result.run_dir + "/hf/model.safetensors"));
  // A longer schedule on the same run: resumes from step 2 and exports again.
  Config longer = config("export", random_dataset());
  longer.schedule.train_steps = 3;
  longer.checkpoint.export_hf_at_end = true;
  const TrainResult again = train(longer, fast());
  EXPECT_EQ(again.resumed_from_step, 2);
  EXPECT_TRUE(fs::exists(result.run_dir + "/hf/config.json"));
  for (const auto& entry : fs::directory_iterator(result.run_dir)) {
    EXPECT_EQ(entry.path().filename().string().find("hf."), std::string::npos) << entry.path();
  }
}

// train() with TrainHooks::poison_step making the listed steps' losses NaN.
TrainResult train_poisoned(Config& config, std::vector<int64_t> steps, int64_t stop_after_step = -1) {
  TrainOptions options;
  options.measure_peak = false;
  options.stop_after_step = stop_after_step;
  TrainHooks hooks;
  hooks.poison_step = [steps](int64_t step) { return std::find(steps.begin(), steps.end(), step) != steps.end(); };
  return train(config, options, &hooks);
}

TEST_F(TrainingTest, SkipPolicyDropsTheNonFiniteStepAndFinishes) {
  Config c = config("skip", random_dataset());
  c.optimizer.nonfinite_policy = "skip";
  c.schedule.train_steps = 8;
  c.checkpoint.interval = 0;
  const TrainResult result = train_poisoned(c, {5});
  EXPECT_EQ(result.final_step, 8);
  const auto records = metrics(result);
  ASSERT_EQ(records.size(), 8u);
  for (const json& record : records) {
    const bool skipped = record["step"].get<int64_t>() == 5;
    EXPECT_EQ(record.value("skipped", false), skipped) << record.dump();
    if (skipped) {
      ASSERT_TRUE(record["samples"].is_array());
      EXPECT_EQ(record["samples"].size(), 4u);  // global batch 4: both micro-batches' samples
    } else {
      EXPECT_TRUE(std::isfinite(record["loss"].get<double>())) << record.dump();
    }
  }
  for (const auto& p : result.model->named_parameters()) {
    EXPECT_TRUE(torch::isfinite(p.value()).all().item<bool>()) << p.key();
  }
  // The skip count is saved next to the step.
  const json state = json::parse(read_file(result.run_dir + "/checkpoints/step-0000008/" + kTrainerStateFile));
  EXPECT_EQ(state["skipped_steps"], 1);
}

TEST_F(TrainingTest, SkipCountSurvivesResume) {
  Config c = config("skipresume", random_dataset());
  c.optimizer.nonfinite_policy = "skip";
  c.optimizer.max_skipped_steps = 1;
  ASSERT_EQ(train_poisoned(c, {3}, /*stop_after_step=*/10).final_step, 10);
  // The resumed run starts with the one skip used: a second one is too many.
  Config again = config("skipresume", random_dataset());
  again.optimizer.nonfinite_policy = "skip";
  again.optimizer.max_skipped_steps = 1;
  try {
    train_poisoned(again, {13});
    ADD_FAILURE() << "no exception thrown";
  } catch (const BadInput& e) {
    ADD_FAILURE() << "BadInput: " << e.what();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("at step 13"), std::string::npos) << e.what();
  }
}

TEST_F(TrainingTest, StopPolicyThrowsAndLeavesTheLastCheckpointIntact) {
  Config c = config("stop", random_dataset());
  c.checkpoint.interval = 5;
  try {
    train_poisoned(c, {7});
    ADD_FAILURE() << "no exception thrown";
  } catch (const BadInput& e) {
    ADD_FAILURE() << "BadInput: " << e.what();
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("at step 7"), std::string::npos) << what;
    EXPECT_NE(what.find("global samples ["), std::string::npos) << what;
  }
  const fs::path checkpoints = path("runs/stop/checkpoints");
  EXPECT_EQ(read_file((checkpoints / "latest").string()), "step-0000005\n");
  EXPECT_FALSE(fs::exists(checkpoints / "step-0000007"));
  const ModelFiles files = ModelFiles::open((checkpoints / "step-0000005").string());
  EXPECT_EQ(files.step(), 5);
  // No metrics line for the failed step.
  std::istringstream lines(read_file(path("runs/stop/metrics.jsonl")));
  int64_t last_step = 0;
  for (std::string line; std::getline(lines, line);) last_step = json::parse(line)["step"].get<int64_t>();
  EXPECT_EQ(last_step, 6);
}

TEST_F(TrainingTest, SkipPolicyStopsPastMaxSkippedSteps) {
  Config c = config("maxskip", random_dataset());
  c.optimizer.nonfinite_policy = "skip";
  c.optimizer.max_skipped_steps = 1;
  c.checkpoint.interval = 2;
  try {
    train_poisoned(c, {3, 6});
    ADD_FAILURE() << "no exception thrown";
  } catch (const BadInput& e) {
    ADD_FAILURE() << "BadInput: " << e.what();
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("at step 6"), std::string::npos) << what;
    EXPECT_NE(what.find("max_skipped_steps 1"), std::string::npos) << what;
  }
  const fs::path checkpoints = path("runs/maxskip/checkpoints");
  EXPECT_EQ(read_file((checkpoints / "latest").string()), "step-0000004\n");
  std::istringstream lines(read_file(path("runs/maxskip/metrics.jsonl")));
  std::vector<int64_t> skipped;
  for (std::string line; std::getline(lines, line);) {
    const json record = json::parse(line);
    if (record.value("skipped", false)) skipped.push_back(record["step"].get<int64_t>());
  }
  EXPECT_EQ(skipped, (std::vector<int64_t>{3}));
}

TEST_F(TrainingTest, Bf16ComputeTracksFp32AndKeepsFp32Weights) {
  const std::string dataset = pattern_dataset();
  Config fp32_config = config("fp32", dataset);
  Config bf16_config = config("bf16", dataset);
  bf16_config.precision.compute = "bf16";
  const TrainResult fp32 = train(fp32_config, fast());
  const TrainResult bf16 = train(bf16_config, fast());
  for (const auto& named : bf16.model->named_parameters()) {
    EXPECT_EQ(named.value().scalar_type(), torch::kFloat) << named.key();
  }
  // bf16 matmuls change the numbers (so the runs are not identical) but not
  // the learning: after 20 steps the losses agree within 2%.
  EXPECT_NE(fp32.last_loss, bf16.last_loss);
  EXPECT_NEAR(bf16.last_loss, fp32.last_loss, 0.02 * fp32.last_loss);
  EXPECT_LT(bf16.last_loss, metrics(bf16).front()["loss"].get<double>() * 0.5);
}

// precision.params bf16: bf16 weights on the device, fp32 masters in AdamW
// (written to the checkpoint under the parameters' names), and the loss of
// 50 steps within 2% of the fp32 run's.
TEST_F(TrainingTest, Bf16ParamsTrackFp32AndTheCheckpointHoldsTheFp32Masters) {
  const std::string dataset = pattern_dataset();
  Config fp32_config = config("fp32", dataset);
  Config bf16_config = config("bf16", dataset);
  for (Config* c : {&fp32_config, &bf16_config}) {
    c->schedule.train_steps = 50;
    c->checkpoint.interval = 50;
  }
  bf16_config.precision.params = "bf16";
  bf16_config.precision.compute = "bf16";
  const TrainResult fp32 = train(fp32_config, fast());
  const TrainResult bf16 = train(bf16_config, fast());
  ASSERT_EQ(bf16.final_step, 50);
  EXPECT_NE(fp32.last_loss, bf16.last_loss);
  EXPECT_NEAR(bf16.last_loss, fp32.last_loss, 0.02 * fp32.last_loss);
  EXPECT_LT(bf16.last_loss, metrics(bf16).front()["loss"].get<double>() * 0.5);

  const ModelFiles saved = ModelFiles::open(bf16.run_dir + "/checkpoints/step-0000050");
  int64_t finer_than_bf16 = 0;
  for (const auto& named : bf16.model->named_parameters()) {
    EXPECT_EQ(named.value().scalar_type(), torch::kBFloat16) << named.key();
    const torch::Tensor master = saved.read(named.key());
    ASSERT_EQ(master.scalar_type(), torch::kFloat) << named.key();
    EXPECT_TRUE(torch::equal(master.to(torch::kBFloat16), named.value().detach())) << named.key();
    finer_than_bf16 += (master != master.to(torch::kBFloat16).to(torch::kFloat)).sum().item<int64_t>();
    EXPECT_FALSE(saved.contains("optimizer.master." + named.key())) << "stored once, as the parameter";
  }
  EXPECT_GT(finer_than_bf16, 0) << "the masters keep bits a bf16 weight cannot";
}

TEST_F(TrainingTest, Bf16ParamsResumeBitIdenticallyAndFromAnFp32Checkpoint) {
  const auto bf16 = [&](const std::string& name) {
    Config c = config(name, random_dataset());
    c.precision.params = "bf16";
    c.precision.compute = "bf16";
    return c;
  };
  expect_bit_identical_resume(bf16);

  // An fp32 run's checkpoint resumes with bf16 parameters (its weights
  // become the masters) and the other way round.
  Config fp32_first = config("switch", random_dataset());
  ASSERT_EQ(train(fp32_first, fast(/*stop_after_step=*/10)).final_step, 10);
  Config bf16_second = bf16("switch");
  const TrainResult switched = train(bf16_second, fast(/*stop_after_step=*/15));
  EXPECT_EQ(switched.resumed_from_step, 10);
  Config fp32_third = config("switch", random_dataset());
  const TrainResult back = train(fp32_third, fast());
  EXPECT_EQ(back.resumed_from_step, 15);
  EXPECT_EQ(back.final_step, 20);
}

TEST_F(TrainingTest, Bf16ParamsWithFp32ComputeAndUnknownDevicesAreRefused) {
  Config bf16_params = config("bf16-params", random_dataset());
  bf16_params.precision.params = "bf16";
  test_support::expect_bad_input([&] { train(bf16_params, fast()); }, {"precision.params", "precision.compute bf16"});
  EXPECT_FALSE(fs::exists(path("runs/bf16-params"))) << "a refused run must write nothing";
  if (cuda_device_count() == 0) {
    Config cuda = config("cuda", random_dataset());
    cuda.run.device = "cuda";
    test_support::expect_bad_input([&] { train(cuda, fast()); }, {"run.device"});
    Config automatic = config("auto", random_dataset());
    automatic.run.device = "auto";
    EXPECT_EQ(train(automatic, fast()).final_step, 20);  // auto falls back to the CPU
  }
}

// fusion.*: the clipping factor inside AdamW gives the unfused run's bits
// on the CPU (its single-tensor path multiplies as clipping does); the fused
// weight gradients (not rounded to bf16 before they are summed) train like
// the unfused ones; each is refused where the run would not take it.
TEST_F(TrainingTest, FusionsTrainLikeTheUnfusedAndAreRefusedWhereTheyDoNotApply) {
  const std::string dataset = pattern_dataset();
  const auto bf16 = [&](const std::string& name, bool wgrad, bool clip, bool add_norm = false) {
    Config c = config(name, dataset);
    c.precision.compute = "bf16";
    c.optimizer.clip_grad_norm = 0.05;  // below the norms of this run: every step clips
    c.fusion.wgrad_accumulation = wgrad;
    c.fusion.clip_in_adamw = clip;
    c.fusion.add_rmsnorm = add_norm;
    return c;
  };
  Config plain_config = bf16("plain", false, false), clip_config = bf16("clip", false, true);
  Config wgrad_config = bf16("wgrad", true, false), add_norm_config = bf16("add-norm", false, false, true);
  const std::vector<json> plain = metrics(train(plain_config, fast()));
  const std::vector<json> clip = metrics(train(clip_config, fast()));
  const std::vector<json> wgrad = metrics(train(wgrad_config, fast()));
  const std::vector<json> add_norm = metrics(train(add_norm_config, fast()));
  ASSERT_EQ(plain.size(), 20u);
  ASSERT_EQ(clip.size(), plain.size());
  ASSERT_EQ(wgrad.size(), plain.size());
  ASSERT_EQ(add_norm.size(), plain.size());
  // On the CPU the add and norm take the unfused ops (the kernel is the
  // GPU's), and AdamW multiplies by the factor as clipping would: same bits.
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_GT(plain[i]["grad_norm"].get<double>(), 0.05) << "step " << i + 1 << " must clip";
    for (const auto* run : {&clip, &add_norm}) {
      EXPECT_EQ((*run)[i]["loss"].get<double>(), plain[i]["loss"].get<double>()) << "step " << i + 1;
      EXPECT_EQ((*run)[i]["grad_norm"].get<double>(), plain[i]["grad_norm"].get<double>()) << "step " << i + 1;
    }
  }
  // The first step's loss comes before any gradient; later ones differ by
  // the gradients' bf16 roundings and learn as far.
  EXPECT_EQ(wgrad.front()["loss"].get<double>(), plain.front()["loss"].get<double>());
  EXPECT_NE(wgrad.back()["loss"].get<double>(), plain.back()["loss"].get<double>());
  EXPECT_NEAR(wgrad.back()["loss"].get<double>(), plain.back()["loss"].get<double>(),
              0.02 * plain.back()["loss"].get<double>());
  EXPECT_LT(wgrad.back()["loss"].get<double>(), wgrad.front()["loss"].get<double>() * 0.5);

  Config fp32_wgrad = config("fp32-wgrad", dataset);
  fp32_wgrad.fusion.wgrad_accumulation = true;
  test_support::expect_bad_input([&] { train(fp32_wgrad, fast()); },
                                 {"fusion.wgrad_accumulation", "precision.compute bf16", "one rank"});
  EXPECT_FALSE(fs::exists(path("runs/fp32-wgrad"))) << "a refused run must write nothing";
  Config two_ranks = bf16("two-ranks", true, false);
  ParallelDims dims;
  dims.world = 2;
  dims.dp = 2;
  test_support::expect_bad_input([&] { check_precision(two_ranks, dims); }, {"fusion.wgrad_accumulation", "2 ranks"});
  Config unclipped = bf16("unclipped", false, true);
  unclipped.optimizer.clip_grad_norm = 0;
  test_support::expect_bad_input([&] { train(unclipped, fast()); }, {"fusion.clip_in_adamw", "clip_grad_norm"});
  Config zero = bf16("zero", false, true);
  zero.parallel.zero_stage = 1;
  test_support::expect_bad_input([&] { check_precision(zero, dims); }, {"fusion.clip_in_adamw", "zero_stage 1"});
  Config fp32_add_norm = config("fp32-add-norm", dataset);
  fp32_add_norm.fusion.add_rmsnorm = true;
  test_support::expect_bad_input([&] { train(fp32_add_norm, fast()); }, {"fusion.add_rmsnorm", "bf16"});
  Config tp_add_norm = bf16("tp-add-norm", false, false, true);
  ParallelDims tp_dims;
  tp_dims.world = 2;
  tp_dims.tp = 2;
  test_support::expect_bad_input([&] { check_precision(tp_add_norm, tp_dims); }, {"fusion.add_rmsnorm", "tp 2"});
  for (const std::string architecture : {"olmo2", "gemma", "gemma2"}) {
    Config other = bf16("other", false, false, true);
    other.model.architecture = architecture;
    test_support::expect_bad_input([&] { check_precision(other, ParallelDims{}); },
                                   {"fusion.add_rmsnorm", "architecture " + architecture});
  }
}

TEST_F(TrainingTest, ValidationLossIsLoggedAtItsIntervalAndMatchesTheFinalModel) {
  Config c = config("valid", pattern_dataset());
  c.data.valid = random_dataset();  // same vocabulary and tokenizer hash
  c.data.valid_interval = 8;
  c.data.valid_batches = 3;
  const TrainResult result = train(c, fast());
  std::vector<int64_t> valid_steps;
  double last_valid = 0;
  for (const json& record : metrics(result)) {
    if (!record.contains("valid_loss")) continue;
    valid_steps.push_back(record["step"].get<int64_t>());
    last_valid = record["valid_loss"].get<double>();
    EXPECT_EQ(record["valid_batches"].get<int64_t>(), 3);
  }
  EXPECT_EQ(valid_steps, (std::vector<int64_t>{8, 16, 20}));
  EXPECT_DOUBLE_EQ(last_valid, result.last_valid_loss);

  // The same number from the final weights, computed here: the mean over the
  // first 3 micro-batches of 2 validation samples, in order.
  const Dataset valid = Dataset::open(c.data.valid);
  std::vector<int32_t> tokens(3 * 2 * 16 + 1);
  valid.read_tokens(0, std::span<int32_t>(tokens));
  torch::NoGradGuard no_grad;
  double sum = 0;
  for (int64_t b = 0; b < 3; ++b) {
    std::vector<int64_t> rows;
    for (int64_t r = 0; r < 2; ++r) {
      const int64_t start = (b * 2 + r) * 16;
      for (int64_t t = 0; t < 17; ++t) rows.push_back(tokens[start + t]);
    }
    const auto rows_bt = torch::tensor(rows).view({2, 17});
    const auto logits = result.model->forward(rows_bt.slice(1, 0, 16));
    sum += torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), rows_bt.slice(1, 1, 17).reshape({-1}))
               .item<double>();
  }
  EXPECT_NEAR(last_valid, sum / 3, 1e-5);
}

TEST_F(TrainingTest, MetricsReportMemory) {
  Config c = config("memory", random_dataset());
  c.schedule.train_steps = 2;
  const TrainResult result = train(c, fast());
  for (const json& record : metrics(result)) {
    // The CPU figure is the process's peak resident set: more than the model.
    EXPECT_GT(record["mem_peak_gib"].get<double>() * 1024 * 1024 * 1024, 1e6) << record.dump();
    EXPECT_GT(record["mem_reserved_gib"].get<double>(), 0.0) << record.dump();
  }
}

// What a checkpoint holds, made outside train(): the config's model
// (initialized from its run.seed), a fresh AdamW and a loader.
struct StateToSave {
  explicit StateToSave(const Config& c)
      : model(c.model, factory),
        optimizer(to_named_tensors(initialized(model, c.run.seed).named_parameters()), AdamWOptions{}),
        loader(loader_config(c)) {}
  static LlamaForCausalLM& initialized(LlamaForCausalLM& m, uint64_t seed) {
    m.init_weights(seed);
    return m;
  }
  static LoaderConfig loader_config(const Config& c) {
    LoaderConfig out;
    out.datasets = {{c.data.train.front().path, 1.0}};
    out.seq_len = c.data.seq_len;
    out.global_batch = c.batch.global_batch_size;
    out.micro_batch = c.batch.micro_batch_size;
    return out;
  }
  LocalLayerFactory factory;
  LlamaForCausalLM model;
  AdamW optimizer;
  Loader loader;
};

// checkpoint.async: the snapshot handed to the background thread is a copy,
// so updates made while it is written do not reach the checkpoint.
TEST_F(TrainingTest, AsyncSnapshotIsACopyThatTrainingMayUpdateMeanwhile) {
  torch::manual_seed(3);
  StateToSave state(config("async", random_dataset()));
  LlamaForCausalLM& model = state.model;
  const AdamW& optimizer = state.optimizer;
  const Loader& loader = state.loader;
  std::map<std::string, torch::Tensor> before;
  for (const auto& p : model.named_parameters()) before[p.key()] = p.value().detach().clone();

  TrainingSnapshot copied = snapshot_training_state(7, model, optimizer, loader, 0, /*copy=*/true);
  TrainingSnapshot shared = snapshot_training_state(7, model, optimizer, loader, 0, /*copy=*/false);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model.named_parameters()) p.value().add_(1.0);
  }
  // Without a copy the snapshot sees the update: the copy is what protects it.
  EXPECT_TRUE(torch::equal(shared.model.front().values, model.named_parameters()[shared.model.front().name]));

  AsyncCheckpointWriter writer(path("checkpoints"), TrainingCheckpointOptions{}, CheckpointRank{});
  const std::string folder = writer.start(std::move(copied));
  EXPECT_EQ(folder, path("checkpoints") + "/step-0000007");
  writer.wait();
  EXPECT_EQ(read_file(path("checkpoints/latest")), "step-0000007\n");
  const ModelFiles files = open_training_checkpoint(folder);
  for (const auto& [name, value] : before) EXPECT_TRUE(torch::equal(files.read(name), value)) << name;
}

// A background write that fails is reported by the next wait(), and leaves
// no checkpoint folder behind.
TEST_F(TrainingTest, AsyncWriteFailureIsReportedByWait) {
  const StateToSave state(config("async", random_dataset()));
  write_file_atomic(path("not-a-folder"), "x");  // the checkpoints folder cannot be made below a file
  AsyncCheckpointWriter writer(path("not-a-folder/checkpoints"), TrainingCheckpointOptions{}, CheckpointRank{});
  writer.start(snapshot_training_state(1, state.model, state.optimizer, state.loader, 0, /*copy=*/true));
  EXPECT_ANY_THROW(writer.wait());
  EXPECT_NO_THROW(writer.wait());  // reported once
  EXPECT_FALSE(fs::exists(path("not-a-folder/checkpoints")));
}

// Note [who writes a piece]: under ZeRO with expert parallelism an
// expert's pieces are this replica's own (its shard over edp), so they go to
// a tp rank of this replica, and only this replica's slots are loaded. dp 4
// x ep 2 x tp 2: replica r holds ep rank r % 2's experts.
TEST(PieceWriters, ZeroPiecesOfExpertsGoToTheirOwnReplica) {
  const std::vector<int64_t> bytes = {400, 300, 200, 100};
  const std::vector<bool> whole_on_every_tp_rank = {false, true, false, true};
  const std::vector<bool> expert = {true, true, false, true};
  for (int64_t replica = 0; replica < 4; ++replica) {
    for (int64_t my_tp = 0; my_tp < 2; ++my_tp) {
      std::vector<int64_t> load(8, 0);
      const std::vector<int64_t> writer = assign_piece_writers(bytes, whole_on_every_tp_rank, 4, 2, replica, my_tp,
                                                               load, {&expert, 2, 1, replica % 2});
      for (size_t i = 0; i < bytes.size(); ++i) {
        if (whole_on_every_tp_rank[i]) {
          EXPECT_EQ(writer[i] / 2, replica) << i;
        } else {
          EXPECT_EQ(writer[i], replica * 2 + my_tp) << i;
        }
      }
      // Each tp slice once, a piece every tp rank holds once: 2 x 400 + 300 + 2 x 200 + 100.
      for (int64_t slot = 0; slot < 8; ++slot) {
        if (slot / 2 != replica) {
          EXPECT_EQ(load[static_cast<size_t>(slot)], 0) << slot;
        }
      }
      EXPECT_EQ(load[static_cast<size_t>(replica * 2)] + load[static_cast<size_t>(replica * 2 + 1)], 1600);
    }
  }
}

}  // namespace
}  // namespace loom
