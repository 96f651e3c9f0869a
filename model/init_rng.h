// The counter-based generator behind a run's initial weights: the value of
// element i of parameter NAME depends on (run.seed, NAME, i) and nothing
// else, so a rank draws its own slice of a tensor without drawing the rest,
// and every layout starts from the same weights. Torch-free; model/init.h
// fills tensors with it.
//
// Note [layout-independent initialization]
// torch's generator is sequential: the k-th value it gives depends on every
// draw before it, so a rank could only reproduce its slice of a tensor by
// drawing the whole model first (at 70B, 282 GB per rank). A counter-based
// generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) is a keyed bijection of a counter instead: block b of NAME's
// stream is Philox4x32-10 of the counter (b, FNV-1a(NAME)) under the key
// run.seed, four 32-bit words, which Box-Muller turns into the N(0, 1) values
// of elements 4b .. 4b+3 (row-major in the global tensor). A value depends
// neither on the layout, nor on the order tensors are drawn in, nor on how
// many threads draw them.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

namespace loom {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// Philox4x32-10: ten rounds over a 128-bit counter under a 64-bit key, as
// Random123's philox4x32 (whose known-answer vectors tests/unit/test_init.cpp
// checks) and at::philox_engine compute it.
PhiloxCounter philox4x32_10(PhiloxCounter counter, PhiloxKey key);

// 64-bit FNV-1a: a hash of a parameter name that stays the same across
// compilers, libraries and runs (std::hash promises none of that).
uint64_t fnv1a_64(std::string_view text);

// The N(0, std) values of one tensor's elements, by global row-major index.
class NormalInitStream {
 public:
  NormalInitStream(uint64_t seed, std::string_view name, double std);

  // The value of element `index`.
  float at(uint64_t index) const;
  // out[k] = at(first + k) for k in [0, count), four values per Philox call.
  void fill(float* out, uint64_t first, int64_t count) const;

 private:
  // Elements 4 block .. 4 block + 3.
  std::array<float, 4> block(uint64_t block) const;

  PhiloxKey key_;
  uint32_t name_lo_, name_hi_;
  double std_;
};

}  // namespace loom
