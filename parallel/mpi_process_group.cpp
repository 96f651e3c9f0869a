#include "parallel/mpi_process_group.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/accumulate.h>

namespace loom {

namespace {

std::string thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE:
      return "MPI_THREAD_MULTIPLE";
  }
  return "thread level " + std::to_string(level);
}

// An MPI call failed (MPI_ERRORS_RETURN is set on every communicator): the
// communicator's state is unknown from here on, so the job ends.
void check_mpi(int rc, const std::string& where, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(rc, text, &length);
  MpiSession::abort(where + ": " + call + " failed: " + std::string(text, static_cast<size_t>(length)));
}

// The MPI type that carries `dtype`'s bytes. bfloat16 travels as 16-bit
// unsigned integers: right for moving values, never used to reduce them
// (Note [bfloat16 reductions]).
MPI_Datatype mpi_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return MPI_FLOAT;
    case c10::ScalarType::Double:
      return MPI_DOUBLE;
    case c10::ScalarType::Int:
      return MPI_INT32_T;
    case c10::ScalarType::Long:
      return MPI_INT64_T;
    case c10::ScalarType::BFloat16:
      return MPI_UINT16_T;
    default:
      // check_tensor refused every other dtype before this point.
      throw std::logic_error(std::string("no MPI type for ") + c10::toString(dtype));
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:  // summed, then divided on completion
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

// MPI counts are ints.
int mpi_count(const std::string& where, const at::Tensor& tensor) {
  if (tensor.numel() > INT_MAX) {
    throw std::invalid_argument(where + ": " + describe_tensor(tensor) + " has more than " + std::to_string(INT_MAX) +
                                " elements, the most one MPI call can move; split it");
  }
  return static_cast<int>(tensor.numel());
}

// The signature of a tensor to send or receive; refusals start with `where`.
TensorSignature signature_of(const std::string& where, const at::Tensor& tensor) {
  try {
    return TensorSignature::of(tensor);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(where + ": " + e.what());
  }
}

std::string seconds(std::chrono::milliseconds duration) {
  std::ostringstream os;
  os << std::chrono::duration<double>(duration).count() << " s";
  return os.str();
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

// One started non-blocking MPI operation. Holds the tensors it reads and
// writes until it completes: MPI keeps raw pointers into them.
class MpiWork final : public Work {
 public:
  // `what`: the operation and its tensors, for messages; `hint`: what the
  // other ranks must have done for it to complete.
  MpiWork(std::shared_ptr<detail::MpiRuntime> runtime, std::string what, std::string hint,
          std::chrono::milliseconds timeout, std::vector<at::Tensor> tensors)
      : Work(timeout),
        runtime_(std::move(runtime)),
        what_(std::move(what)),
        hint_(std::move(hint)),
        tensors_(std::move(tensors)) {}

  ~MpiWork() override {
    if (completed_ || mpi_finalized()) return;
    if (request_ == MPI_REQUEST_NULL && signature_request_ == MPI_REQUEST_NULL) return;
    if (std::uncaught_exceptions() > 0) {
      // Note [abandoned works]: MPI may still write into the buffers.
      abandon_tensors(std::move(tensors_));
      (void)signature_.release();
      return;
    }
    // MPI may still write into the tensors: returning them to the allocator
    // before completion would corrupt memory. Waiting keeps the promise of
    // the header (an unfinished Work is waited for, or the job ends).
    wait();
  }

  using Work::wait;

  MPI_Request* request() { return &request_; }
  const std::string& what() const { return what_; }

  // Runs once, on completion, before is_completed() first returns true.
  void on_complete(std::function<void()> finish) { finish_ = std::move(finish); }

  // Note [send signatures]. A send: `signature` goes ahead of the data, on
  // the request signature_request(). A recv: the signature that arrives
  // there must equal `signature`, or the job ends.
  TensorSignature* carry_signature(const TensorSignature& signature, bool expect) {
    signature_ = std::make_unique<TensorSignature>(expect ? TensorSignature{} : signature);
    if (expect) expected_ = signature;
    return signature_.get();
  }
  MPI_Request* signature_request() { return &signature_request_; }

  bool is_completed() override {
    if (completed_) return true;
    int done = 0;
    {
      auto lock = runtime_->lock();
      if (signature_request_ != MPI_REQUEST_NULL) {
        check_mpi(MPI_Test(&signature_request_, &done, MPI_STATUS_IGNORE), what_, "MPI_Test");
        if (!done) return false;
        if (expected_ && *signature_ != *expected_) {
          MpiSession::abort(what_ + ": the sender's tensor is " + signature_->describe() +
                            "; the receiver's tensor must have the sender's dtype and shape");
        }
      }
      check_mpi(MPI_Test(&request_, &done, MPI_STATUS_IGNORE), what_, "MPI_Test");
    }
    if (!done) return false;
    completed_ = true;
    if (finish_) finish_();
    finish_ = nullptr;
    tensors_.clear();
    signature_.reset();
    return true;
  }

  void wait(std::chrono::milliseconds timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    // Open MPI advances non-blocking operations only inside MPI calls, so the
    // wait is a loop of MPI_Test; yield keeps oversubscribed ranks moving.
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() >= deadline) {
        MpiSession::abort(what_ + " did not complete within " + seconds(timeout) + "; " + hint_ + ". Ending the job.");
      }
      std::this_thread::yield();
    }
  }

 private:
  std::shared_ptr<detail::MpiRuntime> runtime_;
  std::string what_;
  std::string hint_;
  std::vector<at::Tensor> tensors_;
  std::function<void()> finish_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool completed_ = false;
  std::unique_ptr<TensorSignature> signature_;  // sent, or the buffer the sender's arrives in
  std::optional<TensorSignature> expected_;     // a recv's own
  MPI_Request signature_request_ = MPI_REQUEST_NULL;
};

