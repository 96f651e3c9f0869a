// Specification of config composition: `base:` chains (relative to the file
// that names them, overridden by the file, then by --set), cycles and missing
// bases refused, ${NAME} / ${NAME:-default} interpolation, and the origin of
// every key that `loom inspect` prints.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "config/config.h"
#include "util/error.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

// A folder of config files, removed at the end of the test.
class ConfigFolder {
 public:
  ConfigFolder() {
    static std::atomic<int> counter{0};
    root_ = fs::temp_directory_path() /
            ("loom_config_compose_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(root_);
  }
  ~ConfigFolder() { fs::remove_all(root_); }

  // Writes `text` to root/relative and returns the path.
  std::string write(const std::string& relative, const std::string& text) const {
    const fs::path path = root_ / relative;
    fs::create_directories(path.parent_path());
    std::ofstream(path) << text;
    return path.string();
  }
  std::string path(const std::string& relative) const { return (root_ / relative).string(); }

 private:
  fs::path root_;
};

// Sets an environment variable for the test's duration (unset = nullptr).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    value ? ::setenv(name, value, 1) : ::unsetenv(name);
  }
  ~ScopedEnv() { old_.empty() ? ::unsetenv(name_.c_str()) : ::setenv(name_.c_str(), old_.c_str(), 1); }

 private:
  std::string name_;
  std::string old_;
};

std::string refusal(const std::string& path, const std::vector<std::string>& overrides = {}) {
  try {
    load_config(path, overrides);
  } catch (const BadInput& e) {
    return e.what();
  }
  return "";
}

const std::string kModel =
    "model:\n"
    "  hidden_size: 64\n"
    "  intermediate_size: 128\n"
    "  num_layers: 4\n"
    "  num_heads: 4\n"
    "  vocab_size: 256\n";

// The three-file chain of docs/experiments.md: the experiment builds on a
// schedule file in a folder of its own, which builds on a model file beside it.
struct Chain {
  ConfigFolder folder;
  std::string model, schedule, experiment;
  Chain() {
    model = folder.write("bases/model.yaml",
                         kModel +                      // lines 1-6
                             "optimizer:\n"            // 7
                             "  lr: 0.01\n"            // 8
                             "  weight_decay: 0.2\n"   // 9
                             "run:\n"                  // 10
                             "  name: from-model\n");  // 11
    schedule = folder.write("bases/schedule.yaml",
                            "base: model.yaml\n"         // 1 (beside it, not beside the experiment)
                            "schedule:\n"                // 2
                            "  train_steps: 100\n"       // 3
                            "  warmup_steps: 10\n"       // 4
                            "optimizer:\n"               // 5
                            "  lr: 0.003\n");            // 6
    experiment = folder.write("exp/lr.yaml",
                              "base: ../bases/schedule.yaml\n"  // 1
                              "run:\n"                          // 2
                              "  name: lr-sweep\n"              // 3
                              "schedule:\n"                     // 4
                              "  warmup_steps: 20\n");          // 5
  }
};

TEST(ConfigCompose, ThreeFileChainLaterFilesOverrideEarlierOnesAndSetOverridesAll) {
  Chain chain;
  ConfigOrigins origins;
  const Config config = load_config(chain.experiment, {"optimizer.weight_decay=0.05"}, &origins);
  EXPECT_EQ(config.model.hidden_size, 64);             // only in model.yaml
  EXPECT_DOUBLE_EQ(config.optimizer.lr, 0.003);        // schedule.yaml over model.yaml
  EXPECT_EQ(config.schedule.train_steps, 100);         // only in schedule.yaml
  EXPECT_EQ(config.schedule.warmup_steps, 20);         // lr.yaml over schedule.yaml
  EXPECT_EQ(config.run.name, "lr-sweep");              // lr.yaml over model.yaml
  EXPECT_DOUBLE_EQ(config.optimizer.weight_decay, 0.05);  // --set over model.yaml
  EXPECT_EQ(config.batch.micro_batch_size, 1);          // nobody: the default

  // Every key names the line that set it last.
  const std::string model = fs::path(chain.model).lexically_normal().string();
  const std::string schedule = fs::path(chain.schedule).lexically_normal().string();
  EXPECT_EQ(origins.at("model.hidden_size"), model + ":2:3");
  EXPECT_EQ(origins.at("optimizer.lr"), schedule + ":6:3");
  EXPECT_EQ(origins.at("schedule.train_steps"), schedule + ":3:3");
  EXPECT_EQ(origins.at("schedule.warmup_steps"), chain.experiment + ":5:3");
  EXPECT_EQ(origins.at("run.name"), chain.experiment + ":3:3");
  EXPECT_EQ(origins.at("optimizer.weight_decay"), "--set optimizer.weight_decay=0.05");
  EXPECT_EQ(origins.count("batch.micro_batch_size"), 0u);
  EXPECT_EQ(config.base_files, (std::vector<std::string>{model, schedule}));
}

