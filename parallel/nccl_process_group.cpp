#include "parallel/nccl_process_group.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "parallel/deadline_watch.h"

namespace loom {

namespace {

// The signature of a tensor sent or received; refusals start with `where`.
TensorSignature signature_of(const std::string& where, const at::Tensor& tensor) {
  try {
    return TensorSignature::of(tensor);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(where + ": " + e.what());
  }
}

// A signature as the host tensor the MPI group sends.
at::Tensor signature_tensor(const TensorSignature& signature) {
  at::Tensor words = at::empty({TensorSignature::kWords}, at::kLong);
  std::memcpy(words.data_ptr(), signature.words.data(), sizeof(signature.words));
  return words;
}

}  // namespace

namespace {

std::string nccl_version() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return "NCCL (version unknown)";
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return "NCCL " + std::to_string(version / 10000) + "." + std::to_string(version % 10000 / 100) + "." +
         std::to_string(version % 100);
}

// The NCCL type that carries `dtype`. bfloat16 is NCCL's own type, reduced
// natively (Note [NCCL bfloat16 reductions]).
ncclDataType_t nccl_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return ncclFloat32;
    case c10::ScalarType::Double:
      return ncclFloat64;
    case c10::ScalarType::BFloat16:
      return ncclBfloat16;
    case c10::ScalarType::Int:
      return ncclInt32;
    case c10::ScalarType::Long:
      return ncclInt64;
    default:
      // check_tensor refused every other dtype before this point.
      throw std::logic_error(std::string("no NCCL type for ") + c10::toString(dtype));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:  // integer AVG was refused by check_reduce_op
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

struct StreamDestroyer {
  void operator()(cudaStream_t stream) const { cudaStreamDestroy(stream); }
};
using CudaStream = std::unique_ptr<CUstream_st, StreamDestroyer>;

struct EventDestroyer {
  void operator()(cudaEvent_t event) const { cudaEventDestroy(event); }
};
using CudaEvent = std::unique_ptr<CUevent_st, EventDestroyer>;

// How long an abort lets ncclCommAbort run before it goes on anyway.
constexpr std::chrono::seconds kAbortGrace{5};
// How often the watchdog looks at the operations in flight, and a host
// waiting for a call that returned ncclInProgress polls it. Short: a
// finished operation's tensors go back to the allocator only when the
// watchdog has seen it finish.
constexpr std::chrono::milliseconds kPollInterval{1};
// How long a thread whose NCCL call returned ncclInProgress spins before it
// polls at kPollInterval.
constexpr std::chrono::milliseconds kSettleSpin{10};

// Set once any group of this process has started ending the job
// (NcclCommunicator::abort_job): from then on destructors abort instead of
// waiting (Note [NCCL on failure]). Per process by nature, like the job.
std::atomic<bool> g_job_ending{false};

// For a thread that finds the job ending on another thread: it must not go
// on as if its operation had finished, nor end the process before the other
// thread's message is out. MpiSession::abort ends this thread too.
[[noreturn]] void wait_for_the_job_to_end() {
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}

// True in a destructor that runs because an exception is propagating, or
// once the job is ending: then NCCL objects abort rather than wait.
bool abandoning() { return std::uncaught_exceptions() > 0 || g_job_ending.load(); }

}  // namespace

namespace detail {

// Owns the NCCL communicator (non-blocking: Note [NCCL watchdog]) and the
// group's stream. Every failure after construction ends the job through
// abort_job, which aborts the communicator first: a kernel stuck in an NCCL
// collective would otherwise keep the GPU (and the process's exit) waiting.
class NcclCommunicator {
 public:
  NcclCommunicator(c10::DeviceIndex device, int world_rank, std::string group_name)
      : device_(device), world_rank_(world_rank), group_name_(std::move(group_name)) {}

