// loom plan's layouts, memory model and time model (plan/) on hand-checked cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "model/layers.h"
#include "model/llama.h"
#include "parallel/pipeline.h"
#include "plan/planner.h"
#include "tests/unit/plan_test_support.h"
#include "tests/unit/source_dir.h"
#include "util/error.h"

namespace loom::plan {
namespace {

using test_support::compute_only;
using test_support::numel_of;
using test_support::tiny_problem;

TEST(PlanParameters, whole_model_counts_equal_the_models_tensors) {
  for (const bool tied : {false, true}) {
    for (const char* architecture : {"llama", "qwen2"}) {
      ModelConfig model = tiny_problem(1).model;
      model.tie_embeddings = tied;
      model.architecture = architecture;
      LocalLayerFactory factory;
      LlamaForCausalLM llama(model, factory);
      const ParameterCount count = count_rank_parameters(model, 1, {StageSpec{}}, false);
      EXPECT_EQ(count.total, numel_of(llama)) << architecture << " tied " << tied;
      EXPECT_EQ(count.total, count_parameters(model));
      EXPECT_EQ(count.largest, model.vocab_size * model.hidden_size);
    }
  }
}

TEST(PlanParameters, pipeline_ranks_hold_what_loom_builds_for_them) {
  // 8 layers over 3 stages split 3, 3, 2 (pipeline_stage_spec); tied: the
  // last stage holds its own copy of the embedding.
  for (const bool tied : {false, true}) {
    Problem problem = tiny_problem(3);
    problem.model.tie_embeddings = tied;
    const Layout layout{1, 1, 3, "afab", 1, 0, 1, Recompute::kNone, false};
    const MemoryEstimate memory = estimate_memory(problem, layout);
    ASSERT_EQ(memory.ranks.size(), 3u);
    const PipeSchedule schedule = make_pipe_schedule("afab", 3, 16, 1);
    LocalLayerFactory factory;
    for (int64_t r = 0; r < 3; ++r) {
      int64_t built = 0;
      for (const auto& chunk : build_pipeline_chunks(problem.model, factory, schedule, r)) built += numel_of(*chunk);
      EXPECT_EQ(memory.ranks[r].parameters, built) << "rank " << r << " tied " << tied;
      EXPECT_DOUBLE_EQ(memory.ranks[r].params, 4.0 * static_cast<double>(built));
      EXPECT_DOUBLE_EQ(memory.ranks[r].grads, 4.0 * static_cast<double>(built));
      EXPECT_DOUBLE_EQ(memory.ranks[r].optimizer, 8.0 * static_cast<double>(built));
    }
  }
}

TEST(PlanParameters, tensor_parallel_shards_by_hand) {
  // tiny, tp 2: per layer q 64x128, k and v 32x128, o 128x64, gate and up
  // 192x128, down 128x192, two norms of 128; embedding and head 1024x128;
  // final norm 128.
  const ModelConfig model = tiny_problem(2).model;
  const int64_t layer = 64 * 128 + 2 * 32 * 128 + 128 * 64 + 2 * 192 * 128 + 128 * 192 + 2 * 128;
  const int64_t expected = 8 * layer + 2 * 1024 * 128 + 128;
  EXPECT_EQ(count_rank_parameters(model, 2, {StageSpec{}}, false).total, expected);
}

TEST(PlanMemory, zero1_divides_the_optimizer_state_by_dp_and_keeps_shards_of_parameters_and_gradient) {
  Problem problem = tiny_problem(4);
  const int64_t params = count_parameters(problem.model);
  const MemoryEstimate plain = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false});
  const MemoryEstimate zero = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false});
  const double shard = static_cast<double>((params + 3) / 4);
  EXPECT_DOUBLE_EQ(plain.ranks[0].optimizer, 8.0 * static_cast<double>(params));
  EXPECT_DOUBLE_EQ(zero.ranks[0].optimizer, 8.0 * shard);
  // parallel/zero.h: fp32 shards of the parameters and of the gradient
  // (the whole flat vectors exist only for their moments).
  EXPECT_DOUBLE_EQ(zero.ranks[0].zero_buffers, 2 * 4.0 * shard);
  EXPECT_DOUBLE_EQ(zero.ranks[0].params, plain.ranks[0].params);
}

