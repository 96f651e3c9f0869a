#include "parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "parallel/autograd_group.h"
#include "util/error.h"

namespace loom {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kSequenceDim = 1;  // of [batch, seq, hidden]

// `dim` of x, checked to exist and (when `divisible`) to split evenly over the group.
int64_t checked_dim(std::string_view op, const at::Tensor& x, int64_t dim, bool divisible, const ProcessGroup& group) {
  const std::string where = std::string(op) + " over group '" + group.name() + "' (size " +
                            std::to_string(group.size()) + "): ";
  if (x.dim() < 1 || dim >= x.dim() || dim < -x.dim()) {
    throw std::invalid_argument(where + "input " + describe_tensor(x) + " has no dim " + std::to_string(dim));
  }
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  if (divisible && x.size(d) % group.size() != 0) {
    throw std::invalid_argument(where + "dim " + std::to_string(d) + " (" + std::to_string(x.size(d)) + ") of input " +
                                describe_tensor(x) + " is not divisible by the group size (" +
                                std::to_string(group.size()) + ")");
  }
  return d;
}

// The collectives concatenate and split along dim 0: move `dim` to the front,
// contiguous, and back after.
at::Tensor all_reduce_sum(ProcessGroup& group, const at::Tensor& x) {
  // A copy: the input (or the incoming gradient) may be shared with other
  // parts of the graph and must keep its value.
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  group.all_reduce(out)->wait();
  return out;
}

at::Tensor all_gather_along(ProcessGroup& group, const at::Tensor& x, int64_t dim) {
  at::Tensor front = x.movedim(dim, 0).contiguous();
  std::vector<int64_t> gathered_shape = front.sizes().vec();
  gathered_shape[0] *= group.size();
  at::Tensor gathered = at::empty(gathered_shape, front.options());
  group.all_gather(gathered, front)->wait();
  return gathered.movedim(0, dim).contiguous();
}

at::Tensor reduce_scatter_along(ProcessGroup& group, const at::Tensor& x, int64_t dim) {
  at::Tensor front = x.movedim(dim, 0).contiguous();
  std::vector<int64_t> chunk_shape = front.sizes().vec();
  chunk_shape[0] /= group.size();
  at::Tensor chunk = at::empty(chunk_shape, front.options());
  group.reduce_scatter(chunk, front)->wait();
  return chunk.movedim(0, dim).contiguous();
}

at::Tensor slice_along(const ProcessGroup& group, const at::Tensor& x, int64_t dim) {
  const int64_t n = x.size(dim) / group.size();
  return x.narrow(dim, group.rank() * n, n).clone(at::MemoryFormat::Contiguous);
}

// f: forward identity, backward all-reduce SUM.
struct CopyToTp : torch::autograd::Function<CopyToTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group) {
    save_group(ctx, *group);
    // Returned as is: autograd makes it a view of x (no copy), which may not
    // be modified in place.
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduce_sum(saved_group(ctx), grads[0]), at::Tensor()};
  }
};

// g: forward all-reduce SUM, backward identity.
struct ReduceFromTp : torch::autograd::Function<ReduceFromTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group) {
    return all_reduce_sum(*group, x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) { return {grads[0], at::Tensor()}; }
};

// Forward `Forward` along `dim`, backward `Backward` along it; each is one
// of all_gather_along, reduce_scatter_along and slice_along above.
template <auto Forward, auto Backward>
struct AlongDim : torch::autograd::Function<AlongDim<Forward, Backward>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, ProcessGroup* group, int64_t dim) {
    save_group(ctx, *group);
    ctx->saved_data["dim"] = dim;
    return Forward(*group, x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t dim = ctx->saved_data["dim"].toInt();
    return {Backward(saved_group(ctx), grads[0], dim), at::Tensor(), at::Tensor()};
  }
};

