#include "parallel/process_group.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>

namespace loom {

std::string_view to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "SUM";
    case ReduceOp::kAvg:
      return "AVG";
    case ReduceOp::kMax:
      return "MAX";
    case ReduceOp::kMin:
      return "MIN";
  }
  return "?";
}

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return "float32";
    case c10::ScalarType::Double:
      return "float64";
    case c10::ScalarType::BFloat16:
      return "bfloat16";
    case c10::ScalarType::Half:
      return "float16";
    case c10::ScalarType::Int:
      return "int32";
    case c10::ScalarType::Long:
      return "int64";
    case c10::ScalarType::Short:
      return "int16";
    case c10::ScalarType::Char:
      return "int8";
    case c10::ScalarType::Byte:
      return "uint8";
    case c10::ScalarType::Bool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

std::string describe_tensor(const at::Tensor& tensor) {
  if (!tensor.defined()) return "undefined tensor";
  std::ostringstream os;
  os << dtype_name(tensor.scalar_type()) << " [";
  for (int64_t d = 0; d < tensor.dim(); ++d) os << (d ? ", " : "") << tensor.size(d);
  os << "] on " << tensor.device();
  return os.str();
}

TensorSignature TensorSignature::of(const at::Tensor& tensor) {
  if (tensor.dim() > kMaxDims) {
    throw std::invalid_argument(describe_tensor(tensor) + " has " + std::to_string(tensor.dim()) +
                                " dims; a tensor sent or received has at most " + std::to_string(kMaxDims));
  }
  TensorSignature signature;
  signature.words[0] = static_cast<int64_t>(tensor.scalar_type());
  signature.words[1] = tensor.dim();
  for (int64_t d = 0; d < tensor.dim(); ++d) signature.words[static_cast<size_t>(2 + d)] = tensor.size(d);
  return signature;
}

std::string TensorSignature::describe() const {
  const int64_t dtype = words[0];
  const int64_t dims = words[1];
  std::ostringstream os;
  if (dtype < 0 || dtype >= static_cast<int64_t>(c10::ScalarType::NumOptions) || dims < 0 || dims > kMaxDims) {
    os << "unreadable (words";
    for (const int64_t word : words) os << " " << word;
    os << ")";
    return os.str();
  }
  os << dtype_name(static_cast<c10::ScalarType>(dtype)) << " [";
  for (int64_t d = 0; d < dims; ++d) os << (d ? ", " : "") << words[static_cast<size_t>(2 + d)];
  os << "]";
  return os.str();
}

void abandon_tensors(std::vector<at::Tensor> tensors) {
  static std::mutex mutex;
  // Never destroyed: reachable to the end, so leak checkers stay quiet.
  static auto* kept = new std::vector<at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  for (at::Tensor& tensor : tensors) kept->push_back(std::move(tensor));
}

namespace {

std::string supported_dtypes() {
  std::string out;
  for (auto dtype : kSupportedDtypes) out += (out.empty() ? "" : ", ") + dtype_name(dtype);
  return out;
}

std::string shape_of(const at::Tensor& tensor) {
  std::ostringstream os;
  os << tensor.sizes();
  return os.str();
}

bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto* a_begin = static_cast<const char*>(a.data_ptr());
  auto* b_begin = static_cast<const char*>(b.data_ptr());
  auto* a_end = a_begin + a.numel() * a.element_size();
  auto* b_end = b_begin + b.numel() * b.element_size();
  return a_begin < b_end && b_begin < a_end;
}

}  // namespace

ProcessGroup::ProcessGroup(std::string name, int rank, std::vector<int> world_ranks, std::chrono::milliseconds timeout)
    : name_(std::move(name)), rank_(rank), world_ranks_(std::move(world_ranks)), timeout_ms_(timeout.count()) {
  if (rank_ < 0 || rank_ >= size()) {
    throw std::logic_error("process group '" + name_ + "': rank " + std::to_string(rank_) + " outside [0, " +
                           std::to_string(size()) + ")");
  }
}

std::string ProcessGroup::start_op(std::string_view op) {
  const int64_t index = ++ops_issued_;
  std::ostringstream os;
  os << "rank " << world_rank() << " (group '" << name_ << "' rank " << rank_ << " of " << size() << ", world ranks [";
  for (size_t i = 0; i < world_ranks_.size(); ++i) os << (i ? " " : "") << world_ranks_[i];
  os << "]): " << op << " #" << index;
  return os.str();
}