  // Only reached with a communicator still open when the group did not get
  // to close it (its constructor ended early): abort, never wait for peers.
  ~NcclCommunicator() { abort_communicator(); }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  void create_stream(const std::string& where) {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = nullptr;
    // Non-blocking: the legacy default stream, which some libraries still
    // use, must not serialize with communication.
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), where, "cudaStreamCreateWithFlags");
    stream_.reset(stream);
  }

  // Joins the communicator of `size` ranks named by `id`, polling until
  // every rank has joined or `timeout` passes (then the job ends, naming
  // `never_joined`: the ranks that must join).
  void init(int size, int rank, const ncclUniqueId& id, const std::string& where, const std::string& never_joined,
            std::chrono::milliseconds timeout) {
    c10::cuda::CUDAGuard guard(device_);  // the communicator binds the current device
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    // Non-blocking: every call returns at once (maybe ncclInProgress) and
    // the host polls, so that a peer that never joins or never connects
    // meets a deadline instead of hanging the host call.
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    const ncclResult_t rc = ncclCommInitRankConfig(&comm, size, id, rank, &config);
    comm_ = comm;  // also while in progress: abort_job aborts it
    settle(rc, where, "ncclCommInitRankConfig", never_joined, timeout);
  }

  c10::DeviceIndex device() const { return device_; }
  cudaStream_t stream() const { return stream_.get(); }
  ncclComm_t comm() const { return comm_; }

  // The orderly end: ncclCommFinalize flushes what was issued (polled like
  // any other call), then ncclCommDestroy frees what is local.
  void close(const std::string& where, const std::string& waiting_for, std::chrono::milliseconds timeout) {
    if (comm_ == nullptr) return;
    c10::cuda::CUDAGuard guard(device_);
    settle(ncclCommFinalize(comm_), where, "ncclCommFinalize", waiting_for, timeout);
    check_nccl(ncclCommDestroy(comm_), where, "ncclCommDestroy");
    comm_ = nullptr;
  }

  // ncclCommAbort, once, giving up on it after kAbortGrace. It stops
  // kernels stuck in NCCL and closes the connections, so the peers see an
  // error instead of silence; it can itself get stuck, hence the bound (the
  // communicator then leaks: the job is ending). Works on a communicator
  // still joining, and from any thread while others use it.
  void abort_communicator() {
    if (aborting_.exchange(true) || comm_ == nullptr) return;
    auto finished = std::make_shared<std::atomic<bool>>(false);
    std::thread([comm = comm_, device = device_, finished] {
      cudaSetDevice(device);
      ncclCommAbort(comm);
      *finished = true;
    }).detach();
    const auto give_up = std::chrono::steady_clock::now() + kAbortGrace;
    while (!*finished && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  // Prints `message`, aborts the communicator and ends every rank of the job.
  [[noreturn]] void abort_job(const std::string& message) {
    g_job_ending = true;
    // The line comes first: the other ranks may end the job at any moment.
    std::fprintf(stderr, "loom: %s\n", message.c_str());
    std::fflush(stderr);
    abort_communicator();
    MpiSession::abort("rank " + std::to_string(world_rank_) + ": aborted the NCCL communicator of group '" +
                      group_name_ + "'; ending the job");
  }

  void check_nccl(ncclResult_t rc, const std::string& where, const char* call) {
    if (rc == ncclSuccess) return;
    abort_job(where + ": " + call + " failed: " + error_text(rc));
  }

  void check_cuda(cudaError_t rc, const std::string& where, const char* call) {
    if (rc == cudaSuccess) return;
    abort_job(where + ": " + call + " failed: " + cudaGetErrorString(rc));
  }

  // `rc` of an NCCL call on this (non-blocking) communicator: ncclInProgress
  // means the call goes on in the background, and the next NCCL call may be
  // made only once the communicator's state is no longer ncclInProgress.
  // The first call on a communicator connects to its peers there, so this
  // is where a peer that never issues its side is waited for: against the
  // deadline, naming `waiting_for` past it.
  void settle(ncclResult_t rc, const std::string& where, const char* call, const std::string& waiting_for,
              std::chrono::milliseconds timeout) {
    if (rc != ncclInProgress) {
      check_nccl(rc, where, call);
      return;
    }
    ncclResult_t state = ncclInProgress;
    DeadlineWatch watch;
    watch.add({.what = where + ": " + call,
               .waiting_for = waiting_for,
               .timeout = timeout,
               .done =
                   [&] {
                     const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
                     if (query != ncclSuccess) state = query;
                     return state != ncclInProgress;
                   },
               .error = {}});
    // Spin briefly (most calls settle within microseconds), then sleep: a
    // join may wait seconds for its peers and should not take a core.
    const auto spin_until = std::chrono::steady_clock::now() + kSettleSpin;
    for (;;) {
      if (auto failure = watch.poll()) abort_job(failure->message);
      if (watch.size() == 0) break;
      if (std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kPollInterval);
      }
    }
    check_nccl(state, where, call);
  }

  // The communicator's asynchronous error as a message, or "" while it has
  // none (ncclInProgress is no error: a call is still settling). Errors NCCL
  // finds after a call returned (a peer gone, a network failure) show up
  // only here; the operation itself would never complete.
  std::string async_error() {
    // After an abort every call would report it: the job is ending already.
    if (comm_ == nullptr || aborting_) return "";
    ncclResult_t state = ncclSuccess;
    const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
    if (query != ncclSuccess) return "ncclCommGetAsyncError failed: " + error_text(query);
    if (state == ncclSuccess || state == ncclInProgress) return "";
    return "NCCL reported an asynchronous error: " + error_text(state);
  }

  CudaEvent make_event(const std::string& where) {
    cudaEvent_t event = nullptr;
    // Without timing an event is cheaper to record and to query.
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), where, "cudaEventCreateWithFlags");
    return CudaEvent(event);
  }

 private:
  std::string error_text(ncclResult_t rc) const {
    std::string text = ncclGetErrorString(rc);
    if (comm_ != nullptr) {
      const char* last = ncclGetLastError(comm_);
      if (last != nullptr && *last != '\0') text += " (" + std::string(last) + ")";
    }
    return text + " [" + nccl_version() + "]";
  }

  c10::DeviceIndex device_;
  int world_rank_;
  std::string group_name_;
  CudaStream stream_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborting_{false};
};

