#include "trainer/forward_backward.h"

#include <limits>
#include <stdexcept>
#include <tuple>
#include <utility>

#include <ATen/autocast_mode.h>

#include "model/kernels/fused_ops.h"
#include "parallel/context_parallel.h"
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

// Note [masked loss]
// A run whose batches carry a loss mask (chat data: MicroBatch::loss_mask) or
// document positions (data.document_mask: MicroBatch::positions) trains on
// some targets only. Target t of a row (the token at t + 1) counts when
// loss_mask[t + 1] is 1 and, with positions, when positions[t + 1] != 0 (that
// token starts the next document, which nothing before it may predict). The
// step's loss is the mean over the counted targets of the whole global batch,
//   L = (sum of ce over the counted targets of every micro-batch on every dp
//        replica) / N,   N = their number,
// not a mean of per-micro-batch means, which would weigh a target by how few
// others share its micro-batch. Each rank loads its step's micro-batches
// first, counts their targets and all-reduces the count over dp (one int64),
// so that before the first backward each micro-batch m knows its share:
//   L_m = mean_m * n_m * dp / N,
// mean_m its mean over its n_m counted targets (the others are given to
// cross-entropy as kIgnoredTarget). The dp reducer averages the replicas'
// gradients, so the gradient is L's; the trainer's dp average of the
// replicas' sums of L_m is L. A micro-batch with no counted target adds a
// zero that still has a backward. A run with neither mask keeps the unmasked
// formula (each micro-batch's mean divided by the micro-batches), bit for bit.

bool is_masked(const MicroBatch& batch) { return !batch.loss_mask.empty() || !batch.positions.empty(); }

// The positions of the micro-batch's inputs within their documents,
// [rows, cols - 1] int64 on the CPU, where the model reads them (Note
// [document mask] in model/document_mask.h); undefined without
// data.document_mask.
torch::Tensor input_positions(const MicroBatch& batch) {
  if (batch.positions.empty()) return {};
  torch::Tensor positions = torch::empty({batch.rows, batch.cols - 1}, torch::kLong);
  int64_t* out = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < batch.rows; ++r)
    for (int64_t t = 0; t + 1 < batch.cols; ++t) out[r * (batch.cols - 1) + t] = batch.positions[r * batch.cols + t];
  return positions;
}

// A micro-batch's inputs and targets on `device` ([rows, cols - 1] each),
// the targets that do not count (Note [masked loss]) set to kIgnoredTarget,
// and how many do.
struct MaskedBatch {
  torch::Tensor inputs, targets;
  int64_t counted = 0;
  torch::Tensor positions;  // input_positions(): undefined without data.document_mask
};

MaskedBatch to_masked_batch(const MicroBatch& batch, c10::Device device) {
  const int64_t rows = batch.rows, cols = batch.cols;
  const size_t size = static_cast<size_t>(rows * cols);
  if ((!batch.loss_mask.empty() && batch.loss_mask.size() != size) ||
      (!batch.positions.empty() && batch.positions.size() != size)) {
    throw std::logic_error("train: a micro-batch's loss mask or positions do not match its " + std::to_string(rows) +
                           " x " + std::to_string(cols) + " tokens");
  }
  torch::Tensor inputs = torch::empty({rows, cols - 1}, torch::kLong);
  torch::Tensor targets = torch::empty({rows, cols - 1}, torch::kLong);
  int64_t* in = inputs.data_ptr<int64_t>();
  int64_t* out = targets.data_ptr<int64_t>();
  int64_t counted = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t + 1 < cols; ++t) {
      const size_t next = static_cast<size_t>(r * cols + t + 1);
      const bool counts = (batch.loss_mask.empty() || batch.loss_mask[next] != 0) &&
                          (batch.positions.empty() || batch.positions[next] != 0);
      in[r * (cols - 1) + t] = batch.tokens[next - 1];
      out[r * (cols - 1) + t] = counts ? batch.tokens[next] : kIgnoredTarget;
      counted += counts ? 1 : 0;
    }
  }
  return {inputs.to(device), targets.to(device), counted, input_positions(batch)};
}

