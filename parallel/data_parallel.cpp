#include "parallel/data_parallel.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace loom {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

GradientReducer::GradientReducer(ProcessGroup& dp, std::vector<at::Tensor> params, Options options)
    : dp_(&dp), params_(std::move(params)), options_(options) {
  if (!(options_.bucket_mb > 0)) {
    throw std::invalid_argument("GradientReducer: bucket_mb must be > 0, got " + std::to_string(options_.bucket_mb));
  }
  holders_ = options_.grad_holders.empty() ? params_ : options_.grad_holders;
  options_.grad_holders.clear();
  if (holders_.size() != params_.size()) {
    throw std::invalid_argument("GradientReducer: " + std::to_string(holders_.size()) + " gradient holders for " +
                                std::to_string(params_.size()) + " parameters");
  }
  if (options_.reduce_dtype != at::kFloat && options_.reduce_dtype != at::kBFloat16) {
    throw std::invalid_argument(std::string("GradientReducer: reduce_dtype must be Float or BFloat16, got ") +
                                c10::toString(options_.reduce_dtype));
  }
  for (size_t k = 0; k < params_.size(); ++k) {
    for (const at::Tensor* t : {&params_[k], &holders_[k]}) {
      if (t->scalar_type() != at::kFloat && t->scalar_type() != at::kBFloat16) {
        throw std::invalid_argument("GradientReducer: gradients must be fp32 or bf16; got " + describe_tensor(*t));
      }
    }
    if (holders_[k].sizes() != params_[k].sizes()) {
      throw std::invalid_argument("GradientReducer: the gradient holder " + describe_tensor(holders_[k]) +
                                  " does not match its parameter " + describe_tensor(params_[k]));
    }
  }
  if (dp_->size() == 1) return;
  // Note [gradient buckets]: reverse order, about bucket_mb each.
  const int64_t limit =
      static_cast<int64_t>(options_.bucket_mb * 1024 * 1024 / static_cast<double>(c10::elementSize(options_.reduce_dtype)));
  bucket_of_.resize(params_.size());
  for (size_t k = params_.size(); k-- > 0;) {
    if (buckets_.empty() || buckets_.back().numel >= limit) buckets_.emplace_back();
    buckets_.back().params.push_back(k);
    buckets_.back().numel += params_[k].numel();
    bucket_of_[k] = buckets_.size() - 1;
  }
  for (size_t k = 0; k < params_.size(); ++k) hooks_.add(params_[k], [this, k] { on_grad_ready(k); });
}

// Reductions still in flight finish before their buffers go (Work's
// destructor waits); the hooks go first (members die in reverse order).
GradientReducer::~GradientReducer() = default;

void GradientReducer::arm() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = options_.overlap && dp_->size() > 1;
}

void GradientReducer::on_grad_ready(size_t param) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;
  Bucket& bucket = buckets_[bucket_of_[param]];
  ++bucket.ready;
  if (bucket.ready == static_cast<int64_t>(bucket.params.size())) launch_ready_buckets();
  poll();
}

void GradientReducer::launch_ready_buckets() {
  while (next_launch_ < buckets_.size() &&
         buckets_[next_launch_].ready == static_cast<int64_t>(buckets_[next_launch_].params.size())) {
    launch(buckets_[next_launch_]);
    ++next_launch_;
  }
}

void GradientReducer::launch(Bucket& bucket) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(bucket.params.size());
  for (size_t k : bucket.params) {
    const at::Tensor& grad = holders_[k].grad();
    // A parameter that got no gradient contributes zeros (every rank must
    // send the same number of elements).
    grads.push_back(grad.defined() ? grad.reshape({-1}).to(options_.reduce_dtype)
                                   : at::zeros({holders_[k].numel()}, holders_[k].options().dtype(options_.reduce_dtype)));
  }
  bucket.buffer = at::cat(grads);
  bucket.work = dp_->all_reduce(bucket.buffer, {ReduceOp::kAvg});
}

void GradientReducer::poll() {
  for (size_t b = 0; b < next_launch_; ++b) {
    if (buckets_[b].work) buckets_[b].work->is_completed();
  }
}

void GradientReducer::finish() {
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = false;
  if (dp_->size() == 1) return;
  last_started_early_ = static_cast<int64_t>(next_launch_);
  const auto start = std::chrono::steady_clock::now();
  for (; next_launch_ < buckets_.size(); ++next_launch_) launch(buckets_[next_launch_]);
  at::NoGradGuard no_grad;
  for (Bucket& bucket : buckets_) {
    bucket.work->wait();
    int64_t offset = 0;
    for (size_t k : bucket.params) {
      at::Tensor& holder = holders_[k];
      const int64_t n = holder.numel();
      const at::Tensor averaged = bucket.buffer.narrow(0, offset, n).view(holder.sizes());
      if (holder.grad().defined()) {
        holder.mutable_grad().copy_(averaged);
      } else {
        holder.mutable_grad() = averaged.to(holder.scalar_type()).clone();
      }
      offset += n;
    }
    bucket.work.reset();
    bucket.buffer = at::Tensor();
    bucket.ready = 0;
  }
  next_launch_ = 0;
  last_wait_seconds_ = seconds_since(start);
}

}  // namespace loom
