// The MPI backend of ProcessGroup (parallel/process_group.h): CPU tensors,
// non-blocking MPI collectives behind Work, and the MPI session that owns
// MPI_Init/MPI_Finalize.
//
//   loom::MpiSession session(&argc, &argv);          // once per process, first
//   auto world = session.world();                    // MPI_COMM_WORLD's ranks
//   auto grid = loom::split_grid(*world, dims);      // this rank's dp, pp, tp groups
//   grid.tp->all_reduce(x)->wait();
//
// Lifetimes: the session must outlive every group and Work made from it
// (declare it first in main). Errors from MPI and timeouts end the job with
// MPI_Abort (Note [process group contract]); MPI_ERRORS_RETURN is set on every
// communicator so that loom, not MPI's default handler, reports them.
#pragma once

#include <mpi.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "parallel/process_group.h"
#include "parallel/topology.h"
#include "util/error.h"

namespace loom {

namespace detail {
// What every group and Work of one session share: the thread level MPI gave,
// and the lock that serializes MPI calls when that level is SERIALIZED.
struct MpiRuntime {
  int thread_level = MPI_THREAD_SINGLE;
  int world_rank = 0;
  std::mutex mutex;
  // Holds `mutex` unless MPI is thread-safe by itself (MPI_THREAD_MULTIPLE).
  std::unique_lock<std::mutex> lock() {
    return thread_level == MPI_THREAD_MULTIPLE ? std::unique_lock<std::mutex>(mutex, std::defer_lock)
                                               : std::unique_lock<std::mutex>(mutex);
  }
};
}  // namespace detail

class MpiProcessGroup;

// MPI_Init_thread in the constructor, MPI_Finalize in the destructor. One per
// process, ever (MPI cannot be initialized again after MPI_Finalize): a second
// MpiSession throws std::logic_error.
//
// It asks for MPI_THREAD_MULTIPLE (or `thread_level`), since collectives may
// be issued from autograd threads. With MPI_THREAD_SERIALIZED (given by MPI,
// or asked for) every MPI call of loom is made under one lock instead; a
// lower level (FUNNELED, SINGLE) is refused with std::runtime_error, after
// MPI_Finalize.
class MpiSession {
 public:
  explicit MpiSession(int* argc = nullptr, char*** argv = nullptr, int thread_level = MPI_THREAD_MULTIPLE);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // The level loom uses: the lower of the one asked for and the one MPI gave,
  // MPI_THREAD_MULTIPLE or MPI_THREAD_SERIALIZED.
  int thread_level() const { return runtime_->thread_level; }

  // A group of all ranks, named "world", on its own duplicate of
  // MPI_COMM_WORLD (so loom's messages never match anyone else's). Collective
  // over all ranks.
  std::unique_ptr<MpiProcessGroup> world(std::chrono::milliseconds timeout = kDefaultCommTimeout) const;

  // Prints "loom: <message>" to stderr and ends every rank of the job with
  // MPI_Abort(MPI_COMM_WORLD, exit_code). For main's catch blocks, timeouts and
  // MPI errors: one rank's failure must not leave the others waiting.
  [[noreturn]] static void abort(const std::string& message, int exit_code = kExitInternal);

 private:
  std::shared_ptr<detail::MpiRuntime> runtime_;
  int world_rank_ = 0;
  int world_size_ = 1;
};

class MpiProcessGroup final : public ProcessGroup {
 public:
  ~MpiProcessGroup() override;  // MPI_Comm_free

  std::string_view backend() const override { return "mpi"; }

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

  // The sub-group of the ranks that pass the same `color` (>= 0), ordered by
  // `key` (ties by rank in this group), named `name`, with this group's
  // timeout. Collective over this group: every rank calls it, in the same
  // order as its other collectives.
  std::unique_ptr<MpiProcessGroup> split(int color, int key, std::string name);

  // This rank's index among the ranks of this group that share its node
  // (MPI_COMM_TYPE_SHARED), in group-rank order, and how many they are: what
  // picks a rank's GPU (Note [choosing a GPU] in trainer/device.h).
  // Collective over this group.
  struct NodeRanks {
    int local_rank = 0;
    int size = 1;
  };
  NodeRanks node_ranks();

  // For code that must call MPI directly (tests, benchmarks). Still owned here.
  MPI_Comm comm() const { return comm_; }

 private:
  friend class MpiSession;
  MpiProcessGroup(std::shared_ptr<detail::MpiRuntime> runtime, MPI_Comm comm, std::string name,
                  std::chrono::milliseconds timeout);

  std::shared_ptr<detail::MpiRuntime> runtime_;
  MPI_Comm comm_;
  MPI_Comm signature_comm_ = MPI_COMM_NULL;  // Note [send signatures]: a send's signature goes ahead of it here
};

// This rank's dp, pp and tp groups (named "dp", "pp", "tp"), with cp > 1
// its "cp" group, and with ep > 1 its "ep" and "edp" groups (Note [expert
// groups] in process_group.h), from the world group. `world` must hold all dims.world ranks in world-rank order (as
// MpiSession::world does); throws std::invalid_argument naming every factor
// otherwise. Collective over `world`.
GridGroups split_grid(MpiProcessGroup& world, const ParallelDims& dims);

}  // namespace loom
