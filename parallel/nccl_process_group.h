// The NCCL backend of ProcessGroup (parallel/process_group.h): CUDA tensors,
// one NCCL communicator and one CUDA stream per group, built from the MPI
// group of the same ranks.
//
//   loom::MpiSession session(&argc, &argv);
//   auto world = session.world();
//   c10::cuda::set_device(local_rank);               // one GPU per rank
//   loom::NcclProcessGroup world_nccl(*world);       // same ranks, same name
//   world_nccl.all_reduce(grad)->wait();
//
// Everything in Note [process group contract] holds, with these differences:
// - Tensors are dense, contiguous CUDA tensors on the group's device (the
//   current device when the group was made); the dtypes are those of
//   kSupportedDtypes.
// - Streams (Note [NCCL streams]): an operation runs on the group's own
//   stream, after everything the caller had queued on its current stream.
//   Work::wait does not block the host: the caller's current stream waits.
// - bfloat16 is reduced by NCCL itself (Note [NCCL bfloat16 reductions]).
// - send/recv: tags are ignored (Note [NCCL send and recv]).
// - Deadlines (Note [NCCL watchdog]): a watchdog thread, not wait, ends the
//   job when an operation outlives its timeout, counted from the issue (or
//   from the wait, which restarts it); joining the communicator and every
//   NCCL call have the group's timeout too. Errors NCCL reports
//   (synchronously, or later as the communicator's asynchronous error) and
//   timeouts abort the communicator (ncclCommAbort) and end the job through
//   MpiSession::abort, naming rank, group and op.
// - On an exception, groups and Works abort instead of waiting (Note [NCCL
//   on failure]).
//
// Note [NCCL streams]
// Each operation records an event on the caller's current stream and makes
// the group's stream wait on it, so NCCL reads the inputs only after the
// kernels that produced them; it then queues the NCCL call and a completion
// event on the group's stream. The caller's stream goes on without waiting,
// so compute queued after the call overlaps the communication.
// Work::wait(timeout) makes the caller's current stream wait on the
// completion event (kernels queued afterwards see the result) and returns at
// once: the host runs ahead of the GPU, queueing the next layer's kernels
// while the collective runs. A host read of a result (.item(), .cpu(),
// .to(kCPU)) synchronizes with that stream, so it sees the result; a read
// on another stream, or through a raw pointer, must make that stream wait
// first (call wait on it). is_completed() asks the completion event and
// never blocks. Destroying an unfinished Work makes the caller's current
// stream wait, like wait.
//
// Note [NCCL watchdog]
// Only the host can notice a collective that never ends: a kernel stuck in
// NCCL never fails by itself. Each group has a watchdog thread that owns its
// operations in flight (their completion events and tensors), polls the
// events and ncclCommGetAsyncError every millisecond, and past an
// operation's deadline, or on an asynchronous error, aborts the communicator
// and ends the job, naming the operation and the ranks it waited for. The
// rules (which operation failed first) are DeadlineWatch's
// (parallel/deadline_watch.h), tested with a fake clock. The watchdog keeps
// an operation's tensors until it has seen the operation finish, so the
// caching allocator cannot hand their memory to another tensor while NCCL
// still uses it (which is why no recordStream is needed); the caller may
// drop its own references and its Work at any time.
// The communicator is non-blocking (ncclConfig_t::blocking = 0): joining it
// (ncclCommInitRankConfig) and the first operation on it, where NCCL
// connects to the peers, go on in the background, and the calling thread
// polls ncclCommGetAsyncError until the call has settled, against the
// group's timeout: a rank that never joins (it failed before, is stuck, or
// cannot reach this one over the network) ends the job at the deadline with
// a message naming the group's other world ranks, instead of hanging in the
// host call. Any NCCL call may return ncclInProgress; each is polled the
// same way before the next is made.
//
// Note [NCCL on failure]
// When an exception propagates (std::uncaught_exceptions() > 0 in the
// destructor), or once the job is ending, a group stops its watchdog and
// aborts its communicator on a thread of its own, and a Work does nothing,
// instead of waiting for operations in flight (each up to the timeout,
// waiting for peers that may be waiting for this rank) and ncclCommDestroy
// (which may wait for peers). So main's catch prints this rank's own error
// and ends the job (MpiSession::abort) at once, before the peers' timeouts
// blame another rank. The orderly destructor waits (on the host, under the
// watchdog's deadlines) until every operation has finished, then flushes
// and frees the communicator (ncclCommFinalize, polled, then
// ncclCommDestroy).
//
// Note [NCCL bfloat16 reductions]
// Unlike the MPI backend (Note [bfloat16 reductions]), bfloat16 tensors go to
// NCCL as ncclBfloat16: NCCL reduces them natively, rounding to bfloat16 as
// it combines values in the order its algorithm (ring or tree) picks. A sum
// over several ranks can therefore differ in its last bits from the MPI
// backend's exact float32 sum rounded once. Sums of values that are exact in
// bfloat16 at every step (small integers, as in the tests) agree.
//
// Note [NCCL send and recv]
// NCCL has no tags: a send and a recv between two ranks pair up in the order
// they are issued, whatever their tags (which are range-checked, then
// ignored). The receiver's dtype and shape must equal the sender's: NCCL
// cannot check this (a mismatch corrupts the data or never completes), so
// each send's TensorSignature goes ahead over a host MPI communicator of the
// group's ranks, and the receiver's Work compares it before it reports
// completion (Note [send signatures] in parallel/process_group.h); the tags
// pair the signatures as they pair MPI's messages. A send or recv occupies the
// group's stream until the peer's matching call runs, so two ranks that each
// send to the other before receiving can deadlock on large messages: in a
// ring, let even ranks send first and odd ranks receive first. Sending to or
// receiving from this rank itself is refused (it would wait on itself).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string_view>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "parallel/process_group.h"

