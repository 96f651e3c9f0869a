#include "model/init.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <stdexcept>
#include <vector>

#include "model/init_rng.h"

namespace loom {

namespace {

std::string shape_text(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + "]";
}

void check_box(const std::string& name, at::IntArrayRef box_shape, at::IntArrayRef global_shape,
               at::IntArrayRef box_start) {
  bool fits = box_shape.size() == global_shape.size() && box_start.size() == global_shape.size();
  for (size_t d = 0; fits && d < global_shape.size(); ++d) {
    fits = box_start[d] >= 0 && box_start[d] + box_shape[d] <= global_shape[d];
  }
  if (!fits) {
    throw std::invalid_argument("init " + name + ": a box of " + shape_text(box_shape) + " at " +
                                shape_text(box_start) + " does not fit its global shape " +
                                shape_text(global_shape));
  }
}

// The box's elements, row-major, are runs of `run_length` consecutive
// elements of the global tensor: the last dim, joined by the dims before it
// for as long as the box spans them whole (a whole tensor is one run, a tp
// shard along dim 0 too, one along dim 1 a run per row).
struct BoxRuns {
  std::vector<int64_t> outer_sizes;    // the box's sizes of the dims before the run
  std::vector<uint64_t> outer_starts;  // the first global element of each of those dims' steps
  std::vector<uint64_t> outer_strides;
  uint64_t first = 0;  // global index of the box's first element
  int64_t run_length = 1;

  BoxRuns(at::IntArrayRef box_shape, at::IntArrayRef global_shape, at::IntArrayRef box_start) {
    const int64_t dims = static_cast<int64_t>(global_shape.size());
    std::vector<uint64_t> strides(dims);
    uint64_t stride = 1;
    for (int64_t d = dims - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= static_cast<uint64_t>(global_shape[d]);
    }
    int64_t run_dim = dims - 1;  // the outermost dim of the run
    while (run_dim > 0 && box_shape[run_dim] == global_shape[run_dim]) --run_dim;
    for (int64_t d = std::max<int64_t>(run_dim, 0); d < dims; ++d) run_length *= box_shape[d];
    for (int64_t d = 0; d < dims; ++d) first += static_cast<uint64_t>(box_start[d]) * strides[d];
    for (int64_t d = 0; d < run_dim; ++d) {
      outer_sizes.push_back(box_shape[d]);
      outer_strides.push_back(strides[d]);
    }
  }

  // Global index of the first element of run `run` (row-major over the outer dims).
  uint64_t start_of(int64_t run) const {
    uint64_t index = first;
    for (int64_t d = static_cast<int64_t>(outer_sizes.size()) - 1; d >= 0; --d) {
      index += static_cast<uint64_t>(run % outer_sizes[d]) * outer_strides[d];
      run /= outer_sizes[d];
    }
    return index;
  }
};

// ~16k values a task: a few hundred microseconds, large enough that the
// thread pool's overhead vanishes, small enough to balance a 1e9-value shard.
constexpr int64_t kValuesPerTask = 1 << 14;

void fill_normal_box(const NormalInitStream& stream, float* out, at::IntArrayRef box_shape,
                     at::IntArrayRef global_shape, at::IntArrayRef box_start) {
  const BoxRuns runs(box_shape, global_shape, box_start);
  const int64_t numel = c10::multiply_integers(box_shape);
  // Each task writes its own range of `out`; a value depends only on its
  // global index, so how the range is cut does not change any value.
  at::parallel_for(0, numel, kValuesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t run = pos / runs.run_length, within = pos % runs.run_length;
      const int64_t n = std::min(end - pos, runs.run_length - within);
      stream.fill(out + pos, runs.start_of(run) + static_cast<uint64_t>(within), n);
      pos += n;
    }
  });
}

}  // namespace

void init_parameter_box(const std::string& name, const at::Tensor& box, at::IntArrayRef global_shape,
                        at::IntArrayRef box_start, double init_std, uint64_t seed) {
  check_box(name, box.sizes(), global_shape, box_start);
  at::NoGradGuard no_grad;
  if (name.ends_with("norm.weight")) {
    box.fill_(1.0);
    return;
  }
  if (name.ends_with(".bias")) {
    box.zero_();
    return;
  }
  // Written in place when the box is fp32, contiguous and on the CPU, as a
  // parameter being built is; through an fp32 copy otherwise.
  const bool in_place = box.device().is_cpu() && box.scalar_type() == at::kFloat && box.is_contiguous();
  at::Tensor values = in_place ? box : at::empty(box.sizes(), at::TensorOptions().dtype(at::kFloat));
  fill_normal_box(NormalInitStream(seed, name, init_std), values.data_ptr<float>(), box.sizes(), global_shape,
                  box_start);
  if (!in_place) box.copy_(values);
}

void init_parameter(const std::string& name, const at::Tensor& p, double init_std, uint64_t seed) {
  const std::vector<int64_t> origin(p.dim(), 0);
  init_parameter_box(name, p, p.sizes(), origin, init_std, seed);
}

}  // namespace loom
