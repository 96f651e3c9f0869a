#include "parallel/zero.h"

#include <ATen/ATen.h>
#include <c10/core/StorageImpl.h>

#include <algorithm>
#include <chrono>
#include <iterator>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "util/error.h"

namespace loom {

namespace {
constexpr const char* kStep = "optimizer.step";
constexpr const char* kKinds[] = {"optimizer.exp_avg.", "optimizer.exp_avg_sq."};

// The decoder layer N whose parameters (model.layers.N.*) are exactly
// `members`; -1 when they are not all one layer's.
int64_t layer_of(const NamedTensors& params, const std::vector<size_t>& members) {
  static const std::string kLayers = "model.layers.";
  int64_t layer = -1;
  for (size_t i : members) {
    const std::string& name = params[i].first;
    if (name.rfind(kLayers, 0) != 0) return -1;
    const int64_t n = std::stoll(name.substr(kLayers.size(), name.find('.', kLayers.size()) - kLayers.size()));
    if (layer >= 0 && n != layer) return -1;
    layer = n;
  }
  return layer;
}

// Note [ZeRO-3]: a unit's buffer keeps its storage object (which its
// parameters' views share) while the memory under it comes and goes.
void free_storage(const at::Tensor& buffer) {
  c10::StorageImpl* storage = buffer.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(c10::DataPtr(nullptr, buffer.device()));
  storage->set_nbytes(0);
}

void allocate_storage(const at::Tensor& buffer, int64_t numel) {
  c10::StorageImpl* storage = buffer.storage().unsafeGetStorageImpl();
  const size_t nbytes = static_cast<size_t>(numel) * buffer.element_size();
  storage->set_data_ptr_noswap(storage->allocator()->allocate(nbytes));
  storage->set_nbytes(nbytes);
}

}  // namespace

std::vector<std::vector<size_t>> zero_units_by_layer(const NamedTensors& params) {
  static const std::string kLayers = "model.layers.", kEmbedding = "model.embed_tokens.";
  std::vector<std::vector<size_t>> units;
  // "layer N" for a decoder layer's parameters, "embedding" for the input
  // embedding's, "" for the rest (final norm, head).
  std::map<std::string, size_t> unit_of_key;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].first;
    std::string key;
    if (name.rfind(kLayers, 0) == 0) {
      key = "layer " + name.substr(kLayers.size(), name.find('.', kLayers.size()) - kLayers.size());
    } else if (name.rfind(kEmbedding, 0) == 0) {
      key = "embedding";
    }
    const auto [it, added] = unit_of_key.emplace(key, units.size());
    if (added) units.emplace_back();
    units[it->second].push_back(i);
  }
  return units;
}

