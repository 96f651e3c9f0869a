#include "trainer/forward_backward.h"

#include <limits>
#include <stdexcept>
#include <utility>

#include <ATen/autocast_mode.h>

#include "model/kernels/fused_ops.h"
#include "parallel/device_groups.h"
#include "parallel/mpi_process_group.h"
#include "parallel/vocab_parallel.h"

namespace loom {

namespace {

// precision.compute bf16: the forward runs under autocast, so matmuls and
// attention take bf16 copies of the fp32 weights and activations while the
// parameters, their gradients (accumulated over micro-batches) and the
// optimizer stay fp32, as torch.autocast does. Backward follows the forward's
// dtypes by itself; only the forward is inside the scope.
class AutocastScope {
 public:
  AutocastScope(c10::DeviceType device_type, bool enabled) : device_type_(device_type), enabled_(enabled) {
    if (!enabled_) return;
    previous_enabled_ = at::autocast::is_autocast_enabled(device_type_);
    previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
    at::autocast::set_autocast_enabled(device_type_, true);
    at::autocast::set_autocast_dtype(device_type_, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_type_, previous_enabled_);
    at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_type_;
  bool enabled_;
  bool previous_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kBFloat16;
};

// A micro-batch's rows as (inputs, targets) on `device`: [rows, cols - 1] each.
// A copy: autograd keeps the ids for the embedding's backward, and the tensor
// must own them rather than borrow the batch's buffer.
std::pair<torch::Tensor, torch::Tensor> to_inputs_targets(MicroBatch& batch, c10::Device device) {
  const auto rows_bt = torch::from_blob(batch.tokens.data(), {batch.rows, batch.cols}, torch::kLong)
                           .to(device, /*non_blocking=*/false, /*copy=*/true);
  return {rows_bt.slice(1, 0, batch.cols - 1), rows_bt.slice(1, 1, batch.cols)};
}

// The model's (or a pipeline chunk's) forward, under bf16 autocast when asked.
torch::Tensor autocast_forward(LlamaForCausalLM& model, const torch::Tensor& input, bool bf16) {
  AutocastScope autocast(input.device().type(), bf16);
  return model.forward(input);
}

// Mean cross-entropy of `logits_btv` against `targets_bt`, in fp32 whatever
// the compute dtype. With a tensor-parallel group the logits are this rank's
// slice of the vocabulary, and the loss is the vocabulary-parallel
// cross-entropy (the same number on every rank of the group).
torch::Tensor token_loss(const torch::Tensor& logits_btv, const torch::Tensor& targets_bt, ProcessGroup* tp) {
  const torch::Tensor logits_nv = logits_btv.reshape({-1, logits_btv.size(-1)});
  if (tp != nullptr) return vocab_parallel_cross_entropy(*tp, logits_nv, targets_bt.reshape({-1}));
  return kernels::cross_entropy(logits_nv, targets_bt.reshape({-1}));  // fused on a GPU (model/kernels/fused_ops.h)
}

torch::Tensor zero_loss(c10::Device device) {
  return torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
}

class PlainForwardBackward final : public ForwardBackward {
 public:
  PlainForwardBackward(LlamaForCausalLM& model, ProcessGroup* tp_data, GradientReducer* reducer,
                       const ForwardBackwardSetup& setup)
      : model_(model), tp_data_(tp_data), reducer_(reducer), setup_(setup) {}

  torch::Tensor run(Loader& loader, const LossEdit& edit, std::vector<uint64_t>& samples,
                    const MicroBatchDone& done) override {
    const int64_t micro_batches = setup_.micro_batches;
    torch::Tensor step_loss = zero_loss(setup_.device);
    for (int64_t m = 0; m < micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      auto [inputs_bt, targets_bt] = to_inputs_targets(batch, setup_.device);
      // Mean over this micro-batch's tokens, divided by the number of
      // micro-batches: the accumulated gradient is then that of the mean
      // over the whole global batch (every micro-batch has as many tokens).
      auto loss = next_token_loss(inputs_bt, targets_bt) / static_cast<double>(micro_batches);
      if (edit.poison && m == 0) loss = loss * std::numeric_limits<double>::quiet_NaN();
      if (edit.scale != 1.0 && m == 0) loss = loss * edit.scale;
      if (reducer_ != nullptr && m == micro_batches - 1) reducer_->arm();
      loss.backward();
      step_loss += loss.detach().to(torch::kDouble);
      done(m + 1);
    }
    return step_loss;
  }

  double evaluate(const Loader& loader, int64_t max_batches) override {
    torch::NoGradGuard no_grad;
    torch::Tensor total = zero_loss(setup_.device);
    int64_t count = 0;
    for (MicroBatch batch : loader.validation_batches(max_batches)) {
      auto [inputs_bt, targets_bt] = to_inputs_targets(batch, setup_.device);
      total += next_token_loss(inputs_bt, targets_bt).to(torch::kDouble);
      ++count;
    }
    return count > 0 ? total.item<double>() / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
  }

