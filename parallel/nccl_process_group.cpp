#include "parallel/nccl_process_group.h"

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace loom {

namespace {

std::string seconds(std::chrono::milliseconds duration) {
  std::ostringstream os;
  os << std::chrono::duration<double>(duration).count() << " s";
  return os.str();
}

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

// How long abort_job lets ncclCommAbort run before it ends the job anyway.
constexpr std::chrono::seconds kAbortGrace{5};

}  // namespace

namespace detail {

// Owns the NCCL communicator and the group's stream. Every failure after
// construction ends the job through abort_job, which aborts the communicator
// first: a kernel stuck in an NCCL collective would otherwise keep the GPU
// (and the process's exit) waiting.
class NcclCommunicator {
 public:
  NcclCommunicator(c10::DeviceIndex device, int world_rank, std::string group_name)
      : device_(device), world_rank_(world_rank), group_name_(std::move(group_name)) {}

  ~NcclCommunicator() {
    // Every Work holds this object, so no operation is in flight here. After
    // an error the job has ended already (abort_job), so this is the
    // orderly path.
    c10::cuda::CUDAGuard guard(device_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
  }
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

  void init(int size, int rank, const ncclUniqueId& id, const std::string& where) {
    c10::cuda::CUDAGuard guard(device_);  // ncclCommInitRank binds the current device
    ncclComm_t comm = nullptr;
    check_nccl(ncclCommInitRank(&comm, size, id, rank), where, "ncclCommInitRank");
    comm_ = comm;
  }

  c10::DeviceIndex device() const { return device_; }
  cudaStream_t stream() const { return stream_.get(); }
  ncclComm_t comm() const { return comm_; }

  // Prints `message`, aborts the communicator and ends every rank of the job.
  [[noreturn]] void abort_job(const std::string& message) {
    // The line comes first: the other ranks may end the job at any moment.
    std::fprintf(stderr, "loom: %s\n", message.c_str());
    std::fflush(stderr);
    // ncclCommAbort stops kernels stuck in NCCL and closes its connections,
    // so the peers see an error instead of silence; it is only a courtesy
    // (the job ends either way) and can itself get stuck, hence the bound.
    // Once: two Works may fail at the same time.
    if (!aborting_.exchange(true) && comm_ != nullptr) {
      auto finished = std::make_shared<std::atomic<bool>>(false);
      std::thread([comm = comm_, finished] {
        ncclCommAbort(comm);
        *finished = true;
      }).detach();
      const auto give_up = std::chrono::steady_clock::now() + kAbortGrace;
      while (!*finished && std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    MpiSession::abort("rank " + std::to_string(world_rank_) + ": aborted the NCCL communicator of group '" +
                      group_name_ + "'; ending the job");
  }

  void check_nccl(ncclResult_t rc, const std::string& where, const char* call) {
    if (rc == ncclSuccess) return;
    std::string detail = ncclGetErrorString(rc);
    if (comm_ != nullptr) {
      const char* last = ncclGetLastError(comm_);
      if (last != nullptr && *last != '\0') detail += " (" + std::string(last) + ")";
    }
    abort_job(where + ": " + call + " failed: " + detail + " [" + nccl_version() + "]");
  }

  void check_cuda(cudaError_t rc, const std::string& where, const char* call) {
    if (rc == cudaSuccess) return;
    abort_job(where + ": " + call + " failed: " + cudaGetErrorString(rc));
  }

  // Errors NCCL found after a call returned (a peer gone, a network failure)
  // show up only here; the operation itself would never complete.
  void check_async_error(const std::string& where) {
    ncclResult_t state = ncclSuccess;
    check_nccl(ncclCommGetAsyncError(comm_, &state), where, "ncclCommGetAsyncError");
    if (state != ncclSuccess && state != ncclInProgress) check_nccl(state, where, "NCCL (asynchronous error)");
  }

  CudaEvent make_event(const std::string& where) {
    cudaEvent_t event = nullptr;
    // Without timing an event is cheaper to record and to query.
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), where, "cudaEventCreateWithFlags");
    return CudaEvent(event);
  }

 private:
  c10::DeviceIndex device_;
  int world_rank_;
  std::string group_name_;
  CudaStream stream_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborting_{false};
};

}  // namespace detail

namespace {

// One operation queued on the group's stream (Note [NCCL streams]).
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<detail::NcclCommunicator> comm, std::string what, std::string hint,
           std::chrono::milliseconds timeout, std::vector<at::Tensor> tensors, CudaEvent done)
      : Work(timeout),
        comm_(std::move(comm)),
        what_(std::move(what)),
        hint_(std::move(hint)),
        tensors_(std::move(tensors)),
        done_(std::move(done)) {}

  ~NcclWork() override {
    // NCCL may still write into the tensors: returning them to the caching
    // allocator before completion would hand live memory to other tensors.
    if (!completed_) wait();
  }

  using Work::wait;

  bool is_completed() override {
    if (completed_) return true;
    comm_->check_async_error(what_);
    const cudaError_t rc = cudaEventQuery(done_.get());
    if (rc == cudaErrorNotReady) {
      // Not an error, but CUDA records it as the last error; clear it so
      // that libtorch's next kernel-launch check does not report it.
      (void)cudaGetLastError();
      return false;
    }
    comm_->check_cuda(rc, what_, "cudaEventQuery");
    completed_ = true;
    tensors_.clear();
    return true;
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (completed_) return;
    // Kernels the caller queues from here on run after the operation, even
    // on a stream other than the one it was issued from.
    const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(comm_->device()).stream();
    comm_->check_cuda(cudaStreamWaitEvent(caller, done_.get(), 0), what_, "cudaStreamWaitEvent");
    // The host polls as well: only it can see that a collective never ends
    // (Note [NCCL streams]). yield keeps oversubscribed ranks moving.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!is_completed()) {
      if (std::chrono::steady_clock::now() >= deadline) {
        comm_->abort_job(what_ + " did not complete within " + seconds(timeout) + "; " + hint_ + ". Ending the job.");
      }
      std::this_thread::yield();
    }
  }

 private:
  std::shared_ptr<detail::NcclCommunicator> comm_;
  std::string what_;
  std::string hint_;
  std::vector<at::Tensor> tensors_;
  CudaEvent done_;
  bool completed_ = false;
};

