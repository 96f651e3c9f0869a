// The communication interface every parallel layer talks to, in the style of
// PyTorch's c10d ProcessGroup: one object per group of ranks (the world, or
// one axis of the dp x pp x tp grid), each collective of the same shape
//   op(tensors..., const OpOptions& = {}) -> std::unique_ptr<Work>
// Backends: MPI for CPU tensors (parallel/mpi_process_group.h); NCCL for CUDA
// tensors (parallel/nccl_process_group.h, CUDA builds). See docs/parallelism.md.
//
// Note [process group contract]
// - Every rank of a group issues the same collectives (all_reduce, all_gather,
//   reduce_scatter, broadcast, barrier) on that group in the same order, with
//   the same dtype, shapes, op and root. Different groups are independent: a
//   rank may have operations outstanding on its tp and dp groups at once.
//   Issue the operations of one group from one thread at a time; from several
//   threads their order would not be the same on every rank.
// - send/recv pair up by (peer, tag) in the order they are issued; the
//   receiver's tensor must have the sender's dtype and shape, which every
//   backend checks (Note [send signatures]).
// - Every call only starts the operation and returns a Work handle. The
//   tensors belong to the operation until Work::wait returns (or
//   is_completed() returned true): do not read or write them before, and do
//   not free them (the Work holds a reference, so dropping your own is safe).
//   Destroying an unfinished Work waits for it, except while an exception
//   unwinds (Note [abandoned works]).
// - Work::wait never fails quietly and never hangs: when the timeout (the
//   group's when the operation was issued, or the one passed to wait)
//   passes, or the backend reports an error, it prints one line naming the
//   rank, the group, the operation and its tensors, and the ranks it waited
//   for (a collective: the group's other members; send/recv: the peer, by
//   group and world rank), then ends the whole job (MPI_Abort). A job whose ranks
//   disagree about the order of collectives therefore ends at the first
//   collective that never completes, within the timeout.
// - Arguments are checked on the calling rank before anything is sent:
//   unsupported dtype or device, non-contiguous tensor, shapes that do not
//   fit, root or peer out of range. Refused calls throw std::invalid_argument
//   whose message names the rank, the group and the operation; nothing was
//   started on this rank, but the other ranks' matching call may be waiting,
//   so treat it as a bug that ends the job (main catches and aborts).
//
//
// Note [send signatures]
// Ahead of its data, every send passes the receiver its tensor's dtype and
// shape (a TensorSignature, on a channel of its own: MPI, a duplicate of the
// group's communicator). The receiver compares it with its own tensor's
// before it hands the data on, and a mismatch ends the job naming both, e.g.
// "recv #3 of bfloat16 [2, 8, 64] on cpu from group rank 0 (world rank 0)
// tag 1: the sender's tensor is float32 [2, 8, 64]". Without it NCCL would
// hand garbage to the receiver (it moves bytes, and cannot tell), and MPI
// would accept any dtype of the same size and any shape of the same count.
// A tensor sent or received has at most TensorSignature::kMaxDims dims.
//
// Note [abandoned works]
// An exception that unwinds past an unfinished Work (a CUDA out-of-memory in
// a backward while gradient buckets are in flight) must not wait for it:
// its peers may never complete it, and the rank's own error would then be
// printed only after the timeout, after the peers' timeouts blamed the wrong
// rank. So while an exception unwinds, destroying an unfinished Work
// abandons it: its tensors are kept alive, never freed (the backend may
// still write into them), and nothing waits. The group is then unusable
// (its ranks no longer agree on what has been issued), so the exception must
// end the job, as main's catch blocks do with MpiSession::abort.
//
// Tensors: dense and contiguous, on the backend's device (MPI: CPU), dtype one
// of float32, float64, bfloat16, int32, int64 (kSupportedDtypes). Reductions
// of bfloat16 are computed in float32 (Note [bfloat16 reductions]); AVG is
// refused for integer tensors (an integer mean would silently round).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loom {