TEST(PlanMemory, zero2_shards_the_gradients_and_zero3_the_parameters_too) {
  const Problem problem = tiny_problem(4);
  const double params = static_cast<double>(count_parameters(problem.model));
  const double shard = static_cast<double>((count_parameters(problem.model) + 3) / 4);
  // The largest unit of the tiny model: the head (2048 x 128) with the final
  // norm, larger than the embedding and than a layer.
  const double unit = 2048.0 * 128 + 128;
  EXPECT_EQ(largest_unit_parameters(problem.model, 1, {StageSpec{}}, false), 2048 * 128 + 128);
  EXPECT_EQ(largest_unit_parameters(problem.model, 1, {StageSpec{0, 2, false, false}}, false),
            128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 384 * 128 + 2 * 128);  // one decoder layer
  const double layer = 128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 384 * 128 + 2 * 128;
  // The units of no layer, kept whole by ZeRO-3: the embedding, and the head with the final norm.
  const double ends = 2048.0 * 128 + unit;
  auto with_zero = [&](int64_t stage) {
    return estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, stage, 1, Recompute::kNone, false});
  };
  const MemoryEstimate zero0 = with_zero(0), zero2 = with_zero(2), zero3 = with_zero(3);
  // ZeRO-2: whole parameters, 1/dp of an fp32 gradient, of the parameters
  // and of the moments, and in flight a unit's gradients with their flat
  // buffer.
  EXPECT_DOUBLE_EQ(zero2.ranks[0].params, 4 * params);
  EXPECT_DOUBLE_EQ(zero2.ranks[0].grads, 4 * shard);
  EXPECT_DOUBLE_EQ(zero2.ranks[0].optimizer, 8 * shard);
  EXPECT_DOUBLE_EQ(zero2.ranks[0].zero_buffers, 4 * shard);
  EXPECT_DOUBLE_EQ(zero2.ranks[0].zero_in_flight, 4 * 2 * unit);
  // ZeRO-3: the parameters' shard, the embedding and head whole; in flight
  // two gathered layers, a layer's gradients, their flat buffer and this
  // rank's part of their reduction, and the head's gradients.
  EXPECT_DOUBLE_EQ(zero3.ranks[0].params, 4 * (shard + ends));
  EXPECT_DOUBLE_EQ(zero3.ranks[0].zero_in_flight, 4 * (4 * layer + layer / 4 + unit));
  EXPECT_LT(zero3.peak, zero2.peak);
  EXPECT_LT(zero2.peak, zero0.peak);
  // Without dp there is nothing to shard.
  Problem one = tiny_problem(1);
  EXPECT_DOUBLE_EQ(estimate_memory(one, Layout{1, 1, 1, "1f1b", 1, 3, 1, Recompute::kNone, false}).peak,
                   estimate_memory(one, Layout{1, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}).peak);
}

TEST(PlanMemory, bf16_parameters_keep_bf16_weights_and_grads_and_fp32_masters_in_the_optimizer) {
  Problem problem = tiny_problem(4);
  problem.bf16 = problem.params_bf16 = true;
  const double params = static_cast<double>(count_parameters(problem.model));
  const double shard = static_cast<double>((count_parameters(problem.model) + 3) / 4);
  const MemoryEstimate plain = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false});
  EXPECT_DOUBLE_EQ(plain.ranks[0].params, 2 * params);
  EXPECT_DOUBLE_EQ(plain.ranks[0].grads, 4 * params);  // precision.grad_accum fp32: the fp32 sums
  problem.grad_accum_fp32 = false;
  EXPECT_DOUBLE_EQ(estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}).ranks[0].grads,
                   2 * params);
  problem.grad_accum_fp32 = true;
  EXPECT_DOUBLE_EQ(plain.ranks[0].optimizer, 12 * params);  // master, exp_avg, exp_avg_sq
  EXPECT_DOUBLE_EQ(plain.ranks[0].weight_cache, 0.0);      // no casts of bf16 weights
  const MemoryEstimate zero3 = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 3, 1, Recompute::kNone, false});
  const double ends = 2 * 2048.0 * 128 + 128;  // the embedding, the head and final norm: kept whole
  EXPECT_DOUBLE_EQ(zero3.ranks[0].params, 2 * (shard + ends));
  EXPECT_DOUBLE_EQ(zero3.ranks[0].optimizer, 12 * shard);
  // Without ZeRO, bf16 weights save memory only with bf16 gradient sums:
  // 2 + 2 + 12 bytes a parameter against fp32's 4 + 4 + 8 (and 2 + 4 + 12
  // with fp32 sums).
  problem.grad_accum_fp32 = false;
  const MemoryEstimate bf16_sums = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false});
  problem.params_bf16 = false;
  const MemoryEstimate fp32 = estimate_memory(problem, Layout{4, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false});
  EXPECT_LT(bf16_sums.peak, fp32.peak);
  EXPECT_GT(plain.peak, bf16_sums.peak);
}

