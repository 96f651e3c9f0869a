// ZeRO-1 (parallel/zero.h) under mpirun, with the world as the dp group:
// every rank trains two copies of the same small Llama model on its own
// data, one with the whole AdamW and an all-reduce of the gradients
// (GradientReducer), the other with ShardedAdamW; the weights, the gradient
// norm and the gathered optimizer state must agree, and each rank must hold
// 1/dp of the optimizer state.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "parallel/data_parallel.h"
#include "parallel/mpi_process_group.h"
#include "parallel/tensor_parallel_model.h"
#include "parallel/zero.h"
#include "tests/unit/mpi_test_main.h"
#include "model/llama.h"
#include "util/error.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& dp() { return *g_world; }

constexpr double kLr = 1e-2;

ModelConfig tiny() {
  ModelConfig m;
  m.hidden_size = 32;
  m.intermediate_size = 64;
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 67;  // odd sizes, so that shards split parameters mid-tensor
  m.max_seq_len = 16;
  m.init_std = 0.05;
  return m;
}

std::shared_ptr<LlamaForCausalLM> model_from_seed() {
  torch::manual_seed(3);
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(tiny(), factory);
  model->init_weights(3);
  return model;
}

at::Tensor loss_on_my_data(LlamaForCausalLM& model, int64_t step) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(500 + 17 * step + dp().rank());
  const at::Tensor ids = at::randint(tiny().vocab_size, {2, 9}, gen, at::kLong);
  const at::Tensor logits = model.forward(ids.narrow(1, 0, 8));
  return torch::nn::functional::cross_entropy(logits.reshape({-1, tiny().vocab_size}),
                                              ids.narrow(1, 1, 8).reshape({-1}));
}

TEST(ShardedAdamW, MatchesWholeAdamWWithAllReducedGradientsAndHoldsOneDpthOfTheState) {
  auto reference = model_from_seed();
  auto sharded = model_from_seed();
  AdamWOptions options;
  options.eps = 1e-6;
  AdamW whole(to_named_tensors(reference->named_parameters()), options);
  GradientReducer reducer(dp(), whole.params(), {25.0, true});
  ShardedAdamW zero(dp(), to_named_tensors(sharded->named_parameters()), options);
  // Every element sits in exactly one rank's shard (no tp: every dim is -1).
  const GradNormReduction reduction =
      sharded_grad_norm({&dp()}, /*tp_rank=*/0, zero.shard_named_params(), tensor_parallel_shard_dims(*sharded));

  for (int64_t step = 0; step < 5; ++step) {
    whole.zero_grad();
    zero.zero_grad();
    reducer.arm();
    loss_on_my_data(*reference, step).backward();
    reducer.finish();
    loss_on_my_data(*sharded, step).backward();
    zero.reduce_gradients();
    const double whole_norm = clip_grad_norm(whole.params(), 0.5);
    const double zero_norm = clip_grad_norm(zero.shard_params(), 0.5, &reduction);
    EXPECT_NEAR(zero_norm, whole_norm, 1e-5 * whole_norm) << "step " << step;
    whole.step(kLr);
    zero.step(kLr);
    // The reduce-scatter sums in another order than the all-reduce; Adam's
    // steps are about lr whatever the gradient, so the bound is 1% of a step.
    for (const auto& named : reference->named_parameters()) {
      const at::Tensor& got = sharded->named_parameters()[named.key()];
      EXPECT_LE((got - named.value()).abs().max().item<double>(), 0.01 * kLr) << named.key() << " after step " << step;
    }
  }
  EXPECT_EQ(zero.step_count(), whole.step_count());

  // The state, gathered, is the whole AdamW's.
  const NamedTensors gathered = zero.state_dict();
  const NamedTensors expected = whole.state_dict();
  ASSERT_EQ(gathered.size(), expected.size());
  for (size_t i = 0; i < gathered.size(); ++i) {
    EXPECT_EQ(gathered[i].first, expected[i].first);
    test_support::expect_close(gathered[i].second, expected[i].second, 1e-4, gathered[i].first);
  }

  // Memory: exp_avg and exp_avg_sq of 1/dp of the elements (within 5%).
  int64_t numel = 0;
  for (const auto& p : reference->parameters()) numel += p.numel();
  const double unsharded = 2.0 * 4.0 * static_cast<double>(numel);
  const double expected_share = unsharded / dp().size();
  EXPECT_NEAR(static_cast<double>(zero.state_bytes()), expected_share, 0.05 * expected_share)
      << "unsharded " << unsharded << " bytes over dp " << dp().size();
}

TEST(ShardedAdamW, ResumesFromAWholeStateLikeTheRunThatSavedIt) {
  auto a = model_from_seed();
  auto b = model_from_seed();
  AdamWOptions options;
  ShardedAdamW first(dp(), to_named_tensors(a->named_parameters()), options);
  for (int64_t step = 0; step < 3; ++step) {
    first.zero_grad();
    loss_on_my_data(*a, step).backward();
    first.reduce_gradients();
    first.step(1e-2);
  }
  // b takes a's weights and the whole (gathered) state, then both take one more step.
  {
    at::NoGradGuard no_grad;
    for (const auto& named : a->named_parameters()) b->named_parameters()[named.key()].copy_(named.value());
  }
  ShardedAdamW second(dp(), to_named_tensors(b->named_parameters()), options);
  second.load_state_dict(first.state_dict());
  EXPECT_EQ(second.step_count(), 3);
  for (auto* pair : {&first, &second}) pair->zero_grad();
  loss_on_my_data(*a, 3).backward();
  loss_on_my_data(*b, 3).backward();
  first.reduce_gradients();
  second.reduce_gradients();
  first.step(1e-2);
  second.step(1e-2);
  for (const auto& named : a->named_parameters()) {
    EXPECT_TRUE(at::equal(b->named_parameters()[named.key()], named.value())) << named.key();
  }
}

TEST(ShardedAdamW, AStateWithAMisshapenEntryIsRefused) {
  auto model = model_from_seed();
  ShardedAdamW zero(dp(), to_named_tensors(model->named_parameters()), AdamWOptions{});
  NamedTensors state = zero.state_dict();
  for (auto& [name, tensor] : state) {
    if (name == "optimizer.exp_avg.model.norm.weight") tensor = at::zeros({3});
  }
  try {
    zero.load_state_dict(state);
    ADD_FAILURE() << "no BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer.exp_avg.model.norm.weight"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_zero");
}