// The counted targets of the replicas together (Note [masked loss]).
int64_t count_over_dp(ProcessGroup* dp, int64_t counted) {
  if (dp == nullptr || dp->size() == 1) return counted;
  torch::Tensor total = torch::tensor({counted}, torch::kLong);
  all_reduce_through_cpu(*dp, total);
  return total.item<int64_t>();
}

// The counted targets N of every replica's `batches` together, and each
// micro-batch's share L_m / mean_m = n_m * dp / N of Note [masked loss] (all 0
// when nothing counts).
struct MaskedShares {
  int64_t total = 0;
  std::vector<double> scales;
};

MaskedShares masked_shares(const std::vector<MaskedBatch>& batches, ProcessGroup* dp) {
  int64_t counted = 0;
  for (const MaskedBatch& b : batches) counted += b.counted;
  MaskedShares shares;
  shares.total = count_over_dp(dp, counted);
  const double replicas = dp != nullptr ? static_cast<double>(dp->size()) : 1.0;
  for (const MaskedBatch& b : batches) {
    shares.scales.push_back(shares.total > 0 ? static_cast<double>(b.counted) * replicas /
                                                   static_cast<double>(shares.total)
                                             : 0.0);
  }
  return shares;
}

// A micro-batch's rows as (inputs, targets) on `device`: [rows, cols - 1] each.
// A copy: autograd keeps the ids for the embedding's backward, and the tensor
// must own them rather than borrow the batch's buffer.
std::pair<torch::Tensor, torch::Tensor> to_inputs_targets(MicroBatch& batch, c10::Device device) {
  const auto rows_bt = torch::from_blob(batch.tokens.data(), {batch.rows, batch.cols}, torch::kLong)
                           .to(device, /*non_blocking=*/false, /*copy=*/true);
  return {rows_bt.slice(1, 0, batch.cols - 1), rows_bt.slice(1, 1, batch.cols)};
}

// The model's (or a pipeline chunk's) forward, under bf16 autocast when asked;
// over packed documents when `positions` is defined.
torch::Tensor autocast_forward(LlamaForCausalLM& model, const torch::Tensor& input, bool bf16,
                               const torch::Tensor& positions = {}) {
  AutocastScope autocast(input.device().type(), bf16);
  return model.forward(input, positions);
}

// Mean cross-entropy of `logits_btv` against `targets_bt`, in fp32 whatever
// the compute dtype. With a tensor-parallel group the logits are this rank's
// slice of the vocabulary, and the loss is the vocabulary-parallel
// cross-entropy (the same number on every rank of the group), whose padding
// columns beyond `vocab` leave the softmax (Note [vocab padding]).
// `masked`: targets equal to kIgnoredTarget leave the mean (Note [masked
// loss]); the caller never asks for a mean over no targets.
torch::Tensor token_loss(const torch::Tensor& logits_btv, const torch::Tensor& targets_bt, ProcessGroup* tp,
                         int64_t vocab, bool masked = false) {
  const torch::Tensor logits_nv = logits_btv.reshape({-1, logits_btv.size(-1)});
  if (tp != nullptr) return vocab_parallel_cross_entropy(*tp, logits_nv, targets_bt.reshape({-1}), masked, vocab);
  // Fused on a GPU (model/kernels/fused_ops.h); both paths ignore kIgnoredTarget as torch does.
  return kernels::cross_entropy(logits_nv, targets_bt.reshape({-1}));
}

// Micro-batch loss times its share (Note [masked loss]); a zero with a
// backward when the share is 0.
torch::Tensor scaled_token_loss(const torch::Tensor& logits_btv, const torch::Tensor& targets_bt, ProcessGroup* tp,
                                int64_t vocab, double scale) {
  if (scale == 0.0) return logits_btv.sum().to(torch::kFloat) * 0.0;
  return token_loss(logits_btv, targets_bt, tp, vocab, /*masked=*/true) * scale;
}

torch::Tensor zero_loss(c10::Device device) {
  return torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
}

