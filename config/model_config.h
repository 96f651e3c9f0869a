// The model's shape (model.* in the config): what the model folder builds
// from. Torch-free, so that config/, the checkpoint readers, the fuzzers and
// `loom plan` speak of a model without libtorch.
#pragma once

#include <cstdint>
#include <string>

namespace loom {

struct RopeScalingConfig {
  std::string type = "none";  // none | llama3 | linear
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture = "llama";  // llama | qwen2 (qwen2: q/k/v biases)
  int64_t hidden_size = 0;             // required
  int64_t intermediate_size = 0;       // required
  int64_t num_layers = 0;              // required
  int64_t num_heads = 0;               // required
  int64_t num_kv_heads = 0;            // 0 -> num_heads
  int64_t head_dim = 0;                // 0 -> hidden_size / num_heads
  int64_t vocab_size = 0;              // required
  int64_t max_seq_len = 2048;          // tokens
  double rope_theta = 10000.0;
  RopeScalingConfig rope_scaling;
  double rms_norm_eps = 1e-5;
  bool tie_embeddings = false;
  bool attention_bias = false;  // llama: bias on q/k/v/o; qwen2 always has q/k/v bias
  bool mlp_bias = false;
  double init_std = 0.02;
  std::string init_from;        // Hugging Face folder to start from ("" = random init)
  int64_t bos_token_id = -1;    // -1 = none
  int64_t eos_token_id = -1;    // -1 = none
  // Grow the embedding and head of model.init_from to this many rows (new
  // tokens of a fine-tune); new rows start at the mean of the old ones.
  // 0 = keep the vocabulary.
  int64_t resize_vocab = 0;
  // Activation recomputation: none keeps every layer's activations for
  // backward; full keeps only each decoder layer's input and recomputes the
  // layer during backward (less memory, one more forward). Not in config.json.
  std::string recompute = "none";  // none | full

  // Resolved values (after defaults): never 0.
  int64_t kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_heads; }
  bool qkv_bias() const { return architecture == "qwen2" || attention_bias; }
  bool o_bias() const { return architecture != "qwen2" && attention_bias; }
};

}  // namespace loom
