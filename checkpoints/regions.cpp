#include "checkpoints/regions.h"

#include <algorithm>
#include <stdexcept>

namespace loom {

int64_t Region::box_numel() const {
  int64_t n = 1;
  for (const auto& [start, stop] : box) n *= stop - start;
  return n;
}

Region Region::whole(const std::vector<int64_t>& shape) {
  Region region;
  for (int64_t d : shape) region.box.push_back({0, d});
  return region;
}

Region Region::chunk(const std::vector<int64_t>& shape, int64_t dim, int64_t index, int64_t parts) {
  Region region = whole(shape);
  if (dim < 0) return region;
  if (dim >= static_cast<int64_t>(shape.size()) || parts < 1 || shape[dim] % parts != 0 || index < 0 ||
      index >= parts) {
    throw std::invalid_argument("chunk " + std::to_string(index) + " of " + std::to_string(parts) + " along dim " +
                                std::to_string(dim) + " does not fit a tensor of " + std::to_string(shape.size()) +
                                " dims");
  }
  const int64_t n = shape[dim] / parts;
  region.box[dim] = {index * n, (index + 1) * n};
  return region;
}

Region Region::padded_chunk(const std::vector<int64_t>& shape, int64_t dim, int64_t index, int64_t parts) {
  if (dim < 0 || dim >= static_cast<int64_t>(shape.size()) || parts < 1 || index < 0 || index >= parts) {
    throw std::invalid_argument("padded chunk " + std::to_string(index) + " of " + std::to_string(parts) +
                                " along dim " + std::to_string(dim) + " does not fit a tensor of " +
                                std::to_string(shape.size()) + " dims");
  }
  Region region = whole(shape);
  const int64_t n = (shape[dim] + parts - 1) / parts;
  region.box[dim] = {std::min(index * n, shape[dim]), std::min((index + 1) * n, shape[dim])};
  return region;
}

std::vector<Run> runs_of(const Region& region, const std::vector<int64_t>& shape) {
  const size_t dims = shape.size();
  if (region.box.size() != dims) throw std::invalid_argument(describe(region) + " has another rank than the tensor");
  for (size_t d = 0; d < dims; ++d) {
    const auto [start, stop] = region.box[d];
    if (start < 0 || start > stop || stop > shape[d]) {
      throw std::invalid_argument(describe(region) + " lies outside the tensor along dim " + std::to_string(d));
    }
  }
  const int64_t box_numel = region.box_numel();
  const Range flat = region.flat.value_or(Range{0, box_numel});
  if (flat.first < 0 || flat.first > flat.second || flat.second > box_numel) {
    throw std::invalid_argument(describe(region) + ": the flat range lies outside the box");
  }
  std::vector<Run> runs;
  if (flat.first == flat.second) return runs;
  // The box is contiguous in the global tensor over its last dims where it
  // spans them whole: `inner` elements from dim `split` on form one stretch.
  size_t split = dims;
  int64_t inner = 1;
  while (split > 0) {
    const size_t d = split - 1;
    inner *= region.box[d].second - region.box[d].first;
    split = d;
    if (region.box[d].first != 0 || region.box[d].second != shape[d]) break;
  }
  std::vector<int64_t> stride(dims, 1);  // of the global tensor
  for (size_t d = dims; d-- > 1;) stride[d - 1] = stride[d] * shape[d];
  // Walk the stretches of the box (one per index of the dims before `split`),
  // keeping those that meet the flat range.
  std::vector<int64_t> index(split, 0);
  for (int64_t local = 0; local < flat.second; local += inner) {
    int64_t global = 0;
    for (size_t d = 0; d < split; ++d) global += (region.box[d].first + index[d]) * stride[d];
    if (split < dims) global += region.box[split].first * stride[split];
    const int64_t begin = std::max(local, flat.first), end = std::min(local + inner, flat.second);
    if (begin < end) runs.push_back({global + (begin - local), begin - flat.first, end - begin});
    for (size_t d = split; d-- > 0;) {  // the next stretch: increment the index like an odometer
      if (++index[d] < region.box[d].second - region.box[d].first) break;
      index[d] = 0;
    }
  }
  return runs;
}

std::vector<Overlap> overlaps(const std::vector<Run>& a, const std::vector<Run>& b) {
  std::vector<Overlap> out;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const int64_t begin = std::max(a[i].global, b[j].global);
    const int64_t end = std::min(a[i].global + a[i].length, b[j].global + b[j].length);
    if (begin < end) out.push_back({a[i].local + (begin - a[i].global), b[j].local + (begin - b[j].global), end - begin});
    if (a[i].global + a[i].length <= b[j].global + b[j].length) {
      ++i;
    } else {
      ++j;
    }
  }
  return out;
}

std::string describe(const Region& region) {
  std::string out = "[";
  for (size_t d = 0; d < region.box.size(); ++d) {
    out += (d ? ", " : "") + std::to_string(region.box[d].first) + ":" + std::to_string(region.box[d].second);
  }
  out += "]";
  if (region.flat) out += " flat " + std::to_string(region.flat->first) + ":" + std::to_string(region.flat->second);
  return out;
}

}  // namespace loom