// How long Work::wait() waits before it ends the job, unless the group was
// made with another timeout (loom train: parallel.comm_timeout, and
// parallel.comm_timeout_first_step until the first step is done) or wait is
// given one. Long enough for rank 0 to write a checkpoint while the others
// wait at the next collective.
inline constexpr std::chrono::milliseconds kDefaultCommTimeout = std::chrono::minutes(10);

enum class ReduceOp {
  kSum,
  kAvg,  // the sum divided by the group size (floating-point dtypes only)
  kMax,
  kMin,
};
std::string_view to_string(ReduceOp op);  // "SUM", "AVG", "MAX", "MIN"

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
};
struct AllGatherOptions {};
struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
};
struct BroadcastOptions {
  int root = 0;  // group rank whose tensor every rank receives
};
struct SendOptions {
  int peer = -1;  // group rank to send to (required)
  int tag = 0;    // matches the receiver's RecvOptions::tag; 0 <= tag <= 32767
};
struct RecvOptions {
  int peer = -1;  // group rank to receive from (required)
  int tag = 0;
};
struct BarrierOptions {};
// all_to_all: how many rows (along dim 0) of `input` go to each group rank
// and of `output` come from each, in group-rank order. Empty: equal shares,
// dim 0 divided by the group size. Rank r's input_splits[s] must equal rank
// s's output_splits[r]; a rank cannot see the others' splits, so a mismatch
// is a bug that the backend may report or not.
struct AllToAllOptions {
  std::vector<int64_t> input_splits;
  std::vector<int64_t> output_splits;
};

// Note [bfloat16 reductions]
// MPI has no bfloat16 type. all_reduce and reduce_scatter of a bfloat16
// tensor reduce a float32 copy and round the result to bfloat16 once, on
// completion: the sum of a few bfloat16 values is then exact before the one
// rounding, and every rank gets the same bits. all_gather, broadcast, send and
// recv move the 2-byte values unchanged.

// The handle of one started operation.
class Work {
 public:
  explicit Work(std::chrono::milliseconds default_timeout) : default_timeout_(default_timeout) {}
  virtual ~Work() = default;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  // True once the operation has finished on this rank (its output tensors
  // hold the result). Never blocks; polling it also drives the operation
  // forward (MPI progresses only inside MPI calls).
  virtual bool is_completed() = 0;

  // Returns once the operation has finished on this rank. When `timeout`
  // passes first, ends the whole job with a message naming the rank, the
  // group and the operation (Note [process group contract]).
  virtual void wait(std::chrono::milliseconds timeout) = 0;
  void wait() { wait(default_timeout_); }

  std::chrono::milliseconds default_timeout() const { return default_timeout_; }

