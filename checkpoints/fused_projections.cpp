#include "checkpoints/fused_projections.h"

#include <map>
#include <set>
#include <stdexcept>

#include <c10/util/ArrayRef.h>
#include <c10/util/StringUtil.h>

#include "checkpoints/hub.h"
#include "util/error.h"

namespace loom {

std::vector<std::pair<std::string, int64_t>> fused_parts(const ModelConfig& m, const std::string& name) {
  const auto replaced = [&](const std::string& suffix, const std::string& part) {
    return name.substr(0, name.size() - suffix.size()) + part;
  };
  const int64_t q = m.num_heads * m.head_size(), kv = m.kv_heads() * m.head_size();
  if (name.ends_with("self_attn.qkv_proj.weight")) {
    const std::string suffix = "qkv_proj.weight";
    return {{replaced(suffix, "q_proj.weight"), q}, {replaced(suffix, "k_proj.weight"), kv},
            {replaced(suffix, "v_proj.weight"), kv}};
  }
  if (name.ends_with("mlp.gate_up_proj.weight")) {
    const std::string suffix = "gate_up_proj.weight";
    return {{replaced(suffix, "gate_proj.weight"), m.intermediate_size},
            {replaced(suffix, "up_proj.weight"), m.intermediate_size}};
  }
  return {};
}

// A member of ModelFiles (checkpoints/hub.h), defined beside the other half
// of the Note.
void ModelFiles::split_fused_projections() {
  std::vector<StoredTensor> split;
  for (StoredTensor& tensor : tensors_) {
    const auto parts = fused_parts(model_, tensor.info.name);
    if (parts.empty()) {
      split.push_back(std::move(tensor));
      continue;
    }
    const std::vector<int64_t>& shape = tensor.info.shape;
    int64_t rows = 0;
    for (const auto& part : parts) rows += part.second;
    if (shape.size() != 2 || shape[0] != rows || shape[1] != model_.hidden_size) {
      throw BadInput(file_of(tensor.info.name) + ": tensor '" + tensor.info.name + "' has shape " +
                     c10::str(c10::IntArrayRef(shape)) + " but the config needs [" + std::to_string(rows) + ", " +
                     std::to_string(model_.hidden_size) + "]");
    }
    const StoredPiece& whole = tensor.pieces.front();
    const uint64_t row_bytes = static_cast<uint64_t>(shape[1]) * safetensors::dtype_size(tensor.info.dtype);
    int64_t first_row = 0;
    for (const auto& [name, part_rows] : parts) {
      StoredTensor part;
      part.info = {name, tensor.info.dtype, {part_rows, shape[1]}, 0, 0};
      part.pieces.push_back({whole.file, whole.begin + static_cast<uint64_t>(first_row) * row_bytes,
                             Region::whole(part.info.shape), {}});
      part.is_model = tensor.is_model;
      split.push_back(std::move(part));
      first_row += part_rows;
    }
  }
  tensors_.clear();
  index_.clear();
  for (StoredTensor& tensor : split) add_tensor(std::move(tensor));
}

std::vector<HubTensor> fuse_projections_for_hub(const ModelConfig& config, const std::vector<HubTensor>& tensors) {
  if (config.architecture != "phi3") return tensors;
  std::map<std::string, const HubTensor*> by_name;
  for (const HubTensor& tensor : tensors) by_name[tensor.name] = &tensor;
  std::set<std::string> taken;
  std::vector<HubTensor> out;
  for (const HubTensor& tensor : tensors) {
    if (taken.count(tensor.name)) continue;
    std::string fused;
    for (const auto& [suffix, fused_suffix] : {std::pair<std::string, std::string>{"q_proj.weight", "qkv_proj.weight"},
                                               {"gate_proj.weight", "gate_up_proj.weight"}}) {
      if (tensor.name.ends_with(suffix)) fused = tensor.name.substr(0, tensor.name.size() - suffix.size()) + fused_suffix;
    }
    const auto parts = fused.empty() ? std::vector<std::pair<std::string, int64_t>>{} : fused_parts(config, fused);
    if (parts.empty()) {
      out.push_back(tensor);
      continue;
    }
    HubTensor joined{fused, {0, tensor.shape[1]}, nullptr};
    std::vector<const HubTensor*> sources;
    for (const auto& part : parts) {
      const auto it = by_name.find(part.first);
      if (it == by_name.end()) throw std::logic_error("export: no '" + part.first + "' to fuse into '" + fused + "'");
      sources.push_back(it->second);
      joined.shape[0] += it->second->shape[0];
      taken.insert(part.first);
    }
    joined.source = [sources](const ByteSink& sink) {
      for (const HubTensor* source : sources) source->source(sink);
    };
    out.push_back(std::move(joined));
  }
  return out;
}

}  // namespace loom
