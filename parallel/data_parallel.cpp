#include "parallel/data_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace loom {

namespace {

// Runs after a parameter's gradient accumulator wrote .grad.
class GradReadyHook : public torch::autograd::FunctionPostHook {
 public:
  GradReadyHook(std::function<void()> on_ready) : on_ready_(std::move(on_ready)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    on_ready_();
    return outputs;
  }

 private:
  std::function<void()> on_ready_;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

GradReadyHooks::GradReadyHooks(const std::vector<at::Tensor>& params, std::function<void(size_t)> on_ready) {
  for (size_t k = 0; k < params.size(); ++k) {
    std::shared_ptr<torch::autograd::Node> accumulator = torch::autograd::impl::grad_accumulator(params[k]);
    keys_.push_back(accumulator->add_post_hook(std::make_unique<GradReadyHook>([on_ready, k] { on_ready(k); })));
    accumulators_.push_back(std::move(accumulator));
  }
}

GradReadyHooks::~GradReadyHooks() {
  for (size_t k = 0; k < accumulators_.size(); ++k) accumulators_[k]->del_post_hook(keys_[k]);
}

GradientReducer::GradientReducer(ProcessGroup& dp, std::vector<at::Tensor> params, Options options)
    : dp_(&dp), params_(std::move(params)), options_(options) {
  if (!(options_.bucket_mb > 0)) {
    throw std::invalid_argument("GradientReducer: bucket_mb must be > 0, got " + std::to_string(options_.bucket_mb));
  }
  for (const at::Tensor& p : params_) {
    if (p.scalar_type() != at::kFloat) {
      throw std::invalid_argument("GradientReducer: gradients are reduced in fp32; got a parameter " +
                                  describe_tensor(p));
    }
  }
  if (dp_->size() == 1) return;
  // Note [gradient buckets]: reverse order, about bucket_mb each.
  const int64_t limit = static_cast<int64_t>(options_.bucket_mb * 1024 * 1024 / sizeof(float));
  bucket_of_.resize(params_.size());
  for (size_t k = params_.size(); k-- > 0;) {
    if (buckets_.empty() || buckets_.back().numel >= limit) buckets_.emplace_back();
    buckets_.back().params.push_back(k);
    buckets_.back().numel += params_[k].numel();
    bucket_of_[k] = buckets_.size() - 1;
  }
  hooks_ = std::make_unique<GradReadyHooks>(params_, [this](size_t k) { on_grad_ready(k); });
}

GradientReducer::~GradientReducer() {
  hooks_.reset();
  // Reductions still in flight finish before their buffers go (Work's destructor waits).
}

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
    const at::Tensor& grad = params_[k].grad();
    // A parameter that got no gradient contributes zeros (every rank must
    // send the same number of elements).
    grads.push_back(grad.defined() ? grad.reshape({-1}) : at::zeros({params_[k].numel()}, params_[k].options()));
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
      at::Tensor& param = params_[k];
      const int64_t n = param.numel();
      const at::Tensor averaged = bucket.buffer.narrow(0, offset, n).view(param.sizes());
      if (param.grad().defined()) {
        param.mutable_grad().copy_(averaged);
      } else {
        param.mutable_grad() = averaged.clone();
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