ShardedAdamW::ShardedAdamW(ProcessGroup& dp, NamedTensors params, AdamWOptions options, ZeroOptions zero)
    : dp_(&dp), params_(std::move(params)), stage_(zero.stage), overlap_(zero.overlap) {
  if (stage_ < 1 || stage_ > 3) throw std::invalid_argument("ShardedAdamW: stage must be 1, 2 or 3");
  for (const auto& [name, param] : params_) {
    if (!param.defined() || !at::isFloatingType(param.scalar_type()) ||
        param.scalar_type() != params_[0].second.scalar_type()) {
      throw std::invalid_argument("ShardedAdamW: parameter '" + name +
                                  "' must be a defined floating-point tensor of the first parameter's dtype");
    }
  }
  if (zero.units.empty()) {
    zero.units.emplace_back();
    for (size_t i = 0; i < params_.size(); ++i) zero.units[0].push_back(i);
  }
  // Note [ZeRO units]: each unit a flat vector padded to a multiple of dp,
  // the units end to end, and this rank's shards of them end to end.
  const int64_t size = dp_->size();
  offsets_.assign(params_.size(), -1);
  unit_of_.assign(params_.size(), 0);
  int64_t shard_base = 0;
  for (auto& members : zero.units) {
    Unit unit;
    unit.base = total_;
    int64_t numel = 0;
    for (size_t i : members) {
      if (i >= params_.size() || offsets_[i] >= 0) {
        throw std::invalid_argument("ShardedAdamW: the units must list every parameter once");
      }
      offsets_[i] = total_ + numel;
      unit_of_[i] = units_.size();
      numel += params_[i].second.numel();
    }
    unit.params = std::move(members);
    unit.padded = (numel + size - 1) / size * size;
    unit.shard_base = shard_base;
    total_ += unit.padded;
    shard_base += unit.padded / size;
    units_.push_back(std::move(unit));
  }
  if (std::find(offsets_.begin(), offsets_.end(), -1) != offsets_.end()) {
    throw std::invalid_argument("ShardedAdamW: the units must list every parameter once");
  }
  shard_size_ = shard_base;
  at::NoGradGuard no_grad;
  model_options_ = params_.empty() ? at::TensorOptions(at::kFloat) : params_[0].second.options();
  options_ = model_options_.dtype(at::kFloat);
  // Note [ZeRO with bf16 parameters]
  masters_ = model_options_.dtype() != caffe2::TypeMeta::Make<float>();
  fp32_grad_accum_ = masters_ && zero.fp32_grad_accum;
  // Every stage keeps this rank's shard of the parameters (Note [ZeRO-1
  // layout]) and of the averaged gradient, never the whole flat vector.
  shard_params_ = at::zeros({shard_size_}, options_);
  shard_grad_ = at::zeros({shard_size_}, options_);
  if (stage_ == 3) {
    // Note [ZeRO-3]: the parameters made views of their unit's buffer
    // (gathered for now).
    for (Unit& unit : units_) {
      unit.full = at::zeros({unit.padded}, model_options_);
      for (size_t i : unit.params) {
        at::Tensor& param = params_[i].second;
        at::Tensor view = unit.full.narrow(0, offsets_[i] - unit.base, param.numel());
        view.copy_(param.reshape({-1}));
        param.set_data(view.view(param.sizes()));
      }
      unit.gathered = true;
      unit.layer = layer_of(params_, unit.params);
      if (unit.layer >= 0) layer_units_[unit.layer] = &unit - units_.data();
    }
  }
  // The pieces of this rank's range of each unit, each a view of the shard
  // of the parameters whose gradient is a view of the shard's gradient.
  NamedTensors pieces;
  for (const Unit& unit : units_) {
    const int64_t share = unit.padded / size;
    const int64_t lo = unit.base + dp_->rank() * share, hi = lo + share;
    for (size_t i : unit.params) {
      const int64_t begin = std::max(lo, offsets_[i]), end = std::min(hi, offsets_[i] + params_[i].second.numel());
      if (begin >= end) continue;
      const int64_t shard_offset = unit.shard_base + (begin - lo);
      pieces_.push_back({i, begin - offsets_[i], begin, shard_offset, end - begin});
      at::Tensor piece = shard_params_.narrow(0, shard_offset, end - begin);
      piece.copy_(params_[i].second.reshape({-1}).narrow(0, begin - offsets_[i], end - begin));
      piece.mutable_grad() = shard_grad_.narrow(0, shard_offset, end - begin);
      pieces.emplace_back(params_[i].first, piece);
    }
  }
  shard_ = std::make_unique<AdamW>(std::move(pieces), options);
  if (masters_) {
    shard_model_ = at::empty({shard_size_}, model_options_);
    round_masters();
  }
  if (fp32_grad_accum_) {
    fp32_grads_.resize(params_.size());
    fp32_hooks_ = std::make_unique<GradReadyHooks>();
    for (size_t k = 0; k < params_.size(); ++k) fp32_hooks_->add(params_[k].second, [this, k] { move_to_fp32(k); });
  }
  if (stage_ == 2 && overlap_ && size > 1) {
    hooks_ = std::make_unique<GradReadyHooks>();
    for (size_t k = 0; k < params_.size(); ++k) hooks_->add(params_[k].second, [this, k] { on_grad_ready(k); });
  }
  if (stage_ == 3) release_all();
}

ShardedAdamW::~ShardedAdamW() {
  hooks_.reset();
  fp32_hooks_.reset();
  // Reductions still in flight finish before their buffers go (Work's destructor waits).
  // Stage 3: the parameters outlive the optimizer, as views of the units'
  // buffers; a unit left freed gets its memory back (its values undefined),
  // so that whoever keeps them (a resume that failed after start() and
  // loads them again) never writes into freed memory. Local: no collective.
  for (Unit& unit : units_) {
    if (unit.gathering) {
      unit.gathering->wait();
      unit.gathering.reset();
      unit.gathered = true;
    }
    if (stage_ == 3 && !unit.gathered) allocate_storage(unit.full, unit.padded);
  }
}

