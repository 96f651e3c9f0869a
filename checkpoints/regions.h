// Where a stored piece of a tensor sits in the whole tensor, and which of its
// elements a reader needs: the geometry behind sharded checkpoints
// (docs/checkpoints.md, "Sharded checkpoints"). Torch-free.
//
// Note [pieces are boxes with a flat range]
// A piece is a box of the global tensor (a [start, stop) range per dim: a
// tensor-parallel slice, or the whole tensor) and, optionally, a flat range
// [begin, end) of the box's elements in row-major order: the part of a
// parameter that one ZeRO rank owns (its shards cut the flat parameter
// space, Note [ZeRO-1 layout]). Either way the piece's elements are stored
// in that row-major order, so every piece reads as a list of runs: stretches
// that are contiguous both in the piece and in the global tensor. Two
// regions overlap where their runs do; a reader of any layout takes from each
// stored piece the runs it shares with what it owns.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace loom {

using Range = std::pair<int64_t, int64_t>;  // [start, stop)

struct Region {
  std::vector<Range> box;       // one range per dim of the global tensor
  std::optional<Range> flat;    // elements [begin, end) of the box, row-major; none = all of it

  int64_t box_numel() const;
  int64_t numel() const { return flat ? flat->second - flat->first : box_numel(); }

  // The whole of a tensor of `shape`.
  static Region whole(const std::vector<int64_t>& shape);
  // `shape` cut into `parts` equal chunks along `dim`, chunk `index` (dim -1:
  // the whole tensor). std::invalid_argument when the dim does not divide.
  static Region chunk(const std::vector<int64_t>& shape, int64_t dim, int64_t index, int64_t parts);
  // `shape` padded along `dim` to a multiple of `parts` and cut into equal
  // chunks, chunk `index` less the padding: the rows of the whole tensor
  // that a tensor-parallel rank of a padded vocabulary holds (Note [vocab
  // padding] in parallel/vocab_parallel.h), empty where the chunk is all
  // padding. std::invalid_argument for a dim or index out of range.
  static Region padded_chunk(const std::vector<int64_t>& shape, int64_t dim, int64_t index, int64_t parts);
  bool operator==(const Region&) const = default;
};

// A stretch of `length` elements at `global` (row-major index in the whole
// tensor) and `local` (index in the region's own element order).
struct Run {
  int64_t global = 0;
  int64_t local = 0;
  int64_t length = 0;
};

// The region's runs in increasing global (and local) order. std::invalid_argument
// when the region does not fit `shape` (a box outside it, a flat range outside
// the box).
std::vector<Run> runs_of(const Region& region, const std::vector<int64_t>& shape);

// Where two regions of the same tensor share elements: each overlap as
// {global, local index in `a`, length} and the local index in `b`.
struct Overlap {
  int64_t a_local = 0;
  int64_t b_local = 0;
  int64_t length = 0;
};
std::vector<Overlap> overlaps(const std::vector<Run>& a, const std::vector<Run>& b);

// "[0:4, 8:16] flat 3:9" for messages.
std::string describe(const Region& region);

}  // namespace loom
