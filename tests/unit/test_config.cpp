// Specification of the YAML config: what loads, what is refused, and what the
// refusal says (file:line:col or the --set argument, the key, the value).
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "config/config.h"
#include "tests/unit/source_dir.h"
#include "util/error.h"

namespace loom {
namespace {

// A valid model section, one key per line: line 1 is `model:`, line 7 the last key.
const std::string kModel =
    "model:\n"
    "  hidden_size: 64\n"
    "  intermediate_size: 128\n"
    "  num_layers: 4\n"
    "  num_heads: 4\n"
    "  num_kv_heads: 2\n"
    "  vocab_size: 256\n";

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  size_t at = text.find(from);
  if (at == std::string::npos) throw std::logic_error("test setup: '" + from + "' not in text");
  return text.replace(at, from.size(), to);
}

// The message of the BadInput that parsing throws, or "" when it does not throw.
std::string refusal(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(yaml, "bad.yaml", overrides);
  } catch (const BadInput& e) {
    return e.what();
  }
  return "";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// --- refusals: one row per kind of bad input -------------------------------------

struct BadCase {
  std::string name;  // test name: says what is wrong
  std::string yaml;
  std::vector<std::string> overrides;
  std::vector<std::string> must_say;  // the key, the location, and what was expected
};

std::ostream& operator<<(std::ostream& out, const BadCase& c) { return out << c.name; }

// One row per line reads as a table.
// clang-format off
std::vector<BadCase> bad_cases() {
  const std::string m = kModel;  // lines 1-7; sections appended start at line 8
  return {
      // Types: checked as each key is read.
      {"int_key_given_a_word", m + "run:\n  seed: abc\n", {}, {"bad.yaml:9:", "run.seed", "abc"}},
      {"int_key_given_a_fraction", m + "parallel:\n  tp: 1.5\n", {}, {"bad.yaml:9:", "parallel.tp", "1.5"}},
      {"int_key_given_a_bool", m + "batch:\n  micro_batch_size: true\n", {}, {"bad.yaml:9:", "batch.micro_batch_size"}},
      {"int_key_given_a_list", m + "schedule:\n  train_steps: [1, 2]\n", {},
       {"bad.yaml:9:", "schedule.train_steps", "a list"}},
      {"int_key_overflowing_64_bits", m + "schedule:\n  train_steps: 99999999999999999999\n", {},
       {"bad.yaml:9:", "schedule.train_steps", "out of range"}},
      {"int_key_given_nothing", m + "logging:\n  interval:\n", {},
       {"bad.yaml:9:", "logging.interval", "missing value"}},
      {"bool_key_given_yes", m + "checkpoint:\n  async: yes\n", {},
       {"bad.yaml:9:", "checkpoint.async", "true or false"}},
      {"float_key_given_a_word", m + "optimizer:\n  lr: fast\n", {}, {"bad.yaml:9:", "optimizer.lr", "fast"}},
      {"float_key_given_infinity", m + "optimizer:\n  eps: 1e999\n", {}, {"bad.yaml:9:", "optimizer.eps"}},
      {"string_key_given_a_map", m + "run:\n  name: {a: 1}\n", {}, {"bad.yaml:9:", "run.name", "a map"}},
      {"betas_of_wrong_length", m + "optimizer:\n  betas: [0.9]\n", {},
       {"bad.yaml:9:", "optimizer.betas", "2 numbers"}},
      {"betas_element_not_a_number", m + "optimizer:\n  betas: [0.9, high]\n", {},
       {"bad.yaml:9:", "optimizer.betas[1]"}},
      {"env_given_a_list", m + "launch:\n  env: [A]\n", {}, {"bad.yaml:9:", "launch.env", "a map"}},
      {"mpirun_args_given_a_map", m + "launch:\n  mpirun_args: {a: b}\n", {}, {"bad.yaml:9:", "launch.mpirun_args"}},
      {"data_source_with_unknown_key", m + "data:\n  train:\n    - {path: a, wieght: 2}\n", {},
       {"bad.yaml:10:", "data.train[0].wieght", "path or weight"}},
      {"data_source_without_path", m + "data:\n  train:\n    - {weight: 2}\n", {},
       {"bad.yaml:10:", "data.train[0].path"}},
      {"data_source_with_negative_weight", m + "data:\n  train:\n    - a\n    - {path: b, weight: -1}\n", {},
       {"bad.yaml:11:", "data.train[1].weight", "> 0"}},
      {"dp_zero", m + "parallel:\n  dp: 0\n", {}, {"bad.yaml:9:", "parallel.dp", ">= 1 or auto"}},

      // Structure.
      {"unknown_key_suggests_closest", m + "run:\n  sede: 1\n", {},
       {"bad.yaml:9:", "run.sede", "did you mean run.seed?"}},
      {"hf_spelling_suggests_loom_key", replaced(m, "num_heads", "num_attention_heads"), {},
       {"bad.yaml:5:", "model.num_attention_heads", "did you mean model.num_heads?"}},
      {"key_in_wrong_section_suggests_right_one", m + "  seq_len: 64\n", {},
       {"bad.yaml:8:", "model.seq_len", "did you mean data.seq_len?"}},
      {"unknown_key_lists_section_keys", m + "logging:\n  wandb_project: x\n", {},
       {"bad.yaml:9:", "logging.wandb_project", "known keys in logging: interval"}},
      {"unknown_section", "trainer:\n  steps: 1\n" + m, {}, {"bad.yaml:1:", "trainer", "unknown key"}},
      {"section_not_a_map", m + "optimizer: 0.1\n", {}, {"bad.yaml:8:", "optimizer", "must be a map"}},
      {"key_given_twice", m + "run:\n  seed: 1\n  seed: 2\n", {}, {"bad.yaml:10:", "run.seed", "twice", "line 9"}},
      {"alias_and_key_given_together", m + "  rope_scaling: {type: llama3, rope_type: llama3}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.rope_type", "twice"}},
      {"top_level_list", "- run\n- model\n", {}, {"bad.yaml:1:1", "(top level)", "a list"}},
      {"empty_file", "# nothing here\n", {}, {"bad.yaml", "empty config"}},
      {"yaml_syntax_error", m + "run: [1, 2\n", {}, {"bad.yaml:9:", "YAML syntax error"}},
      {"two_documents", m + "---\n" + m, {}, {"bad.yaml:8:", "more than one YAML document"}},
      // yaml-cpp 0.7's LoadAll would loop forever here.
      {"stray_comma_starting_a_line", "# comment\n, of 8 GPUs\n" + m, {}, {"bad.yaml:2:1", "YAML syntax error"}},

      // Allowed values.
      {"device_not_allowed", m + "run:\n  device: tpu\n", {}, {"bad.yaml:9:", "run.device", "tpu", "cpu, cuda, auto"}},
      {"architecture_not_allowed", m + "  architecture: gpt2\n", {},
       {"bad.yaml:8:", "model.architecture", "llama, qwen2"}},
      {"pp_schedule_not_allowed", m + "parallel:\n  pp_schedule: gpipe\n", {},
       {"bad.yaml:9:", "parallel.pp_schedule", "afab, 1f1b, interleaved"}},
      {"decay_not_allowed", m + "schedule:\n  decay: step\n", {},
       {"bad.yaml:9:", "schedule.decay", "cosine, linear, wsd, constant"}},
      {"precision_not_allowed", m + "precision:\n  compute: fp16\n", {},
       {"bad.yaml:9:", "precision.compute", "fp32, bf16"}},
      {"zero_stage_not_allowed", m + "parallel:\n  zero_stage: 4\n", {},
       {"bad.yaml:9:", "parallel.zero_stage", "0, 1, 2, 3"}},
      {"rope_type_not_allowed", m + "  rope_scaling: {type: mrope, factor: 4}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.type", "none, llama3, linear, yarn, dynamic, longrope"}},
      {"slurm_launcher_not_allowed", m + "launch:\n  slurm:\n    launcher: pbs\n", {},
       {"bad.yaml:10:", "launch.slurm.launcher", "srun, mpirun"}},