void ShardedAdamW::zero_grad() {
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& grad = fp32_grad_accum_ ? fp32_grads_[i] : params_[i].second.mutable_grad();
    if (fp32_grad_accum_) params_[i].second.mutable_grad() = at::Tensor();
    if (!grad.defined()) continue;
    // Stage 3 accumulates in the shard's gradient, not in .grad.
    if (stage_ == 3) {
      grad = at::Tensor();
    } else {
      grad.zero_();
    }
  }
  if (stage_ == 3) shard_grad_.zero_();
}

// Note [ZeRO with bf16 parameters]
void ShardedAdamW::round_masters() {
  at::NoGradGuard no_grad;
  shard_model_.copy_(shard_params_);
}

void ShardedAdamW::move_to_fp32(size_t i) {
  at::Tensor& param = params_[i].second;
  if (!param.grad().defined()) return;
  at::NoGradGuard no_grad;
  at::Tensor& sum = fp32_grads_[i];
  if (sum.defined()) {
    sum.add_(param.grad());
  } else {
    sum = param.grad().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  }
  param.mutable_grad() = at::Tensor();
}

at::Tensor& ShardedAdamW::grad_of(size_t i) {
  if (!fp32_grad_accum_) return params_[i].second.mutable_grad();
  move_to_fp32(i);
  return fp32_grads_[i];
}

void ShardedAdamW::drop_grad(size_t i) {
  params_[i].second.mutable_grad() = at::Tensor();
  if (fp32_grad_accum_) fp32_grads_[i] = at::Tensor();
}

at::Tensor& ShardedAdamW::gradient_of(const at::Tensor& param) {
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].second.is_same(param)) return grad_of(i);
  }
  throw std::invalid_argument("ShardedAdamW::gradient_of: not one of the optimizer's parameters");
}

void ShardedAdamW::arm() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = hooks_ != nullptr;
}

void ShardedAdamW::on_grad_ready(size_t param) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;
  ++units_[unit_of_[param]].ready;
  launch_ready_units();
  for (size_t k = 0; k < launched_; ++k) {
    // Polling moves MPI's non-blocking operations forward while backward
    // computes, and a finished unit's buffer goes at once.
    Unit& unit = units_[units_.size() - 1 - k];
    if (unit.work && unit.work->is_completed()) retire(unit);
  }
}

void ShardedAdamW::launch_ready_units() {
  while (launched_ < units_.size()) {
    Unit& unit = units_[units_.size() - 1 - launched_];
    if (unit.ready < static_cast<int64_t>(unit.params.size())) return;
    // At most kInFlight units' buffers at once: the oldest finishes first.
    for (size_t k = 0; k < launched_ && in_flight_ >= kInFlight; ++k) {
      Unit& oldest = units_[units_.size() - 1 - k];
      if (oldest.work) retire(oldest);
    }
    launch(unit);
    ++launched_;
  }
}

void ShardedAdamW::retire(Unit& unit) {
  unit.work->wait();
  unit.work.reset();
  unit.flat_grad = at::Tensor();
  held_flat_grad_numel_ -= unit.padded;
  --in_flight_;
}

void ShardedAdamW::launch(Unit& unit) {
  at::NoGradGuard no_grad;
  unit.flat_grad = at::zeros({unit.padded}, options_);
  for (size_t i : unit.params) {
    const at::Tensor& grad = grad_of(i);
    if (grad.defined()) unit.flat_grad.narrow(0, offsets_[i] - unit.base, grad.numel()).copy_(grad.reshape({-1}));
    // Stage 2: this rank keeps only its shard of the averaged gradient.
    if (stage_ == 2) drop_grad(i);
  }
  held_flat_grad_numel_ += unit.padded;
  ++in_flight_;
  peak_flat_grad_numel_ = std::max(peak_flat_grad_numel_, held_flat_grad_numel_);
  unit.work = dp_->reduce_scatter(shard_grad_.narrow(0, unit.shard_base, unit.padded / dp_->size()), unit.flat_grad,
                                  {ReduceOp::kAvg});
}