// loom train runs bf16 parameters under every ZeRO stage (Note [ZeRO with
// bf16 parameters]), so loom plan proposes them, and counts the sharded
// masters once: with the optimizer, 12 bytes a parameter over dp.
TEST(PlanLayouts, bf16_parameters_are_proposed_with_zero_and_hold_less_than_fp32) {
  Problem problem = tiny_problem(4);
  problem.bf16 = problem.params_bf16 = true;
  EXPECT_EQ(layout_problem(problem, Layout{4, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false}), "");
  bool any_zero = false;
  for (const Layout& layout : enumerate_layouts(problem)) any_zero = any_zero || layout.zero_stage > 0;
  EXPECT_TRUE(any_zero);
  const double params = static_cast<double>(count_parameters(problem.model));
  const double shard = static_cast<double>((count_parameters(problem.model) + 3) / 4);
  const Layout zero1{4, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false};
  const MemoryEstimate bf16 = estimate_memory(problem, zero1);
  EXPECT_DOUBLE_EQ(bf16.ranks[0].params, 2 * params);
  EXPECT_DOUBLE_EQ(bf16.ranks[0].optimizer, 12 * shard);           // master, exp_avg, exp_avg_sq
  EXPECT_DOUBLE_EQ(bf16.ranks[0].zero_buffers, (4 + 2) * shard);  // the gradient's shard, the rounded masters
  problem.params_bf16 = false;
  const MemoryEstimate fp32 = estimate_memory(problem, zero1);
  EXPECT_DOUBLE_EQ(fp32.ranks[0].zero_buffers, (4 + 4) * shard);
  EXPECT_LT(bf16.peak, fp32.peak);
}

TEST(PlanMemory, selective_recomputation_keeps_less_than_none_and_more_than_full) {
  const ModelConfig model = tiny_problem(1).model;
  for (const bool bf16 : {false, true}) {
    const double none = layer_activation_bytes(model, 256, 1, false, bf16, Recompute::kNone);
    const double selective = layer_activation_bytes(model, 256, 1, false, bf16, Recompute::kSelective);
    const double full = layer_activation_bytes(model, 256, 1, false, bf16, Recompute::kFull);
    // What the fused attention core saves of its own: a log-sum-exp per head
    // (its output stays saved as o_proj's input).
    EXPECT_DOUBLE_EQ(none - selective, 256.0 * 4 * 8);
    EXPECT_GT(selective, full);
  }
  // Under tp a rank's core has its share of the heads.
  EXPECT_DOUBLE_EQ(attention_core_bytes(model, 256, 2, false), 256.0 * 4 * 4);
}

TEST(PlanMemory, activations_grow_with_the_micro_batch_and_shrink_with_recomputation) {
  const ModelConfig model = tiny_problem(1).model;
  const double one = layer_activation_bytes(model, 256, 1, false, false, Recompute::kNone);
  EXPECT_DOUBLE_EQ(layer_activation_bytes(model, 512, 1, false, false, Recompute::kNone), 2 * one);
  // fp32 per token: 6 h + 2 q + 2 kv + 4 intermediate + heads + 2 floats.
  EXPECT_DOUBLE_EQ(one, 256.0 * 4 * (6 * 128 + 2 * 128 + 2 * 64 + 4 * 384 + 8 + 2));
  EXPECT_DOUBLE_EQ(layer_activation_bytes(model, 256, 1, false, false, Recompute::kFull), 256.0 * 4 * 128);
  EXPECT_LT(layer_activation_bytes(model, 256, 2, false, false, Recompute::kNone), one);
}

TEST(PlanMemory, afab_keeps_more_micro_batches_in_flight_than_1f1b) {
  const Problem problem = tiny_problem(2);
  const MemoryEstimate afab = estimate_memory(problem, Layout{1, 1, 2, "afab", 1, 0, 1, Recompute::kNone, false});
  const MemoryEstimate one_f_one_b = estimate_memory(problem, Layout{1, 1, 2, "1f1b", 1, 0, 1, Recompute::kNone, false});
  EXPECT_GT(afab.ranks[0].activations, 4 * one_f_one_b.ranks[0].activations);
}