// Forward all-gather, backward this rank's slice of the gradient.
using GatherAlong = AlongDim<all_gather_along, slice_along>;
// Forward this rank's slice, backward all-gather.
using ScatterAlong = AlongDim<slice_along, all_gather_along>;
// Forward all-gather, backward reduce-scatter: the gathered activation feeds
// every rank's shard of a column-parallel weight, so each rank's gradient of
// it is a partial sum, of which this rank keeps its slice.
using GatherAlongReduceScatterBack = AlongDim<all_gather_along, reduce_scatter_along>;
// Forward reduce-scatter, backward all-gather.
using ReduceScatterAlong = AlongDim<reduce_scatter_along, all_gather_along>;

std::string not_divisible(std::string_view layer, std::string_view what, int64_t value, int64_t tp) {
  return std::string(layer) + ": " + std::string(what) + " (" + std::to_string(value) +
         ") is not divisible by the tensor-parallel size tp (" + std::to_string(tp) + ")";
}

}  // namespace

at::Tensor copy_to_tp(ProcessGroup& tp, const at::Tensor& x) {
  if (tp.size() == 1) return x;
  return CopyToTp::apply(x, &tp);
}

at::Tensor reduce_from_tp(ProcessGroup& tp, const at::Tensor& x) {
  if (tp.size() == 1) return x;
  return ReduceFromTp::apply(x, &tp);
}

at::Tensor gather_from_tp(ProcessGroup& tp, const at::Tensor& x) {
  const int64_t dim = checked_dim("gather_from_tp", x, -1, /*divisible=*/false, tp);
  if (tp.size() == 1) return x;
  return GatherAlong::apply(x, &tp, dim);
}

at::Tensor scatter_to_tp(ProcessGroup& tp, const at::Tensor& x) {
  const int64_t dim = checked_dim("scatter_to_tp", x, -1, /*divisible=*/true, tp);
  if (tp.size() == 1) return x;
  return ScatterAlong::apply(x, &tp, dim);
}

at::Tensor gather_from_sp(ProcessGroup& tp, const at::Tensor& x) {
  const int64_t dim = checked_dim("gather_from_sp", x, kSequenceDim, /*divisible=*/false, tp);
  if (tp.size() == 1) return x;
  return GatherAlongReduceScatterBack::apply(x, &tp, dim);
}

at::Tensor reduce_scatter_to_sp(ProcessGroup& tp, const at::Tensor& x) {
  const int64_t dim = checked_dim("reduce_scatter_to_sp", x, kSequenceDim, /*divisible=*/true, tp);
  if (tp.size() == 1) return x;
  return ReduceScatterAlong::apply(x, &tp, dim);
}

at::Tensor shard_linear_weight(const at::Tensor& full_weight, LinearRole role, int64_t rank, int64_t size) {
  if (full_weight.dim() != 2) {
    throw BadInput("shard_linear_weight: expected a weight [out, in], got " + describe_tensor(full_weight));
  }
  if (role == LinearRole::kReplicated) return full_weight.clone(at::MemoryFormat::Contiguous);
  const int64_t dim = role == LinearRole::kColumn ? 0 : 1;
  const int64_t full = full_weight.size(dim);
  if (full % size != 0) {
    throw BadInput(not_divisible("shard_linear_weight", role == LinearRole::kColumn ? "out_features" : "in_features",
                                 full, size));
  }
  const int64_t n = full / size;
  return full_weight.narrow(dim, rank * n, n).clone(at::MemoryFormat::Contiguous);
}

at::Tensor shard_linear_bias(const at::Tensor& full_bias, LinearRole role, int64_t rank, int64_t size) {
  if (full_bias.dim() != 1) {
    throw BadInput("shard_linear_bias: expected a bias [out], got " + describe_tensor(full_bias));
  }
  if (role != LinearRole::kColumn) return full_bias.clone(at::MemoryFormat::Contiguous);
  if (full_bias.size(0) % size != 0) {
    throw BadInput(not_divisible("shard_linear_bias", "out_features", full_bias.size(0), size));
  }
  const int64_t n = full_bias.size(0) / size;
  return full_bias.narrow(0, rank * n, n).clone(at::MemoryFormat::Contiguous);
}