      // Model.
      {"required_key_missing", replaced(m, "  hidden_size: 64\n", ""), {},
       {"bad.yaml:1:", "model.hidden_size", "required"}},
      {"hidden_size_negative", replaced(m, "hidden_size: 64", "hidden_size: -64"), {},
       {"bad.yaml:2:", "model.hidden_size", "-64", "> 0"}},
      {"llama_hidden_size_not_a_multiple_of_heads_with_head_dim",
       replaced(replaced(m, "model:\n", "model:\n  head_dim: 10\n"), "hidden_size: 64", "hidden_size: 63"), {},
       {"bad.yaml:6:", "model.hidden_size (63) is not divisible by model.num_heads", "transformers refuses"}},
      {"phi3_with_yarn_scaling",
       replaced(m, "model:\n", "model:\n  architecture: phi3\n") + "  rope_scaling: {type: yarn, factor: 2}\n", {},
       {"bad.yaml:9:", "model.rope_scaling.type", "yarn for architecture phi3", "none or longrope"}},
      {"qwen2_with_mlp_bias", replaced(m, "model:\n", "model:\n  architecture: qwen2\n  mlp_bias: true\n"), {},
       {"bad.yaml:3:", "model.mlp_bias", "qwen2"}},
      {"qwen3_with_mlp_bias", replaced(m, "model:\n", "model:\n  architecture: qwen3\n  mlp_bias: true\n"), {},
       {"bad.yaml:3:", "model.mlp_bias", "qwen3"}},
      {"nope_layers_for_llama", m + "  nope_layers: [1]\n", {},
       {"bad.yaml:8:", "model.nope_layers", "architecture llama", "only smollm3"}},
      {"nope_layer_past_the_last", replaced(m, "model:\n", "model:\n  architecture: smollm3\n") + "  nope_layers: [9]\n", {},
       {"bad.yaml:9:", "model.nope_layers", "layer 9"}},
      {"sliding_window_for_olmo2", replaced(m, "model:\n", "model:\n  architecture: olmo2\n") + "  sliding_window: 8\n", {},
       {"bad.yaml:9:", "model.sliding_window", "olmo2", "mistral, qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3 or mixtral"}},
      {"layer_types_of_another_length",
       replaced(m, "model:\n", "model:\n  architecture: qwen2\n") + "  sliding_window: 8\n  layer_types: [sliding_attention]\n", {},
       {"bad.yaml:10:", "model.layer_types", "1 entries"}},
      {"longrope_factors_of_another_length",
       m + "  rope_scaling: {type: longrope, short_factor: [1, 1], long_factor: [1, 2]}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.short_factor", "head_dim / 2"}},
      {"gemma_at_random", replaced(m, "model:\n", "model:\n  architecture: gemma2\n"), {},
       {"bad.yaml:2:", "model.architecture", "not initialized at random", "model.init_from"}},
      {"geglu_for_llama", m + "  hidden_act: gelu\n", {},
       {"bad.yaml:8:", "model.hidden_act", "gelu", "silu"}},
      {"softcapping_for_llama", m + "  attn_logit_softcapping: 50\n", {},
       {"bad.yaml:8:", "model.attn_logit_softcapping", "only gemma2 and gemma3_text"}},
      {"kv_heads_not_dividing_heads", replaced(m, "num_kv_heads: 2", "num_kv_heads: 3"), {},
       {"bad.yaml:6:", "model.num_kv_heads (3) does not divide model.num_heads (4)"}},
      {"hidden_not_divisible_by_heads", replaced(m, "hidden_size: 64", "hidden_size: 66"), {},
       {"bad.yaml:5:", "model.hidden_size (66)", "model.num_heads (4)"}},
      {"rope_theta_zero", m + "  rope_theta: 0\n", {}, {"bad.yaml:8:", "model.rope_theta", "> 0"}},
      {"rms_norm_eps_negative", m + "  rms_norm_eps: -1e-5\n", {}, {"bad.yaml:8:", "model.rms_norm_eps", "> 0"}},
      {"init_std_zero", m + "  init_std: 0\n", {}, {"bad.yaml:8:", "model.init_std", "> 0"}},
      {"eos_token_outside_vocab", m + "  eos_token_id: 256\n", {},
       {"bad.yaml:8:", "model.eos_token_id", "vocab_size (256)"}},
      {"rope_llama3_factor_below_one", m + "  rope_scaling: {type: llama3, factor: 0.5}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.factor", ">= 1"}},
      {"rope_high_freq_not_above_low",
       m + "  rope_scaling: {type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 2}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.high_freq_factor (2)", "low_freq_factor (4)"}},
      {"rope_map_without_type", m + "  rope_scaling: {factor: 8}\n", {},
       {"bad.yaml:8:", "model.rope_scaling.type", "missing"}},

      // Mixtures of experts (Note [mixture of experts] in model/moe.h).
      {"experts_for_a_dense_family", m + "  num_experts: 4\n", {},
       {"bad.yaml:8:", "model.num_experts is set for architecture llama", "mixtral, qwen2_moe or qwen3_moe"}},
      {"balance_loss_for_a_dense_family", m + "  output_router_logits: true\n", {},
       {"bad.yaml:8:", "model.output_router_logits is set for architecture llama, which has no router",
        "mixtral, qwen2_moe or qwen3_moe"}},
      {"mixture_of_experts_without_experts", replaced(m, "model:\n", "model:\n  architecture: mixtral\n"), {},
       {"bad.yaml:2:", "model.num_experts is 0 for architecture mixtral"}},
      {"top_k_above_the_experts",
       replaced(m, "model:\n", "model:\n  architecture: qwen3_moe\n") +
           "  num_experts: 4\n  num_experts_per_tok: 8\n  moe_intermediate_size: 32\n", {},
       {"model.num_experts_per_tok is 8 for 4 experts", "between 1 and model.num_experts"}},
      {"qwen2_moe_without_a_shared_expert",
       replaced(m, "model:\n", "model:\n  architecture: qwen2_moe\n") +
           "  num_experts: 4\n  num_experts_per_tok: 2\n  moe_intermediate_size: 32\n", {},
       {"model.shared_expert_intermediate_size is 0 for qwen2_moe"}},

      // Expert parallelism (parallel/expert_parallel.h).
      {"ep_on_a_dense_model", m + "parallel:\n  dp: 2\n  ep: 2\nlaunch:\n  ranks: 2\n", {},
       {"parallel.ep needs a mixture of experts", "architecture mixtral, qwen2_moe or qwen3_moe"}},
      {"ep_not_dividing_the_experts",
       replaced(m, "model:\n", "model:\n  architecture: mixtral\n") +
           "  num_experts: 6\n  num_experts_per_tok: 2\nparallel:\n  dp: 4\n  ep: 4\nlaunch:\n  ranks: 4\n", {},
       {"parallel.ep (4) does not divide model.num_experts (6)"}},
      {"ep_not_dividing_dp",
       replaced(m, "model:\n", "model:\n  architecture: mixtral\n") +
           "  num_experts: 4\n  num_experts_per_tok: 2\nparallel:\n  dp: 3\n  ep: 2\nlaunch:\n  ranks: 3\n", {},
       {"parallel.ep (2) does not divide parallel.dp (3)"}},

      // Layout and training.
      {"tp_not_dividing_heads", m + "parallel:\n  tp: 3\n", {},
       {"bad.yaml:9:", "parallel.tp (3) does not divide model.num_heads (4)"}},
      {"tp_not_dividing_kv_heads", m + "parallel:\n  tp: 4\nlaunch:\n  ranks: 4\n", {},
       {"bad.yaml:9:", "parallel.tp (4) does not divide model.num_kv_heads (2)"}},
      {"pp_above_num_layers", m + "parallel:\n  pp: 8\n", {},
       {"bad.yaml:9:", "parallel.pp (8) > model.num_layers (4)"}},
      {"virtual_stages_without_interleaved", m + "parallel:\n  pp: 2\n  virtual_stages: 2\n", {},
       {"bad.yaml:10:", "parallel.virtual_stages", "interleaved"}},
      {"interleaved_without_virtual_stages", m + "parallel:\n  pp: 2\n  pp_schedule: interleaved\n", {},
       {"bad.yaml:10:", "parallel.pp_schedule", "virtual_stages >= 2"}},
      {"sequence_parallel_without_tp", m + "parallel:\n  sequence_parallel: true\n", {},
       {"bad.yaml:9:", "parallel.sequence_parallel", "parallel.tp > 1"}},
      {"cp_not_dividing_the_sequence", m + "parallel:\n  cp: 3\nlaunch:\n  ranks: 3\n", {},
       {"bad.yaml:9:", "parallel.cp", "sequence length (2048) is not divisible by 2 * parallel.cp (6)"}},
      {"dp_times_cp_not_ranks", m + "parallel:\n  dp: 2\n  cp: 2\nlaunch:\n  ranks: 2\n", {},
       {"parallel.dp (2) * parallel.cp (2) * parallel.tp (1) * parallel.pp (1) = 4 != launch.ranks (2)"}},
      {"global_batch_not_multiple_of_micro_times_dp",
       m + "parallel:\n  dp: 2\nbatch:\n  micro_batch_size: 2\n  global_batch_size: 6\nlaunch:\n  ranks: 2\n", {},
       {"bad.yaml:12:", "batch.global_batch_size (6)", "micro_batch_size (2) * parallel.dp (2) = 4"}},
      {"seq_len_above_max_seq_len", m + "data:\n  seq_len: 4096\n", {},
       {"bad.yaml:9:", "data.seq_len (4096) > model.max_seq_len (2048)"}},
      {"beta_not_below_one", m + "optimizer:\n  betas: [0.9, 1.0]\n", {}, {"bad.yaml:9:", "optimizer.betas", "[0, 1)"}},
      {"lr_negative", m + "optimizer:\n  lr: -0.1\n", {}, {"bad.yaml:9:", "optimizer.lr", "> 0"}},
      {"eps_zero", m + "optimizer:\n  eps: 0\n", {}, {"bad.yaml:9:", "optimizer.eps", "> 0"}},
      {"weight_decay_negative", m + "optimizer:\n  weight_decay: -0.1\n", {},
       {"bad.yaml:9:", "optimizer.weight_decay", ">= 0"}},
      {"clip_grad_norm_negative", m + "optimizer:\n  clip_grad_norm: -1\n", {},
       {"bad.yaml:9:", "optimizer.clip_grad_norm", ">= 0"}},
      {"warmup_longer_than_training", m + "schedule:\n  train_steps: 10\n  warmup_steps: 20\n", {},
       {"bad.yaml:10:", "schedule.warmup_steps (20) > schedule.train_steps (10)"}},
      {"min_lr_ratio_above_one", m + "schedule:\n  min_lr_ratio: 1.5\n", {},
       {"bad.yaml:9:", "schedule.min_lr_ratio", "[0, 1]"}},
      {"keep_last_zero", m + "checkpoint:\n  keep_last: 0\n", {}, {"bad.yaml:9:", "checkpoint.keep_last", ">= 1"}},
      {"checkpoint_resume_empty", m + "checkpoint:\n  resume: \"\"\n", {}, {"bad.yaml:9:", "checkpoint.resume"}},
      {"logging_interval_zero", m + "logging:\n  interval: 0\n", {}, {"bad.yaml:9:", "logging.interval", ">= 1"}},
      {"run_name_with_slash", m + "run:\n  name: a/b\n", {}, {"bad.yaml:9:", "run.name", "a/b"}},
      {"ranks_not_dp_times_tp_times_pp", m + "parallel:\n  dp: 2\n  tp: 2\nlaunch:\n  ranks: 8\n", {},
       {"bad.yaml:12:", "launch.ranks", "parallel.dp (2) * parallel.tp (2) * parallel.pp (1) = 4 != launch.ranks (8)"}},
      {"procs_per_node_times_nodes_not_ranks",
       m + "parallel:\n  dp: auto\nlaunch:\n  ranks: 4\n  nodes: 2\n  procs_per_node: 4\n", {},
       {"bad.yaml:13:", "launch.procs_per_node (4) * launch.nodes (2) = 8 != launch.ranks (4)"}},
      {"ranks_not_multiple_of_nodes", m + "parallel:\n  dp: auto\nlaunch:\n  ranks: 3\n  nodes: 2\n", {},
       {"bad.yaml:12:", "launch.ranks (3) is not a multiple of launch.nodes (2)"}},
      {"nodes_zero", m + "launch:\n  nodes: 0\n", {}, {"bad.yaml:9:", "launch.nodes", ">= 1"}},
      {"env_name_invalid", m + "launch:\n  env: {\"A-B\": 1}\n", {}, {"bad.yaml:9:", "launch.env", "A-B"}},

      // --set overrides name the argument instead of a line.
      {"override_unknown_key", m, {"model.num_head=4"}, {"--set model.num_head=4", "did you mean model.num_heads?"}},
      {"override_without_equals", m, {"model.num_heads"}, {"--set model.num_heads", "malformed", "key=value"}},
      {"override_wrong_type", m, {"run.seed=abc"}, {"--set run.seed=abc: run.seed", "abc"}},
      {"override_invalid_yaml", m, {"optimizer.betas=[0.9,"},
       {"--set optimizer.betas=[0.9,", "optimizer.betas", "not valid YAML"}},
      {"override_breaking_the_layout", m, {"parallel.tp=2"},
       {"--set parallel.tp=2: parallel.tp", "!= launch.ranks (1)"}},
      {"override_section_not_a_map", m, {"launch=4"}, {"--set launch=4: launch", "must be a map"}},
      {"override_out_of_range", m, {"run.name=ok", "optimizer.lr=0"}, {"--set optimizer.lr=0: optimizer.lr", "> 0"}},
  };
}

