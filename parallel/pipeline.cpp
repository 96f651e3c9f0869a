#include "parallel/pipeline.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "util/error.h"

namespace loom {

namespace {
// Activations and gradients share one tag (Note [pipeline executor]).
constexpr int kStageTag = 1;
constexpr int kGatherTag = 3;
const std::string kTiedName = "model.embed_tokens.weight";

at::Tensor default_loss(const at::Tensor& logits, const at::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
                                             targets.reshape({-1}));
}
}  // namespace

NamedTensors gather_pipeline_stages(ProcessGroup& pp, const NamedTensors& local) {
  // Each rank but 0 sends a header (per tensor: name length, the name's
  // bytes, dtype, rank, sizes; as int64), preceded by its length, then the
  // tensors. Rank 0 receives from rank 1, 2, ... in turn.
  at::NoGradGuard no_grad;
  if (pp.rank() != 0) {
    std::vector<int64_t> header;
    for (const auto& [name, tensor] : local) {
      header.push_back(static_cast<int64_t>(name.size()));
      header.insert(header.end(), name.begin(), name.end());
      header.push_back(static_cast<int64_t>(tensor.scalar_type()));
      header.push_back(tensor.dim());
      for (int64_t size : tensor.sizes()) header.push_back(size);
    }
    at::Tensor length = at::tensor({static_cast<int64_t>(header.size())}, at::kLong);
    pp.send(length, {0, kGatherTag})->wait();
    pp.send(at::tensor(header, at::kLong), {0, kGatherTag})->wait();
    for (const auto& [name, tensor] : local) {
      pp.send(tensor.detach().to(at::kCPU).contiguous(), {0, kGatherTag})->wait();
    }
    return {};
  }
  NamedTensors all;
  std::set<std::string> seen;
  auto keep = [&](const std::string& name, at::Tensor tensor) {
    if (seen.insert(name).second) all.emplace_back(name, std::move(tensor));
  };
  for (const auto& [name, tensor] : local) keep(name, tensor.detach().to(at::kCPU).clone());
  for (int source = 1; source < pp.size(); ++source) {
    at::Tensor length = at::empty({1}, at::kLong);
    pp.recv(length, {source, kGatherTag})->wait();
    at::Tensor header = at::empty({length.item<int64_t>()}, at::kLong);
    pp.recv(header, {source, kGatherTag})->wait();
    const int64_t* h = header.data_ptr<int64_t>();
    const int64_t* end = h + header.numel();
    while (h < end) {
      std::string name(static_cast<size_t>(*h), '\0');
      ++h;
      for (char& c : name) c = static_cast<char>(*h++);
      const auto dtype = static_cast<at::ScalarType>(*h++);
      const int64_t dims = *h++;
      std::vector<int64_t> sizes(h, h + dims);
      h += dims;
      at::Tensor tensor = at::empty(sizes, at::TensorOptions().dtype(dtype));
      pp.recv(tensor, {source, kGatherTag})->wait();
      keep(name, std::move(tensor));
    }
  }
  return all;
}

StageSpec pipeline_stage_spec(int64_t num_layers, int64_t stages, int64_t stage) {
  if (stages < 1 || stage < 0 || stage >= stages) {
    throw BadInput("pipeline stage " + std::to_string(stage) + " of " + std::to_string(stages) + " does not exist");
  }
  if (num_layers < stages) {
    throw BadInput("model.num_layers (" + std::to_string(num_layers) + ") is smaller than the pipeline's " +
                   std::to_string(stages) + " model stages (parallel.pp * parallel.virtual_stages): every stage "
                   "needs a layer");
  }
  const int64_t base = num_layers / stages, extra = num_layers % stages;
  StageSpec spec;
  spec.first_layer = stage * base + std::min(stage, extra);
  spec.num_layers = base + (stage < extra ? 1 : 0);
  spec.has_embedding = stage == 0;
  spec.has_head = stage == stages - 1;
  return spec;
}

std::vector<std::shared_ptr<LlamaForCausalLM>> build_pipeline_chunks(const ModelConfig& model,
                                                                     const LayerFactory& factory,
                                                                     const PipeSchedule& schedule, int64_t rank) {
  const int64_t model_stages = schedule.stages * schedule.virtual_stages;
  std::vector<std::shared_ptr<LlamaForCausalLM>> chunks;
  for (int64_t c = 0; c < schedule.virtual_stages; ++c) {
    const StageSpec spec = pipeline_stage_spec(model.num_layers, model_stages, schedule.model_stage(rank, c));
    chunks.push_back(std::make_shared<LlamaForCausalLM>(model, factory, spec));
  }
  return chunks;
}