// Note [cp tokens]
// Under context parallelism every cp rank of a replica loads the replica's
// micro-batches and keeps its zig-zag share of each row's inputs and
// targets (Note [zig-zag chunks] in parallel/context_parallel.h): its mean
// loss is over those, and the dp x cp average (Note [cp replicas] in
// parallel/process_group.h) makes the replica's mean. A masked batch's
// counted targets are counted again on the share, so that the dp x cp sum
// of the counts is the global batch's. Packed documents' positions stay
// whole: rotary takes the rank's from them, and the ring attention core
// the documents of every rank's keys (RingAttentionCore::forward_documents).
// This cp rank's tokens of a micro-batch (Note [cp tokens]); the batch
// itself without context parallelism (`cp` null).
std::pair<torch::Tensor, torch::Tensor> cp_share(ProcessGroup* cp, std::pair<torch::Tensor, torch::Tensor> batch) {
  if (cp == nullptr) return batch;
  return {zigzag_tokens(batch.first, cp->rank(), cp->size()), zigzag_tokens(batch.second, cp->rank(), cp->size())};
}

MaskedBatch cp_share(ProcessGroup* cp, MaskedBatch batch) {
  if (cp == nullptr) return batch;
  std::tie(batch.inputs, batch.targets) = cp_share(cp, std::pair{batch.inputs, batch.targets});
  batch.counted = batch.targets.ne(kIgnoredTarget).sum().item<int64_t>();
  return batch;
}

class PlainForwardBackward final : public ForwardBackward {
 public:
  PlainForwardBackward(LlamaForCausalLM& model, ProcessGroup* tp_data, ProcessGroup* dp, ProcessGroup* cp,
                       GradientSync* reducer, const ForwardBackwardSetup& setup)
      : model_(model), tp_data_(tp_data), dp_(dp), cp_(cp), reducer_(reducer), setup_(setup) {}

  torch::Tensor run(Loader& loader, const LossEdit& edit, std::vector<uint64_t>& samples,
                    const MicroBatchDone& done) override {
    const int64_t micro_batches = setup_.micro_batches;
    torch::Tensor step_loss = zero_loss(setup_.device);
    last_loss_tokens_ = -1;
    for (int64_t m = 0; m < micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      if (is_masked(batch)) return run_masked(loader, std::move(batch), edit, samples, done);
      auto [inputs_bt, targets_bt] = cp_share(cp_, to_inputs_targets(batch, setup_.device));
      // Mean over this micro-batch's tokens, divided by the number of
      // micro-batches: the accumulated gradient is then that of the mean
      // over the whole global batch (every micro-batch has as many tokens).
      backward(next_token_loss(inputs_bt, targets_bt) / static_cast<double>(micro_batches), m, edit, step_loss, done);
    }
    return step_loss;
  }

  double evaluate(const Loader& loader, int64_t max_batches) override {
    torch::NoGradGuard no_grad;
    torch::Tensor total = zero_loss(setup_.device);
    int64_t count = 0;
    std::vector<MaskedBatch> masked;
    for (MicroBatch batch : loader.validation_batches(max_batches)) {
      if (is_masked(batch)) {
        masked.push_back(cp_share(cp_, to_masked_batch(batch, setup_.device)));
        continue;
      }
      auto [inputs_bt, targets_bt] = cp_share(cp_, to_inputs_targets(batch, setup_.device));
      total += next_token_loss(inputs_bt, targets_bt).to(torch::kDouble);
      ++count;
    }
    if (!masked.empty()) return evaluate_masked(masked);
    return count > 0 ? total.item<double>() / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
  }

  int64_t last_loss_tokens() const override { return last_loss_tokens_; }

 private:
  // The step's micro-batches with a loss mask or positions (Note [masked
  // loss]): all loaded and counted first. `first` is the one run() read.
  torch::Tensor run_masked(Loader& loader, MicroBatch first, const LossEdit& edit, std::vector<uint64_t>& samples,
                           const MicroBatchDone& done) {
    const int64_t micro_batches = setup_.micro_batches;
    std::vector<MaskedBatch> batches;
    for (int64_t m = 0; m < micro_batches; ++m) {
      MicroBatch batch = m == 0 ? std::move(first) : loader.next_micro_batch();
      if (m > 0) {
        for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      }
      batches.push_back(cp_share(cp_, to_masked_batch(batch, setup_.device)));
    }
    const MaskedShares shares = masked_shares(batches, dp_);
    last_loss_tokens_ = shares.total;
    torch::Tensor step_loss = zero_loss(setup_.device);
    for (int64_t m = 0; m < micro_batches; ++m) {
      const MaskedBatch& b = batches[static_cast<size_t>(m)];
      const torch::Tensor logits = autocast_forward(model_, b.inputs, setup_.bf16, b.positions);
      backward(scaled_token_loss(logits, b.targets, tp_data_, vocab(), shares.scales[static_cast<size_t>(m)]), m, edit,
               step_loss, done);
    }
    return step_loss;
  }