// clang-format on

class ConfigRefuses : public testing::TestWithParam<BadCase> {};

TEST_P(ConfigRefuses, WithMessageNamingKeyLocationAndExpectation) {
  const BadCase& c = GetParam();
  std::string message = refusal(c.yaml, c.overrides);
  ASSERT_FALSE(message.empty()) << "accepted:\n" << c.yaml;
  for (const std::string& part : c.must_say)
    EXPECT_NE(message.find(part), std::string::npos) << "missing '" << part << "' in: " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "message is not one line: " << message;
}

INSTANTIATE_TEST_SUITE_P(BadInput, ConfigRefuses, testing::ValuesIn(bad_cases()),
                         [](const testing::TestParamInfo<BadCase>& info) { return info.param.name; });

TEST(ConfigErrors, MessageHasTheDocumentedShape) {
  // <file>:<line>:<col>: <key>: <what is wrong> (got <value>; expected <expectation>)
  EXPECT_EQ(refusal(kModel + "run:\n  device: tpu\n"),
            "bad.yaml:9:3: run.device: not an allowed value (got tpu; expected one of cpu, cuda, auto)");
  EXPECT_EQ(refusal(kModel + "run:\n  seed: abc\n"),
            "bad.yaml:9:9: run.seed: not a non-negative integer (got abc; expected a non-negative integer)");
}