TEST(PlanLayouts, invalid_layouts_are_refused_with_the_reason) {
  Problem problem = tiny_problem(2);
  EXPECT_EQ(layout_problem(problem, Layout{1, 2, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}), "");
  problem.gpus = problem.gpus_per_node = 3;
  EXPECT_NE(layout_problem(problem, Layout{1, 3, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}).find("num_heads"), std::string::npos);
  problem.gpus = problem.gpus_per_node = 16;
  EXPECT_NE(layout_problem(problem, Layout{1, 1, 16, "1f1b", 1, 0, 1, Recompute::kNone, false}).find("num_layers"),
            std::string::npos);
  problem.gpus = problem.gpus_per_node = 2;
  EXPECT_NE(layout_problem(problem, Layout{2, 1, 1, "1f1b", 1, 0, 3, Recompute::kNone, false}).find("divisible"),
            std::string::npos);
  EXPECT_NE(layout_problem(problem, Layout{1, 1, 2, "interleaved", 2, 0, 16, Recompute::kNone, false}).find("interleaved"),
            std::string::npos);  // one micro-batch: not a multiple of pp
  EXPECT_NE(layout_problem(problem, Layout{1, 1, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}).find("--gpus"), std::string::npos);
  problem.gpus = 4;
  problem.gpus_per_node = 2;
  EXPECT_NE(layout_problem(problem, Layout{1, 4, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}).find("spans nodes"),
            std::string::npos);
}

TEST(PlanLayouts, enumeration_gives_only_valid_layouts_of_the_world_size) {
  const Problem problem = tiny_problem(4);
  const std::vector<Layout> layouts = enumerate_layouts(problem);
  ASSERT_FALSE(layouts.empty());
  for (const Layout& layout : layouts) {
    EXPECT_EQ(layout.world(), 4);
    EXPECT_EQ(layout_problem(problem, layout), "") << layout.describe();
  }
}

TEST(PlanLayouts, enumeration_covers_every_zero_stage_and_recomputation) {
  const std::vector<Layout> layouts = enumerate_layouts(tiny_problem(4));
  for (const int64_t zero : {0, 1, 2, 3}) {
    for (const Recompute recompute : {Recompute::kNone, Recompute::kSelective, Recompute::kFull}) {
      const bool found = std::any_of(layouts.begin(), layouts.end(), [&](const Layout& l) {
        return l.dp == 4 && l.zero_stage == zero && l.recompute == recompute;
      });
      EXPECT_TRUE(found) << "zero " << zero << " recompute " << recompute_name(recompute);
    }
  }
  // ZeRO only with dp > 1.
  for (const Layout& l : layouts) EXPECT_TRUE(l.dp > 1 || l.zero_stage == 0) << l.describe();
}

TEST(PlanLayouts, zero3_and_selective_layouts_write_their_config) {
  const Layout layout = parse_layout("dp=4,zero=3,recompute=selective,mb=2", "--layout");
  EXPECT_EQ(layout, (Layout{4, 1, 1, "1f1b", 1, 3, 2, Recompute::kSelective, false}));
  EXPECT_EQ(layout.describe(), "dp 4 tp 1 pp 1 mb 2 zero3 selective");
  const std::vector<std::string> lines = layout.config_lines();
  EXPECT_NE(std::find(lines.begin(), lines.end(), "parallel.zero_stage: 3"), lines.end());
  EXPECT_NE(std::find(lines.begin(), lines.end(), "model.recompute: selective"), lines.end());
  Config config;
  layout.apply_to(config);
  EXPECT_EQ(config.parallel.zero_stage, 3);
  EXPECT_EQ(config.model.recompute, "selective");
  EXPECT_EQ(parse_layout("recompute=full", "--layout").recompute, Recompute::kFull);
  EXPECT_THROW(parse_layout("zero=4", "--layout"), BadInput);
  EXPECT_THROW(parse_layout("recompute=some", "--layout"), BadInput);
}

TEST(PlanLayouts, parse_layout_reads_every_key_and_refuses_unknown_ones) {
  const Layout layout = parse_layout("dp=2,tp=1,pp=2,schedule=interleaved,v=2,zero=1,mb=4,recompute=1,sp=0", "--layout");
  EXPECT_EQ(layout, (Layout{2, 1, 2, "interleaved", 2, 1, 4, Recompute::kFull, false}));
  EXPECT_THROW(parse_layout("dp=2,xp=2", "--layout"), BadInput);
  EXPECT_THROW(parse_layout("dp=x", "--layout"), BadInput);
}

