#include "parallel/staged_process_group.h"

#include <ATen/ATen.h>

#include <exception>

namespace loom {

namespace {

// The MPI operation on the host copies; on completion, the result goes back
// into the caller's tensor (on the caller's current stream).
class StagedWork final : public Work {
 public:
  StagedWork(std::unique_ptr<Work> host, at::Tensor target, at::Tensor staged)
      : Work(host->default_timeout()), host_(std::move(host)), target_(std::move(target)), staged_(std::move(staged)) {}
  ~StagedWork() override {
    if (std::uncaught_exceptions() == 0) finish();  // Note [abandoned works]: the MPI Work abandons itself
  }

  bool is_completed() override {
    if (!host_->is_completed()) return false;
    finish();
    return true;
  }
  void wait(std::chrono::milliseconds timeout) override {
    host_->wait(timeout);
    finish();
  }

 private:
  void finish() {
    if (done_) return;
    host_->wait();
    if (target_.defined()) target_.copy_(staged_);
    done_ = true;
  }

  std::unique_ptr<Work> host_;
  at::Tensor target_;  // undefined when nothing comes back (send, barrier)
  at::Tensor staged_;
  bool done_ = false;
};

// A host copy of `tensor`: a copy on the CPU too, so that the CPU runs the
// same staging as a GPU and its tests check it.
at::Tensor staged(const at::Tensor& tensor) {
  return tensor.to(tensor.options().device(at::kCPU), /*non_blocking=*/false, /*copy=*/true);
}

// A host tensor to receive into for `tensor`.
at::Tensor staging_for(const at::Tensor& tensor) {
  return at::empty(tensor.sizes(), tensor.options().device(at::kCPU));
}

}  // namespace

StagedProcessGroup::StagedProcessGroup(MpiProcessGroup& mpi)
    : ProcessGroup(mpi.name(), mpi.rank(), mpi.world_ranks(), mpi.timeout()),
      host_(mpi.split(0, mpi.rank(), mpi.name())) {}

std::unique_ptr<Work> StagedProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host = staged(tensor);
  return std::make_unique<StagedWork>(host_->all_reduce(host, options), tensor, host);
}

std::unique_ptr<Work> StagedProcessGroup::all_gather(const at::Tensor& output, const at::Tensor& input,
                                                     const AllGatherOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host_output = staging_for(output);
  return std::make_unique<StagedWork>(host_->all_gather(host_output, staged(input), options), output, host_output);
}

std::unique_ptr<Work> StagedProcessGroup::reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                                         const ReduceScatterOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host_output = staging_for(output);
  return std::make_unique<StagedWork>(host_->reduce_scatter(host_output, staged(input), options), output,
                                      host_output);
}

std::unique_ptr<Work> StagedProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host = staged(tensor);
  return std::make_unique<StagedWork>(host_->broadcast(host, options), tensor, host);
}

std::unique_ptr<Work> StagedProcessGroup::send(const at::Tensor& tensor, const SendOptions& options) {
  host_->set_timeout(timeout());
  return std::make_unique<StagedWork>(host_->send(staged(tensor), options), at::Tensor(), at::Tensor());
}

std::unique_ptr<Work> StagedProcessGroup::recv(const at::Tensor& tensor, const RecvOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host = staging_for(tensor);
  return std::make_unique<StagedWork>(host_->recv(host, options), tensor, host);
}

std::unique_ptr<Work> StagedProcessGroup::barrier(const BarrierOptions& options) {
  host_->set_timeout(timeout());
  return std::make_unique<StagedWork>(host_->barrier(options), at::Tensor(), at::Tensor());
}

std::unique_ptr<Work> StagedProcessGroup::all_to_all(const at::Tensor& output, const at::Tensor& input,
                                                     const AllToAllOptions& options) {
  host_->set_timeout(timeout());
  at::Tensor host_output = staging_for(output);
  return std::make_unique<StagedWork>(host_->all_to_all(host_output, staged(input), options), output, host_output);
}

}  // namespace loom
