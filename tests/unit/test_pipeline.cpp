// The pipeline executor (parallel/pipeline.h) under mpirun, with the world as
// the pp group: every rank builds the whole model from a fixed seed and
// computes one step's loss and gradients alone; then the ranks run the same
// step through each schedule on their chunks, and each checks the loss (on
// the last stage) and its chunks' gradients against its own whole-model ones.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/pipeline.h"
#include "parallel/tensor_parallel_model.h"
#include "tests/unit/mpi_test_main.h"
#include "model/llama.h"
#include "util/error.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& pp() { return *g_world; }

constexpr int64_t kMicroBatches = 12, kBatch = 2, kSeq = 8;  // 12: interleaved needs a multiple of pp (2, 3, 4)

ModelConfig model_config(int64_t layers, bool tied) {
  ModelConfig m;
  m.hidden_size = 32;
  m.intermediate_size = 64;
  m.num_layers = layers;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 50;
  m.max_seq_len = 16;
  m.init_std = 0.05;
  m.tie_embeddings = tied;
  return m;
}

// Returns the executor's peak of live micro-batches on this rank.
int64_t check_schedule(const char* kind, int64_t virtual_stages, int64_t layers, bool tied = false) {
  const ModelConfig config = model_config(layers, tied);
  torch::manual_seed(11);
  LocalLayerFactory factory;
  LlamaForCausalLM whole(config, factory);
  whole.init_weights(11);
  std::vector<at::Tensor> inputs, targets;
  at::Tensor whole_loss = at::zeros({}, at::kDouble);
  for (int64_t mb = 0; mb < kMicroBatches; ++mb) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(100 + mb);
    const at::Tensor ids = at::randint(config.vocab_size, {kBatch, kSeq + 1}, gen, at::kLong);
    inputs.push_back(ids.narrow(1, 0, kSeq).contiguous());
    targets.push_back(ids.narrow(1, 1, kSeq).contiguous());
    const at::Tensor logits = whole.forward(inputs.back());
    const at::Tensor loss =
        torch::nn::functional::cross_entropy(logits.reshape({-1, config.vocab_size}), targets.back().reshape({-1})) /
        static_cast<double>(kMicroBatches);
    loss.backward();
    whole_loss += loss.detach().to(at::kDouble);
  }

  const PipeSchedule schedule = make_pipe_schedule(kind, pp().size(), kMicroBatches, virtual_stages);
  auto chunks = build_pipeline_chunks(config, factory, schedule, pp().rank());
  for (auto& chunk : chunks) load_tensor_parallel_shards(*chunk, to_named_tensors(whole.named_parameters()), 0, 1);
  PipeGroups groups(*g_world);
  PipelineExecutor executor(groups, schedule, chunks, {kBatch, kSeq, config.hidden_size});
  const double loss = executor.run(inputs, targets);

  const bool has_last = schedule.model_stage(pp().rank(), virtual_stages - 1) == pp().size() * virtual_stages - 1;
  if (has_last) {
    EXPECT_NEAR(loss, whole_loss.item<double>(), 1e-5 * whole_loss.item<double>()) << kind;
  } else {
    EXPECT_EQ(loss, 0.0) << kind;
  }
  const auto whole_params = whole.named_parameters();
  int64_t checked = 0;
  for (auto& chunk : chunks) {
    for (const auto& named : chunk->named_parameters()) {
      const at::Tensor& expected = whole_params[named.key()].grad();
      if (!named.value().grad().defined()) {
        ADD_FAILURE() << kind << ": no gradient for " << named.key();
        continue;
      }
      test_support::expect_close(named.value().grad(), expected, 1e-5, std::string(kind) + ": gradient of " + named.key());
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
  return executor.last_peak_live();
}

// Note [pipeline links]: each direction between ring neighbours is a group
// of its own holding just those two ranks, so that a send waiting for its
// receiver holds up nothing else; messages sent over a link arrive.
TEST(PipeGroups, EachRankHasAGroupPerDirectionToAndFromItsRingNeighbours) {
  const int p = pp().size(), me = pp().rank();
  PipeGroups groups(*g_world);
  EXPECT_EQ(&groups.host(), &pp());
  EXPECT_EQ(&groups.device(), &pp());
  if (p == 1) {  // chunks of one rank send to itself, over pp
    EXPECT_EQ(groups.to(0).group, &pp());
    EXPECT_EQ(groups.from(0).peer, 0);
    EXPECT_THROW(groups.to(1), std::invalid_argument);
    return;
  }
  const int next = (me + 1) % p, prev = (me + p - 1) % p;
  for (const auto& [link, other, what] : {std::tuple{groups.to(next), next, "to next"},
                                          std::tuple{groups.from(prev), prev, "from prev"}}) {
    ASSERT_NE(link.group, nullptr) << what;
    EXPECT_EQ(link.group->size(), 2) << what;
    EXPECT_EQ(link.group->world_ranks(), (std::vector<int>{std::min(me, other), std::max(me, other)})) << what;
    EXPECT_EQ(link.group->world_ranks()[static_cast<size_t>(link.peer)], other) << what;
  }
  EXPECT_NE(groups.to(prev).group, groups.from(prev).group) << "one group per direction";
  if (p >= 4) {
    EXPECT_THROW(groups.to((me + 2) % p), std::invalid_argument);
  }

  // Around the ring both ways at once: every rank sends before it receives.
  const auto send = [&](int to, int value) {
    const PipeGroups::Link link = groups.to(to);
    return link.group->send(at::full({1000}, value, at::kInt), {link.peer, 1});
  };
  const auto recv = [&](int from) {
    const PipeGroups::Link link = groups.from(from);
    at::Tensor t = at::empty({1000}, at::kInt);
    link.group->recv(t, {link.peer, 1})->wait();
    return t;
  };
  auto forward = send(next, me), backward = send(prev, 100 + me);
  EXPECT_TRUE(at::equal(recv(prev), at::full({1000}, prev, at::kInt)));
  EXPECT_TRUE(at::equal(recv(next), at::full({1000}, 100 + next, at::kInt)));
  forward->wait();
  backward->wait();
}

// Activation memory, counted in the run: AFAB holds every micro-batch's
// graph before the first backward; 1F1B at most p - r on rank r.
TEST(PipelineExecutor, AllForwardAllBackwardMatchesTheWholeModelHoldingEveryMicroBatch) {
  EXPECT_EQ(check_schedule("afab", 1, 4), kMicroBatches);
}
TEST(PipelineExecutor, OneForwardOneBackwardMatchesTheWholeModelHoldingAtMostPMinusR) {
  EXPECT_EQ(check_schedule("1f1b", 1, 5), pp().size() - pp().rank());
}
TEST(PipelineExecutor, InterleavedMatchesTheWholeModel) { check_schedule("interleaved", 2, 8); }

// The first and the last stage each hold a copy of a tied embedding; after
// the step both copies hold the tied weight's whole gradient.
TEST(PipelineExecutor, TiedEmbeddingCopiesGetTheWholeGradient) {
  check_schedule("1f1b", 1, 4, /*tied=*/true);
  check_schedule("interleaved", 2, 8, /*tied=*/true);
}

TEST(PipelineExecutor, StagesSplitTheLayersEvenlyFirstStagesTakingTheRest) {
  const StageSpec a = pipeline_stage_spec(10, 4, 0), b = pipeline_stage_spec(10, 4, 1);
  const StageSpec c = pipeline_stage_spec(10, 4, 2), d = pipeline_stage_spec(10, 4, 3);
  EXPECT_EQ(a.first_layer, 0);
  EXPECT_EQ(a.num_layers, 3);
  EXPECT_EQ(b.first_layer, 3);
  EXPECT_EQ(b.num_layers, 3);
  EXPECT_EQ(c.first_layer, 6);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(d.first_layer, 8);
  EXPECT_EQ(d.num_layers, 2);
  EXPECT_TRUE(a.has_embedding && !a.has_head && d.has_head && !d.has_embedding);
  EXPECT_THROW(pipeline_stage_spec(3, 4, 0), BadInput);
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_pipeline");
}
