// Phi-3's fused projections between the Hub files and loom's model: import
// splits each fused tensor into the model's parts, export joins them back
// (Note [fused projections]).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "config/model_config.h"

namespace loom {

// Note [fused projections]
// Phi-3's Hub files hold one qkv_proj [(heads + 2 kv_heads) * head_dim,
// hidden] and one gate_up_proj [2 * intermediate, hidden] per layer; loom's
// model keeps q/k/v and gate/up apart, so that tensor parallelism cuts each
// by heads or columns as for every other family (a fused weight cut in tp
// equal row blocks would give a rank queries of one head and keys of
// another). The parts are consecutive row blocks of the fused tensor, and
// so consecutive bytes of its file: each part is read in place, from its
// first row's byte on (ModelFiles::split_fused_projections), and an export
// writes them back one after the other under the fused name
// (fuse_projections_for_hub).

// The parts of a fused Phi-3 weight `name`, as (name, rows) in the order of
// their rows, or none for any other tensor.
std::vector<std::pair<std::string, int64_t>> fused_parts(const ModelConfig& m, const std::string& name);

// One tensor of an export: its name and shape, and a source that hands its
// bytes, already in the export's dtype, to a sink in pieces of any size.
using ByteSink = std::function<void(std::span<const std::byte>)>;
struct HubTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::function<void(const ByteSink&)> source;
};

// Phi-3: q/k/v and gate/up written as the fused qkv_proj and gate_up_proj
// its Hub files hold, each part's bytes after the previous one's. Other
// families: the tensors as they are. std::logic_error when a part is missing.
std::vector<HubTensor> fuse_projections_for_hub(const ModelConfig& config, const std::vector<HubTensor>& tensors);

}  // namespace loom