TEST(ConfigErrors, MissingFileNamesPathAndReason) {
  try {
    load_config("/nonexistent/loom.yaml");
    FAIL() << "no exception";
  } catch (const BadInput& e) {
    EXPECT_STREQ(e.what(), "cannot read config file '/nonexistent/loom.yaml': No such file or directory");
  }
}

TEST(ConfigErrors, FileErrorsNameThePath) {
  std::string path = testing::TempDir() + "loom_bad_config.yaml";
  std::ofstream(path) << kModel << "parallel:\n  tp: 3\n";
  try {
    load_config(path);
    FAIL() << "no exception";
  } catch (const BadInput& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path + ":9:3: parallel.tp", 0), 0u) << e.what();
  }
  std::filesystem::remove(path);
}

// --- what loads -------------------------------------------------------------------

TEST(ConfigLoads, DefaultsFillKeysNotGiven) {
  Config c = parse_config(kModel, "mini.yaml");
  EXPECT_EQ(c.run.name, "loom");
  EXPECT_EQ(c.run.output_dir, "runs");
  EXPECT_EQ(c.run.seed, 1234u);
  EXPECT_EQ(c.run.device, "cpu");
  EXPECT_EQ(c.model.hidden_size, 64);
  EXPECT_EQ(c.model.kv_heads(), 2);
  EXPECT_EQ(c.model.head_size(), 16);
  EXPECT_EQ(c.model.max_seq_len, 2048);
  EXPECT_EQ(c.model.rope_scaling.type, "none");
  EXPECT_EQ(c.parallel.dp, 1);
  EXPECT_EQ(c.parallel.pp_schedule, "1f1b");
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.9, 0.95}));
  EXPECT_EQ(c.schedule.decay, "cosine");
  EXPECT_EQ(c.checkpoint.resume, "auto");
  EXPECT_TRUE(c.checkpoint.export_hf_at_end);
  EXPECT_EQ(c.launch.ranks, 1);
  EXPECT_EQ(c.launch.slurm.launcher, "srun");
  EXPECT_EQ(c.source_path, "");
}