// The group's watchdog thread (Note [NCCL watchdog]): it owns the operations
// in flight, polls their completion events and the communicator's
// asynchronous error, drops each operation (and its tensors) once it has
// finished, and ends the job past a deadline or on an error.
class NcclWatchdog {
 public:
  explicit NcclWatchdog(std::shared_ptr<NcclCommunicator> comm) : comm_(std::move(comm)) {
    thread_ = std::thread([this] { run(); });
  }
  ~NcclWatchdog() { stop(); }
  NcclWatchdog(const NcclWatchdog&) = delete;
  NcclWatchdog& operator=(const NcclWatchdog&) = delete;

  uint64_t watch(DeadlineWatch::Op op) {
    uint64_t id = 0;
    {
      // Under mutex_, so the thread cannot miss it between its check for
      // work and its sleep.
      std::lock_guard<std::mutex> lock(mutex_);
      id = watch_.add(std::move(op));
    }
    wake_.notify_one();
    return id;
  }

  void restart(uint64_t id, std::chrono::milliseconds timeout) { watch_.restart(id, timeout); }
  bool failed() const { return watch_.failed(); }

  // Returns once every operation has been seen finished. Never hangs: the
  // thread ends the job at the first deadline that passes.
  void drain() {
    std::unique_lock<std::mutex> lock(mutex_);
    drained_.wait(lock, [&] { return watch_.size() == 0 || stop_; });
  }

  // Ends the thread; the operations not seen finished stay held (with
  // their tensors) until this object is destroyed.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    drained_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    // Events and the communicator belong to the group's device.
    cudaSetDevice(comm_->device());
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      if (watch_.size() == 0) {
        drained_.notify_all();
        wake_.wait(lock, [&] { return stop_ || watch_.size() > 0; });
        continue;
      }
      lock.unlock();
      if (auto failure = watch_.poll()) comm_->abort_job(failure->message);
      lock.lock();
      if (watch_.size() > 0) wake_.wait_for(lock, kPollInterval, [&] { return stop_; });
    }
  }

  std::shared_ptr<NcclCommunicator> comm_;
  DeadlineWatch watch_;
  std::mutex mutex_;  // guards stop_, and orders watch() against the thread's sleep
  std::condition_variable wake_, drained_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace detail

namespace {

// What an operation and its Work share: the completion event, the tensors
// NCCL reads and writes (held until the operation is seen finished, so that
// the caching allocator cannot hand their memory to another tensor while
// NCCL still uses it), and whether it has finished.
struct NcclOpState {
  CudaEvent done;
  std::vector<at::Tensor> tensors;
  std::atomic<bool> finished{false};

