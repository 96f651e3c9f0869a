// ZeRO-1 and ZeRO-2 (parallel/zero.h) under mpirun, with the world as the
// dp group: every rank trains two copies of the same small Llama model on
// its own data, one with the whole AdamW and an all-reduce of the gradients
// (GradientReducer), the other with ShardedAdamW; the weights, the gradient
// norm and the gathered optimizer state must agree, and each rank must hold
// 1/dp of the optimizer state. ZeRO-2 must also reduce per unit while the
// last backward runs, free the model's gradients, and never hold a flat
// gradient of the whole model.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include "optim/fp32_gradients.h"
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
  m.num_layers = 3;
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
  GradientReducer reducer(dp(), whole.params(), {.bucket_mb = 25.0, .overlap = true});
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

TEST(ShardedAdamW, UnitsByLayerAreTheEmbeddingEachDecoderLayerAndTheRest) {
  auto model = model_from_seed();
  const NamedTensors params = to_named_tensors(model->named_parameters());
  const std::vector<std::vector<size_t>> units = zero_units_by_layer(params);
  const size_t layers = static_cast<size_t>(tiny().num_layers);
  ASSERT_EQ(units.size(), layers + 2);
  size_t listed = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    for (size_t i : units[u]) {
      const std::string& name = params[i].first;
      // Unit 0 is the embedding, then one unit a decoder layer, then the
      // final norm and the head.
      if (u == 0) {
        EXPECT_EQ(name.rfind("model.embed_tokens.", 0), 0u) << name;
      } else if (u <= layers) {
        EXPECT_EQ(name.rfind("model.layers." + std::to_string(u - 1) + ".", 0), 0u) << name << " in unit " << u;
      } else {
        EXPECT_EQ(name.find("model.layers."), std::string::npos) << name;
        EXPECT_EQ(name.find("model.embed_tokens."), std::string::npos) << name;
      }
      ++listed;
    }
  }
  EXPECT_EQ(listed, params.size());
}

// Stage 2: two micro-batches per step, the second armed, as the trainer runs it.
// A whole AdamW over `reference` whose gradients the dp bucket reducer
// averages, beside a ZeRO optimizer of `stage` (units by layer) over
// `sharded`, and the norm of its shards: what the stage tests compare.
struct AgainstWholeAdamW {
  AgainstWholeAdamW(std::shared_ptr<LlamaForCausalLM> reference_model, std::shared_ptr<LlamaForCausalLM> sharded_model,
                    int64_t stage)
      : reference(std::move(reference_model)),
        sharded(std::move(sharded_model)),
        options(with_eps(1e-6)),
        whole(to_named_tensors(reference->named_parameters()), options),
        reducer(dp(), whole.params(), {.bucket_mb = 25.0, .overlap = true}),
        params(to_named_tensors(sharded->named_parameters())),
        zero(dp(), params, options, stage_options(stage, params)),
        reduction(sharded_grad_norm({&dp()}, /*tp_rank=*/0, zero.shard_named_params(),
                                    tensor_parallel_shard_dims(*sharded))) {}

  static AdamWOptions with_eps(double eps) {
    AdamWOptions o;
    o.eps = eps;
    return o;
  }
  static ZeroOptions stage_options(int64_t stage, const NamedTensors& params) {
    ZeroOptions o;
    o.stage = stage;
    o.units = zero_units_by_layer(params);
    return o;
  }

  std::shared_ptr<LlamaForCausalLM> reference, sharded;
  AdamWOptions options;
  AdamW whole;
  GradientReducer reducer;
  NamedTensors params;
  ShardedAdamW zero;
  GradNormReduction reduction;
};