int comm_rank(MPI_Comm comm) {
  int rank = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "new process group", "MPI_Comm_rank");
  return rank;
}

// The world rank of each rank of `comm`, in `comm`'s rank order.
std::vector<int> world_ranks_of(MPI_Comm comm) {
  int size = 0;
  check_mpi(MPI_Comm_size(comm, &size), "new process group", "MPI_Comm_size");
  MPI_Group group, world_group;
  check_mpi(MPI_Comm_group(comm, &group), "new process group", "MPI_Comm_group");
  check_mpi(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "new process group", "MPI_Comm_group");
  std::vector<int> ranks(static_cast<size_t>(size)), world_ranks(static_cast<size_t>(size));
  for (int i = 0; i < size; ++i) ranks[static_cast<size_t>(i)] = i;
  check_mpi(MPI_Group_translate_ranks(group, size, ranks.data(), world_group, world_ranks.data()), "new process group",
            "MPI_Group_translate_ranks");
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return world_ranks;
}

std::atomic<bool> g_session_made{false};

}  // namespace

// --- MpiSession ----------------------------------------------------------------

MpiSession::MpiSession(int* argc, char*** argv, int thread_level) {
  if (g_session_made.exchange(true)) {
    throw std::logic_error(
        "MpiSession: one per process: MPI cannot be initialized again once finalized, and a "
        "session was already made");
  }
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) throw std::logic_error("MpiSession: MPI was already initialized outside loom");
  // Open MPI's non-blocking all-reduce (libnbc, what every loom all_reduce
  // is) picks its algorithm itself by default, and on this project's
  // machines that ran at 0.4x the bus bandwidth of a blocking MPI_Allreduce
  // for 4 KB to 32 MB; its ring algorithm runs at 0.9 to 1.4x
  // (bench/bench_tp_comm.cpp, docs/performance.md). MCA parameters are read
  // from the environment at MPI_Init: a value the user set wins.
  ::setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
  int provided = MPI_THREAD_SINGLE;
  // Without an error handler yet, a failing MPI_Init_thread ends the process
  // itself with MPI's own message.
  MPI_Init_thread(argc, argv, thread_level, &provided);
  provided = std::min(provided, thread_level);
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    throw std::runtime_error("MPI thread level " + thread_level_name(provided) +
                             "; loom needs MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE because collectives may be "
                             "issued from autograd threads. Use an MPI built with thread support (Open MPI has it "
                             "by default since 3.0).");
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  runtime_ = std::make_shared<detail::MpiRuntime>();
  runtime_->thread_level = provided;
  runtime_->world_rank = world_rank_;
}

