// The model a run starts from: random weights from the config, or the weights
// of a Hugging Face folder or loom checkpoint named by `model.init_from`.
#pragma once

#include <memory>
#include <string>
#include <vector>

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
// part (read_init_from). With model.resize_vocab N, config.model's
// vocab_size is N; BadInput when N is below the folder's vocabulary.
ModelFiles open_init_from(Config& config);

// BadInput when model.resize_vocab is set without model.init_from (there is
// no vocabulary to grow).
void check_resize_vocab(const Config& config);

// Copies into `destination` (any device, contiguous or not) the elements of
// `region` of parameter `name`, whose global shape in the model
// open_init_from resolved is `shape`, from `files`. Where model.resize_vocab
// grew the embedding or the untied head (`shape` has more rows than the
// stored tensor), rows past the stored ones are the mean of the stored rows
// (Note [growing the vocabulary]).
void read_init_from(const ModelFiles& files, const std::string& name, const std::vector<int64_t>& shape,
                    const Region& region, torch::Tensor destination);

// Writes a loom checkpoint (step 0, weights only) of the model `model`
// describes, initialized as a run with run.seed = `seed` starts on any
// layout (model/init.h), stored in `dtype`. One tensor is made, written and
// dropped at a time, so the model may be larger than memory (`loom init`).
// torch's generator is neither used nor changed.
void write_initialized_checkpoint(const ModelConfig& model, uint64_t seed, torch::ScalarType dtype,
                                  const std::string& dir);

}  // namespace loom
