// loom plan's context parallelism (parallel.cp): the layout axis, the memory
// and time of ring attention (plan/ring_model.h) on hand-checked cases, and a
// search where only cp fits.
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>

#include "model/llama.h"
#include "plan/planner.h"
#include "plan/ring_model.h"
#include "tests/unit/plan_test_support.h"
#include "tests/unit/source_dir.h"
#include "util/error.h"

namespace loom::plan {
namespace {

using test_support::compute_only;
using test_support::tiny_problem;

constexpr double kGiB = 1024.0 * 1024 * 1024;

Layout with_cp(Layout layout, int64_t cp) {
  layout.cp = cp;
  return layout;
}

TEST(PlanContextParallel, the_layout_reads_writes_and_describes_cp) {
  const Layout layout = parse_layout("dp=2,cp=4,tp=2,mb=2", "--layout");
  EXPECT_EQ(layout.cp, 4);
  EXPECT_EQ(layout.world(), 16);
  EXPECT_EQ(layout.describe(), "dp 2 cp 4 tp 2 pp 1 mb 2");
  EXPECT_EQ(parse_layout("dp=2", "--layout").describe(), "dp 2 tp 1 pp 1 mb 1");
  const std::vector<std::string> lines = layout.config_lines();
  EXPECT_NE(std::find(lines.begin(), lines.end(), "parallel.cp: 4"), lines.end());
  Config config;
  layout.apply_to(config);
  EXPECT_EQ(config.parallel.cp, 4);
  EXPECT_EQ(Layout::of(config, 2), layout);
  EXPECT_THROW(parse_layout("cp=0", "--layout"), BadInput);
}

TEST(PlanContextParallel, layouts_config_refuses_are_refused_and_never_enumerated) {
  const Problem problem = tiny_problem(4);
  EXPECT_EQ(layout_problem(problem, with_cp(Layout{2, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 2)), "");
  EXPECT_NE(layout_problem(problem, with_cp(Layout{2, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 4)).find(
                "not --gpus 4"),
            std::string::npos);
  EXPECT_NE(layout_problem(problem, with_cp(Layout{2, 1, 1, "1f1b", 1, 1, 1, Recompute::kNone, false}, 2)).find("ZeRO"),
            std::string::npos);
  Problem windowed = problem;
  windowed.model.sliding_window = 32;
  EXPECT_NE(layout_problem(windowed, with_cp(Layout{1, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 4))
                .find("sliding windows"),
            std::string::npos);
  Problem capped = problem;
  capped.model.attn_logit_softcapping = 50;
  EXPECT_NE(layout_problem(capped, with_cp(Layout{1, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 4))
                .find("soft-cap"),
            std::string::npos);
  // 2 x cp equal chunks: 120 tokens split over cp 4 would need 8 | 120 (yes), cp 16 does not divide.
  Problem odd = tiny_problem(16, 120);
  EXPECT_EQ(layout_problem(odd, with_cp(Layout{1, 2, 2, "1f1b", 1, 0, 1, Recompute::kNone, false}, 4)), "");
  EXPECT_NE(layout_problem(odd, with_cp(Layout{1, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 16))
                .find("divisible by 2 * cp"),
            std::string::npos);

  const std::vector<Layout> layouts = enumerate_layouts(problem);
  int64_t with_context = 0;
  for (const Layout& layout : layouts) {
    EXPECT_EQ(layout.world(), 4);
    if (layout.cp > 1) {
      ++with_context;
      EXPECT_EQ(layout.zero_stage, 0) << layout.describe();
    }
  }
  EXPECT_GT(with_context, 0);
  for (const Layout& layout : enumerate_layouts(windowed)) EXPECT_EQ(layout.cp, 1) << layout.describe();
}

TEST(PlanContextParallel, ring_memory_by_hand) {
  // Tiny, fp32, one sequence of 128 over cp 2: chunks of c = 32, 64 tokens
  // a rank; 8 heads and 4 kv heads of 16.
  const RingShape shape{2, 1, 128, 1, false};
  const ModelConfig& model = tiny_problem(2).model;
  const double block = 4.0 * 2 * 4 * 64 * 16;      // [2, 1, 4, 64, 16] fp32 = 32768
  const double scores = 4.0 * 8 * 32 * 64;         // [1, 8, 32, 64] fp32 = 65536
  const double per_query = 4.0 * 8 * 64 * 16;      // [1, 8, 64, 16] fp32 = 32768
  const double lse = 4.0 * 8 * 64;                 // 2048
  EXPECT_EQ(ring_block_bytes(model, shape), block);
  const RingMemory memory = ring_attention_memory(model, shape);
  EXPECT_EQ(memory.forward, 2 * block + per_query + lse + 2 * per_query + 3 * scores);
  EXPECT_EQ(memory.forward, 362496);
  EXPECT_EQ(memory.backward, 2 * block + block /* fp32 gradient */ + 4 * per_query + 4 * scores);
  EXPECT_EQ(memory.backward, 491520);
  // Under tp 2 a rank holds half the heads; bf16 halves the blocks only.
  const RingMemory tp2 = ring_attention_memory(model, {2, 1, 128, 2, false});
  EXPECT_EQ(tp2.backward, memory.backward / 2);
  EXPECT_EQ(ring_attention_memory(model, {2, 1, 128, 1, true}).forward, memory.forward - block);
  EXPECT_EQ(ring_attention_memory(model, {1, 1, 128, 1, false}).backward, 0);
}

TEST(PlanContextParallel, a_rank_keeps_its_seq_over_cp_tokens_and_whole_replica_states) {
  // At 4096 tokens the ring's score matrices ([1, 8, 1024, 2048] fp32 at cp
  // 2) outweigh the loss's logits: the peak is a layer's backward.
  const Problem problem = tiny_problem(2, 4096);
  const Layout cp2 = with_cp(Layout{1, 1, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 2);
  const MemoryEstimate memory = estimate_memory(problem, cp2);
  ASSERT_EQ(memory.ranks.size(), 1u);
  const RankMemory& rank = memory.ranks[0];
  EXPECT_EQ(rank.peak_phase.rfind("backward of a layer", 0), 0u) << rank.peak_phase;
  // The eight layers' saved activations at 2048 tokens, the loss's released.
  EXPECT_DOUBLE_EQ(rank.activations, 8 * layer_activation_bytes(problem.model, 2048, 1, false, false, Recompute::kNone));
  EXPECT_DOUBLE_EQ(rank.transient, ring_attention_memory(problem.model, {2, 1, 4096, 1, false}).backward);
  // Whole rows of ids, and the rank's copies of its inputs and targets.
  EXPECT_DOUBLE_EQ(rank.pipeline_buffers, 8.0 * 4097 + 2 * 8.0 * 2048);
  // Parameters, gradients and AdamW state: a replica's, as without cp.
  const RankMemory single = estimate_memory(tiny_problem(1, 4096), Layout{}).ranks[0];
  EXPECT_EQ(rank.parameters, single.parameters);
  EXPECT_EQ(rank.params + rank.grads + rank.optimizer, single.params + single.grads + single.optimizer);
  // cp 4 keeps half cp 2's activations.
  const RankMemory cp4 = estimate_memory(tiny_problem(4, 4096), with_cp(Layout{}, 4)).ranks[0];
  EXPECT_DOUBLE_EQ(cp4.activations, rank.activations / 2);
}

TEST(PlanContextParallel, ring_time_by_hand) {
  const ModelConfig& model = tiny_problem(2).model;
  const RingShape shape{2, 1, 128, 1, false};
  MachineProfile machine = compute_only();
  // Per head and batch c^2 = 1024 pairs: the own block 3 c^2 and the other 2 c^2,
  // 8 heads; forward 4 x 16 FLOPs a pair, backward 10 x 16.
  const double own = 3 * 8 * 1024.0, other = 2 * 8 * 1024.0;
  const RingTime fast = ring_attention_time(model, shape, machine, {1e30, 0});
  EXPECT_NEAR(fast.forward_compute, 64 * (own + other) / 1e10, 1e-18);
  EXPECT_NEAR(fast.backward_compute, 160 * (own + other) / 1e10, 1e-18);
  EXPECT_NEAR(fast.forward_exposed_comm, 0, 1e-18);
  EXPECT_NEAR(fast.backward_exposed_comm, 0, 1e-18);
  // On a link of 1 MB/s a block (32768 bytes) takes 32.8 ms: forward the
  // one transfer shows beyond the own block's compute; backward too, and
  // each of the two steps' gradient accumulator (fp32, 32768 bytes) after it.
  const RingTime slow = ring_attention_time(model, shape, machine, {1e6, 0});
  EXPECT_NEAR(slow.forward_exposed_comm, 0.032768 - 64 * own / 1e10, 1e-12);
  EXPECT_NEAR(slow.backward_exposed_comm, 0.032768 - 160 * own / 1e10 + 2 * 0.032768, 1e-12);
  // cp 4: chunks of 16, a quarter of the pairs per step, (2 x 4 + 1) c^2 in all.
  const RingTime cp4 = ring_attention_time(model, {4, 1, 128, 1, false}, machine, {1e30, 0});
  EXPECT_NEAR(cp4.forward_compute, 64 * 9 * 8 * 256.0 / 1e10, 1e-18);
}

TEST(PlanContextParallel, the_ring_crosses_nodes_when_tp_times_cp_fills_more_than_one) {
  // Rank order tp, cp, pp, dp: tp 2 x cp 2 fits a node of 4, not one of 2.
  const MachineProfile base = compute_only();
  MachineProfile machine = base;
  machine.inter_node = {1e6, 0};  // slow between nodes, free inside one
  Problem problem = tiny_problem(4);
  const Layout layout = with_cp(Layout{1, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 2);
  const StepTime inside = estimate_step_time(problem, layout, machine);
  EXPECT_NEAR(inside.cp_comm, 0, 1e-12);
  problem.gpus_per_node = 2;
  const StepTime across = estimate_step_time(problem, layout, machine);
  // 16 micro-batches of 8 layers, each walking the ring forward and backward.
  const RingTime ring = ring_attention_time(problem.model, {2, 1, 128, 2, false}, machine, machine.inter_node);
  EXPECT_NEAR(across.cp_comm, 16 * 8 * (ring.forward_exposed_comm + ring.backward_exposed_comm), 1e-9);
  EXPECT_GT(across.total, inside.total);
  // Selective recomputation walks each layer's ring again in backward.
  Layout selective = layout;
  selective.recompute = Recompute::kSelective;
  EXPECT_NEAR(estimate_step_time(problem, selective, machine).cp_comm,
              16 * 8 * (2 * ring.forward_exposed_comm + ring.backward_exposed_comm), 1e-9);
}

TEST(PlanContextParallel, cp_replicas_share_the_checkpoint_as_dp_replicas_do_and_each_reads_its_slices) {
  // dp 1 x cp 2 x tp 2: world ranks ((pp * cp) + cp_rank) * tp + tp_rank.
  // The cp ranks are replicas (Note [cp replicas]): the writers are chosen
  // among them as among dp 2's (RunCheckpoints::assign_writers), so every
  // rank writes what the same rank of dp 2 x tp 2 would.
  const Problem problem = tiny_problem(4);
  const Layout layout = with_cp(Layout{1, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 2);
  const CheckpointEstimate c = estimate_checkpoint(problem, layout, 1e9, 1e9);
  ASSERT_EQ(c.rank_bytes.size(), 4u);
  EXPECT_DOUBLE_EQ(c.total_bytes, checkpoint_tensor_bytes(problem.model));
  const CheckpointEstimate dp2 =
      estimate_checkpoint(problem, Layout{2, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 1e9, 1e9);
  EXPECT_EQ(c.rank_bytes, dp2.rank_bytes);
  for (const auto bytes : c.rank_bytes) EXPECT_GT(bytes, 0);
  // Resume: all four read their tp slices, twice the one replica's reading.
  const CheckpointEstimate tp2 =
      estimate_checkpoint(tiny_problem(2), Layout{1, 2, 1, "1f1b", 1, 0, 1, Recompute::kNone, false}, 1e9, 1e9);
  EXPECT_DOUBLE_EQ(c.node_read_bytes, 2 * tp2.node_read_bytes);
}

// Llama 3 8B (configs/llama3-8b.yaml) at 512K tokens a sequence on 16
// nodes of 8 x 80 GiB H100s. Without cp every layout holds whole 512K-token
// sequences: with full recomputation, sequence parallelism and ZeRO-3 the
// layers' inputs and the loss's logits over the vocabulary still do not fit.
// With cp a rank holds 512K / cp tokens; the ring's score matrices, eager
// fp32 ([batch, heads / tp, c, 2c] with c = seq / 2cp), fit from cp x tp = 128
// on. (At 128K tokens on 32 GPUs layouts without cp fit: dp 8 tp 4 ZeRO-3,
// full recomputation and sp at 62 GiB, docs/plan.md.)
TEST(PlanAcceptance, llama3_8b_at_512k_tokens_on_128_h100s_fits_only_with_context_parallelism) {
  Problem problem = Problem::from_config(load_config(loom_source_dir() + "/configs/llama3-8b.yaml"));
  problem.seq_len = 524288;
  problem.model.max_seq_len = 524288;
  problem.global_batch = 64;
  problem.gpus = 128;
  problem.gpus_per_node = 8;
  problem.gpu_memory_bytes = 80 * kGiB;
  const MachineProfile h100 = load_machine_profile(loom_source_dir() + "/configs/machines/h100-node.yaml");
  const std::vector<Candidate> candidates = plan_layouts(problem, h100);
  ASSERT_FALSE(candidates.empty());
  int64_t fitting = 0;
  for (const Candidate& c : candidates) {
    if (!c.fits) continue;
    ++fitting;
    EXPECT_GT(c.layout.cp, 1) << c.layout.describe() << " fits at " << c.memory.peak / kGiB << " GiB";
  }
  EXPECT_GT(fitting, 0);
  EXPECT_TRUE(candidates.front().fits);
  // Layouts without cp were searched (and found too large).
  EXPECT_TRUE(std::any_of(candidates.begin(), candidates.end(), [](const Candidate& c) { return c.layout.cp == 1; }));
  std::cout << fitting << " of " << candidates.size() << " layouts fit; fastest " << candidates.front().layout.describe()
            << " at " << candidates.front().memory.peak / kGiB << " GiB, " << candidates.front().time.total << " s\n";
}

}  // namespace
}  // namespace loom::plan