TEST(PlanTime, collectives_follow_the_ring_formulas) {
  const LinkProfile link{1e9, 1e-6};
  EXPECT_DOUBLE_EQ(all_reduce_seconds(link, 1, 1e9), 0.0);
  EXPECT_DOUBLE_EQ(all_reduce_seconds(link, 4, 1e9), 6e-6 + 1.5);
  EXPECT_DOUBLE_EQ(all_gather_seconds(link, 4, 1e9), 3e-6 + 0.75);
}

TEST(PlanTime, data_parallel_halves_the_compute_and_the_bubble_follows_the_schedule) {
  const MachineProfile machine = compute_only();
  const Problem one = tiny_problem(1), two = tiny_problem(2);
  const StepTime single = estimate_step_time(one, Layout{1, 1, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}, machine);
  const StepTime dp2 = estimate_step_time(two, Layout{2, 1, 1, "1f1b", 1, 0, 2, Recompute::kNone, false}, machine);
  EXPECT_NEAR(dp2.pipeline, single.pipeline / 2, 1e-9 * single.pipeline);
  EXPECT_DOUBLE_EQ(single.bubble, 0.0);
  // pp 2, 8 micro-batches: the pipeline takes longer than its busiest rank,
  // interleaving shortens the wait, and recomputation adds a forward.
  const StepTime pp2 = estimate_step_time(two, Layout{1, 1, 2, "1f1b", 1, 0, 2, Recompute::kNone, false}, machine);
  const StepTime interleaved = estimate_step_time(two, Layout{1, 1, 2, "interleaved", 2, 0, 2, Recompute::kNone, false}, machine);
  EXPECT_GT(pp2.bubble, 0.0);
  EXPECT_LT(interleaved.bubble, pp2.bubble);
  const StepTime recompute = estimate_step_time(one, Layout{1, 1, 1, "1f1b", 1, 0, 2, Recompute::kFull, false}, machine);
  EXPECT_GT(recompute.compute, single.compute * 1.2);
}

TEST(PlanTime, selective_recomputes_the_attention_core_and_zero3_gathers_in_forward_and_backward) {
  const MachineProfile machine = compute_only();
  const Problem one = tiny_problem(1);
  auto compute = [&](Recompute recompute) {
    return estimate_step_time(one, Layout{1, 1, 1, "1f1b", 1, 0, 2, recompute, false}, machine).compute;
  };
  EXPECT_GT(compute(Recompute::kSelective), compute(Recompute::kNone));
  EXPECT_LT(compute(Recompute::kSelective), compute(Recompute::kFull));
  // On a slow dp link with nothing hidden: ZeRO-3 gathers the parameters in
  // every micro-batch's forward and backward and reduce-scatters the
  // gradients in its backward; ZeRO-2 only reduce-scatters.
  MachineProfile slow = machine;
  slow.intra_node = slow.inter_node = {1e9, 0};
  slow.dp_overlap = 0;
  const Problem four = tiny_problem(4);
  auto with_zero = [&](int64_t stage) {
    return estimate_step_time(four, Layout{4, 1, 1, "1f1b", 1, stage, 2, Recompute::kNone, false}, slow);
  };
  const StepTime zero2 = with_zero(2), zero3 = with_zero(3);
  const double bytes = 4.0 * static_cast<double>(count_parameters(four.model));
  const double micro_batches = 2;  // 16 sequences over dp 4 x mb 2
  EXPECT_NEAR(zero2.zero_comm, micro_batches * all_gather_seconds(slow.intra_node, 4, bytes), 1e-12);
  EXPECT_NEAR(zero3.zero_comm, micro_batches * 3 * all_gather_seconds(slow.intra_node, 4, bytes), 1e-12);
  EXPECT_EQ(with_zero(0).zero_comm, 0.0);
}

TEST(PlanTime, planner_puts_fitting_layouts_first_and_the_fastest_first_among_them) {
  Problem problem = tiny_problem(4);
  problem.gpu_memory_bytes = 1e12;
  const std::vector<Candidate> candidates = plan_layouts(problem, compute_only());
  ASSERT_GT(candidates.size(), 2u);
  for (size_t i = 1; i < candidates.size(); ++i) {
    if (candidates[i].fits && candidates[i - 1].fits) {
      EXPECT_LE(candidates[i - 1].time.total, candidates[i].time.total);
    }
  }
}

