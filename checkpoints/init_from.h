// The model a run starts from: random weights from the config, or the weights
// of a Hugging Face folder or loom checkpoint named by `model.init_from`.
#pragma once

#include <memory>
#include <string>

#include <torch/types.h>

#include "checkpoints/hub.h"
#include "config/config.h"
#include "model/llama.h"

namespace loom {

// With `model.init_from` set, the model's shape comes from that folder's
// config; shape keys also given in the YAML must agree with it (BadInput
// naming both values otherwise). `config.model` is updated to the shape used.
std::shared_ptr<LlamaForCausalLM> build_initial_model(Config& config, const LayerFactory& factory);

// The folder `model.init_from` names, opened (nothing read yet), its shape
// checked against the YAML's shape keys as build_initial_model does and put
// in `config.model`, and its tensors checked against that model (names,
// shapes, dtypes) without reading them: for ranks that each read only their
// part (ModelFiles::read_region).
ModelFiles open_init_from(Config& config);

// Writes a loom checkpoint (step 0, weights only) of the model `model`
// describes, initialized as a run with run.seed = `seed` starts on any
// layout (model/init.h), stored in `dtype`. One tensor is made, written and
// dropped at a time, so the model may be larger than memory (`loom init`).
// torch's generator is neither used nor changed.
void write_initialized_checkpoint(const ModelConfig& model, uint64_t seed, torch::ScalarType dtype,
                                  const std::string& dir);

}  // namespace loom