void ShardedAdamW::reduce_gradients() {
  if (stage_ == 3) {
    // The units of no decoder layer, and any layer whose backward hooks
    // did not reduce it (Note [ZeRO-3]); the same on every dp rank.
    for (size_t u = units_.size(); u-- > 0;) {
      const Unit& unit = units_[u];
      const bool has_grad = std::any_of(unit.params.begin(), unit.params.end(),
                                        [&](size_t i) { return grad_of(i).defined(); });
      if (has_grad) reduce_unit(u);
    }
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = false;
  last_started_in_backward_ = static_cast<int64_t>(launched_);
  // Under stage 2 each unit's buffer goes as soon as its reduction is done,
  // so at most the units in flight hold one.
  for (; launched_ < units_.size(); ++launched_) {
    Unit& unit = units_[units_.size() - 1 - launched_];
    launch(unit);
    if (stage_ == 2) retire(unit);
  }
  for (Unit& unit : units_) {
    if (unit.work) retire(unit);
    unit.ready = 0;
  }
  launched_ = 0;
}

void ShardedAdamW::step(double lr) {
  shard_->step(lr);
  at::NoGradGuard no_grad;
  if (masters_) round_masters();
  if (stage_ == 3) {
    // The decoder layers are gathered again when they run; the others now.
    for (size_t u = 0; u < units_.size(); ++u) {
      Unit& unit = units_[u];
      if (unit.gathering) unit.gathering->wait();
      unit.gathering.reset();
      if (unit.layer >= 0) {
        release(u);
      } else {
        const int64_t share = unit.padded / dp_->size();
        dp_->all_gather(unit.full, gather_source().narrow(0, unit.shard_base, share))->wait();
      }
    }
    return;
  }
  // Stages 1 and 2: each unit's parameters all-gathered into a buffer of
  // the unit and copied into place, the next unit's gather posted while one
  // is copied; at most two units' buffers at once.
  auto post = [&](const Unit& unit, at::Tensor* buffer) {
    const int64_t share = unit.padded / dp_->size();
    *buffer = at::empty({unit.padded}, model_options_);
    return dp_->all_gather(*buffer, gather_source().narrow(0, unit.shard_base, share));
  };
  at::Tensor buffer, next_buffer;
  std::unique_ptr<Work> gathering = units_.empty() ? nullptr : post(units_[0], &buffer);
  for (size_t u = 0; u < units_.size(); ++u) {
    std::unique_ptr<Work> next = u + 1 < units_.size() ? post(units_[u + 1], &next_buffer) : nullptr;
    gathering->wait();
    const Unit& unit = units_[u];
    for (size_t i : unit.params) {
      at::Tensor& param = params_[i].second;
      param.copy_(buffer.narrow(0, offsets_[i] - unit.base, param.numel()).view(param.sizes()));
    }
    buffer = std::move(next_buffer);
    next_buffer = at::Tensor();
    gathering = std::move(next);
  }
}

// Note [ZeRO-3]
void ShardedAdamW::check_stage_3(const char* what) const {
  if (stage_ != 3) throw std::logic_error(std::string("ShardedAdamW::") + what + ": only under ZeRO-3");
}

std::optional<size_t> ShardedAdamW::layer_unit(int64_t layer) const {
  check_stage_3("layer_unit");
  const auto it = layer_units_.find(layer);
  if (it == layer_units_.end()) return std::nullopt;
  return it->second;
}

std::optional<size_t> ShardedAdamW::next_layer_unit(int64_t layer, int direction) const {
  check_stage_3("next_layer_unit");
  if (direction > 0) {
    const auto it = layer_units_.upper_bound(layer);
    if (it == layer_units_.end()) return std::nullopt;
    return it->second;
  }
  auto it = layer_units_.lower_bound(layer);
  if (it == layer_units_.begin()) return std::nullopt;
  return std::prev(it)->second;
}

void ShardedAdamW::prefetch(size_t u) {
  check_stage_3("prefetch");
  Unit& unit = units_.at(u);
  if (unit.gathered || unit.gathering) return;
  allocate_storage(unit.full, unit.padded);
  const int64_t share = unit.padded / dp_->size();
  unit.gathering = dp_->all_gather(unit.full, gather_source().narrow(0, unit.shard_base, share));
}

void ShardedAdamW::gather(size_t u) {
  check_stage_3("gather");
  Unit& unit = units_.at(u);
  if (unit.gathered) return;
  prefetch(u);
  const auto start = std::chrono::steady_clock::now();
  unit.gathering->wait();
  gather_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  unit.gathering.reset();
  unit.gathered = true;
}

void ShardedAdamW::release(size_t u) {
  check_stage_3("release");
  Unit& unit = units_.at(u);
  if (unit.layer < 0) return;
  if (unit.gathering) {
    unit.gathering->wait();
    unit.gathering.reset();
  } else if (!unit.gathered) {
    return;
  }
  free_storage(unit.full);
  unit.gathered = false;
}

void ShardedAdamW::reduce_unit(size_t u) {
  check_stage_3("reduce_unit");
  at::NoGradGuard no_grad;
  Unit& unit = units_.at(u);
  at::Tensor flat = at::zeros({unit.padded}, options_);
  for (size_t i : unit.params) {
    const at::Tensor& grad = grad_of(i);
    if (grad.defined()) flat.narrow(0, offsets_[i] - unit.base, grad.numel()).copy_(grad.reshape({-1}));
    drop_grad(i);
  }
  peak_flat_grad_numel_ = std::max(peak_flat_grad_numel_, unit.padded);
  const int64_t share = unit.padded / dp_->size();
  at::Tensor mine = at::empty({share}, options_);
  const auto start = std::chrono::steady_clock::now();
  dp_->reduce_scatter(mine, flat, {ReduceOp::kAvg})->wait();
  reduce_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  shard_grad_.narrow(0, unit.shard_base, share).add_(mine);
}

void ShardedAdamW::gather_all() {
  check_stage_3("gather_all");
  for (size_t u = 0; u < units_.size(); ++u) prefetch(u);
  for (size_t u = 0; u < units_.size(); ++u) gather(u);
}

void ShardedAdamW::release_all() {
  check_stage_3("release_all");
  for (size_t u = 0; u < units_.size(); ++u) release(u);
}

void ZeroLayerWrapper::gather_layer(int64_t layer, int direction) {
  // Note [ZeRO-3]: this layer's gathers and those of the layer that runs
  // next (after it in forward, before it in backward) are posted before
  // this layer computes (every optimizer's first), then waited for.
  for (ShardedAdamW* zero : zeros_) {
    const std::optional<size_t> unit = zero->layer_unit(layer);
    if (!unit) continue;
    zero->prefetch(*unit);
    if (const auto next = zero->next_layer_unit(layer, direction)) zero->prefetch(*next);
  }
  for (ShardedAdamW* zero : zeros_) {
    if (const auto unit = zero->layer_unit(layer)) zero->gather(*unit);
  }
}

void ZeroLayerWrapper::before_forward(const LayerCall& call) { gather_layer(call.layer, +1); }

void ZeroLayerWrapper::after_forward(const LayerCall& call) {
  for (ShardedAdamW* zero : zeros_) {
    if (const auto unit = zero->layer_unit(call.layer)) zero->release(*unit);
  }
}

void ZeroLayerWrapper::before_backward(const LayerCall& call) { gather_layer(call.layer, -1); }

void ZeroLayerWrapper::after_backward(const LayerCall& call) {
  for (ShardedAdamW* zero : zeros_) {
    const std::optional<size_t> unit = zero->layer_unit(call.layer);
    if (!unit) continue;
    zero->reduce_unit(*unit);
    zero->release(*unit);
  }
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto& [name, tensor] : shard_->state_dict()) {
    if (name != kStep) bytes += tensor.numel() * static_cast<int64_t>(tensor.element_size());
  }
  return bytes;
}