  // Never blocks. Called by the watchdog thread and by Work::is_completed.
  bool query(detail::NcclCommunicator& comm, const std::string& what) {
    if (finished) return true;
    const cudaError_t rc = cudaEventQuery(done.get());
    if (rc == cudaErrorNotReady) {
      // Not an error, but CUDA records it as the thread's last error; clear
      // it so that libtorch's next kernel-launch check does not report it.
      (void)cudaGetLastError();
      return false;
    }
    comm.check_cuda(rc, what, "cudaEventQuery");
    finished = true;
    return true;
  }
};

// One operation queued on the group's stream (Note [NCCL streams]); the
// group's watchdog follows it (Note [NCCL watchdog]).
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<detail::NcclCommunicator> comm, std::shared_ptr<detail::NcclWatchdog> watchdog,
           std::shared_ptr<NcclOpState> state, uint64_t id, std::string what, std::chrono::milliseconds timeout)
      : Work(timeout),
        comm_(std::move(comm)),
        watchdog_(std::move(watchdog)),
        state_(std::move(state)),
        id_(id),
        what_(std::move(what)) {}

  ~NcclWork() override {
    // Destroying an unfinished Work waits for it, as the contract says: on
    // the caller's stream, like wait. Not while unwinding or when the job is
    // ending (Note [NCCL on failure]): then nothing may wait, and the
    // watchdog still holds the tensors.
    if (!state_->finished && !abandoning()) make_current_stream_wait();
  }

  using Work::wait;

  bool is_completed() override {
    if (watchdog_->failed()) wait_for_the_job_to_end();
    return state_->query(*comm_, what_);
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (watchdog_->failed()) wait_for_the_job_to_end();
    if (state_->finished) return;
    // The deadline counts from here, as for the MPI backend; the watchdog
    // enforces it (the host does not wait).
    watchdog_->restart(id_, timeout);
    make_current_stream_wait();
  }

 private:
  // Kernels the caller queues from here on run after the operation, even on
  // a stream other than the one it was issued from. The host goes on: a
  // .item() or .cpu() of a result synchronizes with that stream.
  void make_current_stream_wait() {
    const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(comm_->device()).stream();
    comm_->check_cuda(cudaStreamWaitEvent(caller, state_->done.get(), 0), what_, "cudaStreamWaitEvent");
  }

  std::shared_ptr<detail::NcclCommunicator> comm_;
  std::shared_ptr<detail::NcclWatchdog> watchdog_;
  std::shared_ptr<NcclOpState> state_;
  uint64_t id_;
  std::string what_;
};

// Queues `call` on the group's stream after the caller's current stream's
// work so far, hands the operation to the watchdog and returns its Work.
std::unique_ptr<Work> launch(const std::shared_ptr<detail::NcclCommunicator>& comm,
                             const std::shared_ptr<detail::NcclWatchdog>& watchdog, std::string what,
                             std::string hint, std::chrono::milliseconds timeout, std::vector<at::Tensor> tensors,
                             const char* call_name, const std::function<ncclResult_t(ncclComm_t, cudaStream_t)>& call) {
  c10::cuda::CUDAGuard guard(comm->device());
  const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(comm->device()).stream();
  // Without this wait NCCL could send an input before the kernel that
  // writes it has run, or overwrite an output a queued kernel still reads.
  CudaEvent ready = comm->make_event(what);
  comm->check_cuda(cudaEventRecord(ready.get(), caller), what, "cudaEventRecord");
  comm->check_cuda(cudaStreamWaitEvent(comm->stream(), ready.get(), 0), what, "cudaStreamWaitEvent");
  comm->settle(call(comm->comm(), comm->stream()), what, call_name, hint, timeout);
  auto state = std::make_shared<NcclOpState>();
  state->done = comm->make_event(what);
  state->tensors = std::move(tensors);
  comm->check_cuda(cudaEventRecord(state->done.get(), comm->stream()), what, "cudaEventRecord");
  const uint64_t id = watchdog->watch({.what = what,
                                       .waiting_for = hint,
                                       .timeout = timeout,
                                       .done =
                                           [comm_ref = comm.get(), state, what] {
                                             if (!state->query(*comm_ref, what)) return false;
                                             // Seen finished: the tensors go back to their owners.
                                             state->tensors.clear();
                                             return true;
                                           },
                                       .error = [comm] { return comm->async_error(); }});
  return std::make_unique<NcclWork>(comm, watchdog, std::move(state), id, std::move(what), timeout);
}