 private:
  std::chrono::milliseconds default_timeout_;
};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }  // this rank's index in the group, 0 <= rank < size
  int size() const { return static_cast<int>(world_ranks_.size()); }
  const std::string& name() const { return name_; }  // "world", "tp", "pp", "dp", ...
  // The world rank of each group rank, in group-rank order.
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  int world_rank() const { return world_ranks_[static_cast<size_t>(rank_)]; }
  // The timeout of the operations issued from now on (a started Work keeps
  // the one it was issued with). set_timeout may be called while other
  // threads issue operations: the first step of a run gets a longer one
  // (start-up, loading a checkpoint) than the steps after it.
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(timeout_ms_.load()); }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ms_.store(timeout.count()); }
  virtual std::string_view backend() const = 0;  // "mpi"

  // Every rank's `tensor` becomes the reduction of all ranks' `tensor`.
  virtual std::unique_ptr<Work> all_reduce(const at::Tensor& tensor, const AllReduceOptions& options = {}) = 0;

  // `output` becomes the concatenation along dim 0 of every rank's `input`,
  // in group-rank order: input [n, ...] -> output [size * n, ...] (a 0-dim
  // input gathers into output [size]). Same dtype; no overlap.
  virtual std::unique_ptr<Work> all_gather(const at::Tensor& output, const at::Tensor& input,
                                           const AllGatherOptions& options = {}) = 0;

  // The reduction of every rank's `input` [size * n, ...], split along dim 0
  // into `size` equal chunks; rank r's `output` [n, ...] becomes chunk r.
  // input.size(0) must be divisible by the group size.
  virtual std::unique_ptr<Work> reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                               const ReduceScatterOptions& options = {}) = 0;

  // Every rank's `tensor` becomes the root's.
  virtual std::unique_ptr<Work> broadcast(const at::Tensor& tensor, const BroadcastOptions& options = {}) = 0;

  // Point to point: `tensor` goes to / comes from group rank options.peer.
  virtual std::unique_ptr<Work> send(const at::Tensor& tensor, const SendOptions& options) = 0;
  virtual std::unique_ptr<Work> recv(const at::Tensor& tensor, const RecvOptions& options) = 0;

  // Completes once every rank of the group has issued it.
  virtual std::unique_ptr<Work> barrier(const BarrierOptions& options = {}) = 0;

  // Rank r's `input` rows for rank s (options.input_splits[s] of them, the
  // s-th block along dim 0) become the r-th block of rank s's `output`: the
  // exchange of expert parallelism (parallel/expert_parallel.h). Same dtype
  // and row shape on both; no overlap. The default refuses: MPI, NCCL and
  // the staged test backend implement it.
  virtual std::unique_ptr<Work> all_to_all(const at::Tensor& output, const at::Tensor& input,
                                           const AllToAllOptions& options = {});

 protected:
  ProcessGroup(std::string name, int rank, std::vector<int> world_ranks, std::chrono::milliseconds timeout);

  // "rank 3 (group 'tp' rank 1 of 2, world ranks [2 3]): all_reduce #7" —
  // the start of every message about operation `op` (#N counts the
  // operations this rank has issued on this group). Also counts the op.
  std::string start_op(std::string_view op);

  // Argument checks shared by backends; each throws std::invalid_argument
  // starting with `where` (from start_op).
  void check_tensor(const std::string& where, std::string_view role, const at::Tensor& tensor,
                    c10::DeviceType device) const;
  void check_reduce_op(const std::string& where, ReduceOp op, const at::Tensor& tensor) const;
  void check_all_gather_shapes(const std::string& where, const at::Tensor& output, const at::Tensor& input) const;
  void check_reduce_scatter_shapes(const std::string& where, const at::Tensor& output, const at::Tensor& input) const;
  // The splits of an all_to_all, resolved (equal shares where empty) and
  // checked against the tensors: {input rows per rank, output rows per rank}.
  std::pair<std::vector<int64_t>, std::vector<int64_t>> check_all_to_all(const std::string& where,
                                                                         const at::Tensor& output,
                                                                         const at::Tensor& input,
                                                                         const AllToAllOptions& options) const;
  void check_group_rank(const std::string& where, std::string_view role, int group_rank) const;
  void check_tag(const std::string& where, int tag) const;

  // For the message of an operation that did not complete: what this rank
  // waits for. collective_hint(): "waiting for world ranks [0 2] (the other
  // members of group 'dp') ...". peer_name(1): "group rank 1 (world rank 3)".
  std::string collective_hint() const;
  std::string peer_name(int group_rank) const;

 private:
  std::string name_;
  int rank_;
  std::vector<int> world_ranks_;
  std::atomic<int64_t> timeout_ms_;
  std::atomic<int64_t> ops_issued_{0};
};

