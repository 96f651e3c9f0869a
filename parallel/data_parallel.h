// Data parallelism: the gradient average over the dp group, in buckets that
// are reduced while the last micro-batch's backward is still running.
//
//   GradientReducer reducer(dp, params, {.bucket_mb = 25});
//   for each micro-batch m:
//     if (m == last) reducer.arm();   // the next backward launches buckets as they fill
//     loss.backward();
//   reducer.finish();                 // waits for what is in flight; grads are now dp averages
//
// Note [gradient buckets]
// Parameters are grouped into buckets of about bucket_mb MiB in reverse order
// of the list (the model registers parameters in forward order, so backward
// produces their gradients roughly last to first). While armed, a hook on
// each parameter's gradient accumulator (it runs after the gradient is
// accumulated into .grad) counts the parameter ready; when every parameter of
// a bucket is ready, its gradients are copied into one flat fp32 buffer and an
// all-reduce AVG of it starts. Buckets start strictly in index order on every
// rank (a bucket that fills early waits for the ones before it), so every rank
// of the group issues the same collectives in the same order whatever the
// order its hooks ran in. finish() starts what has not started (parameters
// whose gradients arrived without a hook, e.g. through recomputation), waits
// for everything and copies the averages back into .grad. Hooks and finish()
// poll the outstanding reductions, which is what moves MPI's non-blocking
// operations forward while backward computes.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>

#include "optim/grad_ready_hooks.h"
#include "parallel/process_group.h"

namespace loom {

// What the last micro-batch's backward arms, so that it starts the dp
// reduction of gradients as they become ready: the bucket reducer below, or
// ZeRO-2's sharded optimizer (parallel/zero.h).
class GradientSync {
 public:
  virtual ~GradientSync() = default;
  // The next backward (the last micro-batch's) starts reductions as gradients complete.
  virtual void arm() = 0;
};

class GradientReducer : public GradientSync {
 public:
  struct Options {
    double bucket_mb = 25.0;  // parallel.bucket_mb
    // false: nothing starts during backward; finish() reduces every bucket
    // (the baseline the overlap is measured against).
    bool overlap = true;
    // The dtype the buckets are reduced in (parallel.reduce_dtype): fp32,
    // or bf16 (gradients rounded to bf16 before they are summed, half the
    // bytes on the wire where the backend reduces bf16 natively).
    at::ScalarType reduce_dtype = at::kFloat;
    // Parallel to the parameters: the tensors whose .grad holds each one's
    // gradient (the fp32 masters of bf16 parameters under
    // precision.grad_accum fp32, AdamW::gradient_holders()); empty: the
    // parameters themselves. The hooks stay on the parameters' accumulators.
    std::vector<at::Tensor> grad_holders = {};
  };

  // `params`: the leaf tensors whose gradients are averaged, in forward
  // (registration) order, fp32 or bf16 on the group's device. The group and the
  // parameters must outlive the reducer. With a group of one rank nothing is
  // communicated and finish() returns at once.
  GradientReducer(ProcessGroup& dp, std::vector<at::Tensor> params, Options options);
  ~GradientReducer() override;
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // The next backward (the last micro-batch's) launches buckets as they fill.
  void arm() override;
  // Starts what has not started, waits for every reduction and writes the dp
  // averages into the parameters' .grad. Disarms.
  void finish();

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Seconds the last finish() spent waiting for reductions to complete (and
  // starting the ones that had not started), and how many buckets had
  // started before it.
  double last_wait_seconds() const { return last_wait_seconds_; }
  int64_t last_started_early() const { return last_started_early_; }

 private:
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    int64_t numel = 0;
    int64_t ready = 0;
    at::Tensor buffer;
    std::unique_ptr<Work> work;
  };

  void on_grad_ready(size_t param);    // from the accumulator hooks
  void launch_ready_buckets();         // under mutex_
  void launch(Bucket& bucket);         // under mutex_
  void poll();                         // under mutex_

  ProcessGroup* dp_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> holders_;  // whose .grad is reduced (Options::grad_holders)
  Options options_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // param index -> bucket index
  GradReadyHooks hooks_;
  std::mutex mutex_;
  bool armed_ = false;
  size_t next_launch_ = 0;
  double last_wait_seconds_ = 0.0;
  int64_t last_started_early_ = 0;
};

}  // namespace loom