std::string with_tensor(const std::string& where, const at::Tensor& tensor) {
  return where + " of " + describe_tensor(tensor);
}

size_t count_of(const at::Tensor& tensor) { return static_cast<size_t>(tensor.numel()); }

c10::DeviceIndex current_device_or_throw(const MpiProcessGroup& mpi) {
  if (c10::cuda::device_count() == 0) {
    throw std::runtime_error("rank " + std::to_string(mpi.world_rank()) + " (group '" + mpi.name() +
                             "'): NcclProcessGroup needs a CUDA device, and none is visible to this process (check "
                             "nvidia-smi and CUDA_VISIBLE_DEVICES)");
  }
  return c10::cuda::current_device();
}

}  // namespace

// --- NcclProcessGroup ------------------------------------------------------------

NcclProcessGroup::NcclProcessGroup(MpiProcessGroup& mpi)
    : ProcessGroup(mpi.name(), mpi.rank(), mpi.world_ranks(), mpi.timeout()) {
  const c10::DeviceIndex device = current_device_or_throw(mpi);
  const std::string where = start_op("NCCL communicator on cuda:" + std::to_string(device));
  comm_ = std::make_shared<detail::NcclCommunicator>(device, world_rank(), name());
  comm_->create_stream(where);

  // ncclUniqueId is 128 opaque bytes; it travels as int64s since the MPI
  // group's broadcast takes only kSupportedDtypes. Going through the group
  // (not a bare MPI_Bcast) keeps its timeout: a rank that never gets here
  // ends the job instead of leaving the others waiting.
  static_assert(sizeof(ncclUniqueId) % sizeof(int64_t) == 0);
  at::Tensor id_bytes = at::zeros({static_cast<int64_t>(sizeof(ncclUniqueId) / sizeof(int64_t))}, at::kLong);
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank() == 0) {
    comm_->check_nccl(ncclGetUniqueId(&id), where, "ncclGetUniqueId");
    std::memcpy(id_bytes.data_ptr(), &id, sizeof(id));
  }
  mpi.broadcast(id_bytes, {.root = 0})->wait();
  std::memcpy(&id, id_bytes.data_ptr(), sizeof(id));

  // Every rank has reached this point (the broadcast completed), but a
  // rank may still fail before joining, or the ranks may not reach each
  // other over the network: the join is polled against the deadline.
  comm_->init(size(), rank(), id, where, peers_never_joined(name(), world_ranks(), rank(), "ncclCommInitRankConfig"),
              timeout());
  watchdog_ = std::make_shared<detail::NcclWatchdog>(comm_);
  signatures_ = mpi.split(0, mpi.rank(), mpi.name());
}

NcclProcessGroup::~NcclProcessGroup() {
  if (abandoning()) {
    // Note [NCCL on failure]: an exception is on its way to main's catch,
    // which prints it and ends the job, or the job is ending already.
    // Waiting for the operations in flight (which may wait for a peer that
    // is itself waiting for this rank) or ncclCommDestroy (which may wait
    // for peers) would delay that message by up to a timeout; so stop
    // watching (a timeout reported now would blame the wrong rank) and abort
    // the communicator on a thread of its own, which releases the held
    // tensors once NCCL has stopped using them.
    watchdog_->stop();
    std::thread([comm = std::move(comm_), watchdog = std::move(watchdog_)]() mutable {
      comm->abort_communicator();
      watchdog.reset();
      comm.reset();
    }).detach();
    return;
  }
  // The orderly end: every operation seen finished (the watchdog still
  // enforces their deadlines), then the communicator flushed and freed.
  watchdog_->drain();
  watchdog_->stop();
  comm_->close(start_op("closing the NCCL communicator"), collective_hint(), timeout());
}

c10::DeviceIndex NcclProcessGroup::device() const { return comm_->device(); }

void NcclProcessGroup::check_device_tensor(const std::string& where, std::string_view role,
                                           const at::Tensor& tensor) const {
  check_tensor(where, role, tensor, c10::DeviceType::CUDA);
  if (tensor.device().index() != comm_->device()) {
    throw std::invalid_argument(where + ": " + std::string(role) + " is " + describe_tensor(tensor) +
                                "; this group's communicator is on cuda:" + std::to_string(comm_->device()));
  }
}