TEST(ConfigLoads, OverridesWinOverTheFileAndLastOverrideWins) {
  Config c = parse_config(kModel + "run:\n  name: from-file\n  seed: 7\n", "x.yaml",
                          {"run.name=first", "run.name=second", "optimizer.lr=1e-3"});
  EXPECT_EQ(c.run.name, "second");
  EXPECT_EQ(c.run.seed, 7u);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1e-3);
}

TEST(ConfigLoads, OverrideValuesAreYaml) {
  Config c = parse_config(kModel, "x.yaml",
                          {"optimizer.betas=[0.8,0.99]", "data.train=[a, {path: b, weight: 3}]",
                           "launch.mpirun_args=[--oversubscribe, --bind-to, none]", "launch.env.OMP_NUM_THREADS=2",
                           "model.rope_scaling={type: linear, factor: 2}", "checkpoint.resume=none", "data.valid="});
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.8, 0.99}));
  ASSERT_EQ(c.data.train.size(), 2u);
  EXPECT_EQ(c.data.train[0].path, "a");
  EXPECT_DOUBLE_EQ(c.data.train[0].weight, 1.0);
  EXPECT_EQ(c.data.train[1].path, "b");
  EXPECT_DOUBLE_EQ(c.data.train[1].weight, 3.0);
  EXPECT_EQ(c.launch.mpirun_args, (std::vector<std::string>{"--oversubscribe", "--bind-to", "none"}));
  EXPECT_EQ(c.launch.env.at("OMP_NUM_THREADS"), "2");
  EXPECT_EQ(c.model.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 2.0);
  EXPECT_EQ(c.checkpoint.resume, "none");
  EXPECT_EQ(c.data.valid, "");
}