ColumnParallelLinear::ColumnParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias,
                                           Options options)
    : tp_(&tp), in_features_(in_features), out_features_(out_features), options_(options) {
  if (out_features % tp.size() != 0) {
    throw BadInput(not_divisible("ColumnParallelLinear [" + std::to_string(out_features) + ", " +
                                     std::to_string(in_features) + "]",
                                 "out_features", out_features, tp.size()));
  }
  const int64_t out_local = out_features / tp.size();
  weight_ = register_parameter("weight", torch::empty({out_local, in_features}));
  if (bias) bias_ = register_parameter("bias", torch::zeros({out_local}));
}

at::Tensor column_input(ProcessGroup& tp, const at::Tensor& x, bool sequence_parallel) {
  return sequence_parallel ? gather_from_sp(tp, x) : copy_to_tp(tp, x);
}

at::Tensor SharedColumnInput::get(ProcessGroup& tp, const at::Tensor& x, bool sequence_parallel) {
  const bool grad_mode = at::GradMode::is_enabled();
  if (input_.defined() && input_.is_same(x) && x._version() == version_ && grad_mode == grad_mode_ &&
      sequence_parallel == sequence_parallel_) {
    return output_;
  }
  output_ = column_input(tp, x, sequence_parallel);
  input_ = x;
  version_ = x._version();
  grad_mode_ = grad_mode;
  sequence_parallel_ = sequence_parallel;
  return output_;
}

torch::Tensor ColumnParallelLinear::forward(const torch::Tensor& x) {
  // f (or its sequence-parallel form): identity forward, and in backward the
  // sum over ranks of the input gradients each weight shard produced.
  const at::Tensor x_full = options_.input_ready    ? x
                             : options_.shared_input ? options_.shared_input->get(*tp_, x, options_.sequence_parallel)
                                                     : column_input(*tp_, x, options_.sequence_parallel);
  at::Tensor y_local = at::linear(x_full, weight_, bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt);
  return options_.gather_output ? gather_from_tp(*tp_, y_local) : y_local;
}

RowParallelLinear::RowParallelLinear(ProcessGroup& tp, int64_t in_features, int64_t out_features, bool bias,
                                     Options options)
    : tp_(&tp), in_features_(in_features), out_features_(out_features), options_(options) {
  if (in_features % tp.size() != 0) {
    throw BadInput(not_divisible("RowParallelLinear [" + std::to_string(out_features) + ", " +
                                     std::to_string(in_features) + "]",
                                 "in_features", in_features, tp.size()));
  }
  if (bias && !options.reduce_output) {
    throw std::invalid_argument("RowParallelLinear: a bias needs reduce_output (it is added once, after the sum)");
  }
  weight_ = register_parameter("weight", torch::empty({out_features, in_features / tp.size()}));
  if (bias) bias_ = register_parameter("bias", torch::zeros({out_features}));
}

torch::Tensor RowParallelLinear::forward(const torch::Tensor& x) {
  const at::Tensor x_local = options_.input_is_parallel ? x : scatter_to_tp(*tp_, x);
  // No bias here: added to every rank's partial sum it would be counted tp times.
  const at::Tensor y_partial = at::linear(x_local, weight_);
  if (!options_.reduce_output) return y_partial;
  if (!options_.sequence_parallel) {
    const at::Tensor y = reduce_from_tp(*tp_, y_partial);
    // y and its gradient are the same on every rank, so is the bias gradient.
    // The bias joins in y's dtype, as at::linear's own bias would: under bf16
    // autocast an fp32 bias would promote the residual stream to fp32 (and a
    // pipeline send of it would then not match the next stage's bf16 recv).
    return bias_.defined() ? y + bias_.to(y.scalar_type()) : y;
  }
  const at::Tensor y_slice = reduce_scatter_to_sp(*tp_, y_partial);
  // Each rank adds the bias to its own sequence slice: copy_to_tp sums the
  // slices' bias gradients over the group in backward.
  return bias_.defined() ? y_slice + copy_to_tp(*tp_, bias_).to(y_slice.scalar_type()) : y_slice;
}

}  // namespace loom