PipeGroups::PipeGroups(MpiProcessGroup& pp, const Twin& twin) : host_(&pp) {
  const int p = pp.size(), me = pp.rank();
  if (twin && p > 1) device_twin_ = twin(pp);
  // One stage: a rank running several chunks sends to itself, which only
  // MPI can (the trainer runs no pipeline on one pp rank; its tests do).
  if (p == 1) to_[0] = from_[0] = Link{&pp, 0};
  // The links in one order on every rank: for each pair of ring neighbours
  // (i, i + 1 mod p; one pair when p is 2), the direction i -> i + 1, then
  // the reverse. Every split is collective over pp; the ranks outside a
  // link make a group of their own (colour 1) and drop it.
  const int pairs = p == 1 ? 0 : p == 2 ? 1 : p;
  for (int i = 0; i < pairs; ++i) {
    const int a = i, b = (i + 1) % p;
    for (const auto& [from, to] : {std::pair{a, b}, std::pair{b, a}}) {
      const bool member = me == from || me == to;
      std::unique_ptr<MpiProcessGroup> link =
          pp.split(member ? 0 : 1, me, "pp " + std::to_string(from) + ">" + std::to_string(to));
      if (!member) continue;
      // Group ranks follow pp ranks: the lower pp rank of the two is 0.
      const int other = me == from ? to : from;
      ProcessGroup* group = link.get();
      owned_.push_back(std::move(link));
      if (twin) {
        owned_.push_back(twin(*static_cast<MpiProcessGroup*>(group)));
        group = owned_.back().get();
      }
      (me == from ? to_ : from_)[other] = Link{group, other < me ? 0 : 1};
    }
  }
}

void PipeGroups::set_timeout(std::chrono::milliseconds timeout) {
  for (auto& group : owned_) group->set_timeout(timeout);
  if (device_twin_) device_twin_->set_timeout(timeout);
}

PipeGroups::Link PipeGroups::link(const std::map<int, Link>& links, int pp_rank, const char* direction) const {
  const auto it = links.find(pp_rank);
  if (it == links.end()) {
    throw std::invalid_argument("PipeGroups: pp rank " + std::to_string(host_->rank()) + " has no link " + direction +
                                " pp rank " + std::to_string(pp_rank));
  }
  return it->second;
}

PipelineExecutor::PipelineExecutor(const PipeGroups& groups, const PipeSchedule& schedule,
                                   std::vector<std::shared_ptr<LlamaForCausalLM>> chunks, Shape shape, Hooks hooks)
    : groups_(&groups), schedule_(&schedule), chunks_(std::move(chunks)), shape_(shape), hooks_(std::move(hooks)) {
  ProcessGroup& pp = groups.host();
  if (!hooks_.forward) {
    hooks_.forward = [](LlamaForCausalLM& chunk, const at::Tensor& in, const at::Tensor& positions) {
      return chunk.forward(in, positions);
    };
  }
  if (!hooks_.loss) hooks_.loss = default_loss;
  if (!chunks_.empty() && !chunks_.front()->parameters().empty()) {
    device_ = chunks_.front()->parameters().front().device();
  }
  if (pp.size() != schedule.stages) {
    throw std::invalid_argument("PipelineExecutor: the pp group has " + std::to_string(pp.size()) +
                                " ranks, the schedule " + std::to_string(schedule.stages) + " stages");
  }
  if (static_cast<int64_t>(chunks_.size()) != schedule.virtual_stages) {
    throw std::invalid_argument("PipelineExecutor: " + std::to_string(chunks_.size()) + " chunks for " +
                                std::to_string(schedule.virtual_stages) + " virtual stages");
  }
  // The ranks without a copy of the tied weight take part in the sum of its
  // gradients with zeros of its shape, which with tensor parallelism is the
  // vocabulary slice's: the holders tell the others, once.
  const ModelConfig& config = chunks_.front()->config();
  if (config.tie_embeddings && schedule.stages * schedule.virtual_stages > 1) {
    at::Tensor shape = at::zeros({2}, at::kLong);
    for (auto& chunk : chunks_) {
      for (const auto& named : chunk->named_parameters()) {
        if (named.key() == kTiedName) shape = at::tensor(named.value().sizes().vec(), at::kLong);
      }
    }
    pp.all_reduce(shape, {ReduceOp::kMax})->wait();
    tied_shape_ = {shape[0].item<int64_t>(), shape[1].item<int64_t>()};
  }
}

std::unique_ptr<Work> PipelineExecutor::send_to(int pp_rank, const at::Tensor& tensor) const {
  const PipeGroups::Link link = groups_->to(pp_rank);
  return link.group->send(tensor, {link.peer, kStageTag});
}