TEST(ConfigCompose, InspectOutputAnnotatesEveryKeyWithItsOriginAndReadsBackEqual) {
  Chain chain;
  ConfigOrigins origins;
  const Config config = load_config(chain.experiment, {"optimizer.weight_decay=0.05"}, &origins);
  const std::string text = config_to_yaml(config, &origins);
  const std::string schedule = fs::path(chain.schedule).lexically_normal().string();
  EXPECT_NE(text.find("lr: 0.003  # " + schedule + ":6:3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("weight_decay: 0.05  # --set optimizer.weight_decay=0.05\n"), std::string::npos) << text;
  EXPECT_NE(text.find("micro_batch_size: 1  # default\n"), std::string::npos) << text;
  // Comments aside, it is the resolved config: it loads to the same thing.
  EXPECT_EQ(config_to_yaml(parse_config(text, "inspect.yaml")), config_to_yaml(config));
}

TEST(ConfigCompose, ResolvedConfigNeedsNeitherTheBaseFilesNorTheEnvironment) {
  ConfigFolder folder;
  folder.write("base.yaml", kModel);
  const std::string path = folder.write("exp.yaml", "base: base.yaml\nrun:\n  name: ${LOOM_TEST_NAME}\n");
  const ScopedEnv env("LOOM_TEST_NAME", "from-env");
  const Config config = load_config(path);
  const std::string resolved = folder.write("resolved.yaml", config_to_yaml(config));
  fs::remove(folder.path("base.yaml"));
  const ScopedEnv unset("LOOM_TEST_NAME", nullptr);
  const Config again = load_config(resolved);
  EXPECT_EQ(again.run.name, "from-env");
  EXPECT_EQ(config_to_yaml(again), config_to_yaml(config));
}

TEST(ConfigCompose, ListOfBasesAppliesInOrder) {
  ConfigFolder folder;
  folder.write("model.yaml", kModel);
  folder.write("fast.yaml", "optimizer:\n  lr: 0.1\n");
  folder.write("slow.yaml", "optimizer:\n  lr: 0.001\n");
  const Config config = load_config(folder.write("exp.yaml", "base: [model.yaml, fast.yaml, slow.yaml]\n"));
  EXPECT_DOUBLE_EQ(config.optimizer.lr, 0.001);
}

TEST(ConfigCompose, NestedMapsMergeKeyByKeyAndListsReplace) {
  ConfigFolder folder;
  folder.write("base.yaml", kModel + "launch:\n  slurm:\n    partition: gpu\n    time: '02:00:00'\n"
                                     "  mpirun_args: [--a, --b]\n");
  const Config config =
      load_config(folder.write("exp.yaml", "base: base.yaml\nlaunch:\n  slurm:\n    time: '04:00:00'\n"
                                           "  mpirun_args: [--c]\n"));
  EXPECT_EQ(config.launch.slurm.partition, "gpu");
  EXPECT_EQ(config.launch.slurm.time, "04:00:00");
  EXPECT_EQ(config.launch.mpirun_args, (std::vector<std::string>{"--c"}));
}

TEST(ConfigCompose, CycleIsRefusedNamingTheFileTheBaseKeyAndTheChain) {
  ConfigFolder folder;
  const std::string a = folder.write("a.yaml", "base: b.yaml\n" + kModel);
  const std::string b = folder.write("b.yaml", "base: c.yaml\n");
  const std::string c = folder.write("c.yaml", "base: a.yaml\n");
  const std::string message = refusal(a);
  EXPECT_NE(message.find(c + ":1:7: base: base files form a cycle: " + a + " -> " + b + " -> " + c + " -> " + a),
            std::string::npos)
      << message;
  // A file that is its own base.
  const std::string self = folder.write("self.yaml", "base: ./self.yaml\n" + kModel);
  EXPECT_NE(refusal(self).find(self + ":1:7: base: base files form a cycle"), std::string::npos) << refusal(self);
}

TEST(ConfigCompose, MissingBaseIsRefusedNamingTheFileLineAndPath) {
  ConfigFolder folder;
  const std::string path = folder.write("exp.yaml", kModel + "base: nowhere/base.yaml\n");
  const std::string message = refusal(path);
  EXPECT_NE(message.find(path + ":7:7: base: cannot read base config 'nowhere/base.yaml'"), std::string::npos)
      << message;
  EXPECT_NE(message.find(folder.path("nowhere/base.yaml") + " does not exist"), std::string::npos) << message;
  // A base that is a folder, and a base that is not a file name.
  fs::create_directories(folder.path("dir.yaml"));
  EXPECT_NE(refusal(folder.write("d.yaml", "base: dir.yaml\n")).find("is not a file"), std::string::npos);
  EXPECT_NE(refusal(folder.write("m.yaml", "base: {a: 1}\n")).find("m.yaml:1:7: base: wrong type"),
            std::string::npos);
}

TEST(ConfigCompose, EmptyBaseFileIsRefusedByName) {
  ConfigFolder folder;
  const std::string empty = folder.write("empty.yaml", "# nothing\n");
  EXPECT_NE(refusal(folder.write("exp.yaml", "base: empty.yaml\n" + kModel)).find(empty + ": empty config"),
            std::string::npos);
}

TEST(ConfigCompose, BaseCannotBeSetFromTheCommandLine) {
  ConfigFolder folder;
  const std::string path = folder.write("exp.yaml", kModel);
  EXPECT_NE(refusal(path, {"base=other.yaml"}).find("--set base=other.yaml: base: unknown key"), std::string::npos);
}

TEST(ConfigCompose, InterpolationReadsTheEnvironmentWithShellDefaults) {
  const ScopedEnv name("LOOM_TEST_RUN", "run-a");
  const ScopedEnv empty("LOOM_TEST_EMPTY", "");
  const ScopedEnv unset("LOOM_TEST_UNSET", nullptr);
  const ScopedEnv lr("LOOM_TEST_LR", "0.0005");
  const Config config = parse_config(kModel +
                                         "run:\n"
                                         "  name: ${LOOM_TEST_RUN}-${LOOM_TEST_UNSET:-x}\n"
                                         "  output_dir: ${LOOM_TEST_EMPTY:-out}/$${literal}\n"
                                         "optimizer:\n"
                                         "  lr: ${LOOM_TEST_LR:-1}\n"
                                         "launch:\n"
                                         "  mpirun_args: ['${LOOM_TEST_UNSET:---x}']\n"
                                         "  env: {A: '${LOOM_TEST_RUN}'}\n"
                                         "schedule:\n"
                                         "  train_steps: ${LOOM_TEST_UNSET:-7}\n",
                                     "x.yaml", {"data.valid=${LOOM_TEST_RUN:-no}/v", "launch.env.B=${LOOM_TEST_RUN}"});
  EXPECT_EQ(config.run.name, "run-a-x");
  EXPECT_EQ(config.run.output_dir, "out/${literal}");  // empty counts as unset for :-
  EXPECT_DOUBLE_EQ(config.optimizer.lr, 0.0005);       // read as the key's type
  EXPECT_EQ(config.schedule.train_steps, 7);
  EXPECT_EQ(config.launch.mpirun_args, (std::vector<std::string>{"--x"}));
  EXPECT_EQ(config.launch.env.at("A"), "run-a");
  EXPECT_EQ(config.launch.env.at("B"), "run-a");
  EXPECT_EQ(config.data.valid, "run-a/v");
}

TEST(ConfigCompose, UndefinedVariableWithoutDefaultIsRefusedNamingFileLineAndKey) {
  const ScopedEnv unset("LOOM_TEST_UNSET", nullptr);
  ConfigFolder folder;
  const std::string path = folder.write("exp.yaml", kModel + "data:\n  valid: /data/${LOOM_TEST_UNSET}/v\n");
  const std::string message = refusal(path);
  EXPECT_NE(message.find(path + ":8:10: data.valid: undefined environment variable LOOM_TEST_UNSET"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("${LOOM_TEST_UNSET:-value}"), std::string::npos) << message;
  // In a base file: that file is named.
  const std::string base = folder.write("base.yaml", kModel + "run:\n  name: ${LOOM_TEST_UNSET}\n");
  const std::string message2 = refusal(folder.write("top.yaml", "base: base.yaml\n"));
  EXPECT_NE(message2.find(base + ":8:9: run.name: undefined environment variable"), std::string::npos) << message2;
  // Malformed references.
  EXPECT_NE(refusal(folder.write("u.yaml", kModel + "run:\n  name: ${OPEN\n")).find("unclosed ${"), std::string::npos);
  EXPECT_NE(refusal(folder.write("n.yaml", kModel + "run:\n  name: ${1X}\n")).find("not an environment variable"),
            std::string::npos);
}

TEST(ConfigCompose, BasePathsInterpolateToo) {
  ConfigFolder folder;
  folder.write("models/m.yaml", kModel);
  const ScopedEnv dir("LOOM_TEST_MODELS", "models");
  const Config config = load_config(folder.write("exp.yaml", "base: ${LOOM_TEST_MODELS}/m.yaml\n"));
  EXPECT_EQ(config.model.hidden_size, 64);
}

TEST(ConfigCompose, RopeScalingReplacedInADerivedFileForgetsTheBaseOrigins) {
  ConfigFolder folder;
  folder.write("base.yaml", kModel + "  rope_scaling: {type: linear, factor: 2}\n");
  const std::string path = folder.write("exp.yaml", "base: base.yaml\nmodel:\n  rope_scaling: none\n");
  ConfigOrigins origins;
  const Config config = load_config(path, {}, &origins);
  EXPECT_EQ(config.model.rope_scaling.type, "none");
  EXPECT_EQ(origins.count("model.rope_scaling.factor"), 0u);
  EXPECT_NE(config_to_yaml(config, &origins).find("    factor: 1.0  # " + path + ":3:3"), std::string::npos)
      << config_to_yaml(config, &origins);
}

}  // namespace
}  // namespace loom