// The groups of one rank along each axis of the dp x cp x pp x tp grid
// (parallel/topology.h). Group ranks are the coordinates along the axis: this
// rank is rank coords.tp of `tp`, whose members differ from it only in tp.
//
// Note [host and device groups]
// A CUDA run has two grids of the same ranks. The MPI grid (split_grid) takes
// CPU tensors: the step's loss and metrics, the flags every rank must agree
// on, gradient norms (all_reduce_through_cpu), checkpoint commits. The NCCL
// grid (device_grid, dp and tp axes) takes the model's own tensors where they
// live: tensor-parallel activations and the vocabulary-parallel loss, dp
// gradient buckets and ZeRO shards; the pipeline's activations, gradients
// and tied-weight sums go over PipeGroups' NCCL twins (Note [pipeline
// links] in parallel/pipeline.h). Copying those through the host would
// cost more than the step. On the CPU the MPI grid serves both. Each
// collective thus has one home: the CPU tests run the same calls on the
// same groups' MPI twins.
//
// Note [cp replicas]
// Under context parallelism (parallel/context_parallel.h) the cp ranks of a
// replica hold the same parameters and each computes the loss of its share
// of the sequence's tokens, as many as any other's. To everything that
// averages over replicas they are replicas: the mean over the dp x cp ranks
// of their mean token losses is the mean over the global batch, and the
// average of their gradients is its gradient. So `dp` holds the dp x cp
// ranks that share pp and tp (group rank dp * cp + cp), and the gradient
// reducer, the loss, the token counts of a masked loss (Note [masked loss]
// in trainer/forward_backward.cpp) and validation go over it unchanged. The
// data is a replica's: the loader reads by the dp coordinate, and each cp
// rank takes its zig-zag chunks of the same rows. `cp` (null when cp is 1)
// holds the ranks that share dp, pp and tp: the ring.
//
// Note [expert groups]
// Expert parallelism (parallel.ep, parallel/expert_parallel.h) splits each
// sparse layer's experts over ep ranks carved out of dp: dp ranks
// b * ep .. b * ep + ep - 1 (block b) hold one copy of all experts between
// them, ep rank dp % ep the experts ep_rank * E/ep .. (ep_rank + 1) * E/ep - 1.
// `ep` (null when ep is 1) holds the ranks of this rank's block that share
// cp, pp and tp: they exchange tokens. `edp` holds the ranks that hold the
// same experts, one per block and cp rank (group rank block * cp + cp): an
// expert's gradient is reduced over it, as a dense parameter's over `dp`.
struct GridGroups {
  std::unique_ptr<ProcessGroup> dp;
  std::unique_ptr<ProcessGroup> pp;
  std::unique_ptr<ProcessGroup> tp;
  std::unique_ptr<ProcessGroup> cp;
  std::unique_ptr<ProcessGroup> ep;
  std::unique_ptr<ProcessGroup> edp;
};

// `tensor` (a small tensor on any device: a loss, a norm, a flag) replaced by
// its reduction over `group`, through a contiguous CPU copy, so that a group
// whose backend takes CPU tensors (MPI) reduces it whatever its device.
// Blocking; collective over `group`.
void all_reduce_through_cpu(ProcessGroup& group, at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);

// Every rank's `mine`, in group rank order, on every rank (for short texts:
// what each rank wrote into a checkpoint, an error message). Blocking;
// collective over `group`.
std::vector<std::string> all_gather_strings(ProcessGroup& group, const std::string& mine);

// "float32 [4, 8] on cpu" (dtype, shape, device) for messages, with dtypes
// named as in Python ("float32", "bfloat16", "int64").
std::string describe_tensor(const at::Tensor& tensor);
std::string dtype_name(c10::ScalarType dtype);

// The dtype and shape of a sent tensor, as the receiver checks them (Note
// [send signatures]): a fixed block of int64 words, so a backend can move it
// as it moves a tensor.
struct TensorSignature {
  static constexpr int kMaxDims = 8;
  static constexpr int kWords = 2 + kMaxDims;  // dtype, number of dims, the dims (unused: 0)
  std::array<int64_t, kWords> words{};

  // Throws std::invalid_argument for a tensor of more than kMaxDims dims.
  static TensorSignature of(const at::Tensor& tensor);
  // "float32 [4, 8]"; words no tensor has (a corrupt message) are shown raw.
  std::string describe() const;
  bool operator==(const TensorSignature&) const = default;
};

// Keeps the tensors of an abandoned Work alive until the process ends (Note
// [abandoned works]). Call only while an exception unwinds.
void abandon_tensors(std::vector<at::Tensor> tensors);

// The dtypes every backend supports.
inline constexpr c10::ScalarType kSupportedDtypes[] = {c10::ScalarType::Float, c10::ScalarType::Double,
                                                       c10::ScalarType::BFloat16, c10::ScalarType::Int,
                                                       c10::ScalarType::Long};

}  // namespace loom