// Queues `call` on the group's stream after the caller's current stream's
// work so far, and returns the Work that holds `tensors` until it is done.
std::unique_ptr<Work> launch(const std::shared_ptr<detail::NcclCommunicator>& comm, std::string what,
                             std::string hint, std::chrono::milliseconds timeout, std::vector<at::Tensor> tensors,
                             const char* call_name, const std::function<ncclResult_t(ncclComm_t, cudaStream_t)>& call) {
  c10::cuda::CUDAGuard guard(comm->device());
  const cudaStream_t caller = c10::cuda::getCurrentCUDAStream(comm->device()).stream();
  // Without this wait NCCL could send an input before the kernel that
  // writes it has run, or overwrite an output a queued kernel still reads.
  CudaEvent ready = comm->make_event(what);
  comm->check_cuda(cudaEventRecord(ready.get(), caller), what, "cudaEventRecord");
  comm->check_cuda(cudaStreamWaitEvent(comm->stream(), ready.get(), 0), what, "cudaStreamWaitEvent");
  comm->check_nccl(call(comm->comm(), comm->stream()), what, call_name);
  CudaEvent done = comm->make_event(what);
  comm->check_cuda(cudaEventRecord(done.get(), comm->stream()), what, "cudaEventRecord");
  return std::make_unique<NcclWork>(comm, std::move(what), std::move(hint), timeout, std::move(tensors),
                                    std::move(done));
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

  // ncclCommInitRank blocks until every rank has joined, with no timeout of
  // its own; the broadcast just before means every rank has reached it.
  comm_->init(size(), rank(), id, where);
}