TEST(ShardedAdamW, Stage2ReducesPerUnitDuringBackwardAndHoldsNoWholeGradient) {
  AgainstWholeAdamW pair(model_from_seed(), model_from_seed(), /*stage=*/2);
  auto& [reference, sharded, options, whole, reducer, params, zero, reduction] = pair;
  int64_t numel = 0, largest_unit = 0;
  for (const auto& unit : zero_units_by_layer(params)) {
    int64_t unit_numel = 0;
    for (size_t i : unit) unit_numel += params[i].second.numel();
    largest_unit = std::max(largest_unit, unit_numel);
    numel += unit_numel;
  }

  for (int64_t step = 0; step < 4; ++step) {
    whole.zero_grad();
    zero.zero_grad();
    for (int64_t micro = 0; micro < 2; ++micro) {
      if (micro == 1) reducer.arm();
      (loss_on_my_data(*reference, 2 * step + micro) / 2).backward();
      if (micro == 1) zero.arm();
      (loss_on_my_data(*sharded, 2 * step + micro) / 2).backward();
    }
    reducer.finish();
    zero.reduce_gradients();
    // Every unit but the one holding the embedding (whose gradient comes
    // last) was complete, and started, before backward ended.
    EXPECT_GE(zero.last_started_in_backward(), zero.num_units() - 1) << "step " << step;
    for (const auto& [name, param] : params) EXPECT_FALSE(param.grad().defined()) << name << " kept its gradient";
    const double whole_norm = clip_grad_norm(whole.params(), 0.5);
    const double zero_norm = clip_grad_norm(zero.shard_params(), 0.5, &reduction);
    EXPECT_NEAR(zero_norm, whole_norm, 1e-5 * whole_norm) << "step " << step;
    whole.step(kLr);
    zero.step(kLr);
    for (const auto& named : reference->named_parameters()) {
      const at::Tensor& got = sharded->named_parameters()[named.key()];
      EXPECT_LE((got - named.value()).abs().max().item<double>(), 0.01 * kLr) << named.key() << " after step " << step;
    }
  }
  // No flat gradient of the whole model: two units' at most (padded to dp).
  EXPECT_LE(zero.peak_flat_grad_numel(), 2 * (largest_unit + dp().size()));
  EXPECT_LT(zero.peak_flat_grad_numel(), numel);
  const NamedTensors gathered = zero.state_dict();
  const NamedTensors expected = whole.state_dict();
  ASSERT_EQ(gathered.size(), expected.size());
  for (size_t i = 0; i < gathered.size(); ++i) {
    EXPECT_EQ(gathered[i].first, expected[i].first);
    test_support::expect_close(gathered[i].second, expected[i].second, 1e-4, gathered[i].first);
  }
}

// Trains a model 3 steps with an optimizer of `saver`'s options (made from
// its parameters), hands its weights and whole state to a stage-1
// optimizer over a second model, and takes a fourth step with both.
// Returns the two models.
std::pair<std::shared_ptr<LlamaForCausalLM>, std::shared_ptr<LlamaForCausalLM>> fourth_step_after_resume(
    const std::function<ZeroOptions(const NamedTensors&)>& saver) {
  auto a = model_from_seed();
  auto b = model_from_seed();
  AdamWOptions options;
  const NamedTensors params_a = to_named_tensors(a->named_parameters());
  ShardedAdamW first(dp(), params_a, options, saver(params_a));
  for (int64_t step = 0; step < 3; ++step) {
    first.zero_grad();
    loss_on_my_data(*a, step).backward();
    first.reduce_gradients();
    first.step(1e-2);
  }
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
  return {a, b};
}

// A stage-2 state (other units, so other pieces) resumes under stage 1 and
// gives the step the stage-2 optimizer takes.
TEST(ShardedAdamW, Stage2StateResumesUnderStage1) {
  const auto [a, b] = fourth_step_after_resume([](const NamedTensors& params) {
    ZeroOptions zero2;
    zero2.stage = 2;
    zero2.units = zero_units_by_layer(params);
    return zero2;
  });
  // Other units reduce-scatter in other orders over dp 3 and 4: 1% of a step, as above.
  for (const auto& named : a->named_parameters()) {
    const at::Tensor& got = b->named_parameters()[named.key()];
    EXPECT_LE((got - named.value()).abs().max().item<double>(), 0.01 * 1e-2) << named.key();
  }
}

// --- ZeRO-3 (Note [ZeRO-3]) ------------------------------------------------

// A dp group whose gathers are slow to complete (each wait sleeps), and that
// logs each gather as it is posted, named by the decoder layer whose shard
// it sends (`layer_of_input`).
class SlowGatherGroup : public ProcessGroup {
 public:
  SlowGatherGroup(ProcessGroup& inner, std::vector<std::string>& log)
      : ProcessGroup("dp", inner.rank(), inner.world_ranks(), inner.timeout()), inner_(inner), log_(log) {}
  std::function<std::string(const at::Tensor&)> layer_of_input;