std::string ProcessGroup::collective_hint() const {
  std::ostringstream os;
  os << "waiting for world ranks [";
  bool first = true;
  for (size_t i = 0; i < world_ranks_.size(); ++i) {
    if (static_cast<int>(i) == rank_) continue;
    os << (first ? "" : " ") << world_ranks_[i];
    first = false;
  }
  os << "] (the other members of group '" << name_
     << "'); every rank of the group must issue the same collectives in the same order; a rank that did not may "
        "have failed, be stopped or stuck, be waiting elsewhere, or have issued a different operation";
  return os.str();
}

std::string ProcessGroup::peer_name(int group_rank) const {
  return "group rank " + std::to_string(group_rank) + " (world rank " +
         std::to_string(world_ranks_[static_cast<size_t>(group_rank)]) + ")";
}

void ProcessGroup::check_tensor(const std::string& where, std::string_view role, const at::Tensor& tensor,
                                c10::DeviceType device) const {
  auto refuse = [&](const std::string& why) {
    throw std::invalid_argument(where + ": " + std::string(role) + " " + why);
  };
  if (!tensor.defined()) refuse("is an undefined tensor");
  if (tensor.device().type() != device || tensor.layout() != c10::kStrided) {
    refuse("is " + describe_tensor(tensor) + "; the " + std::string(backend()) + " backend needs dense " +
           c10::DeviceTypeName(device, /*lower_case=*/true) + " tensors");
  }
  if (std::find(std::begin(kSupportedDtypes), std::end(kSupportedDtypes), tensor.scalar_type()) ==
      std::end(kSupportedDtypes)) {
    refuse("is " + describe_tensor(tensor) + "; supported dtypes: " + supported_dtypes());
  }
  // The backends hand the raw buffer to MPI/NCCL, which know nothing of strides.
  if (!tensor.is_contiguous()) {
    refuse("is " + describe_tensor(tensor) +
           " and not contiguous; pass tensor.contiguous() (and copy the result "
           "back if it was a view)");
  }
}

void ProcessGroup::check_reduce_op(const std::string& where, ReduceOp op, const at::Tensor& tensor) const {
  if (op == ReduceOp::kAvg && !at::isFloatingType(tensor.scalar_type())) {
    throw std::invalid_argument(where + ": AVG of an " + dtype_name(tensor.scalar_type()) +
                                " tensor is refused (an integer mean would round); reduce with SUM and divide");
  }
}

void ProcessGroup::check_all_gather_shapes(const std::string& where, const at::Tensor& output,
                                           const at::Tensor& input) const {
  auto refuse = [&](const std::string& why) {
    throw std::invalid_argument(where + ": output " + describe_tensor(output) + ", input " + describe_tensor(input) +
                                ": " + why);
  };
  if (output.scalar_type() != input.scalar_type()) refuse("output and input dtypes differ");
  // [n, ...] gathers into [size * n, ...]; a 0-dim input into [size].
  std::vector<int64_t> expected(input.sizes().begin(), input.sizes().end());
  if (expected.empty()) expected.push_back(1);
  expected[0] *= size();
  if (output.sizes().vec() != expected) {
    std::ostringstream os;
    os << "output shape must be " << c10::IntArrayRef(expected) << " (input's dim 0 times the group size " << size()
       << ")";
    refuse(os.str());
  }
  if (overlap(output, input)) refuse("output and input overlap");
}

void ProcessGroup::check_reduce_scatter_shapes(const std::string& where, const at::Tensor& output,
                                               const at::Tensor& input) const {
  auto refuse = [&](const std::string& why) {
    throw std::invalid_argument(where + ": output " + describe_tensor(output) + ", input " + describe_tensor(input) +
                                ": " + why);
  };
  if (output.scalar_type() != input.scalar_type()) refuse("output and input dtypes differ");
  if (input.dim() == 0) refuse("input must have at least one dimension (split along dim 0)");
  if (input.size(0) % size() != 0) {
    refuse("input dim 0 (" + std::to_string(input.size(0)) + ") is not divisible by the group size (" +
           std::to_string(size()) + ")");
  }
  std::vector<int64_t> expected = input.sizes().vec();
  expected[0] /= size();
  if (output.sizes().vec() != expected) {
    std::ostringstream os;
    os << "output shape must be " << c10::IntArrayRef(expected) << " (input's dim 0 divided by the group size "
       << size() << "), got " << shape_of(output);
    refuse(os.str());
  }
  if (overlap(output, input)) refuse("output and input overlap");
}