NamedTensors ShardedAdamW::state_dict() const {
  at::NoGradGuard no_grad;
  const NamedTensors mine = shard_->state_dict();
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : mine) by_name[name] = &tensor;
  std::vector<at::Tensor> whole_flat;
  // exp_avg, exp_avg_sq, and with bf16 parameters the masters (the shard itself).
  for (size_t k = 0; k < (masters_ ? 3 : 2); ++k) {
    at::Tensor shard = shard_params_;
    if (k < 2) {
      shard = at::zeros({shard_size_}, options_);
      for (const Piece& piece : pieces_) {
        const at::Tensor& state = *by_name.at(kKinds[k] + params_[piece.param].first);
        shard.narrow(0, piece.shard_offset, piece.numel).copy_(state.reshape({-1}));
      }
    }
    at::Tensor flat = at::empty({total_}, options_);
    for (const Unit& unit : units_) {
      const int64_t share = unit.padded / dp_->size();
      dp_->all_gather(flat.narrow(0, unit.base, unit.padded), shard.narrow(0, unit.shard_base, share))->wait();
    }
    whole_flat.push_back(flat);
  }
  NamedTensors out;
  out.emplace_back(kStep, by_name.at(kStep)->clone());
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& param = params_[i].second;
    for (size_t k = 0; k < whole_flat.size(); ++k) {
      const std::string name = k < 2 ? kKinds[k] + params_[i].first : AdamW::master_entry(params_[i].first);
      out.emplace_back(name, whole_flat[k].narrow(0, offsets_[i], param.numel()).view(param.sizes()).clone());
    }
  }
  return out;
}