MpiSession::~MpiSession() {
  if (!mpi_finalized()) MPI_Finalize();
}

std::unique_ptr<MpiProcessGroup> MpiSession::world(std::chrono::milliseconds timeout) const {
  const std::string what = "rank " + std::to_string(world_rank_) + ": MPI_Comm_idup of MPI_COMM_WORLD (group 'world')";
  MPI_Comm comm = MPI_COMM_NULL;
  // Non-blocking, so that a rank that never gets here ends the job on timeout
  // instead of leaving the others in MPI_Comm_dup.
  MpiWork work(runtime_, what,
               "waiting for every other rank of the job, which must start and make its world group too", timeout,
               {});
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Comm_idup(MPI_COMM_WORLD, &comm, work.request()), what, "MPI_Comm_idup");
  }
  work.wait();
  check_mpi(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), what, "MPI_Comm_set_errhandler");
  return std::unique_ptr<MpiProcessGroup>(new MpiProcessGroup(runtime_, comm, "world", timeout));
}

void MpiSession::abort(const std::string& message, int exit_code) {
  std::fprintf(stderr, "loom: %s\n", message.c_str());
  std::fflush(stderr);
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized && !mpi_finalized()) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

// --- MpiProcessGroup -------------------------------------------------------------

MpiProcessGroup::MpiProcessGroup(std::shared_ptr<detail::MpiRuntime> runtime, MPI_Comm comm, std::string name,
                                 std::chrono::milliseconds timeout)
    : ProcessGroup(std::move(name), comm_rank(comm), world_ranks_of(comm), timeout),
      runtime_(std::move(runtime)),
      comm_(comm) {
  // Every rank of `comm` makes its group together (world, split), so this
  // blocking duplicate cannot wait on a rank that never comes.
  auto lock = runtime_->lock();
  check_mpi(MPI_Comm_dup(comm_, &signature_comm_), "group '" + this->name() + "'", "MPI_Comm_dup");
  check_mpi(MPI_Comm_set_errhandler(signature_comm_, MPI_ERRORS_RETURN), "group '" + this->name() + "'",
            "MPI_Comm_set_errhandler");
}

MpiProcessGroup::~MpiProcessGroup() {
  // After MPI_Finalize the communicator is gone already (the session was
  // destroyed first, against the lifetime rule in the header).
  if (comm_ != MPI_COMM_NULL && !mpi_finalized()) {
    auto lock = runtime_->lock();
    MPI_Comm_free(&comm_);
    if (signature_comm_ != MPI_COMM_NULL) MPI_Comm_free(&signature_comm_);
  }
}

namespace {
// "all_reduce #3 of float32 [4] on cpu, SUM" etc.: what + tensors + op.
std::string with_tensor(const std::string& where, const at::Tensor& tensor) {
  return where + " of " + describe_tensor(tensor);
}
}  // namespace

