// loom plan's mixtures of experts (Note [plan: mixture of experts] in
// plan/moe_model.h): total parameters for memory, checkpoints and optimizer
// state, active parameters for FLOPs, on a tiny Mixtral and Qwen2-MoE by hand.
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

#include "launch/preflight.h"
#include "plan/planner.h"
#include "plan/moe_model.h"
#include "model/layers.h"
#include "model/llama.h"
#include "tests/unit/plan_test_support.h"

namespace loom::plan {
namespace {

using test_support::numel_of;

// hidden 64, 4 heads of 16 (2 kv heads), 4 layers, vocabulary 256; 4
// experts, top-2. Mixtral's experts are intermediate_size (96) wide; Qwen2-MoE's
// moe_intermediate_size (32) with a shared expert of 48, every second layer
// sparse (decoder_sparse_step 2: layers 1 and 3).
ModelConfig tiny_moe(const std::string& architecture) {
  ModelConfig m;
  m.architecture = architecture;
  m.hidden_size = 64;
  m.intermediate_size = 96;
  m.num_layers = 4;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 256;
  m.max_seq_len = 64;
  m.num_experts = 4;
  m.num_experts_per_tok = 2;
  if (architecture == "qwen2_moe") {
    m.moe_intermediate_size = 32;
    m.shared_expert_intermediate_size = 48;
    m.decoder_sparse_step = 2;
  }
  return m;
}

Problem problem_of(const ModelConfig& model, int64_t gpus) {
  Problem problem;
  problem.model = model;
  problem.seq_len = 64;
  problem.global_batch = 8;
  problem.gpus = gpus;
  problem.gpus_per_node = gpus;
  return problem;
}

// By hand: attention q 64x64, k and v 32x64 each, o 64x64 = 12288 (qwen2: +
// q, k, v biases 64 + 32 + 32 = 128); two norms 128; embedding and head
// 256 x 64 each = 32768; final norm 64.
constexpr int64_t kAttention = 12288, kNorms = 128, kEmbeddings = 32768, kFinalNorm = 64;
// Mixtral, every layer sparse: router 4 x 64 = 256, four experts of 3 x 64 x 96 = 18432.
constexpr int64_t kMixtralBlock = 256 + 4 * 18432, kMixtralActiveBlock = 256 + 2 * 18432;
// Qwen2-MoE: dense layers 3 x 64 x 96 = 18432; sparse ones router 256, four
// experts of 3 x 64 x 32 = 6144, shared expert 3 x 64 x 48 = 9216 and its gate 64.
constexpr int64_t kQwenDense = 18432, kQwenBlock = 256 + 4 * 6144 + 9216 + 64,
                  kQwenActiveBlock = 256 + 2 * 6144 + 9216 + 64;

TEST(PlanMoe, total_parameters_by_hand_equal_the_models_tensors) {
  const int64_t mixtral = kEmbeddings + kFinalNorm + 4 * (kAttention + kNorms + kMixtralBlock);
  const int64_t qwen = kEmbeddings + kFinalNorm + 4 * (kAttention + 128 + kNorms) + 2 * kQwenDense + 2 * kQwenBlock;
  for (const auto& [architecture, total] : {std::pair<std::string, int64_t>{"mixtral", mixtral}, {"qwen2_moe", qwen}}) {
    const ModelConfig model = tiny_moe(architecture);
    EXPECT_EQ(sparse_layers_of(model, StageSpec{}), architecture == "mixtral" ? 4 : 2);
    LocalLayerFactory factory;
    LlamaForCausalLM built(model, factory);
    EXPECT_EQ(numel_of(built), total) << architecture;
    EXPECT_EQ(count_rank_parameters(model, 1, {StageSpec{}}, false).total, total) << architecture;
    EXPECT_EQ(count_parameters(model), total);
    // Memory holds every expert: a rank's parameters, gradients and AdamW
    // moments are the total's, 16 bytes each in fp32.
    const RankMemory rank = estimate_memory(problem_of(model, 1), Layout{}).ranks[0];
    EXPECT_EQ(rank.parameters, total);
    EXPECT_DOUBLE_EQ(rank.params + rank.grads + rank.optimizer, 16.0 * static_cast<double>(total));
    // Checkpoints write all of them: 12 bytes a parameter and the step.
    EXPECT_DOUBLE_EQ(estimate_checkpoint(problem_of(model, 1), Layout{}, 0, 0).total_bytes,
                     12.0 * static_cast<double>(total) + kOptimizerStepBytes);
  }
}

TEST(PlanMoe, active_parameters_count_the_top_k_experts_shared_expert_and_router) {
  // N of 6N: non-embedding parameters with two of the four experts.
  EXPECT_EQ(count_active_non_embedding_parameters(tiny_moe("mixtral")),
            kFinalNorm + 4 * (kAttention + kNorms + kMixtralActiveBlock));
  EXPECT_EQ(count_active_non_embedding_parameters(tiny_moe("qwen2_moe")),
            kFinalNorm + 4 * (kAttention + 128 + kNorms) + 2 * kQwenDense + 2 * kQwenActiveBlock);
  EXPECT_DOUBLE_EQ(flops_per_token(tiny_moe("mixtral"), 64),
                   6.0 * (kFinalNorm + 4 * (kAttention + kNorms + kMixtralActiveBlock)) + 4 * 12.0 * 64 * 64);
  // A sparse block's forward matmuls per token: 2 FLOPs a weight of the router and of k experts.
  EXPECT_DOUBLE_EQ(sparse_block_matmul_flops_per_token(tiny_moe("mixtral"), 1), 2.0 * kMixtralActiveBlock);
  EXPECT_DOUBLE_EQ(sparse_block_matmul_flops_per_token(tiny_moe("qwen2_moe"), 1), 2.0 * kQwenActiveBlock);
  EXPECT_DOUBLE_EQ(sparse_block_matmul_flops_per_token(tiny_moe("mixtral"), 2), 2.0 * (256 + 2 * 18432 / 2));
}

TEST(PlanMoe, compute_time_follows_the_active_parameters) {
  // Only matmuls cost (1e10 FLOP/s): the Mixtral's step against the dense
  // model of the same shape differs by its sparse blocks' active matmuls
  // less the dense MLPs', forward once and backward twice, 8 micro-batches
  // of 64 tokens through 4 layers.
  MachineProfile machine;
  machine.name = "matmuls";
  machine.peak_flops_fp32 = machine.matmul_flops_fp32 = machine.attention_flops_fp32 = 1e10;
  machine.memory_bytes_per_s = machine.stream_bytes_per_s = 1e30;
  machine.intra_node = machine.inter_node = {1e30, 0};
  const ModelConfig mixtral = tiny_moe("mixtral");
  ModelConfig dense = mixtral;
  dense.architecture = "llama";
  dense.num_experts = dense.num_experts_per_tok = 0;
  const double sparse_s = estimate_step_time(problem_of(mixtral, 1), Layout{}, machine).compute;
  const double dense_s = estimate_step_time(problem_of(dense, 1), Layout{}, machine).compute;
  const double per_token = 2.0 * (kMixtralActiveBlock - 18432);
  EXPECT_NEAR(sparse_s - dense_s, 8 * 4 * 3 * 64 * per_token / 1e10, 1e-12);
  // MFU: the active parameters' 6 N + 12 L H S over the world's peak.
  const StepTime t = estimate_step_time(problem_of(mixtral, 1), Layout{}, machine);
  EXPECT_NEAR(t.mfu, t.tokens_per_s * flops_per_token(mixtral, 64) / 1e10, 1e-12);
}

TEST(PlanMoe, a_sparse_layer_saves_its_experts_rows_by_hand) {
  // Per token, fp32, tp 1, in place of a dense MLP's 4 x 96 floats: logits
  // and probabilities over 4 experts, 2 weights twice, 3 int64 index
  // vectors of 2, and for each of the 2 experts the gathered row and the
  // output (64 each) and gate, silu, up and product (96 each).
  const ModelConfig mixtral = tiny_moe("mixtral");
  const double per_token = 4.0 * 4 + 4.0 * 4 + 4.0 * 4 + 8.0 * 6 + 4.0 * 2 * (2 * 64 + 4 * 96);
  EXPECT_DOUBLE_EQ(sparse_block_saved_bytes_per_token(mixtral, 1, false), per_token);
  EXPECT_DOUBLE_EQ(sparse_layer_activation_bytes(mixtral, 64, 1, false, false, Recompute::kNone),
                   layer_activation_bytes(mixtral, 64, 1, false, false, Recompute::kNone) + 64 * (per_token - 4.0 * 4 * 96));
  // Qwen2-MoE adds the shared expert (4 x 48), its output (64) and gate (1).
  const ModelConfig qwen = tiny_moe("qwen2_moe");
  EXPECT_DOUBLE_EQ(sparse_block_saved_bytes_per_token(qwen, 1, false),
                   4.0 * 4 + 4.0 * 4 + 4.0 * 4 + 8.0 * 6 + 4.0 * 2 * (2 * 64 + 4 * 32) + 4.0 * (4 * 48 + 64 + 1));
  // Full recomputation keeps the layer's input either way.
  EXPECT_DOUBLE_EQ(sparse_layer_activation_bytes(mixtral, 64, 1, false, false, Recompute::kFull), 4.0 * 64 * 64);
  // The walk saves each layer's share: Qwen2-MoE's two sparse and two dense layers.
  const RankMemory rank = estimate_memory(problem_of(qwen, 1), Layout{1, 1, 1, "1f1b", 1, 0, 8, Recompute::kNone, false}).ranks[0];
  const double tokens = 8 * 64;
  const double layers = 2 * layer_activation_bytes(qwen, 512, 1, false, false, Recompute::kNone) +
                        2 * sparse_layer_activation_bytes(qwen, 512, 1, false, false, Recompute::kNone);
  const double head = 3 * 4.0 * tokens * 64 + 4.0 * tokens * 256;  // final norm and log-softmax
  if (rank.peak_phase.rfind("backward of the loss", 0) == 0) {
    EXPECT_DOUBLE_EQ(rank.activations, layers + head);
  } else {
    EXPECT_EQ(rank.peak_phase.rfind("backward of a layer", 0), 0u) << rank.peak_phase;
    EXPECT_DOUBLE_EQ(rank.activations, layers);
  }
}

TEST(PlanMoe, checkpoint_lists_name_every_expert_as_loom_builds_them) {
  for (const char* architecture : {"mixtral", "qwen2_moe"}) {
    const ModelConfig model = tiny_moe(architecture);
    LocalLayerFactory factory;
    LlamaForCausalLM llama(model, factory);
    const std::vector<RankParameter> listed = rank_parameters(model, 1, {StageSpec{}}, false);
    const auto built = llama.named_parameters();
    ASSERT_EQ(listed.size(), built.size()) << architecture;
    for (size_t i = 0; i < listed.size(); ++i) {
      EXPECT_EQ(listed[i].name, built[i].key());
      EXPECT_EQ(listed[i].elements, built[i].value().numel()) << listed[i].name;
    }
  }
  // Under tp 2 the experts are cut like an MLP, the router is whole.
  for (const RankParameter& p : rank_parameters(tiny_moe("mixtral"), 2, {StageSpec{}}, false)) {
    if (p.name == "model.layers.0.block_sparse_moe.gate.weight") {
      EXPECT_TRUE(p.whole_on_every_tp_rank);
      EXPECT_EQ(p.elements, 256);
    }
    if (p.name == "model.layers.0.block_sparse_moe.experts.3.w2.weight") {
      EXPECT_FALSE(p.whole_on_every_tp_rank);
      EXPECT_EQ(p.elements, 64 * 48);
    }
  }
  // Every element once, over dp x tp x pp.
  const Problem problem = problem_of(tiny_moe("qwen2_moe"), 8);
  const CheckpointEstimate c = estimate_checkpoint(problem, Layout{2, 2, 2, "1f1b", 1, 0, 1, Recompute::kNone, false}, 0, 0);
  EXPECT_DOUBLE_EQ(c.total_bytes, checkpoint_tensor_bytes(problem.model));
}

TEST(PlanMoe, sequence_parallelism_is_proposed_for_experts) {
  const Problem problem = problem_of(tiny_moe("mixtral"), 4);
  EXPECT_EQ(layout_problem(problem, Layout{1, 2, 2, "1f1b", 1, 0, 1, Recompute::kNone, true}), "");
  const std::vector<Layout> layouts = enumerate_layouts(problem);
  EXPECT_TRUE(std::any_of(layouts.begin(), layouts.end(), [](const Layout& l) { return l.sequence_parallel; }));
}

// Note [experts under tensor parallelism] (model/moe.h): a sparse block
// communicates over tp once in and once out whatever its number of experts,
// plus the router's k weights per token (and the chosen experts under
// sequence parallelism).
TEST(PlanMoe, tensor_parallel_time_does_not_grow_with_the_experts) {
  MachineProfile slow;
  slow.name = "slow";
  slow.peak_flops_fp32 = slow.matmul_flops_fp32 = slow.attention_flops_fp32 = 1e10;
  slow.memory_bytes_per_s = slow.stream_bytes_per_s = 1e30;
  slow.intra_node = slow.inter_node = {1e6, 1e-3};
  ModelConfig many = tiny_moe("mixtral");
  many.num_experts = 16;
  for (const bool sp : {false, true}) {
    const Layout layout{1, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, sp};
    const double four = estimate_step_time(problem_of(tiny_moe("mixtral"), 2), layout, slow).tp_comm;
    const double sixteen = estimate_step_time(problem_of(many, 2), layout, slow).tp_comm;
    EXPECT_GT(four, 0);
    EXPECT_DOUBLE_EQ(four, sixteen) << "sequence_parallel " << sp;
  }
  // Without sequence parallelism, over the dense model's per layer: the
  // weights' all-reduce in backward, 2 x 64 tokens x 4 bytes over 2 ranks,
  // per layer (4, all sparse) and micro-batch (8 sequences of 64 tokens, mb 1).
  ModelConfig dense = tiny_moe("mixtral");
  dense.architecture = "llama";
  dense.num_experts = dense.num_experts_per_tok = 0;
  const Layout tp2{1, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, false};
  const double extra = 2 * 1e-3 + 2 * 0.5 * (2 * 64 * 4) / 1e6;
  EXPECT_NEAR(estimate_step_time(problem_of(tiny_moe("mixtral"), 2), tp2, slow).tp_comm -
                  estimate_step_time(problem_of(dense, 2), tp2, slow).tp_comm,
              8 * 4 * extra, 1e-9);
}

TEST(PlanMoe, expert_parallelism_holds_its_share_of_the_experts_and_exchanges_the_rows) {
  const Layout layout = parse_layout("dp=4,ep=2,mb=2", "--layout");
  EXPECT_EQ(layout.ep, 2);
  EXPECT_EQ(layout.world(), 4);  // carved out of dp
  EXPECT_EQ(layout.describe(), "dp 4 ep 2 tp 1 pp 1 mb 2");
  const std::vector<std::string> lines = layout.config_lines();
  EXPECT_NE(std::find(lines.begin(), lines.end(), "parallel.ep: 2"), lines.end());
  Config config;
  config.model = tiny_moe("mixtral");
  layout.apply_to(config);
  EXPECT_EQ(config.parallel.ep, 2);
  EXPECT_EQ(Layout::of(config, 4), layout);

  // What config refuses.
  const Problem mixtral = problem_of(tiny_moe("mixtral"), 4);
  EXPECT_EQ(layout_problem(mixtral, layout), "");
  ModelConfig dense = tiny_moe("mixtral");
  dense.architecture = "llama";
  dense.num_experts = dense.num_experts_per_tok = 0;
  EXPECT_NE(layout_problem(problem_of(dense, 4), layout).find("needs a mixture of experts"), std::string::npos);
  Layout zero = layout;
  zero.zero_stage = 3;
  EXPECT_EQ(layout_problem(mixtral, zero), "");  // the layer wrapper gathers the experts over edp
  Layout three = parse_layout("dp=4,ep=4", "--layout");
  three.ep = 3;
  EXPECT_NE(layout_problem(mixtral, three), "");  // 3 divides neither dp 4 nor 4 experts
  bool proposed = false, proposed_with_zero = false, proposed_with_zero_3 = false;
  for (const Layout& l : enumerate_layouts(mixtral)) {
    if (l.ep > 1) {
      proposed = true;
      proposed_with_zero = proposed_with_zero || l.zero_stage > 0;
      proposed_with_zero_3 = proposed_with_zero_3 || l.zero_stage == 3;
      EXPECT_EQ(l.dp % l.ep, 0) << l.describe();
    }
  }
  EXPECT_TRUE(proposed);
  EXPECT_TRUE(proposed_with_zero);
  EXPECT_TRUE(proposed_with_zero_3);
  for (const Layout& l : enumerate_layouts(problem_of(dense, 4))) EXPECT_EQ(l.ep, 1) << l.describe();

  // A rank holds 2 of the 4 experts of each of the 4 layers (3 x 64 x 96 each).
  const int64_t total = kEmbeddings + kFinalNorm + 4 * (kAttention + kNorms + kMixtralBlock);
  const RankMemory rank = estimate_memory(mixtral, layout).ranks[0];
  EXPECT_EQ(rank.parameters, total - 4 * 2 * 18432);
  EXPECT_DOUBLE_EQ(rank.params + rank.grads + rank.optimizer, 16.0 * static_cast<double>(rank.parameters));
  // Every element is still written once.
  EXPECT_DOUBLE_EQ(estimate_checkpoint(mixtral, layout, 0, 0).total_bytes, checkpoint_tensor_bytes(mixtral.model));

  // On a link of 1 MB/s: per sparse layer of the one micro-batch (8
  // sequences over dp 4 x mb 2) of 128 tokens, the counts (4 int64) and two
  // all-to-alls of the 2 rows per token (2 x 128 x 64 fp32) forward, two
  // backward, half of each leaving the rank.
  MachineProfile slow;
  slow.name = "slow";
  slow.peak_flops_fp32 = slow.matmul_flops_fp32 = slow.attention_flops_fp32 = 1e10;
  slow.memory_bytes_per_s = slow.stream_bytes_per_s = 1e30;
  slow.intra_node = slow.inter_node = {1e6, 0};
  const double rows = 0.5 * 2 * 128 * 64 * 4 / 1e6, counts = 0.5 * 4 * 8 / 1e6;
  EXPECT_NEAR(estimate_step_time(mixtral, layout, slow).ep_comm, 4 * (counts + 4 * rows), 1e-12);
  EXPECT_EQ(estimate_step_time(mixtral, parse_layout("dp=4,mb=2", "--layout"), slow).ep_comm, 0);
}

TEST(PlanMoe, zero_under_expert_parallelism_shards_the_experts_state_over_edp) {
  // Note [ZeRO with expert parallelism] (trainer/update.h). A rank of dp 4 x
  // ep 2 holds 2 of the 4 experts of each of the 4 layers (3 x 64 x 96
  // each): 147456 expert elements, sharded over the edp pair that holds
  // them, and 83520 dense ones, sharded over dp 4.
  const int64_t experts = 4 * 2 * 18432;
  const int64_t dense = kEmbeddings + kFinalNorm + 4 * (kAttention + kNorms + 256);
  for (const char* spec : {"dp=4,ep=2,zero=1,mb=2", "dp=4,ep=2,zero=2,mb=2", "dp=2,ep=2,zero=1,mb=2"}) {
    const Layout layout = parse_layout(spec, "--layout");
    const Problem mixtral = problem_of(tiny_moe("mixtral"), layout.world());
    EXPECT_EQ(layout_problem(mixtral, layout), "") << spec;
    const int64_t dp = layout.dp, edp = layout.dp / layout.ep;  // dp 2 x ep 2: the experts' state whole
    const RankMemory rank = estimate_memory(mixtral, layout).ranks[0];
    EXPECT_EQ(rank.parameters, dense + experts) << spec;
    EXPECT_DOUBLE_EQ(rank.optimizer, 8.0 * static_cast<double>(dense / dp + experts / edp)) << spec;
    // Each piece of the state is written once.
    EXPECT_DOUBLE_EQ(estimate_checkpoint(mixtral, layout, 0, 0).total_bytes, checkpoint_tensor_bytes(mixtral.model))
        << spec;
  }
  // ZeRO-1 on a link of 1 MB/s: the flat gradient reduce-scattered and the
  // parameters all-gathered, the dense ones over dp 4 and the experts over
  // edp 2, each rank sending (n - 1) / n of the vector; and the step's four
  // all-reduces of 8 bytes over the world.
  MachineProfile slow;
  slow.name = "slow";
  slow.peak_flops_fp32 = slow.matmul_flops_fp32 = slow.attention_flops_fp32 = 1e10;
  slow.memory_bytes_per_s = slow.stream_bytes_per_s = 1e30;
  slow.intra_node = slow.inter_node = {1e6, 0};
  const double by_hand = 2 * (0.75 * 4 * dense + 0.5 * 4 * experts) / 1e6 + 4 * 2 * 0.75 * 8 / 1e6;
  EXPECT_NEAR(estimate_step_time(problem_of(tiny_moe("mixtral"), 4), parse_layout("dp=4,ep=2,zero=1,mb=2", "--layout"),
                                 slow).dp_comm,
              by_hand, 1e-9);
}

TEST(PlanMoe, the_start_up_forecast_prices_experts_and_cp_as_the_plan_does) {
  // A Mixtral on dp 1 x cp 2: the line is the plan's estimate for that
  // layout, no longer "no forecast".
  Config config;
  config.model = tiny_moe("mixtral");
  config.data.seq_len = 64;
  config.batch.micro_batch_size = 1;
  config.batch.global_batch_size = 8;
  std::vector<double> peaks;
  for (const int64_t cp : {1, 2}) {
    config.parallel.cp = cp;
    std::ostringstream log;
    log_memory_forecast(config, 1, log);
    Problem problem = Problem::from_config(config);
    problem.gpus = problem.gpus_per_node = cp;
    const MemoryEstimate memory = estimate_memory(problem, Layout::of(config, 1));
    EXPECT_EQ(log.str().find("no forecast"), std::string::npos) << log.str();
    EXPECT_NE(log.str().find("(" + std::to_string(static_cast<int64_t>(memory.peak)) + " bytes)"), std::string::npos)
        << "cp " << cp << ": " << log.str();
    peaks.push_back(memory.peak);
  }
  EXPECT_NE(peaks[0], peaks[1]);  // the cp 2 ranks hold half of each sequence, and the ring's blocks
}

}  // namespace
}  // namespace loom::plan