  // Micro-batch m's backward: the test-only loss edits on the first, the dp
  // reducer armed before the last, the loss added to the step's.
  void backward(torch::Tensor loss, int64_t m, const LossEdit& edit, torch::Tensor& step_loss,
                const MicroBatchDone& done) {
    if (edit.poison && m == 0) loss = loss * std::numeric_limits<double>::quiet_NaN();
    if (edit.scale != 1.0 && m == 0) loss = loss * edit.scale;
    if (reducer_ != nullptr && m == setup_.micro_batches - 1) reducer_->arm();
    loss.backward();
    step_loss += loss.detach().to(torch::kDouble);
    done(m + 1);
  }

  // The mean over the counted targets of this replica's validation batches,
  // made the mean over every replica's by weighing with the dp total
  // (validation_loss averages the replicas' results).
  double evaluate_masked(const std::vector<MaskedBatch>& batches) {
    const MaskedShares shares = masked_shares(batches, dp_);
    if (shares.total == 0) return std::numeric_limits<double>::quiet_NaN();
    torch::Tensor sum = zero_loss(setup_.device);
    for (size_t m = 0; m < batches.size(); ++m) {
      const torch::Tensor logits = autocast_forward(model_, batches[m].inputs, setup_.bf16, batches[m].positions);
      sum += scaled_token_loss(logits, batches[m].targets, tp_data_, vocab(), shares.scales[m]).to(torch::kDouble);
    }
    return sum.item<double>();
  }

  // Mean next-token cross-entropy of `inputs_bt` -> `targets_bt`.
  torch::Tensor next_token_loss(const torch::Tensor& inputs_bt, const torch::Tensor& targets_bt) {
    return token_loss(autocast_forward(model_, inputs_bt, setup_.bf16), targets_bt, tp_data_, vocab());
  }
  int64_t vocab() const { return model_.config().vocab_size; }

  LlamaForCausalLM& model_;
  ProcessGroup* tp_data_;
  ProcessGroup* dp_;
  ProcessGroup* cp_;  // null without context parallelism
  GradientSync* reducer_;
  ForwardBackwardSetup setup_;
  int64_t last_loss_tokens_ = -1;
};

class PipelineForwardBackward final : public ForwardBackward {
 public:
  PipelineForwardBackward(ModelParts& parts, const TrainGroups& groups, const ForwardBackwardSetup& setup)
      : pp_(*groups.pp), dp_(groups.dp), cp_(groups.cp), setup_(setup) {
    PipelineExecutor::Shape shape;
    shape.batch = setup.micro_batch;
    // A sequence-parallel residual stream holds a slice of the tokens.
    // A context-parallel rank holds its share of them (Note [cp tokens]).
    shape.tokens = groups.cp != nullptr ? setup.seq_len / groups.cp->size() : setup.seq_len;
    if (groups.tp != nullptr && setup.sequence_parallel) shape.tokens /= groups.tp->size();
    shape.hidden = setup.hidden_size;
    shape.dtype = setup.bf16 ? torch::kBFloat16 : torch::kFloat;
    PipelineExecutor::Hooks hooks;
    hooks.forward = [bf16 = setup.bf16](LlamaForCausalLM& chunk, const torch::Tensor& input,
                                        const torch::Tensor& positions) {
      return autocast_forward(chunk, input, bf16, positions);
    };
    hooks.loss = [this, tp_data = groups.tp_data, vocab = parts.modules.front()->config().vocab_size](
                     const torch::Tensor& logits, const torch::Tensor& targets) {
      return token_loss(logits, targets, tp_data, vocab, masked_now_);
    };
    hooks.gradient_of = setup.gradient_of;
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
    std::vector<torch::Tensor> inputs, targets, positions;
    std::vector<MaskedBatch> masked;
    for (int64_t m = 0; m < setup_.micro_batches; ++m) {
      MicroBatch batch = loader.next_micro_batch();
      for (const SampleId& id : batch.samples) samples.push_back(id.global_index);
      if (is_masked(batch)) {
        masked.push_back(cp_share(cp_, to_masked_batch(batch, setup_.device)));
        inputs.push_back(masked.back().inputs);
        targets.push_back(masked.back().targets);
        if (masked.back().positions.defined()) positions.push_back(masked.back().positions);
        continue;
      }
      auto [inputs_bt, targets_bt] = cp_share(cp_, to_inputs_targets(batch, setup_.device));
      inputs.push_back(inputs_bt);
      targets.push_back(targets_bt);
    }
    // Note [masked loss]: every stage loads the same batches, so every stage
    // finds the same counts.
    std::vector<double> scales;
    last_loss_tokens_ = -1;
    if (!masked.empty()) {
      MaskedShares shares = masked_shares(masked, dp_);
      last_loss_tokens_ = shares.total;
      scales = std::move(shares.scales);
    }
    torch::Tensor step_loss = zero_loss(setup_.device);
    masked_now_ = !masked.empty();
    step_loss += executor_->run(inputs, targets, scales, positions);
    all_reduce_through_cpu(pp_, step_loss);
    if (edit.poison) step_loss = step_loss * std::numeric_limits<double>::quiet_NaN();
    if (edit.scale != 1.0) step_loss = step_loss * edit.scale;
    done(setup_.micro_batches);
    return step_loss;
  }

