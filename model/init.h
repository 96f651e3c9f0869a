// A run's initial weights, a tensor or a slice of one at a time: norm weights
// 1, biases 0, every other parameter ~ N(0, init_std) (Hugging Face's
// initializer), the random values from the counter-based stream of
// (run.seed, parameter name) (Note [layout-independent initialization] in
// model/init_rng.h). A tp shard or a pipeline stage fills its parameters with
// exactly the values the whole model holds there, without drawing the rest.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

namespace loom {

// Fills `box`, the part of the global tensor `name` (of `global_shape`) that
// starts at `box_start` (one offset per dim) and is as large as `box`, with
// the values the whole tensor holds there. `box` may be of any float dtype
// and device and need not be contiguous: the values are drawn in fp32 on the
// CPU (spread over torch's intra-op threads) and converted. Throws
// std::invalid_argument naming `name` when the box does not fit the shape.
void init_parameter_box(const std::string& name, const at::Tensor& box, at::IntArrayRef global_shape,
                        at::IntArrayRef box_start, double init_std, uint64_t seed);

// The whole tensor: init_parameter_box with `p` as its own global shape.
void init_parameter(const std::string& name, const at::Tensor& p, double init_std, uint64_t seed);

}  // namespace loom