std::unique_ptr<Work> MpiProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  const std::string where = start_op("all_reduce");
  check_tensor(where, "tensor", tensor, c10::DeviceType::CPU);
  check_reduce_op(where, options.op, tensor);
  const int count = mpi_count(where, tensor);
  // The collectives move data; they are not autograd operations (the
  // parallel layers wrap them in autograd functions). Without this, the
  // copies and in-place divisions below on a parameter would be refused.
  at::NoGradGuard no_grad;
  const bool via_float = tensor.scalar_type() == c10::ScalarType::BFloat16;  // Note [bfloat16 reductions]
  at::Tensor buffer = via_float ? tensor.to(c10::ScalarType::Float) : tensor;
  auto work =
      std::make_unique<MpiWork>(runtime_, with_tensor(where, tensor) + ", " + std::string(to_string(options.op)),
                                collective_hint(), timeout(), std::vector<at::Tensor>{tensor, buffer});
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, buffer.data_ptr(), count, mpi_type(buffer.scalar_type()), mpi_op(options.op),
                             comm_, work->request()),
              work->what(), "MPI_Iallreduce");
  }
  const bool average = options.op == ReduceOp::kAvg;
  if (average || via_float) {
    work->on_complete([tensor, buffer, average, via_float, n = size()]() mutable {
      at::NoGradGuard no_grad;
      if (average) buffer.div_(n);
      if (via_float) tensor.copy_(buffer);
    });
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::all_gather(const at::Tensor& output, const at::Tensor& input,
                                                  const AllGatherOptions&) {
  const std::string where = start_op("all_gather");
  check_tensor(where, "output", output, c10::DeviceType::CPU);
  check_tensor(where, "input", input, c10::DeviceType::CPU);
  check_all_gather_shapes(where, output, input);
  mpi_count(where, output);
  const int count = mpi_count(where, input);
  auto work = std::make_unique<MpiWork>(runtime_, with_tensor(where, input) + " into " + describe_tensor(output),
                                        collective_hint(), timeout(), std::vector<at::Tensor>{output, input});
  const MPI_Datatype type = mpi_type(input.scalar_type());
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Iallgather(input.data_ptr(), count, type, output.data_ptr(), count, type, comm_, work->request()),
              work->what(), "MPI_Iallgather");
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                                      const ReduceScatterOptions& options) {
  const std::string where = start_op("reduce_scatter");
  check_tensor(where, "output", output, c10::DeviceType::CPU);
  check_tensor(where, "input", input, c10::DeviceType::CPU);
  check_reduce_scatter_shapes(where, output, input);
  check_reduce_op(where, options.op, input);
  mpi_count(where, input);
  const int count = mpi_count(where, output);
  at::NoGradGuard no_grad;  // as in all_reduce
  const bool via_float = input.scalar_type() == c10::ScalarType::BFloat16;  // Note [bfloat16 reductions]
  at::Tensor input_buffer = via_float ? input.to(c10::ScalarType::Float) : input;
  at::Tensor output_buffer = via_float ? at::empty(output.sizes(), input_buffer.options()) : output;
  auto work = std::make_unique<MpiWork>(
      runtime_,
      with_tensor(where, input) + " into " + describe_tensor(output) + ", " + std::string(to_string(options.op)),
      collective_hint(), timeout(), std::vector<at::Tensor>{output, input, input_buffer, output_buffer});
  {
    auto lock = runtime_->lock();
    check_mpi(
        MPI_Ireduce_scatter_block(input_buffer.data_ptr(), output_buffer.data_ptr(), count,
                                  mpi_type(output_buffer.scalar_type()), mpi_op(options.op), comm_, work->request()),
        work->what(), "MPI_Ireduce_scatter_block");
  }
  const bool average = options.op == ReduceOp::kAvg;
  if (average || via_float) {
    work->on_complete([output, output_buffer, average, via_float, n = size()]() mutable {
      at::NoGradGuard no_grad;
      if (average) output_buffer.div_(n);
      if (via_float) output.copy_(output_buffer);
    });
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  const std::string where = start_op("broadcast");
  check_tensor(where, "tensor", tensor, c10::DeviceType::CPU);
  check_group_rank(where, "root", options.root);
  const int count = mpi_count(where, tensor);
  auto work =
      std::make_unique<MpiWork>(runtime_, with_tensor(where, tensor) + " from root " + std::to_string(options.root),
                                collective_hint(), timeout(), std::vector<at::Tensor>{tensor});
  {
    auto lock = runtime_->lock();
    check_mpi(
        MPI_Ibcast(tensor.data_ptr(), count, mpi_type(tensor.scalar_type()), options.root, comm_, work->request()),
        work->what(), "MPI_Ibcast");
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::send(const at::Tensor& tensor, const SendOptions& options) {
  const std::string where = start_op("send");
  check_tensor(where, "tensor", tensor, c10::DeviceType::CPU);
  check_group_rank(where, "peer", options.peer);
  check_tag(where, options.tag);
  const int count = mpi_count(where, tensor);
  auto work = std::make_unique<MpiWork>(runtime_,
                                        with_tensor(where, tensor) + " to " + peer_name(options.peer) + " tag " +
                                            std::to_string(options.tag),
                                        "waiting for " + peer_name(options.peer) + ", which must issue the matching recv",
                                        timeout(), std::vector<at::Tensor>{tensor});
  TensorSignature* signature = work->carry_signature(signature_of(where, tensor), /*expect=*/false);
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Isend(signature->words.data(), TensorSignature::kWords, MPI_INT64_T, options.peer, options.tag,
                        signature_comm_, work->signature_request()),
              work->what(), "MPI_Isend");
    check_mpi(MPI_Isend(tensor.data_ptr(), count, mpi_type(tensor.scalar_type()), options.peer, options.tag, comm_,
                        work->request()),
              work->what(), "MPI_Isend");
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::recv(const at::Tensor& tensor, const RecvOptions& options) {
  const std::string where = start_op("recv");
  check_tensor(where, "tensor", tensor, c10::DeviceType::CPU);
  check_group_rank(where, "peer", options.peer);
  check_tag(where, options.tag);
  const int count = mpi_count(where, tensor);
  const MPI_Datatype type = mpi_type(tensor.scalar_type());
  auto work = std::make_unique<MpiWork>(runtime_,
                                        with_tensor(where, tensor) + " from " + peer_name(options.peer) + " tag " +
                                            std::to_string(options.tag),
                                        "waiting for " + peer_name(options.peer) + ", which must issue the matching send",
                                        timeout(), std::vector<at::Tensor>{tensor});
  TensorSignature* arriving = work->carry_signature(signature_of(where, tensor), /*expect=*/true);
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Irecv(arriving->words.data(), TensorSignature::kWords, MPI_INT64_T, options.peer, options.tag,
                        signature_comm_, work->signature_request()),
              work->what(), "MPI_Irecv");
    check_mpi(MPI_Irecv(tensor.data_ptr(), count, type, options.peer, options.tag, comm_, work->request()),
              work->what(), "MPI_Irecv");
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::barrier(const BarrierOptions&) {
  const std::string where = start_op("barrier");
  auto work = std::make_unique<MpiWork>(runtime_, where, collective_hint(), timeout(), std::vector<at::Tensor>{});
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Ibarrier(comm_, work->request()), work->what(), "MPI_Ibarrier");
  }
  return work;
}

std::unique_ptr<Work> MpiProcessGroup::all_to_all(const at::Tensor& output, const at::Tensor& input,
                                                  const AllToAllOptions& options) {
  const std::string where = start_op("all_to_all");
  check_tensor(where, "output", output, c10::DeviceType::CPU);
  check_tensor(where, "input", input, c10::DeviceType::CPU);
  const auto [input_rows, output_rows] = check_all_to_all(where, output, input, options);
  mpi_count(where, input);
  mpi_count(where, output);
  // Counts and displacements in elements, as ints, in one tensor the work
  // holds: MPI reads them until the operation completes.
  const int64_t row_elements = c10::multiply_integers(input.sizes().slice(1));  // 1 for a 1-D tensor
  const int n = size();
  at::Tensor layout = at::empty({4 * n}, at::kInt);
  int* send_counts = layout.data_ptr<int>();
  int* send_displs = send_counts + n;
  int* recv_counts = send_displs + n;
  int* recv_displs = recv_counts + n;
  int64_t send_at = 0, recv_at = 0;
  for (int r = 0; r < n; ++r) {
    send_counts[r] = static_cast<int>(input_rows[r] * row_elements);
    send_displs[r] = static_cast<int>(send_at);
    recv_counts[r] = static_cast<int>(output_rows[r] * row_elements);
    recv_displs[r] = static_cast<int>(recv_at);
    send_at += input_rows[r] * row_elements;
    recv_at += output_rows[r] * row_elements;
  }
  auto work = std::make_unique<MpiWork>(runtime_, with_tensor(where, input) + " into " + describe_tensor(output),
                                        collective_hint(), timeout(), std::vector<at::Tensor>{output, input, layout});
  const MPI_Datatype type = mpi_type(input.scalar_type());
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Ialltoallv(input.data_ptr(), send_counts, send_displs, type, output.data_ptr(), recv_counts,
                             recv_displs, type, comm_, work->request()),
              work->what(), "MPI_Ialltoallv");
  }
  return work;
}