TEST(ConfigLoads, DpAutoIsStoredAsZeroAndFitsAnyMultipleOfTpTimesPp) {
  Config c = parse_config(kModel + "parallel:\n  dp: auto\n  tp: 2\nlaunch:\n  ranks: 6\n", "x.yaml");
  EXPECT_EQ(c.parallel.dp, 0);
  EXPECT_EQ(c.parallel.tp, 2);
  EXPECT_EQ(parse_config(kModel, "x.yaml", {"parallel.dp=auto", "launch.ranks=8"}).parallel.dp, 0);
}

TEST(ConfigLoads, RopeScalingMapIsParsedWithEitherSpellingOfType) {
  const std::string rope =
      "  rope_scaling:\n"
      "    rope_type: llama3\n"
      "    factor: 32\n"
      "    low_freq_factor: 1\n"
      "    high_freq_factor: 4\n"
      "    original_max_position_embeddings: 8192\n";
  Config c = parse_config(kModel + rope, "x.yaml");
  EXPECT_EQ(c.model.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 32.0);
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.model.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(parse_config(kModel + "  rope_scaling: {type: llama3, factor: 8}\n", "x.yaml").model.rope_scaling.factor,
            8.0);
}

TEST(ConfigLoads, RopeScalingNullOrNoneResetsToNoScaling) {
  const std::string file = kModel + "  rope_scaling: {type: llama3, factor: 8}\n";
  EXPECT_EQ(parse_config(file, "x.yaml", {"model.rope_scaling=null"}).model.rope_scaling.type, "none");
  Config c = parse_config(file, "x.yaml", {"model.rope_scaling=none"});
  EXPECT_EQ(c.model.rope_scaling.type, "none");
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 1.0);
  EXPECT_EQ(parse_config(kModel + "  rope_scaling:\n", "x.yaml").model.rope_scaling.type, "none");
}

TEST(ConfigLoads, DataTrainAcceptsPlainPathsAndWeightedMaps) {
  Config c = parse_config(kModel + "data:\n  train:\n    - web\n    - {path: code, weight: 0.25}\n", "x.yaml");
  ASSERT_EQ(c.data.train.size(), 2u);
  EXPECT_EQ(c.data.train[0].path, "web");
  EXPECT_DOUBLE_EQ(c.data.train[0].weight, 1.0);
  EXPECT_DOUBLE_EQ(c.data.train[1].weight, 0.25);
  Config single = parse_config(kModel + "data:\n  train: web\n", "x.yaml");
  ASSERT_EQ(single.data.train.size(), 1u);
  EXPECT_EQ(single.data.train[0].path, "web");
}

TEST(ConfigLoads, FloatKeysAcceptIntegersAndIntKeysAcceptSigns) {
  Config c = parse_config(kModel + "  rope_theta: 500000\n  bos_token_id: -1\n", "x.yaml", {"optimizer.lr=1"});
  EXPECT_DOUBLE_EQ(c.model.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1.0);
  EXPECT_EQ(c.model.bos_token_id, -1);
}

TEST(ConfigLoads, EmptySectionKeepsDefaults) {
  Config c = parse_config(kModel + "checkpoint:\n", "x.yaml");
  EXPECT_EQ(c.checkpoint.keep_last, 2);
}