  // The last stage's mean, on every stage. Collective over pp.
  double evaluate(const Loader& loader, int64_t max_batches) override {
    std::vector<torch::Tensor> inputs, targets, positions;
    std::vector<MaskedBatch> masked;
    for (MicroBatch batch : loader.validation_batches(max_batches)) {
      if (is_masked(batch)) {
        masked.push_back(cp_share(cp_, to_masked_batch(batch, setup_.device)));
        inputs.push_back(masked.back().inputs);
        targets.push_back(masked.back().targets);
        if (masked.back().positions.defined()) positions.push_back(masked.back().positions);
        continue;
      }
      auto [inputs_bt, targets_bt] = cp_share(cp_, to_inputs_targets(batch, setup_.device));
      inputs.push_back(inputs_bt);
      targets.push_back(targets_bt);
    }
    if (inputs.empty()) return std::numeric_limits<double>::quiet_NaN();
    std::vector<double> scales;
    if (!masked.empty()) {
      // As the plain path's evaluate_masked: weighed by the dp total.
      MaskedShares shares = masked_shares(masked, dp_);
      if (shares.total == 0) return std::numeric_limits<double>::quiet_NaN();
      scales = std::move(shares.scales);
    }
    masked_now_ = !masked.empty();
    torch::Tensor loss = torch::tensor(executor_->evaluate(inputs, targets, scales, positions), torch::kDouble);
    all_reduce_through_cpu(pp_, loss);
    return loss.item<double>();
  }

  void follow_timeout(std::chrono::milliseconds timeout) override { links_->set_timeout(timeout); }
  int64_t last_loss_tokens() const override { return last_loss_tokens_; }

 private:
  ProcessGroup& pp_;
  ProcessGroup* dp_;
  ProcessGroup* cp_;  // null without context parallelism
  ForwardBackwardSetup setup_;
  int64_t last_loss_tokens_ = -1;
  bool masked_now_ = false;  // the batches being run have a mask: the loss ignores kIgnoredTarget
  std::unique_ptr<PipeGroups> links_;
  std::unique_ptr<PipelineExecutor> executor_;
};

}  // namespace

std::unique_ptr<ForwardBackward> make_plain_forward_backward(LlamaForCausalLM& model, const TrainGroups& groups,
                                                             GradientSync* reducer,
                                                             const ForwardBackwardSetup& setup) {
  return std::make_unique<PlainForwardBackward>(model, groups.tp_data, groups.dp, groups.cp, reducer, setup);
}

std::unique_ptr<ForwardBackward> make_pipeline_forward_backward(ModelParts& parts, const TrainGroups& groups,
                                                                const ForwardBackwardSetup& setup) {
  return std::make_unique<PipelineForwardBackward>(parts, groups, setup);
}

}  // namespace loom
