#include "checkpoints/init_from.h"

#include <algorithm>
#include <stdexcept>

#include <torch/types.h>
#include <torch/utils.h>

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

// Note [growing the vocabulary]
// model.resize_vocab adds rows to the embedding and the untied head for the
// tokens a fine-tune adds. A new row starts at the mean of the stored rows:
// its logit starts near the average token's, not at a random extreme, and
// its embedding inside the distribution the layers have seen (what
// transformers' resize_token_embeddings starts from, without its sampled
// noise). The mean is of the whole stored tensor, summed in float64 over
// fixed blocks of rows in row order by every rank that holds a new row, so
// a row's value is the same whichever ranks hold it (tp's vocabulary-parallel
// slices, a pipeline's first and last stages).

bool grows_with_vocab(const std::string& name) {
  return name == "model.embed_tokens.weight" || name == "lm_head.weight";
}

// Rows summed at a time for the mean: 16 MiB of float64 at most.
constexpr int64_t kMeanBlockElements = int64_t{2} << 20;

// The mean of the rows of the stored 2-D tensor `name`, in float64.
torch::Tensor mean_row(const ModelFiles& files, const std::string& name) {
  const std::vector<int64_t>& shape = files.info(name).shape;
  const int64_t rows = shape[0], cols = shape[1];
  const int64_t block_rows = std::max<int64_t>(1, kMeanBlockElements / std::max<int64_t>(cols, 1));
  torch::Tensor sum = torch::zeros({cols}, torch::kDouble);
  torch::Tensor block = torch::empty({std::min(block_rows, rows), cols}, torch::kDouble);
  for (int64_t begin = 0; begin < rows; begin += block_rows) {
    const int64_t end = std::min(rows, begin + block_rows);
    torch::Tensor part = block.narrow(0, 0, end - begin);
    files.read_region(name, Region{{{begin, end}, {0, cols}}, std::nullopt}, part);
    sum += part.sum(0);
  }
  return sum / static_cast<double>(rows);
}

}  // namespace

void check_resize_vocab(const Config& config) {
  if (config.model.resize_vocab != 0 && config.model.init_from.empty()) {
    throw BadInput("model.resize_vocab is " + std::to_string(config.model.resize_vocab) +
                   " but model.init_from is not set: it grows the vocabulary of the model a run starts from "
                   "(set model.vocab_size for a model made from scratch)");
  }
}

void read_init_from(const ModelFiles& files, const std::string& name, const std::vector<int64_t>& shape,
                    const Region& region, torch::Tensor destination) {
  torch::NoGradGuard no_grad;
  const std::vector<int64_t>& stored = files.info(name).shape;
  torch::Tensor host = destination.device().type() == torch::kCPU && destination.is_contiguous()
                           ? destination
                           : torch::empty(destination.sizes(), torch::TensorOptions().dtype(destination.scalar_type()));
  if (stored == shape) {
    files.read_region(name, region, host);
  } else {
    const bool grown = grows_with_vocab(name) && shape.size() == 2 && stored.size() == 2 && stored[1] == shape[1] &&
                       stored[0] < shape[0] && !region.flat && region.box.size() == 2;
    if (!grown) {
      throw std::logic_error("init_from: '" + name + "' is stored as " + c10::str(c10::IntArrayRef(stored)) +
                             ", the model needs " + c10::str(c10::IntArrayRef(shape)) + " " + describe(region));
    }
    const auto [row_begin, row_end] = region.box[0];
    const auto [col_begin, col_end] = region.box[1];
    torch::Tensor rows = host.view({row_end - row_begin, col_end - col_begin});
    const int64_t stored_end = std::min(row_end, stored[0]);
    if (row_begin < stored_end) {
      torch::Tensor old_rows = rows.narrow(0, 0, stored_end - row_begin);  // leading rows: contiguous
      files.read_region(name, Region{{{row_begin, stored_end}, {col_begin, col_end}}, std::nullopt}, old_rows);
    }
    if (row_end > stored[0]) {
      const int64_t first_new = std::max(row_begin, stored[0]);
      const torch::Tensor mean = mean_row(files, name).narrow(0, col_begin, col_end - col_begin);
      rows.narrow(0, first_new - row_begin, row_end - first_new).copy_(mean.to(rows.scalar_type()).expand(
          {row_end - first_new, col_end - col_begin}));
    }
  }
  if (!host.is_same(destination)) destination.copy_(host);
}

std::shared_ptr<LlamaForCausalLM> build_initial_model(Config& config, const LayerFactory& factory) {
  check_resize_vocab(config);
  if (config.model.init_from.empty()) {
    validate_model_config(config.model, config.source_path.empty() ? "config" : config.source_path);
    auto model = std::make_shared<LlamaForCausalLM>(config.model, factory);
    model->init_weights(config.run.seed);
    return model;
  }
  const ModelFiles files = open_init_from(config);
  auto model = std::make_shared<LlamaForCausalLM>(config.model, factory);
  for (auto& named : model->named_parameters()) {
    const std::vector<int64_t> shape = named.value().sizes().vec();
    read_init_from(files, named.key(), shape, Region::whole(shape), named.value());
  }
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
  check_agrees("num_experts", asked.num_experts, stored.num_experts, folder);
  check_agrees("num_experts_per_tok", asked.num_experts_per_tok, stored.num_experts_per_tok, folder);
  check_agrees("moe_intermediate_size", asked.moe_intermediate_size, stored.moe_intermediate_size, folder);
  if (asked.resize_vocab != 0 && asked.resize_vocab < stored.vocab_size) {
    throw BadInput("model.resize_vocab is " + std::to_string(asked.resize_vocab) + " but model.init_from '" + folder +
                   "' has " + std::to_string(stored.vocab_size) + " tokens: the vocabulary can only grow (remove the "
                   "key to keep " + std::to_string(stored.vocab_size) + ")");
  }
  const int64_t vocab_size = std::max(asked.resize_vocab, stored.vocab_size);
  // model.vocab_size may name the folder's vocabulary or the grown one.
  if (asked.vocab_size != vocab_size) check_agrees("vocab_size", asked.vocab_size, stored.vocab_size, folder);

  ModelConfig resolved = stored;
  resolved.init_from = folder;
  resolved.init_std = asked.init_std;
  resolved.recompute = asked.recompute;  // how to train, not what the folder holds
  // The load-balancing loss is how to train too, but the Hub's config.json
  // says it (Note [load-balancing loss]): the folder's unless the config gives it.
  if (config.given.count("model.output_router_logits") > 0) resolved.output_router_logits = asked.output_router_logits;
  if (config.given.count("model.router_aux_loss_coef") > 0) resolved.router_aux_loss_coef = asked.router_aux_loss_coef;
  // Shapes only: this model's storage is allocated but never touched. The
  // folder holds the vocabulary before it grows.
  LocalLayerFactory factory;
  const LlamaForCausalLM expected(resolved, factory);
  verify_weights(expected, files);
  resolved.vocab_size = vocab_size;
  resolved.resize_vocab = asked.resize_vocab;
  config.model = resolved;
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