  std::string_view backend() const override { return inner_.backend(); }
  std::unique_ptr<Work> all_reduce(const at::Tensor& t, const AllReduceOptions& o) override {
    return inner_.all_reduce(t, o);
  }
  std::unique_ptr<Work> all_gather(const at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    if (layer_of_input) log_.push_back("gather " + layer_of_input(in));
    return std::make_unique<SlowWork>(inner_.all_gather(out, in, o));
  }
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                       const ReduceScatterOptions& o) override {
    return inner_.reduce_scatter(out, in, o);
  }
  std::unique_ptr<Work> broadcast(const at::Tensor& t, const BroadcastOptions& o) override {
    return inner_.broadcast(t, o);
  }
  std::unique_ptr<Work> send(const at::Tensor& t, const SendOptions& o) override { return inner_.send(t, o); }
  std::unique_ptr<Work> recv(const at::Tensor& t, const RecvOptions& o) override { return inner_.recv(t, o); }
  std::unique_ptr<Work> barrier(const BarrierOptions& o) override { return inner_.barrier(o); }

 private:
  class SlowWork : public Work {
   public:
    explicit SlowWork(std::unique_ptr<Work> inner) : Work(inner->default_timeout()), inner_(std::move(inner)) {}
    bool is_completed() override { return false; }
    void wait(std::chrono::milliseconds timeout) override {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      inner_->wait(timeout);
    }

   private:
    std::unique_ptr<Work> inner_;
  };
  ProcessGroup& inner_;
  std::vector<std::string>& log_;
};

// Logs each layer's computation: it starts as soon as the hook returns.
class RecordingZeroWrapper : public ZeroLayerWrapper {
 public:
  explicit RecordingZeroWrapper(std::vector<std::string>& log) : ZeroLayerWrapper(false), log_(log) {}

 protected:
  void before_forward(const LayerCall& call) override {
    ZeroLayerWrapper::before_forward(call);
    log_.push_back("forward " + std::to_string(call.layer));
  }
  void before_backward(const LayerCall& call) override {
    ZeroLayerWrapper::before_backward(call);
    log_.push_back("backward " + std::to_string(call.layer));
  }

 private:
  std::vector<std::string>& log_;
};

std::shared_ptr<LlamaForCausalLM> model_from_seed(const ModelConfig& config, LayerFactory& factory) {
  torch::manual_seed(3);
  auto model = std::make_shared<LlamaForCausalLM>(config, factory);
  model->init_weights(3);
  return model;
}

size_t position(const std::vector<std::string>& log, const std::string& event, size_t from = 0) {
  for (size_t i = from; i < log.size(); ++i) {
    if (log[i] == event) return i;
  }
  ADD_FAILURE() << "no '" << event << "' after entry " << from;
  return log.size();
}