TEST(ConfigLoads, InitFromMakesTheModelShapeOptional) {
  Config c = parse_config("model:\n  init_from: hub/SmolLM2-135M\n", "x.yaml");
  EXPECT_EQ(c.model.init_from, "hub/SmolLM2-135M");
  EXPECT_EQ(c.model.hidden_size, 0);
  // What is given is still checked.
  EXPECT_NE(refusal("model:\n  init_from: hub/x\n  hidden_size: 0\n").find("bad.yaml:3:3: model.hidden_size"),
            std::string::npos);
}

TEST(ConfigLoads, LoadConfigRecordsTheSourcePath) {
  std::string path = loom_source_dir() + "/configs/tiny.yaml";
  EXPECT_EQ(load_config(path).source_path, path);
}

TEST(ConfigLoads, EveryBundledConfigLoads) {
  std::vector<std::string> paths;
  for (const auto& entry : std::filesystem::directory_iterator(loom_source_dir() + "/configs")) {
    if (entry.path().extension() == ".yaml") paths.push_back(entry.path().string());
  }
  EXPECT_GE(paths.size(), 6u);
  for (const std::string& path : paths) {
    try {
      load_config(path);
    } catch (const BadInput& e) {
      ADD_FAILURE() << e.what();
    }
  }
}

TEST(ConfigLoads, ExpertParallelismComposesWithEveryZeroStage) {
  const std::string yaml = replaced(kModel, "model:\n", "model:\n  architecture: mixtral\n") +
                           "  num_experts: 4\n  num_experts_per_tok: 2\nparallel:\n  dp: 4\n  ep: 2\n"
                           "launch:\n  ranks: 4\n";
  for (const char* stage : {"1", "2", "3"}) {
    EXPECT_EQ(refusal(yaml, {std::string("parallel.zero_stage=") + stage}), "") << "zero_stage " << stage;
  }
}

TEST(ConfigLoads, TinyRunsOn1_2_4_8RanksByChangingOnlyParallelKeys) {
  const std::string path = loom_source_dir() + "/configs/tiny.yaml";
  const std::vector<std::vector<std::string>> layouts = {
      {"launch.ranks=1"},
      {"launch.ranks=2"},
      {"launch.ranks=2", "parallel.tp=2"},
      {"launch.ranks=2", "parallel.pp=2"},
      {"launch.ranks=4", "parallel.tp=2", "parallel.pp=2"},
      {"launch.ranks=4", "parallel.tp=4", "parallel.sequence_parallel=true"},
      {"launch.ranks=8"},
      {"launch.ranks=8", "parallel.tp=2", "parallel.pp=2"},
      {"launch.ranks=8", "parallel.tp=4", "parallel.pp=2"},
      {"launch.ranks=8", "parallel.pp=8"},
      {"launch.ranks=4", "parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=2"},
      {"launch.ranks=4", "parallel.dp=4", "parallel.zero_stage=1"},
  };
  for (const auto& layout : layouts) {
    try {
      Config c = load_config(path, layout);
      EXPECT_GE(c.batch.global_batch_size, 8);
    } catch (const BadInput& e) {
      ADD_FAILURE() << e.what();
    }
  }
  Config tiny = load_config(path);
  EXPECT_GE(tiny.model.num_layers, 8);
  EXPECT_EQ(tiny.model.num_heads % 4, 0);
  EXPECT_EQ(tiny.model.kv_heads() % 4, 0);
  EXPECT_EQ(tiny.model.intermediate_size % 8, 0);
  EXPECT_EQ(tiny.model.vocab_size % 8, 0);
  EXPECT_EQ(tiny.run.name, "tiny");
}

// --- config_to_yaml -------------------------------------------------------------

TEST(ConfigToYaml, RoundTripsToAnEqualConfig) {
  Config original =
      load_config(loom_source_dir() + "/configs/llama3-1b.yaml",
                  {"run.name=123", "data.valid='null'", "launch.env={A: 'true', B: ''}",
                   "launch.mpirun_args=[-x, 'a b', '#c']", "model.init_std=0.041666666666666664", "optimizer.lr=3e-4",
                   "model.rms_norm_eps=1e-6", "run.seed=18446744073709551615", "launch.slurm.partition='null'"});
  std::string yaml = config_to_yaml(original);
  Config again = parse_config(yaml, "resolved.yaml");
  EXPECT_EQ(config_to_yaml(again), yaml);
  EXPECT_EQ(again.run.name, "123");
  EXPECT_EQ(again.run.seed, 18446744073709551615u);
  EXPECT_EQ(again.data.valid, "null");
  EXPECT_EQ(again.launch.env, original.launch.env);
  EXPECT_EQ(again.launch.mpirun_args, original.launch.mpirun_args);
  EXPECT_EQ(again.launch.slurm.partition, "null");
  EXPECT_EQ(again.model.init_std, original.model.init_std);
  EXPECT_EQ(again.optimizer.lr, original.optimizer.lr);
  EXPECT_EQ(again.model.rms_norm_eps, original.model.rms_norm_eps);
  EXPECT_EQ(again.model.rope_scaling.type, "llama3");
  EXPECT_EQ(again.model.rope_scaling.factor, 32.0);
  ASSERT_EQ(again.data.train.size(), original.data.train.size());
  EXPECT_EQ(again.data.train[1].path, original.data.train[1].path);
  EXPECT_EQ(again.data.train[1].weight, original.data.train[1].weight);
  EXPECT_EQ(again.parallel.dp, 0);
}