namespace loom {

namespace detail {
// The communicator, the stream and the device, shared by the group and its
// Works so that a Work still polling after the group is gone has them
// (defined in nccl_process_group.cpp: the header stays free of NCCL and
// CUDA headers).
class NcclCommunicator;
// The group's watchdog thread and the operations it follows.
class NcclWatchdog;
}  // namespace detail

class NcclProcessGroup final : public ProcessGroup {
 public:
  // The ranks of `mpi` (same group ranks, world ranks, name and timeout) on
  // NCCL, on the current CUDA device. Collective over `mpi`: group rank 0
  // makes the ncclUniqueId, `mpi` broadcasts it, then every rank joins with
  // ncclCommInitRankConfig, polled against the timeout (Note [NCCL
  // watchdog]). Throws std::runtime_error before any communication when no
  // CUDA device is visible; NCCL errors and a join that does not complete in
  // time end the job.
  explicit NcclProcessGroup(MpiProcessGroup& mpi);
  // Waits until every operation has finished, then ncclCommFinalize and
  // ncclCommDestroy; while an exception propagates, ncclCommAbort instead
  // (Note [NCCL on failure]).
  ~NcclProcessGroup() override;

  std::string_view backend() const override { return "nccl"; }
  c10::DeviceIndex device() const;  // the CUDA device of the communicator

  std::unique_ptr<Work> all_reduce(const at::Tensor& tensor, const AllReduceOptions& options = {}) override;
  std::unique_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                   const AllGatherOptions& options = {}) override;
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                       const ReduceScatterOptions& options = {}) override;
  std::unique_ptr<Work> broadcast(const at::Tensor& tensor, const BroadcastOptions& options = {}) override;
  // Tags are ignored (Note [NCCL send and recv]).
  std::unique_ptr<Work> send(const at::Tensor& tensor, const SendOptions& options) override;
  std::unique_ptr<Work> recv(const at::Tensor& tensor, const RecvOptions& options) override;
  // An all_reduce of a one-element tensor on the group's device.
  std::unique_ptr<Work> barrier(const BarrierOptions& options = {}) override;
  // One NCCL group of a send and a recv per rank (itself included), as
  // NCCL has no all-to-all of its own.
  std::unique_ptr<Work> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                   const AllToAllOptions& options = {}) override;

 private:
  // check_tensor for this backend: a CUDA tensor on the group's device.
  void check_device_tensor(const std::string& where, std::string_view role, const at::Tensor& tensor) const;
  void check_peer(const std::string& where, int peer) const;

  std::shared_ptr<detail::NcclCommunicator> comm_;
  // Shared with the Works, which ask it whether the job is ending.
  std::shared_ptr<detail::NcclWatchdog> watchdog_;
  // Note [NCCL send and recv]: the signatures of sends, on the host, and
  // the ones still in flight (dropped once complete).
  std::unique_ptr<MpiProcessGroup> signatures_;
  std::vector<std::unique_ptr<Work>> signatures_sent_;
};

}  // namespace loom