TEST(ShardedAdamW, Stage3PostsTheNextLayersGatherBeforeALayerComputesForwardAndBackward) {
  std::vector<std::string> log;
  SlowGatherGroup slow(dp(), log);
  auto wrapper = std::make_shared<RecordingZeroWrapper>(log);
  LocalLayerFactory factory;
  factory.use_layer_wrapper(wrapper);
  auto model = model_from_seed(tiny(), factory);
  LocalLayerFactory plain_factory;
  auto reference = model_from_seed(tiny(), plain_factory);
  const NamedTensors params = to_named_tensors(model->named_parameters());
  ZeroOptions zero_options;
  zero_options.stage = 3;
  zero_options.units = zero_units_by_layer(params);
  ShardedAdamW zero(slow, params, AdamWOptions{}, zero_options);
  wrapper->attach(&zero);
  // A gather's input is this rank's shard of one unit: the layer whose piece lies in it.
  slow.layer_of_input = [&](const at::Tensor& input) {
    const auto* begin = static_cast<const char*>(input.data_ptr());
    for (const auto& [name, piece] : zero.shard_named_params()) {
      const auto* at = static_cast<const char*>(piece.data_ptr());
      if (at >= begin && at < begin + input.nbytes()) {
        const size_t dot = name.find('.', std::string("model.layers.").size());
        return name.rfind("model.layers.", 0) == 0 ? name.substr(0, dot) : std::string("rest");
      }
    }
    return std::string("?");
  };
  // After start: the embedding, norm and head (unit 0) gathered, the layers not.
  EXPECT_TRUE(zero.gathered(0));
  for (int64_t layer = 0; layer < 3; ++layer) EXPECT_FALSE(zero.gathered(*zero.layer_unit(layer))) << layer;

  const at::Tensor loss = loss_on_my_data(*model, 0);
  EXPECT_NEAR(loss.item<double>(), loss_on_my_data(*reference, 0).item<double>(), 1e-6);
  loss.backward();
  const size_t backward = position(log, "forward 2") + 1;  // where backward's hooks begin
  for (int64_t i = 0; i + 1 < 3; ++i) {
    // Forward: layer i+1's gather is posted before layer i computes.
    EXPECT_LT(position(log, "gather model.layers." + std::to_string(i + 1)),
              position(log, "forward " + std::to_string(i)))
        << "layer " << i;
  }
  for (int64_t i = 2; i > 0; --i) {
    // Backward: layer i-1's gather (again) before layer i's backward computes.
    EXPECT_LT(position(log, "gather model.layers." + std::to_string(i - 1), backward),
              position(log, "backward " + std::to_string(i), backward))
        << "layer " << i;
  }
  // Afterwards no decoder layer is gathered, and their gradients are in the shard.
  for (int64_t layer = 0; layer < 3; ++layer) EXPECT_FALSE(zero.gathered(*zero.layer_unit(layer))) << layer;
  for (const auto& [name, param] : params) {
    if (name.rfind("model.layers.", 0) == 0) {
      EXPECT_FALSE(param.grad().defined()) << name;
    }
  }
}

TEST(ShardedAdamW, Stage3MatchesWholeAdamWWithAllReducedGradients) {
  auto wrapper = std::make_shared<ZeroLayerWrapper>(/*recompute=*/false);
  LocalLayerFactory factory;
  factory.use_layer_wrapper(wrapper);
  AgainstWholeAdamW pair(model_from_seed(), model_from_seed(tiny(), factory), /*stage=*/3);
  auto& [reference, sharded, options, whole, reducer, params, zero, reduction] = pair;
  wrapper->attach(&zero);
  for (int64_t step = 0; step < 3; ++step) {
    whole.zero_grad();
    zero.zero_grad();
    for (int64_t micro = 0; micro < 2; ++micro) {
      if (micro == 1) reducer.arm();
      (loss_on_my_data(*reference, 2 * step + micro) / 2).backward();
      (loss_on_my_data(*sharded, 2 * step + micro) / 2).backward();
    }
    reducer.finish();
    zero.reduce_gradients();
    const double whole_norm = clip_grad_norm(whole.params(), 0.5);
    const double zero_norm = clip_grad_norm(zero.shard_params(), 0.5, &reduction);
    EXPECT_NEAR(zero_norm, whole_norm, 1e-5 * whole_norm) << "step " << step;
    whole.step(kLr);
    zero.step(kLr);
  }
  // Checkpoints read the parameters whole.
  zero.gather_all();
  for (const auto& named : reference->named_parameters()) {
    const at::Tensor& got = sharded->named_parameters()[named.key()];
    EXPECT_LE((got - named.value()).abs().max().item<double>(), 0.01 * kLr) << named.key();
  }
  zero.release_all();
  const NamedTensors gathered = zero.state_dict();
  const NamedTensors expected = whole.state_dict();
  ASSERT_EQ(gathered.size(), expected.size());
  for (size_t i = 0; i < gathered.size(); ++i) {
    test_support::expect_close(gathered[i].second, expected[i].second, 1e-4, gathered[i].first);
  }
  wrapper->attach(nullptr);
}