std::unique_ptr<MpiProcessGroup> MpiProcessGroup::split(int color, int key, std::string name) {
  const std::string where = start_op("split into '" + name + "'");
  if (color < 0) throw std::invalid_argument(where + ": color " + std::to_string(color) + " must be >= 0");
  // MPI_Comm_split blocks and has no timeout. A barrier first means every
  // rank has reached the split (or the barrier's timeout ended the job).
  barrier()->wait();
  MPI_Comm comm = MPI_COMM_NULL;
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Comm_split(comm_, color, key, &comm), where, "MPI_Comm_split");
    check_mpi(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), where, "MPI_Comm_set_errhandler");
  }
  return std::unique_ptr<MpiProcessGroup>(new MpiProcessGroup(runtime_, comm, std::move(name), timeout()));
}

MpiProcessGroup::NodeRanks MpiProcessGroup::node_ranks() {
  const std::string where = start_op("node_ranks");
  barrier()->wait();  // MPI_Comm_split_type blocks without a timeout, as MPI_Comm_split does
  MPI_Comm node = MPI_COMM_NULL;
  NodeRanks place;
  {
    auto lock = runtime_->lock();
    check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank(), MPI_INFO_NULL, &node), where,
              "MPI_Comm_split_type");
    check_mpi(MPI_Comm_rank(node, &place.local_rank), where, "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(node, &place.size), where, "MPI_Comm_size");
    MPI_Comm_free(&node);
  }
  return place;
}