// The acceptance: Llama 3.1 70B (configs/llama3-70b.yaml: sequence
// 8192, global batch 512, bf16 compute over fp32 parameters) on 4 nodes of
// 8 x 80 GiB H100s. Without ZeRO-2/3 the only layouts that fit were dp 1 x
// tp 8 x pp 4 with full recomputation, at 87-89% of the memory.
TEST(PlanAcceptance, llama3_70b_on_32_h100s_at_sequence_8k_fits_within_85_percent_with_zero_layouts) {
  constexpr double kGiB = 1024.0 * 1024 * 1024;
  Problem problem = Problem::from_config(load_config(loom_source_dir() + "/configs/llama3-70b.yaml"));
  ASSERT_EQ(problem.seq_len, 8192);
  ASSERT_GT(count_parameters(problem.model), 70'000'000'000);
  problem.gpus = 32;
  problem.gpus_per_node = 8;
  problem.gpu_memory_bytes = 80 * kGiB;
  const MachineProfile h100 = load_machine_profile(loom_source_dir() + "/configs/machines/h100-node.yaml");
  const std::vector<Candidate> candidates = plan_layouts(problem, h100);
  std::vector<const Candidate*> within;
  for (const Candidate& c : candidates) {
    if (c.memory.peak <= 0.85 * problem.gpu_memory_bytes) within.push_back(&c);
  }
  ASSERT_FALSE(within.empty());
  // The fastest that fits is a ZeRO-3 one, and ZeRO-3 layouts are among
  // those within 85%. ZeRO-2 keeps the whole fp32 parameters of a rank's
  // (tp, pp) slice beside their shard and the moments' shard, which does not
  // leave room for 8K tokens' activations. Selective recomputation layouts
  // are ranked too, but at 8K tokens the activations it keeps (all but the
  // attention core's) do not fit beside 70B's states.
  EXPECT_EQ(candidates.front().layout.zero_stage, 3) << candidates.front().layout.describe();
  auto any = [&](auto predicate) { return std::any_of(within.begin(), within.end(), predicate); };
  EXPECT_TRUE(any([](const Candidate* c) { return c->layout.zero_stage == 3; }));
  EXPECT_TRUE(std::any_of(candidates.begin(), candidates.end(),
                          [](const Candidate& c) { return c.layout.recompute == Recompute::kSelective; }));
  for (const Candidate* c : within) EXPECT_TRUE(c->fits) << c->layout.describe();
  std::cout << within.size() << " of " << candidates.size() << " layouts within 85% of 80 GiB; fastest "
            << within.front()->layout.describe() << " at " << within.front()->memory.peak / kGiB << " GiB\n";
}

TEST(PlanCheckpoint, parameter_lists_are_the_tensors_loom_builds_in_their_order) {
  for (const bool tied : {false, true}) {
    for (const char* architecture : {"llama", "qwen2"}) {
      ModelConfig model = tiny_problem(1).model;
      model.tie_embeddings = tied;
      model.architecture = architecture;
      LocalLayerFactory factory;
      LlamaForCausalLM llama(model, factory);
      const std::vector<RankParameter> listed = rank_parameters(model, 1, {StageSpec{}}, false);
      const auto built = llama.named_parameters();
      ASSERT_EQ(listed.size(), built.size()) << architecture << " tied " << tied;
      for (size_t i = 0; i < listed.size(); ++i) {
        EXPECT_EQ(listed[i].name, built[i].key());
        EXPECT_EQ(listed[i].elements, built[i].value().numel()) << listed[i].name;
        EXPECT_TRUE(listed[i].whole_on_every_tp_rank);
      }
    }
  }
  // Pipeline ranks of an interleaved 2 x 2 split, tied: the last stage's copy of the embedding after its norm.
  Problem problem = tiny_problem(2);
  problem.model.tie_embeddings = true;
  const Layout layout{1, 1, 2, "interleaved", 2, 0, 1, Recompute::kNone, false};
  const PipeSchedule schedule = make_pipe_schedule("interleaved", 2, 16, 2);
  LocalLayerFactory factory;
  for (int64_t r = 0; r < 2; ++r) {
    std::vector<std::string> built;
    for (const auto& chunk : build_pipeline_chunks(problem.model, factory, schedule, r)) {
      for (const auto& named : chunk->named_parameters()) built.push_back(named.key());
    }
    std::vector<std::string> listed;
    for (const RankParameter& p : rank_parameters(problem.model, 1, rank_stages(problem.model, layout, r), true)) {
      listed.push_back(p.name);
    }
    EXPECT_EQ(listed, built) << "pp rank " << r;
  }
}

TEST(PlanCheckpoint, tensor_parallel_lists_split_what_loom_splits) {
  ModelConfig model = tiny_problem(2).model;
  model.architecture = "qwen2";  // q, k, v biases (split with their rows)
  const std::vector<RankParameter> listed = rank_parameters(model, 2, {StageSpec{}}, false);
  for (const RankParameter& p : listed) {
    const bool norm = p.name.find("norm") != std::string::npos;
    EXPECT_EQ(p.whole_on_every_tp_rank, norm) << p.name;
    if (p.name == "model.layers.0.self_attn.k_proj.bias") {
      EXPECT_EQ(p.elements, 32);
    }
    if (p.name == "model.embed_tokens.weight") {
      EXPECT_EQ(p.elements, 1024 * 128);
    }
  }
}

TEST(PlanCheckpoint, every_element_is_written_once_whatever_the_layout) {
  for (const bool tied : {false, true}) {
    Problem problem = tiny_problem(8);
    problem.model.tie_embeddings = tied;
    const double whole = checkpoint_tensor_bytes(problem.model);
    EXPECT_DOUBLE_EQ(whole, 12.0 * static_cast<double>(count_parameters(problem.model)) + 8);
    for (const Layout& layout : {Layout{8, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, Layout{8, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false},
                                 Layout{2, 2, 2, "1f1b", 1, 0, 1, Recompute::kNone, false}, Layout{2, 2, 2, "1f1b", 1, 1, 1, Recompute::kNone, false},
                                 Layout{1, 4, 2, "interleaved", 2, 0, 1, Recompute::kNone, false}}) {
      const CheckpointEstimate c = estimate_checkpoint(problem, layout, 1e9, 2e9);
      ASSERT_EQ(c.rank_bytes.size(), 8u);
      EXPECT_DOUBLE_EQ(c.total_bytes, whole) << layout.describe() << " tied " << tied;
      // The assignment spreads the writing: no rank writes twice its share.
      EXPECT_LE(c.rank_bytes_max, 2 * whole / 8) << layout.describe();
      EXPECT_DOUBLE_EQ(c.node_bytes, whole);  // one node of 8
      EXPECT_DOUBLE_EQ(c.save_s, whole / 1e9);
    }
  }
  // Two nodes of four: each node's ranks, at the rate.
  Problem problem = tiny_problem(8);
  problem.gpus_per_node = 4;
  const CheckpointEstimate c = estimate_checkpoint(problem, Layout{8, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 1e9, 0);
  double first_node = 0;
  for (int rank = 0; rank < 4; ++rank) first_node += static_cast<double>(c.rank_bytes[rank]);
  EXPECT_GE(c.node_bytes, first_node);
  EXPECT_LT(c.node_bytes, c.total_bytes);
  EXPECT_EQ(c.load_s, 0.0);  // no read rate: unknown
}

TEST(PlanCheckpoint, dp_replicas_share_a_stage_by_the_trainers_assignment) {
  // dp 2, no tp or pp: the pieces alternate, largest first, between the two
  // replicas, so each writes close to half (the step's 8 bytes on rank 0).
  const Problem problem = tiny_problem(2);
  const CheckpointEstimate c = estimate_checkpoint(problem, Layout{2, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 0, 0);
  const double half = 6.0 * static_cast<double>(count_parameters(problem.model));
  EXPECT_NEAR(static_cast<double>(c.rank_bytes[0]), half, 0.05 * half);
  EXPECT_EQ(c.rank_bytes[0] + c.rank_bytes[1], static_cast<int64_t>(2 * half) + 8);
  // ZeRO-1: the moments are each replica's own shard; the parameters are shared out first.
  const CheckpointEstimate z = estimate_checkpoint(problem, Layout{2, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false}, 0, 0);
  EXPECT_EQ(z.rank_bytes[0] + z.rank_bytes[1], static_cast<int64_t>(2 * half) + 8);
}

TEST(PlanHostMemory, a_gpu_rank_stages_its_part_and_its_pieces_on_the_host) {
  Problem problem = tiny_problem(2);
  const Layout layout{1, 1, 2, "1f1b", 1, 0, 1, Recompute::kNone, false};
  const MemoryEstimate memory = estimate_memory(problem, layout);
  const CheckpointEstimate c = estimate_checkpoint(problem, layout, 0, 0);
  HostMemory host = estimate_host_memory(problem, layout, memory, c);
  const int64_t most = std::max(memory.ranks[0].parameters, memory.ranks[1].parameters);
  EXPECT_DOUBLE_EQ(host.init, 4.0 * static_cast<double>(most));
  EXPECT_DOUBLE_EQ(host.save, c.rank_bytes_max);
  EXPECT_DOUBLE_EQ(host.resume, 4.0 * 2048 * 128 + 16 * 1024 * 1024);  // the embedding, and the read chunks
  EXPECT_EQ(host.training, 0.0);
  EXPECT_DOUBLE_EQ(host.peak, std::max({host.init, host.save, host.resume}));
  problem.checkpoint_async = true;
  host = estimate_host_memory(problem, layout, memory, c);
  EXPECT_EQ(host.save, 0.0);
  EXPECT_DOUBLE_EQ(host.async, c.rank_bytes_max);
  // On the CPU the training tensors are the host's; an async save adds its buffers.
  problem.host_is_device = true;
  host = estimate_host_memory(problem, layout, memory, c);
  EXPECT_DOUBLE_EQ(host.peak, memory.peak + c.rank_bytes_max);
}

TEST(PlanDisk, a_run_folder_holds_the_kept_checkpoints_one_in_flight_and_the_export) {
  Config config;
  config.model = tiny_problem(1).model;
  config.schedule.train_steps = 100;
  config.checkpoint.interval = 10;
  config.checkpoint.keep_last = 2;
  config.checkpoint.export_dtype = "float32";
  const double n = static_cast<double>(count_parameters(config.model));
  const double one = checkpoint_tensor_bytes(config.model);
  EXPECT_DOUBLE_EQ(run_folder_disk_bytes(config, config.model, one), 3 * one + 4 * n);
  config.checkpoint.export_dtype = "bfloat16";
  config.checkpoint.keep_last = 0;  // every save is kept: ten, and none at the end (step 100 is one of them)
  EXPECT_DOUBLE_EQ(run_folder_disk_bytes(config, config.model, one), 10 * one + 2 * n);
  config.schedule.train_steps = 105;  // and one at the end
  EXPECT_DOUBLE_EQ(run_folder_disk_bytes(config, config.model, one), 11 * one + 2 * n);
  config.checkpoint.export_hf_at_end = false;
  config.checkpoint.enabled = false;
  EXPECT_EQ(run_folder_disk_bytes(config, config.model, one), 0.0);
  // 8B's 40-odd bytes a parameter of the issue: keep_last 2, one in flight, an fp32 export.
  config.checkpoint.enabled = config.checkpoint.export_hf_at_end = true;
  config.checkpoint.keep_last = 2;
  config.checkpoint.export_dtype = "float32";
  EXPECT_NEAR(run_folder_disk_bytes(config, config.model, one) / n, 40.0, 0.01);
}

TEST(PlanProfile, profiles_round_trip_and_a_missing_key_is_named) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "loom-test-plan-profile";
  std::filesystem::create_directories(dir);
  MachineProfile profile = compute_only();
  profile.source = "measured";
  profile.op_overhead_s = 3e-6;
  profile.storage_write_bytes_per_s = 7e8;
  profile.storage_read_bytes_per_s = 9e8;
  save_machine_profile(profile, (dir / "p.yaml").string());
  const MachineProfile loaded = load_machine_profile((dir / "p.yaml").string());
  EXPECT_DOUBLE_EQ(loaded.matmul_flops_fp32, 1e10);
  EXPECT_DOUBLE_EQ(loaded.op_overhead_s, 3e-6);
  EXPECT_DOUBLE_EQ(loaded.storage_read_bytes_per_s, 9e8);
  std::ofstream(dir / "bad.yaml") << "name: x\nsource: measured\ncompute: {peak_flops: {fp32: 1}}\n";
  try {
    load_machine_profile((dir / "bad.yaml").string());
    FAIL() << "a profile without matmul_flops was accepted";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("matmul_flops"), std::string::npos) << e.what();
  }
  const MachineProfile h100 = load_machine_profile(loom_source_dir() + "/configs/machines/h100-node.yaml");
  EXPECT_EQ(h100.source, "specification");
  EXPECT_DOUBLE_EQ(h100.peak_flops_bf16, 9.89e14);
  EXPECT_DOUBLE_EQ(h100.storage_write_bytes_per_s, 5.0e9);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace loom::plan