NamedTensors ShardedAdamW::local_state_dict() const {
  NamedTensors state = shard_->state_dict();
  if (masters_) {
    for (const Piece& piece : pieces_) {
      state.emplace_back(AdamW::master_entry(params_[piece.param].first),
                         shard_params_.narrow(0, piece.shard_offset, piece.numel));
    }
  }
  return state;
}

void ShardedAdamW::load_local_state_dict(const NamedTensors& state) {
  if (!masters_) {
    shard_->load_state_dict(state);
    return;
  }
  // The masters are the shard itself, not AdamW state: checked here, and
  // copied only once AdamW has taken the rest.
  std::map<std::string, const at::Tensor*> masters;
  NamedTensors rest;
  for (const auto& entry : state) {
    const std::string param = AdamW::param_of_entry(entry.first);
    if (entry.first == AdamW::master_entry(param)) {
      masters.emplace(param, &entry.second);
    } else {
      rest.push_back(entry);
    }
  }
  for (const Piece& piece : pieces_) {
    const std::string& name = params_[piece.param].first;
    const auto it = masters.find(name);
    if (it == masters.end()) throw BadInput("optimizer state: missing entry '" + AdamW::master_entry(name) + "'");
    if (it->second->numel() != piece.numel || it->second->dim() != 1) {
      throw BadInput("optimizer state: '" + AdamW::master_entry(name) + "' is " + describe_tensor(*it->second) +
                     ", expected " + std::to_string(piece.numel) + " elements (this rank's piece)");
    }
  }
  if (masters.size() != pieces_.size()) {
    throw BadInput("optimizer state: master entries for parameters this rank holds no piece of");
  }
  shard_->load_state_dict(rest);
  at::NoGradGuard no_grad;
  for (const Piece& piece : pieces_) {
    shard_params_.narrow(0, piece.shard_offset, piece.numel).copy_(*masters.at(params_[piece.param].first));
  }
  round_masters();
}

std::pair<int64_t, int64_t> ShardedAdamW::piece_range(const std::string& name) const {
  for (const Piece& piece : pieces_) {
    if (params_[piece.param].first == name) return {piece.param_offset, piece.param_offset + piece.numel};
  }
  throw std::out_of_range("ZeRO: this rank holds no piece of '" + name + "'");
}

void ShardedAdamW::load_state_dict(const NamedTensors& whole) {
  std::map<std::string, const at::Tensor*> by_name;
  for (const auto& [name, tensor] : whole) by_name[name] = &tensor;
  auto take = [&](const std::string& name, at::IntArrayRef shape) -> const at::Tensor& {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw BadInput("optimizer state: missing entry '" + name + "'");
    if (it->second->sizes() != shape) {
      throw BadInput("optimizer state: '" + name + "' is " + describe_tensor(*it->second) + ", expected shape " +
                     c10::str(shape));
    }
    return *it->second;
  };
  // Every entry is checked on every rank (each sees the whole state), so a
  // bad state is refused by all of them, not only by the owner of the piece.
  std::vector<std::string> kinds(std::begin(kKinds), std::end(kKinds));
  if (masters_) kinds.push_back(AdamW::master_entry(""));
  for (const auto& [name, param] : params_) {
    for (const std::string& kind : kinds) take(kind + name, param.sizes());
  }
  NamedTensors mine;
  mine.emplace_back(kStep, take(kStep, {}));
  for (const Piece& piece : pieces_) {
    const auto& [name, param] = params_[piece.param];
    for (const std::string& kind : kinds) {
      const at::Tensor& full = take(kind + name, param.sizes());
      mine.emplace_back(kind + name, full.reshape({-1}).narrow(0, piece.param_offset, piece.numel).clone());
    }
  }
  load_local_state_dict(mine);
}

}  // namespace loom
