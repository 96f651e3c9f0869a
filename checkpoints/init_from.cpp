#include "checkpoints/init_from.h"

#include "checkpoints/hub.h"
#include "checkpoints/loom_checkpoint.h"
#include "model/init.h"
#include "util/error.h"

namespace loom {

namespace {

// A shape key set in the YAML (non-zero) must match the folder's value.
void check_agrees(const char* key, int64_t from_yaml, int64_t from_folder, const std::string& folder) {
  if (from_yaml != 0 && from_yaml != from_folder) {
    throw BadInput("model." + std::string(key) + " is " + std::to_string(from_yaml) + " but model.init_from '" +
                   folder + "' has " + std::to_string(from_folder) + " (remove the key or make them agree)");
  }
}

}  // namespace

std::shared_ptr<LlamaForCausalLM> build_initial_model(Config& config, const LayerFactory& factory) {
  if (config.model.init_from.empty()) {
    validate_model_config(config.model, config.source_path.empty() ? "config" : config.source_path);
    auto model = std::make_shared<LlamaForCausalLM>(config.model, factory);
    model->init_weights(config.run.seed);
    return model;
  }
  const ModelFiles files = open_init_from(config);
  auto model = std::make_shared<LlamaForCausalLM>(config.model, factory);
  load_weights(*model, files);
  return model;
}

ModelFiles open_init_from(Config& config) {
  const std::string& folder = config.model.init_from;
  ModelFiles files = ModelFiles::open(folder);
  const ModelConfig& stored = files.model_config();
  const ModelConfig& asked = config.model;
  check_agrees("hidden_size", asked.hidden_size, stored.hidden_size, folder);
  check_agrees("intermediate_size", asked.intermediate_size, stored.intermediate_size, folder);
  check_agrees("num_layers", asked.num_layers, stored.num_layers, folder);
  check_agrees("num_heads", asked.num_heads, stored.num_heads, folder);
  check_agrees("num_kv_heads", asked.num_kv_heads, stored.kv_heads(), folder);
  check_agrees("head_dim", asked.head_dim, stored.head_size(), folder);
  check_agrees("vocab_size", asked.vocab_size, stored.vocab_size, folder);

  ModelConfig resolved = stored;
  resolved.init_from = folder;
  resolved.init_std = asked.init_std;
  config.model = resolved;
  // Shapes only: this model's storage is allocated but never touched.
  LocalLayerFactory factory;
  const LlamaForCausalLM expected(resolved, factory);
  verify_weights(expected, files);
  return files;
}

void write_initialized_checkpoint(const ModelConfig& model, uint64_t seed, torch::ScalarType dtype,
                                  const std::string& dir) {
  validate_model_config(model, "model");
  // Names, order and shapes only: the storage of this model is never touched.
  LocalLayerFactory factory;
  const LlamaForCausalLM shapes(model, factory);
  std::vector<CheckpointTensor> tensors;
  for (const auto& named : shapes.named_parameters()) {
    const std::string name = named.key();
    const std::vector<int64_t> shape = named.value().sizes().vec();
    const double init_std = model.init_std;
    tensors.push_back({name, dtype, shape, [name, shape, init_std, seed, dtype] {
                         torch::Tensor p = torch::empty(shape);
                         init_parameter(name, p, init_std, seed);  // fp32, as in training, then stored in dtype
                         return dtype == torch::kFloat ? p : p.to(dtype);
                       }});
  }
  write_loom_checkpoint(model, tensors, dir, CheckpointWriteOptions{});
}

}  // namespace loom