TEST(ConfigToYaml, WritesEveryKey) {
  Config c = parse_config(kModel, "x.yaml");
  std::string yaml = config_to_yaml(c);
  for (const ConfigKeyInfo& info : config_keys()) {
    std::string leaf = info.key.substr(info.key.rfind('.') + 1);
    EXPECT_NE(yaml.find(leaf + ":"), std::string::npos) << info.key;
  }
}

// --- validate_model_config ------------------------------------------------------

TEST(ValidateModelConfig, AcceptsAValidModelAndNamesTheSourceOtherwise) {
  ModelConfig model = parse_config(kModel, "x.yaml").model;
  EXPECT_NO_THROW(validate_model_config(model, "hub/config.json"));
  model.num_kv_heads = 3;
  try {
    validate_model_config(model, "hub/config.json");
    FAIL() << "no exception";
  } catch (const BadInput& e) {
    EXPECT_EQ(std::string(e.what()).rfind("hub/config.json: model.num_kv_heads", 0), 0u) << e.what();
  }
  model.num_kv_heads = 2;
  model.vocab_size = 0;
  EXPECT_THROW(validate_model_config(model, "hub/config.json"), BadInput);
}

// --- the key table ---------------------------------------------------------------

TEST(ConfigKeys, ContainEveryContractKeyWithDocAndType) {
  const std::vector<std::string> contract = {"run.name",
                                             "run.output_dir",
                                             "run.seed",
                                             "run.device",
                                             "model.hidden_size",
                                             "model.intermediate_size",
                                             "model.num_layers",
                                             "model.num_heads",
                                             "model.num_kv_heads",
                                             "model.head_dim",
                                             "model.vocab_size",
                                             "model.max_seq_len",
                                             "model.rope_theta",
                                             "model.rope_scaling",
                                             "model.rms_norm_eps",
                                             "model.tie_embeddings",
                                             "model.attention_bias",
                                             "model.init_std",
                                             "model.init_from",
                                             "parallel.dp",
                                             "parallel.tp",
                                             "parallel.pp",
                                             "parallel.sequence_parallel",
                                             "parallel.pp_schedule",
                                             "parallel.virtual_stages",
                                             "parallel.zero_stage",
                                             "parallel.bucket_mb",
                                             "data.train",
                                             "data.valid",
                                             "data.seq_len",
                                             "data.tokenizer",
                                             "batch.micro_batch_size",
                                             "batch.global_batch_size",
                                             "optimizer.lr",
                                             "optimizer.betas",
                                             "optimizer.eps",
                                             "optimizer.weight_decay",
                                             "optimizer.clip_grad_norm",
                                             "schedule.train_steps",
                                             "schedule.warmup_steps",
                                             "schedule.decay",
                                             "schedule.min_lr_ratio",
                                             "precision.compute",
                                             "precision.params",
                                             "checkpoint.interval",
                                             "checkpoint.keep_last",
                                             "checkpoint.resume",
                                             "checkpoint.async",
                                             "checkpoint.export_hf_at_end",
                                             "logging.interval",
                                             "launch.ranks",
                                             "launch.nodes",
                                             "launch.procs_per_node",
                                             "launch.gpus_per_node",
                                             "launch.mpirun_args",
                                             "launch.env",
                                             "launch.slurm.partition",
                                             "launch.slurm.account",
                                             "launch.slurm.time",
                                             "launch.slurm.launcher",
                                             "launch.slurm.extra_args"};
  std::set<std::string> keys;
  for (const ConfigKeyInfo& info : config_keys()) {
    EXPECT_TRUE(keys.insert(info.key).second) << "listed twice: " << info.key;
    EXPECT_FALSE(info.doc.empty()) << info.key;
    EXPECT_FALSE(info.default_value.empty()) << info.key;
    static const std::set<std::string> types = {"int", "float", "bool", "string", "list", "map"};
    EXPECT_TRUE(types.count(info.type)) << info.key << ": " << info.type;
  }
  for (const std::string& key : contract) EXPECT_TRUE(keys.count(key)) << "missing contract key " << key;
  EXPECT_EQ(std::find_if(config_keys().begin(), config_keys().end(),
                         [](const ConfigKeyInfo& i) { return i.key == "model.hidden_size"; })
                ->default_value,
            "required");
}

TEST(ConfigKeys, EveryKeyIsDocumentedInConfigurationMd) {
  std::string docs = read_file(loom_source_dir() + "/docs/configuration.md");
  ASSERT_FALSE(docs.empty()) << "cannot read docs/configuration.md";
  for (const ConfigKeyInfo& info : config_keys())
    EXPECT_NE(docs.find("`" + info.key + "`"), std::string::npos) << "docs/configuration.md lacks `" << info.key << "`";
}

}  // namespace
}  // namespace loom