 private:
  // Mean next-token cross-entropy of `inputs_bt` -> `targets_bt`.
  torch::Tensor next_token_loss(const torch::Tensor& inputs_bt, const torch::Tensor& targets_bt) {
    return token_loss(autocast_forward(model_, inputs_bt, setup_.bf16), targets_bt, tp_data_);
  }

  LlamaForCausalLM& model_;
  ProcessGroup* tp_data_;
  GradientReducer* reducer_;
  ForwardBackwardSetup setup_;
};

class PipelineForwardBackward final : public ForwardBackward {
 public:
  PipelineForwardBackward(ModelParts& parts, const TrainGroups& groups, const ForwardBackwardSetup& setup)
      : pp_(*groups.pp), setup_(setup) {
    PipelineExecutor::Shape shape;
    shape.batch = setup.micro_batch;
    // A sequence-parallel residual stream holds a slice of the tokens.
    shape.tokens = groups.tp != nullptr && setup.sequence_parallel ? setup.seq_len / groups.tp->size() : setup.seq_len;
    shape.hidden = setup.hidden_size;
    shape.dtype = setup.bf16 ? torch::kBFloat16 : torch::kFloat;
    PipelineExecutor::Hooks hooks;
    hooks.forward = [bf16 = setup.bf16](LlamaForCausalLM& chunk, const torch::Tensor& input) {
      return autocast_forward(chunk, input, bf16);
    };
    hooks.loss = [tp_data = groups.tp_data](const torch::Tensor& logits, const torch::Tensor& targets) {
      return token_loss(logits, targets, tp_data);
    };
    auto* pp_mpi = dynamic_cast<MpiProcessGroup*>(groups.pp);
    if (pp_mpi == nullptr) throw std::logic_error("train: the pp group must be an MPI group");
    PipeGroups::Twin twin;
    if (has_device_groups(setup.device, setup.device_backend)) {
      twin = [device = setup.device, backend = setup.device_backend](MpiProcessGroup& group) {
        return device_twin(group, device, backend);
      };
    }
    links_ = std::make_unique<PipeGroups>(*pp_mpi, twin);
    executor_ = std::make_unique<PipelineExecutor>(*links_, *parts.schedule, parts.modules, shape, std::move(hooks));
  }

  // The pipeline runs the whole step's micro-batches at once (the schedule
  // interleaves them); its loss is the last stage's, shared with all.
  torch::Tensor run(Loader& loader, const LossEdit& edit, std::vector<uint64_t>& samples,
                    const MicroBatchDone& done) override {
    std::vector<torch::Tensor> inputs, targets;
    for (int64_t m = 0; m < setup_.micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      auto [inputs_bt, targets_bt] = to_inputs_targets(batch, setup_.device);
      inputs.push_back(inputs_bt);
      targets.push_back(targets_bt);
    }
    torch::Tensor step_loss = zero_loss(setup_.device);
    step_loss += executor_->run(inputs, targets);
    all_reduce_through_cpu(pp_, step_loss);
    if (edit.poison) step_loss = step_loss * std::numeric_limits<double>::quiet_NaN();
    if (edit.scale != 1.0) step_loss = step_loss * edit.scale;
    done(setup_.micro_batches);
    return step_loss;
  }

  // The last stage's mean, on every stage. Collective over pp.
  double evaluate(const Loader& loader, int64_t max_batches) override {
    std::vector<torch::Tensor> inputs, targets;
    for (MicroBatch batch : loader.validation_batches(max_batches)) {
      auto [inputs_bt, targets_bt] = to_inputs_targets(batch, setup_.device);
      inputs.push_back(inputs_bt);
      targets.push_back(targets_bt);
    }
    if (inputs.empty()) return std::numeric_limits<double>::quiet_NaN();
    torch::Tensor loss = torch::tensor(executor_->evaluate(inputs, targets), torch::kDouble);
    all_reduce_through_cpu(pp_, loss);
    return loss.item<double>();
  }

  void follow_timeout(std::chrono::milliseconds timeout) override { links_->set_timeout(timeout); }

 private:
  ProcessGroup& pp_;
  ForwardBackwardSetup setup_;
  std::unique_ptr<PipeGroups> links_;
  std::unique_ptr<PipelineExecutor> executor_;
};

}  // namespace

std::unique_ptr<ForwardBackward> make_plain_forward_backward(LlamaForCausalLM& model, const TrainGroups& groups,
                                                             GradientReducer* reducer,
                                                             const ForwardBackwardSetup& setup) {
  return std::make_unique<PlainForwardBackward>(model, groups.tp_data, reducer, setup);
}

std::unique_ptr<ForwardBackward> make_pipeline_forward_backward(ModelParts& parts, const TrainGroups& groups,
                                                                const ForwardBackwardSetup& setup) {
  return std::make_unique<PipelineForwardBackward>(parts, groups, setup);
}

}  // namespace loom