std::unique_ptr<Work> PipelineExecutor::recv_from(int pp_rank, const at::Tensor& tensor) const {
  const PipeGroups::Link link = groups_->from(pp_rank);
  return link.group->recv(tensor, {link.peer, kStageTag});
}

namespace {
// Micro-batch m's document positions, undefined without them.
at::Tensor positions_of(const std::vector<at::Tensor>& positions, size_t m) {
  return positions.empty() ? at::Tensor() : positions[m];
}
}  // namespace

at::Tensor PipelineExecutor::scaled_loss(const at::Tensor& logits, const at::Tensor& targets,
                                         const std::vector<double>& loss_scales, int64_t micro_batch,
                                         int64_t micro_batches) const {
  if (loss_scales.empty()) return hooks_.loss(logits, targets) / static_cast<double>(micro_batches);
  const double scale = loss_scales[micro_batch];
  // Nothing of this micro-batch counts: a zero that still has a backward
  // (gradient buckets and tensor-parallel collectives expect one), without
  // asking the loss for a mean over no targets.
  if (scale == 0.0) return logits.sum().to(at::kFloat) * 0.0;
  return hooks_.loss(logits, targets) * scale;
}

double PipelineExecutor::run(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
                             const std::vector<double>& loss_scales, const std::vector<at::Tensor>& positions) {
  const PipeSchedule& s = *schedule_;
  const int64_t p = s.stages, rank = groups_->host().rank(), last_stage = p * s.virtual_stages - 1;
  if (static_cast<int64_t>(inputs.size()) != s.micro_batches || static_cast<int64_t>(targets.size()) != s.micro_batches ||
      (!loss_scales.empty() && static_cast<int64_t>(loss_scales.size()) != s.micro_batches)) {
    throw std::invalid_argument("PipelineExecutor::run: " + std::to_string(inputs.size()) + " inputs, " +
                                std::to_string(targets.size()) + " targets and " + std::to_string(loss_scales.size()) +
                                " loss scales for " + std::to_string(s.micro_batches) + " micro-batches");
  }
  if (!positions.empty() && positions.size() != inputs.size()) {
    throw std::invalid_argument("PipelineExecutor::run: " + std::to_string(positions.size()) + " positions for " +
                                std::to_string(inputs.size()) + " micro-batches");
  }
  // Per (micro-batch, chunk): the chunk's input (a leaf when it came from
  // another stage, so that its gradient can be sent back), its output, and
  // the gradient received for the output.
  struct Slot {
    at::Tensor input, output, output_grad;
  };
  std::map<std::pair<int64_t, int64_t>, Slot> slots;
  std::vector<std::unique_ptr<Work>> sends;
  const auto activation = at::TensorOptions().dtype(shape_.dtype).device(device_);
  const std::vector<int64_t> activation_shape{shape_.batch, shape_.tokens, shape_.hidden};
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions(at::kDouble).device(device_));
  int64_t live = 0;
  last_peak_live_ = 0;
  last_recv_wait_seconds_ = 0;
  const auto run_start = std::chrono::steady_clock::now();
  auto timed_wait = [&](std::unique_ptr<Work> work) {
    const auto start = std::chrono::steady_clock::now();
    work->wait();
    last_recv_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };

  for (const PipeAction& a : s.ranks[rank]) {
    Slot& slot = slots[{a.micro_batch, a.chunk}];
    const int64_t stage = s.model_stage(rank, a.chunk);
    switch (a.op) {
      case PipeOp::kRecvForward: {
        at::Tensor buffer = at::empty(activation_shape, activation);
        timed_wait(recv_from(static_cast<int>((stage - 1) % p), buffer));
        slot.input = buffer.requires_grad_(true);
        break;
      }
      case PipeOp::kForward: {
        LlamaForCausalLM& chunk = *chunks_[a.chunk];
        const at::Tensor& in = stage == 0 ? inputs[a.micro_batch] : slot.input;
        slot.output = hooks_.forward(chunk, in, positions_of(positions, static_cast<size_t>(a.micro_batch)));
        last_peak_live_ = std::max(last_peak_live_, ++live);
        if (stage == last_stage) {
          slot.output = scaled_loss(slot.output, targets[a.micro_batch], loss_scales, a.micro_batch, s.micro_batches);
          loss_sum += slot.output.detach().to(at::kDouble);
        }
        break;
      }
      case PipeOp::kSendForward:
        sends.push_back(send_to(static_cast<int>((stage + 1) % p), slot.output.detach().contiguous()));
        break;
      case PipeOp::kRecvBackward: {
        slot.output_grad = at::empty(activation_shape, activation);
        timed_wait(recv_from(static_cast<int>((stage + 1) % p), slot.output_grad));
        break;
      }
      case PipeOp::kBackward:
        if (stage == last_stage) {
          slot.output.backward();
        } else {
          torch::autograd::backward({slot.output}, {slot.output_grad});
        }
        --live;
        slot.output = at::Tensor();  // the graph is freed; keep only what is sent back
        slot.output_grad = at::Tensor();
        break;
      case PipeOp::kSendBackward:
        sends.push_back(send_to(static_cast<int>((stage - 1) % p), slot.input.grad().contiguous()));
        break;
    }
  }
  for (auto& send : sends) send->wait();
  sync_tied_embedding_grads();
  last_run_seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  return loss_sum.item<double>();
}