// Note [ZeRO with bf16 parameters]: bf16 weights, their fp32 masters in
// the shards, each micro-batch's gradient summed in fp32. Every stage takes
// the steps a whole AdamW takes over the same bf16 model (fp32 masters,
// fp32 sums, fp32 all-reduce); the weights are the masters rounded.
TEST(ShardedAdamW, Bf16ParametersKeepFp32MastersInTheShardsAndStepLikeAWholeAdamW) {
  for (const int64_t stage : {1, 2, 3}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    auto wrapper = std::make_shared<ZeroLayerWrapper>(/*recompute=*/false);
    LocalLayerFactory factory;
    if (stage == 3) factory.use_layer_wrapper(wrapper);
    auto reference = model_from_seed();
    auto sharded = model_from_seed(tiny(), factory);
    reference->to(at::kBFloat16);
    sharded->to(at::kBFloat16);
    AdamWOptions options;
    options.eps = 1e-6;
    AdamW whole(to_named_tensors(reference->named_parameters()), options);
    Fp32GradientAccumulation sums(whole);
    GradientReducer::Options reducer_options;
    reducer_options.grad_holders = whole.gradient_holders();
    GradientReducer reducer(dp(), whole.params(), reducer_options);
    const NamedTensors params = to_named_tensors(sharded->named_parameters());
    ZeroOptions zero_options;
    zero_options.stage = stage;
    zero_options.fp32_grad_accum = true;
    if (stage > 1) zero_options.units = zero_units_by_layer(params);
    ShardedAdamW zero(dp(), params, options, zero_options);
    wrapper->attach(&zero);
    const GradNormReduction reduction =
        sharded_grad_norm({&dp()}, /*tp_rank=*/0, zero.shard_named_params(), tensor_parallel_shard_dims(*sharded));
    for (const auto& piece : zero.shard_params()) EXPECT_EQ(piece.scalar_type(), at::kFloat);
    for (int64_t step = 0; step < 3; ++step) {
      whole.zero_grad();
      zero.zero_grad();
      for (int64_t micro = 0; micro < 2; ++micro) {
        if (micro == 1) reducer.arm();
        if (micro == 1 && stage == 2) zero.arm();
        (loss_on_my_data(*reference, 2 * step + micro) / 2).backward();
        (loss_on_my_data(*sharded, 2 * step + micro) / 2).backward();
      }
      sums.flush();
      reducer.finish();
      zero.reduce_gradients();
      // No clipping: a clipping factor that differs in its last bit (the
      // norms sum in other orders) would round some bf16 weight the other
      // way, and the runs would part by a bf16 rounding.
      const double whole_norm = grad_norm(whole.gradient_holders());
      const double zero_norm = grad_norm(zero.shard_params(), &reduction);
      EXPECT_NEAR(zero_norm, whole_norm, 1e-5 * whole_norm) << "step " << step;
      whole.step(kLr);
      zero.step(kLr);
    }
    // The state, gathered: the whole AdamW's, masters included.
    const NamedTensors gathered = zero.state_dict();
    const NamedTensors expected = whole.state_dict();
    ASSERT_EQ(gathered.size(), expected.size());
    std::map<std::string, at::Tensor> masters;
    for (size_t i = 0; i < gathered.size(); ++i) {
      EXPECT_EQ(gathered[i].first, expected[i].first);
      test_support::expect_close(gathered[i].second, expected[i].second, 1e-4, gathered[i].first);
      if (gathered[i].first.starts_with("optimizer.master.")) masters[AdamW::param_of_entry(gathered[i].first)] = gathered[i].second;
    }
    // The weights are their masters rounded, and stay bf16.
    if (stage == 3) zero.gather_all();
    for (const auto& named : sharded->named_parameters()) {
      EXPECT_EQ(named.value().scalar_type(), at::kBFloat16) << named.key();
      EXPECT_TRUE(at::equal(named.value(), masters.at(named.key()).to(at::kBFloat16))) << named.key();
    }
    if (stage == 3) zero.release_all();

    // A rank's own state lists its pieces' masters; one missing is refused by name.
    NamedTensors local = zero.local_state_dict();
    const auto master = std::find_if(local.begin(), local.end(),
                                     [](const auto& entry) { return entry.first.starts_with("optimizer.master."); });
    ASSERT_NE(master, local.end());
    const std::string missing = master->first;
    local.erase(master);
    try {
      zero.load_local_state_dict(local);
      ADD_FAILURE() << "no BadInput";
    } catch (const BadInput& e) {
      EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    }
    wrapper->attach(nullptr);
  }
}

TEST(ShardedAdamW, ResumesFromAWholeStateLikeTheRunThatSavedIt) {
  // The second model takes the first's weights and whole (gathered) state.
  const auto [a, b] = fourth_step_after_resume([](const NamedTensors&) { return ZeroOptions{}; });
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