void NcclProcessGroup::check_peer(const std::string& where, int peer) const {
  check_group_rank(where, "peer", peer);
  if (peer == rank()) {
    throw std::invalid_argument(where + ": peer " + std::to_string(peer) +
                                " is this rank; an NCCL send or recv to oneself would wait for itself");
  }
}

std::unique_ptr<Work> NcclProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  const std::string where = start_op("all_reduce");
  check_device_tensor(where, "tensor", tensor);
  check_reduce_op(where, options.op, tensor);
  return launch(comm_, watchdog_, with_tensor(where, tensor) + ", " + std::string(to_string(options.op)),
                collective_hint(), timeout(), {tensor}, "ncclAllReduce", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), count_of(tensor),
                                       nccl_type(tensor.scalar_type()), nccl_op(options.op), comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::all_gather(const at::Tensor& output, const at::Tensor& input,
                                                   const AllGatherOptions&) {
  const std::string where = start_op("all_gather");
  check_device_tensor(where, "output", output);
  check_device_tensor(where, "input", input);
  check_all_gather_shapes(where, output, input);
  return launch(comm_, watchdog_, with_tensor(where, input) + " into " + describe_tensor(output), collective_hint(),
                timeout(), {output, input}, "ncclAllGather", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclAllGather(input.data_ptr(), output.data_ptr(), count_of(input),
                                       nccl_type(input.scalar_type()), comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                                       const ReduceScatterOptions& options) {
  const std::string where = start_op("reduce_scatter");
  check_device_tensor(where, "output", output);
  check_device_tensor(where, "input", input);
  check_reduce_scatter_shapes(where, output, input);
  check_reduce_op(where, options.op, input);
  return launch(comm_, watchdog_,
                with_tensor(where, input) + " into " + describe_tensor(output) + ", " +
                    std::string(to_string(options.op)),
                collective_hint(), timeout(), {output, input}, "ncclReduceScatter",
                [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclReduceScatter(input.data_ptr(), output.data_ptr(), count_of(output),
                                           nccl_type(input.scalar_type()), nccl_op(options.op), comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::all_to_all(const at::Tensor& output, const at::Tensor& input,
                                                   const AllToAllOptions& options) {
  const std::string where = start_op("all_to_all");
  check_device_tensor(where, "output", output);
  check_device_tensor(where, "input", input);
  const auto [input_rows, output_rows] = check_all_to_all(where, output, input, options);
  const size_t row_elements = static_cast<size_t>(c10::multiply_integers(input.sizes().slice(1)));
  const size_t bytes = c10::elementSize(input.scalar_type());
  const ncclDataType_t type = nccl_type(input.scalar_type());
  return launch(comm_, watchdog_, with_tensor(where, input) + " into " + describe_tensor(output), collective_hint(),
                timeout(), {output, input}, "ncclSend/ncclRecv", [&](ncclComm_t comm, cudaStream_t stream) {
                  auto* send = static_cast<char*>(input.data_ptr());
                  auto* recv = static_cast<char*>(output.data_ptr());
                  ncclResult_t result = ncclGroupStart();
                  for (int peer = 0; peer < size() && result == ncclSuccess; ++peer) {
                    const size_t send_count = static_cast<size_t>(input_rows[peer]) * row_elements;
                    const size_t recv_count = static_cast<size_t>(output_rows[peer]) * row_elements;
                    result = ncclSend(send, send_count, type, peer, comm, stream);
                    if (result == ncclSuccess) result = ncclRecv(recv, recv_count, type, peer, comm, stream);
                    send += send_count * bytes;
                    recv += recv_count * bytes;
                  }
                  const ncclResult_t ended = ncclGroupEnd();
                  return result != ncclSuccess ? result : ended;
                });
}

std::unique_ptr<Work> NcclProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  const std::string where = start_op("broadcast");
  check_device_tensor(where, "tensor", tensor);
  check_group_rank(where, "root", options.root);
  return launch(comm_, watchdog_, with_tensor(where, tensor) + " from root " + std::to_string(options.root),
                collective_hint(), timeout(), {tensor}, "ncclBroadcast", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), count_of(tensor),
                                       nccl_type(tensor.scalar_type()), options.root, comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::send(const at::Tensor& tensor, const SendOptions& options) {
  const std::string where = start_op("send");
  check_device_tensor(where, "tensor", tensor);
  check_peer(where, options.peer);
  check_tag(where, options.tag);  // pairs the signatures (Note [NCCL send and recv])
  const TensorSignature signature = signature_of(where, tensor);
  // Note [NCCL send and recv]: the signature first, on the host.
  std::erase_if(signatures_sent_, [](const std::unique_ptr<Work>& work) { return work->is_completed(); });
  signatures_->set_timeout(timeout());
  signatures_sent_.push_back(signatures_->send(signature_tensor(signature), options));
  return launch(comm_, watchdog_, with_tensor(where, tensor) + " to " + peer_name(options.peer),
                "waiting for " + peer_name(options.peer) +
                    ", which must issue the matching recv (NCCL pairs the sends and recvs of two ranks in issue order)",
                timeout(), {tensor}, "ncclSend", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclSend(tensor.data_ptr(), count_of(tensor), nccl_type(tensor.scalar_type()), options.peer,
                                  comm, stream);
                });
}

namespace {

// A recv whose sender's signature must match before it is complete (Note
// [NCCL send and recv]).
class SignedRecvWork final : public Work {
 public:
  SignedRecvWork(std::unique_ptr<Work> signature_work, at::Tensor signature, TensorSignature expected,
                 std::unique_ptr<Work> data, std::string what)
      : Work(data->default_timeout()),
        signature_work_(std::move(signature_work)),
        signature_(std::move(signature)),
        expected_(expected),
        data_(std::move(data)),
        what_(std::move(what)) {}

  bool is_completed() override {
    if (!checked_) {
      if (!signature_work_->is_completed()) return false;
      check();
    }
    return data_->is_completed();
  }
  void wait(std::chrono::milliseconds timeout) override {
    if (!checked_) {
      signature_work_->wait(timeout);
      check();
    }
    data_->wait(timeout);
  }

 private:
  void check() {
    TensorSignature sent;
    std::memcpy(sent.words.data(), signature_.data_ptr(), sizeof(sent.words));
    if (sent != expected_) {
      MpiSession::abort(what_ + ": the sender's tensor is " + sent.describe() +
                        "; the receiver's tensor must have the sender's dtype and shape");
    }
    checked_ = true;
  }

  std::unique_ptr<Work> signature_work_;
  at::Tensor signature_;
  TensorSignature expected_;
  std::unique_ptr<Work> data_;
  std::string what_;
  bool checked_ = false;
};

}  // namespace

std::unique_ptr<Work> NcclProcessGroup::recv(const at::Tensor& tensor, const RecvOptions& options) {
  const std::string where = start_op("recv");
  check_device_tensor(where, "tensor", tensor);
  check_peer(where, options.peer);
  check_tag(where, options.tag);  // pairs the signatures (Note [NCCL send and recv])
  const TensorSignature expected = signature_of(where, tensor);
  at::Tensor arriving = at::zeros({TensorSignature::kWords}, at::kLong);
  signatures_->set_timeout(timeout());
  std::unique_ptr<Work> signature_work = signatures_->recv(arriving, options);
  const std::string what = with_tensor(where, tensor) + " from " + peer_name(options.peer);
  std::unique_ptr<Work> data =
      launch(comm_, watchdog_, what,
             "waiting for " + peer_name(options.peer) +
                 ", which must issue the matching send (NCCL pairs the sends and recvs of two ranks in issue order)",
             timeout(), {tensor}, "ncclRecv", [&](ncclComm_t comm, cudaStream_t stream) {
               return ncclRecv(tensor.data_ptr(), count_of(tensor), nccl_type(tensor.scalar_type()), options.peer,
                               comm, stream);
             });
  return std::make_unique<SignedRecvWork>(std::move(signature_work), std::move(arriving), expected, std::move(data),
                                          what);
}

std::unique_ptr<Work> NcclProcessGroup::barrier(const BarrierOptions&) {
  const std::string where = start_op("barrier");
  // NCCL has no barrier; a collective of one element completes only once
  // every rank has issued it, which is all a barrier promises.
  at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(c10::kCUDA, comm_->device()));
  return launch(comm_, watchdog_, where, collective_hint(), timeout(), {token}, "ncclAllReduce",
                [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclAllReduce(token.data_ptr(), token.data_ptr(), 1, ncclInt32, ncclSum, comm, stream);
                });
}

}  // namespace loom