double PipelineExecutor::evaluate(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
                                  const std::vector<double>& loss_scales, const std::vector<at::Tensor>& positions) {
  if (!loss_scales.empty() && loss_scales.size() != inputs.size()) {
    throw std::invalid_argument("PipelineExecutor::evaluate: " + std::to_string(loss_scales.size()) +
                                " loss scales for " + std::to_string(inputs.size()) + " micro-batches");
  }
  const PipeSchedule& s = *schedule_;
  if (!positions.empty() && positions.size() != inputs.size()) {
    throw std::invalid_argument("PipelineExecutor::evaluate: " + std::to_string(positions.size()) +
                                " positions for " + std::to_string(inputs.size()) + " micro-batches");
  }
  const int64_t p = s.stages, rank = groups_->host().rank(), last_stage = p * s.virtual_stages - 1;
  at::NoGradGuard no_grad;
  std::vector<std::unique_ptr<Work>> sends;
  std::vector<at::Tensor> outputs;  // kept until their sends are done
  double loss_sum = 0;
  for (size_t m = 0; m < inputs.size(); ++m) {
    for (int64_t c = 0; c < s.virtual_stages; ++c) {
      const int64_t stage = s.model_stage(rank, c);
      at::Tensor in = inputs[m];
      if (stage > 0) {
        in = at::empty({inputs[m].size(0), shape_.tokens, shape_.hidden},
                       at::TensorOptions().dtype(shape_.dtype).device(device_));
        recv_from(static_cast<int>((stage - 1) % p), in)->wait();
      }
      at::Tensor out = hooks_.forward(*chunks_[c], in, positions_of(positions, m));
      if (stage == last_stage) {
        loss_sum += scaled_loss(out, targets[m], loss_scales, static_cast<int64_t>(m), 1).item<double>();
      } else {
        outputs.push_back(out.contiguous());
        sends.push_back(send_to(static_cast<int>((stage + 1) % p), outputs.back()));
      }
    }
  }
  for (auto& send : sends) send->wait();
  const bool has_last = s.model_stage(rank, s.virtual_stages - 1) == last_stage;
  if (!has_last || inputs.empty()) return 0.0;
  return loss_scales.empty() ? loss_sum / static_cast<double>(inputs.size()) : loss_sum;
}

void PipelineExecutor::sync_tied_embedding_grads() {
  if (tied_shape_.empty()) return;
  // Model stage 0 and the last model stage each hold a copy of the tied
  // weight (the embedding, and the head's), and each copy's gradient is one
  // part of the tied weight's: their sum, on both, keeps the copies equal
  // after the update. Every pp rank takes part in the all-reduce (those
  // without a copy with zeros), so no extra group is needed.
  at::NoGradGuard no_grad;
  std::vector<std::pair<at::Tensor*, at::ScalarType>> grads;  // each copy's gradient slot, and its dtype
  for (auto& chunk : chunks_) {
    for (const auto& named : chunk->named_parameters()) {
      if (named.key() != kTiedName) continue;
      const at::Tensor& param = named.value();
      at::Tensor* grad = hooks_.gradient_of ? &hooks_.gradient_of(param) : &param.mutable_grad();
      // A slot other than the parameter's own .grad is an fp32 sum.
      grads.emplace_back(grad, grad == &param.mutable_grad() ? param.scalar_type() : at::kFloat);
    }
  }
  at::Tensor sum = at::zeros(tied_shape_, at::TensorOptions(at::kFloat).device(device_));
  for (const auto& [grad, dtype] : grads) {
    if (grad->defined()) sum += *grad;
  }
  groups_->device().all_reduce(sum)->wait();
  for (auto& [grad, dtype] : grads) {
    if (grad->defined()) {
      grad->copy_(sum);
    } else {
      *grad = sum.to(dtype, /*non_blocking=*/false, /*copy=*/true);
    }
  }
}

}  // namespace loom
