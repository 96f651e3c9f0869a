// A TEST-ONLY device backend (parallel.device_backend: mpi_staged): the ranks
// of an MPI group, taking tensors on any device by staging them through host
// memory.
//
// NCCL refuses two ranks on one GPU, so on a machine with one GPU the
// multi-rank paths of CUDA training (device placement, streams, the dp
// reducer's hooks and buckets, the pipeline's buffers, sequence-parallel
// gathers) could never run. Through this backend they do: every operation
// copies its tensors to the CPU, runs the MPI operation on the copies, waits
// for it, and copies the result back into the caller's tensors, so any
// number of ranks can share one GPU. It is synchronous and slow (every Work
// it returns is complete), which is why it is for tests only; the results
// are the MPI backend's, bit for bit. On the CPU it runs the same code with
// host tensors (copied too), which is how it is checked on machines without
// a GPU.
#pragma once

#include <memory>

#include "parallel/mpi_process_group.h"
#include "parallel/process_group.h"

namespace loom {

class StagedProcessGroup final : public ProcessGroup {
 public:
  // The ranks of `mpi` (same group ranks, world ranks, name and timeout) on
  // a communicator of their own. Collective over `mpi`.
  explicit StagedProcessGroup(MpiProcessGroup& mpi);

  std::string_view backend() const override { return "mpi_staged"; }

  std::unique_ptr<Work> all_reduce(const at::Tensor& tensor, const AllReduceOptions& options = {}) override;
  std::unique_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                   const AllGatherOptions& options = {}) override;
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                       const ReduceScatterOptions& options = {}) override;
  std::unique_ptr<Work> broadcast(const at::Tensor& tensor, const BroadcastOptions& options = {}) override;
  std::unique_ptr<Work> send(const at::Tensor& tensor, const SendOptions& options) override;
  std::unique_ptr<Work> recv(const at::Tensor& tensor, const RecvOptions& options) override;
  std::unique_ptr<Work> barrier(const BarrierOptions& options = {}) override;
  std::unique_ptr<Work> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                   const AllToAllOptions& options = {}) override;

 private:
  std::unique_ptr<MpiProcessGroup> host_;  // the MPI ranks the copies go through
};

}  // namespace loom