NcclProcessGroup::~NcclProcessGroup() = default;

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
  return launch(comm_, with_tensor(where, tensor) + ", " + std::string(to_string(options.op)), collective_hint(),
                timeout(), {tensor}, "ncclAllReduce", [&](ncclComm_t comm, cudaStream_t stream) {
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
  return launch(comm_, with_tensor(where, input) + " into " + describe_tensor(output), collective_hint(), timeout(),
                {output, input}, "ncclAllGather", [&](ncclComm_t comm, cudaStream_t stream) {
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
  return launch(comm_,
                with_tensor(where, input) + " into " + describe_tensor(output) + ", " +
                    std::string(to_string(options.op)),
                collective_hint(), timeout(), {output, input}, "ncclReduceScatter",
                [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclReduceScatter(input.data_ptr(), output.data_ptr(), count_of(output),
                                           nccl_type(input.scalar_type()), nccl_op(options.op), comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  const std::string where = start_op("broadcast");
  check_device_tensor(where, "tensor", tensor);
  check_group_rank(where, "root", options.root);
  return launch(comm_, with_tensor(where, tensor) + " from root " + std::to_string(options.root), collective_hint(),
                timeout(), {tensor}, "ncclBroadcast", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), count_of(tensor),
                                       nccl_type(tensor.scalar_type()), options.root, comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::send(const at::Tensor& tensor, const SendOptions& options) {
  const std::string where = start_op("send");
  check_device_tensor(where, "tensor", tensor);
  check_peer(where, options.peer);
  check_tag(where, options.tag);  // then ignored (Note [NCCL send and recv])
  return launch(comm_, with_tensor(where, tensor) + " to " + peer_name(options.peer),
                "waiting for " + peer_name(options.peer) +
                    ", which must issue the matching recv (NCCL pairs the sends and recvs of two ranks in issue order, "
                    "with the same element count)",
                timeout(), {tensor}, "ncclSend", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclSend(tensor.data_ptr(), count_of(tensor), nccl_type(tensor.scalar_type()), options.peer,
                                  comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::recv(const at::Tensor& tensor, const RecvOptions& options) {
  const std::string where = start_op("recv");
  check_device_tensor(where, "tensor", tensor);
  check_peer(where, options.peer);
  check_tag(where, options.tag);  // then ignored (Note [NCCL send and recv])
  return launch(comm_, with_tensor(where, tensor) + " from " + peer_name(options.peer),
                "waiting for " + peer_name(options.peer) +
                    ", which must issue the matching send (NCCL pairs the sends and recvs of two ranks in issue order, "
                    "with the same element count)",
                timeout(), {tensor}, "ncclRecv", [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclRecv(tensor.data_ptr(), count_of(tensor), nccl_type(tensor.scalar_type()), options.peer,
                                  comm, stream);
                });
}

std::unique_ptr<Work> NcclProcessGroup::barrier(const BarrierOptions&) {
  const std::string where = start_op("barrier");
  // NCCL has no barrier; a collective of one element completes only once
  // every rank has issued it, which is all a barrier promises.
  at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(c10::kCUDA, comm_->device()));
  return launch(comm_, where, collective_hint(), timeout(), {token}, "ncclAllReduce",
                [&](ncclComm_t comm, cudaStream_t stream) {
                  return ncclAllReduce(token.data_ptr(), token.data_ptr(), 1, ncclInt32, ncclSum, comm, stream);
                });
}

GridGroups nccl_grid(const GridGroups& mpi) {
  auto twin = [](const std::unique_ptr<ProcessGroup>& group) -> std::unique_ptr<ProcessGroup> {
    if (group == nullptr || group->size() == 1) return nullptr;
    auto* source = dynamic_cast<MpiProcessGroup*>(group.get());
    if (source == nullptr) {
      throw std::invalid_argument("nccl_grid: group '" + group->name() + "' has backend " +
                                  std::string(group->backend()) + ", not mpi");
    }
    return std::make_unique<NcclProcessGroup>(*source);
  };
  GridGroups nccl;
  nccl.dp = twin(mpi.dp);
  nccl.tp = twin(mpi.tp);
  return nccl;
}

}  // namespace loom