std::unique_ptr<Work> ProcessGroup::all_to_all(const at::Tensor&, const at::Tensor&, const AllToAllOptions&) {
  throw std::invalid_argument(start_op("all_to_all") + ": the " + std::string(backend()) +
                              " backend has no all_to_all");
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> ProcessGroup::check_all_to_all(
    const std::string& where, const at::Tensor& output, const at::Tensor& input, const AllToAllOptions& options) const {
  auto refuse = [&](const std::string& why) {
    throw std::invalid_argument(where + ": output " + describe_tensor(output) + ", input " + describe_tensor(input) +
                                ": " + why);
  };
  if (output.scalar_type() != input.scalar_type()) refuse("output and input dtypes differ");
  if (input.dim() == 0 || output.dim() == 0) refuse("both need at least one dimension (split along dim 0)");
  if (input.sizes().slice(1) != output.sizes().slice(1)) refuse("their rows (the dims after dim 0) differ");
  const auto resolve = [&](const std::vector<int64_t>& splits, const at::Tensor& tensor, const char* role) {
    if (splits.empty()) {
      if (tensor.size(0) % size() != 0) {
        refuse(std::string(role) + " dim 0 (" + std::to_string(tensor.size(0)) +
               ") is not divisible by the group size (" + std::to_string(size()) + ") and no splits were given");
      }
      return std::vector<int64_t>(static_cast<size_t>(size()), tensor.size(0) / size());
    }
    if (static_cast<int>(splits.size()) != size()) {
      refuse(std::string(role) + " splits has " + std::to_string(splits.size()) + " entries for a group of " +
             std::to_string(size()));
    }
    int64_t rows = 0;
    for (int64_t split : splits) {
      if (split < 0) refuse(std::string(role) + " splits has a negative entry");
      rows += split;
    }
    if (rows != tensor.size(0)) {
      refuse(std::string(role) + " splits add up to " + std::to_string(rows) + " rows, the tensor has " +
             std::to_string(tensor.size(0)));
    }
    return splits;
  };
  std::pair<std::vector<int64_t>, std::vector<int64_t>> splits{resolve(options.input_splits, input, "input"),
                                                               resolve(options.output_splits, output, "output")};
  if (input.numel() > 0 && output.numel() > 0 && overlap(output, input)) refuse("output and input overlap");
  return splits;
}

void ProcessGroup::check_group_rank(const std::string& where, std::string_view role, int group_rank) const {
  if (group_rank < 0 || group_rank >= size()) {
    throw std::invalid_argument(where + ": " + std::string(role) + " " + std::to_string(group_rank) +
                                " is not a rank of group '" + name_ + "' (0 to " + std::to_string(size() - 1) + ")");
  }
}

void ProcessGroup::check_tag(const std::string& where, int tag) const {
  // 32767 is the smallest upper bound MPI guarantees (MPI_TAG_UB).
  if (tag < 0 || tag > 32767) {
    throw std::invalid_argument(where + ": tag " + std::to_string(tag) + " outside [0, 32767]");
  }
}

std::vector<std::string> all_gather_strings(ProcessGroup& group, const std::string& mine) {
  const int64_t size = group.size();
  at::Tensor lengths = at::empty({size}, at::kLong);
  group.all_gather(lengths, at::full({1}, static_cast<int64_t>(mine.size()), at::kLong))->wait();
  const int64_t longest = lengths.max().item<int64_t>();
  // The texts travel as int64 words (MPI groups take no byte tensors).
  const int64_t words = (longest + 7) / 8;
  at::Tensor packed = at::zeros({std::max<int64_t>(words, 1)}, at::kLong);
  std::memcpy(packed.data_ptr(), mine.data(), mine.size());
  at::Tensor all = at::empty({size * packed.numel()}, at::kLong);
  group.all_gather(all, packed)->wait();
  std::vector<std::string> out;
  const auto* bytes = static_cast<const char*>(all.data_ptr());
  for (int64_t r = 0; r < size; ++r) {
    out.emplace_back(bytes + r * packed.numel() * 8, static_cast<size_t>(lengths[r].item<int64_t>()));
  }
  return out;
}

void all_reduce_through_cpu(ProcessGroup& group, at::Tensor& tensor, ReduceOp op) {
  at::Tensor cpu = tensor.to(at::kCPU).contiguous().clone();
  group.all_reduce(cpu, {op})->wait();
  tensor = cpu.to(tensor.device());
}

}  // namespace loom