GridGroups split_grid(MpiProcessGroup& world, const ParallelDims& dims) {
  if (dims.dp < 1 || dims.pp < 1 || dims.tp < 1 || dims.cp < 1 || dims.dp * dims.cp * dims.pp * dims.tp != dims.world ||
      dims.world != world.size() || dims.ep < 1 || dims.dp % dims.ep != 0) {
    const std::string cp = dims.cp != 1 ? " * cp (" + std::to_string(dims.cp) + ")" : "";
    throw std::invalid_argument("split_grid: dp (" + std::to_string(dims.dp) + ")" + cp + " * pp (" +
                                std::to_string(dims.pp) + ") * tp (" + std::to_string(dims.tp) +
                                ") must equal the world (" + std::to_string(dims.world) + ") and the size of group '" +
                                world.name() + "' (" + std::to_string(world.size()) + "), and ep (" +
                                std::to_string(dims.ep) + ") must divide dp");
  }
  const ParallelDims::Coords c = dims.coords_of(world.rank());
  // Each split keeps the ranks that share the other coordinates, ordered
  // by the coordinate along the axis, so group rank == that coordinate. Same
  // order of splits on every rank (they are collectives over `world`).
  // dp (Note [cp replicas] in process_group.h) keeps the ranks that share pp
  // and tp: every cp rank of every replica, group rank dp * cp + cp.
  GridGroups groups;
  groups.tp = world.split(static_cast<int>((c.dp * dims.pp + c.pp) * dims.cp + c.cp), static_cast<int>(c.tp), "tp");
  groups.pp = world.split(static_cast<int>((c.dp * dims.cp + c.cp) * dims.tp + c.tp), static_cast<int>(c.pp), "pp");
  groups.dp = world.split(static_cast<int>(c.pp * dims.tp + c.tp), static_cast<int>(c.dp * dims.cp + c.cp), "dp");
  // Only with cp > 1, so that a run without it makes the communicators it always made.
  if (dims.cp > 1) {
    groups.cp = world.split(static_cast<int>((c.dp * dims.pp + c.pp) * dims.tp + c.tp), static_cast<int>(c.cp), "cp");
  }
  // Note [expert groups] in process_group.h, only with ep > 1.
  if (dims.ep > 1) {
    const int64_t block = c.dp / dims.ep, ep_rank = c.dp % dims.ep;
    groups.ep = world.split(static_cast<int>(((block * dims.pp + c.pp) * dims.cp + c.cp) * dims.tp + c.tp),
                            static_cast<int>(ep_rank), "ep");
    groups.edp = world.split(static_cast<int>((ep_rank * dims.pp + c.pp) * dims.tp + c.tp),
                             static_cast<int>(block * dims.cp + c.cp), "edp");
  }
  return groups;
}

}  // namespace loom
