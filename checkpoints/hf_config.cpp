#include "checkpoints/hf_config.h"

#include <cmath>
#include <vector>

#include "util/error.h"

namespace loom {

namespace {

using nlohmann::json;

class Reader {
 public:
  Reader(const json& hf, const std::string& source) : hf_(hf), source_(source) {}

  bool has(const char* key) const { return hf_.contains(key) && !hf_.at(key).is_null(); }

  int64_t integer(const char* key, std::optional<int64_t> fallback = std::nullopt) const {
    if (!has(key)) {
      if (fallback) return *fallback;
      fail(key, "is missing", "an integer");
    }
    const json& v = hf_.at(key);
    if (!v.is_number_integer()) fail(key, "is " + v.dump(), "an integer");
    return v.get<int64_t>();
  }
  double number(const char* key, double fallback) const { return number_in(hf_, key, fallback); }
  double number_in(const json& obj, const char* key, double fallback) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    const json& v = obj.at(key);
    if (!v.is_number()) fail(key, "is " + v.dump(), "a number");
    return v.get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = hf_.at(key);
    if (!v.is_boolean()) fail(key, "is " + v.dump(), "true or false");
    return v.get<bool>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = hf_.at(key);
    if (!v.is_string()) fail(key, "is " + v.dump(), "a string");
    return v.get<std::string>();
  }
  // bos/eos may be an int, a list of ints (the first is used) or null.
  int64_t token_id(const char* key) const {
    if (!has(key)) return -1;
    const json& v = hf_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_array() && !v.empty() && v.at(0).is_number_integer()) return v.at(0).get<int64_t>();
    fail(key, "is " + v.dump(), "an integer, a list of integers or null");
  }
  [[noreturn]] void fail(const std::string& key, const std::string& what, const std::string& expected) const {
    throw BadInput(source_ + ": " + key + " " + what + " (expected " + expected + ")");
  }

  const json& hf_;
  const std::string& source_;
};

// SmolLM3's no_rope_layers: one entry per layer, 1 where the layer uses
// rotary and 0 where it does not; absent, every no_rope_layer_interval-th
// layer (the 4th, 8th, ... by default) goes without, as transformers fills it.
std::vector<int64_t> nope_layers_from_hf(const Reader& r, const json& hf, int64_t num_layers) {
  std::vector<int64_t> nope;
  if (!r.has("no_rope_layers")) {
    const int64_t interval = r.integer("no_rope_layer_interval", 4);
    if (interval <= 0) r.fail("no_rope_layer_interval", "is " + std::to_string(interval), "a positive integer");
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      if ((layer + 1) % interval == 0) nope.push_back(layer);
    }
    return nope;
  }
  const json& flags = hf.at("no_rope_layers");
  const std::string expected = "a list of " + std::to_string(num_layers) + " entries of 0 or 1, one per layer";
  if (!flags.is_array() || static_cast<int64_t>(flags.size()) != num_layers) {
    r.fail("no_rope_layers", "is " + flags.dump(), expected);
  }
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const json& flag = flags.at(static_cast<size_t>(layer));
    if (!flag.is_number_integer() || (flag.get<int64_t>() != 0 && flag.get<int64_t>() != 1)) {
      r.fail("no_rope_layers", "is " + flags.dump(), expected);
    }
    if (flag.get<int64_t>() == 0) nope.push_back(layer);
  }
  return nope;
}

// The config's layer_types (one per layer: full_attention or
// sliding_attention) into m.layer_types; false when it has none.
bool read_layer_types(const Reader& r, const json& hf, ModelConfig& m) {
  if (!r.has("layer_types")) return false;
  const json& types = hf.at("layer_types");
  if (!types.is_array()) r.fail("layer_types", "is " + types.dump(), "a list of full_attention or sliding_attention");
  for (const json& type : types) {
    if (!type.is_string()) r.fail("layer_types", "is " + types.dump(), "a list of full_attention or sliding_attention");
    m.layer_types.push_back(type.get<std::string>());
  }
  return true;
}

// The window and where it applies. Mistral: sliding_window on every layer.
// Qwen2, Qwen3, SmolLM3: only with use_sliding_window, on the layers
// layer_types names, or (written by older transformers, without
// layer_types) Qwen's layers from max_window_layers on and SmolLM3's
// layers without rotary, as transformers fills them in.
void read_sliding_window(const Reader& r, const json& hf, ModelConfig& m) {
  if (m.architecture == "phi3" || m.architecture == "mixtral") {
    // Phi-3's and Mixtral's window, when they have one, is on every layer
    // (Phi-3-mini-4k: 2047; Mixtral's configs write null).
    if (r.has("sliding_window")) m.sliding_window = r.integer("sliding_window");
    return;
  }
  if (m.architecture == "mistral") {
    m.sliding_window = r.integer("sliding_window");
    if (m.sliding_window <= 0) r.fail("sliding_window", "is " + std::to_string(m.sliding_window), "a positive integer or null");
    return;
  }
  if (m.architecture == "qwen2_moe" || m.architecture == "qwen3_moe") {
    if (r.boolean("use_sliding_window", false)) r.fail("use_sliding_window", "is true", "false for " + m.architecture);
    return;
  }
  const bool qwen = m.architecture == "qwen2" || m.architecture == "qwen3";
  if (!(qwen || m.architecture == "smollm3") || !r.boolean("use_sliding_window", false)) return;
  m.sliding_window = r.integer("sliding_window");
  if (m.sliding_window <= 0) r.fail("sliding_window", "is " + std::to_string(m.sliding_window), "a positive integer");
  if (read_layer_types(r, hf, m)) return;
  const int64_t first_window_layer = qwen ? r.integer("max_window_layers", m.num_layers) : 0;
  for (int64_t layer = 0; layer < m.num_layers; ++layer) {
    const bool sliding = qwen ? layer >= first_window_layer : !m.uses_rotary(layer);
    m.layer_types.push_back(sliding ? "sliding_attention" : "full_attention");
  }
}

// The Hub's names of each family: model_type is loom's architecture.
const char* hf_class_name(const std::string& architecture) {
  if (architecture == "qwen2") return "Qwen2ForCausalLM";
  if (architecture == "qwen3") return "Qwen3ForCausalLM";
  if (architecture == "olmo2") return "Olmo2ForCausalLM";
  if (architecture == "smollm3") return "SmolLM3ForCausalLM";
  if (architecture == "mistral") return "MistralForCausalLM";
  if (architecture == "phi3") return "Phi3ForCausalLM";
  if (architecture == "gemma") return "GemmaForCausalLM";
  if (architecture == "gemma2") return "Gemma2ForCausalLM";
  if (architecture == "gemma3_text") return "Gemma3ForCausalLM";
  if (architecture == "mixtral") return "MixtralForCausalLM";
  if (architecture == "qwen2_moe") return "Qwen2MoeForCausalLM";
  if (architecture == "qwen3_moe") return "Qwen3MoeForCausalLM";
  return "LlamaForCausalLM";
}

// A soft-capping value: null or absent is none (0).
double softcap(const Reader& r, const char* key) {
  const double cap = r.number(key, 0.0);
  if (cap < 0) r.fail(key, "is " + std::to_string(cap), "a positive number or null");
  return cap;
}

// Gemma 2 and 3: the window on the layers layer_types names, or (written
// without it) transformers' own pattern: every second layer for Gemma 2,
// all but every sixth for Gemma 3.
void read_gemma_window(const Reader& r, const json& hf, ModelConfig& m) {
  if (!r.has("sliding_window")) return;
  m.sliding_window = r.integer("sliding_window");
  if (m.sliding_window <= 0) r.fail("sliding_window", "is " + std::to_string(m.sliding_window), "a positive integer");
  if (read_layer_types(r, hf, m)) return;
  const int64_t pattern = m.architecture == "gemma2" ? 2 : r.integer("sliding_window_pattern", 6);
  for (int64_t layer = 0; layer < m.num_layers; ++layer) {
    m.layer_types.push_back((layer + 1) % pattern != 0 ? "sliding_attention" : "full_attention");
  }
}

// The gemma families' own keys (Note [model families]).
void read_gemma(const Reader& r, const json& hf, ModelConfig& m) {
  // Gemma 1 names the activation hidden_act, Gemma 2 and 3 hidden_activation.
  const char* act_key = m.architecture == "gemma" || !r.has("hidden_activation") ? "hidden_act" : "hidden_activation";
  m.hidden_act = r.string(act_key, "gelu_pytorch_tanh");
  if (m.hidden_act != "gelu_pytorch_tanh" && m.hidden_act != "gelu") {
    r.fail(act_key, "is '" + m.hidden_act + "'", "gelu_pytorch_tanh or gelu");
  }
  if (r.boolean("use_bidirectional_attention", false)) {
    r.fail("use_bidirectional_attention", "is true", "false: loom trains causal language models");
  }
  m.tie_embeddings = r.boolean("tie_word_embeddings", true);
  if (m.architecture == "gemma") return;
  m.query_pre_attn_scalar = r.number("query_pre_attn_scalar", 256.0);
  m.attn_logit_softcapping = softcap(r, "attn_logit_softcapping");
  m.final_logit_softcapping = softcap(r, "final_logit_softcapping");
  read_gemma_window(r, hf, m);
}

// Note [mixture of experts] in model/moe.h: the experts and their router,
// with transformers' defaults for absent keys. Mixtral names the count
// num_local_experts, the Qwen families num_experts (transformers 5 writes
// Qwen3-MoE's as num_local_experts too).
void read_experts(const Reader& r, const json& hf, ModelConfig& m) {
  const bool mixtral = m.architecture == "mixtral", qwen2_moe = m.architecture == "qwen2_moe";
  const char* count_key = mixtral || !r.has("num_experts") ? "num_local_experts" : "num_experts";
  m.num_experts = r.integer(count_key, mixtral ? 8 : (qwen2_moe ? 60 : 128));
  m.num_experts_per_tok = r.integer("num_experts_per_tok", mixtral ? 2 : (qwen2_moe ? 4 : 8));
  m.router_aux_loss_coef = r.number("router_aux_loss_coef", 0.001);
  // Training adds the load-balancing loss with it (Note [load-balancing loss]).
  m.output_router_logits = r.boolean("output_router_logits", false);
  if (mixtral) {
    if (r.number("router_jitter_noise", 0.0) != 0.0) {
      r.fail("router_jitter_noise", "is " + hf.at("router_jitter_noise").dump(), "0: loom routes without noise");
    }
    return;
  }
  m.moe_intermediate_size = r.integer("moe_intermediate_size", qwen2_moe ? 1408 : 768);
  if (qwen2_moe) {
    m.shared_expert_intermediate_size = r.integer("shared_expert_intermediate_size", 5632);
    if (!r.boolean("qkv_bias", true)) r.fail("qkv_bias", "is false", "true: loom's qwen2_moe has q/k/v biases");
  }
  m.norm_topk_prob = r.boolean("norm_topk_prob", false);
  m.decoder_sparse_step = r.integer("decoder_sparse_step", 1);
  if (m.decoder_sparse_step <= 0) {
    r.fail("decoder_sparse_step", "is " + std::to_string(m.decoder_sparse_step), "a positive integer");
  }
  if (r.has("mlp_only_layers")) {
    const json& layers = hf.at("mlp_only_layers");
    if (!layers.is_array()) r.fail("mlp_only_layers", "is " + layers.dump(), "a list of layer numbers");
    for (const json& layer : layers) {
      if (!layer.is_number_integer()) r.fail("mlp_only_layers", "is " + layers.dump(), "a list of layer numbers");
      m.mlp_only_layers.push_back(layer.get<int64_t>());
    }
  }
}

}  // namespace

ModelConfig model_config_from_hf(const json& hf, const std::string& source) {
  if (!hf.is_object()) throw BadInput(source + ": not a JSON object");
  Reader r(hf, source);
  ModelConfig m;
  const std::string model_type = r.string("model_type", "");
  if (model_type == "llama") {
    m.architecture = "llama";
  } else if (model_type == "mistral") {
    // Mistral is Llama-shaped apart from sliding-window attention on every
    // layer; without a window it is exactly a Llama model.
    if (r.has("layer_types")) r.fail("layer_types", "is set", "absent: Mistral's window applies to every layer");
    m.architecture = r.has("sliding_window") ? "mistral" : "llama";
  } else if (model_type == "qwen2" || model_type == "qwen3" || model_type == "smollm3" || model_type == "mixtral" ||
             model_type == "qwen2_moe" || model_type == "qwen3_moe") {
    m.architecture = model_type;
  } else if (model_type == "olmo2" || model_type == "gemma" || model_type == "gemma2" ||
             model_type == "gemma3_text" || model_type == "phi3") {
    m.architecture = model_type;
  } else {
    r.fail("model_type", "is '" + model_type + "'",
           "llama, mistral, qwen2, qwen3, olmo2, smollm3, gemma, gemma2, gemma3_text (Gemma 3's text model), phi3, "
           "mixtral, qwen2_moe or qwen3_moe");
  }
  if (!m.gemma()) {
    const std::string act = r.string("hidden_act", "silu");
    if (act != "silu") r.fail("hidden_act", "is '" + act + "'", "silu");
  }

  m.hidden_size = r.integer("hidden_size");
  m.intermediate_size = r.integer("intermediate_size");
  m.num_layers = r.integer("num_hidden_layers");
  m.num_heads = r.integer("num_attention_heads");
  m.num_kv_heads = r.integer("num_key_value_heads", m.num_heads);
  if (m.num_heads <= 0) r.fail("num_attention_heads", "is " + std::to_string(m.num_heads), "a positive integer");
  m.head_dim = r.integer("head_dim", m.hidden_size / m.num_heads);
  m.vocab_size = r.integer("vocab_size");
  m.max_seq_len = r.integer("max_position_embeddings", 2048);
  m.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  m.tie_embeddings = r.boolean("tie_word_embeddings", false);
  // Qwen2's biases are fixed (q/k/v), Mistral has none; the others read
  // attention_bias (all four projections), and llama and smollm3 mlp_bias.
  if (!m.qwen2_biases() && m.architecture != "mistral" && m.architecture != "phi3" && m.architecture != "mixtral") {
    m.attention_bias = r.boolean("attention_bias", false);
  }
  if (m.architecture == "llama" || m.architecture == "smollm3") m.mlp_bias = r.boolean("mlp_bias", false);
  if (m.architecture == "smollm3") m.nope_layers = nope_layers_from_hf(r, hf, m.num_layers);
  if (m.moe()) read_experts(r, hf, m);
  if (m.gemma()) {
    read_gemma(r, hf, m);
  } else {
    read_sliding_window(r, hf, m);
  }
  m.init_std = r.number("initializer_range", 0.02);
  m.bos_token_id = r.token_id("bos_token_id");
  m.eos_token_id = r.token_id("eos_token_id");

  // RoPE: transformers 5 nests everything in rope_parameters; 4.x has
  // rope_theta at the top and an optional rope_scaling dict. When both are
  // present (loom writes both) they agree; rope_scaling wins as in 5.x.
  json rope = json::object();
  if (r.has("rope_parameters")) rope = hf.at("rope_parameters");
  if (r.has("rope_scaling")) rope = hf.at("rope_scaling");
  if (!rope.is_object()) r.fail("rope_parameters", "is " + rope.dump(), "an object");
  double default_theta = 10000.0;
  if (m.architecture == "gemma3_text") {
    // One rope per layer type: transformers 5 nests them; 4.x has the
    // global one at the top and rope_local_base_freq. The sliding layers'
    // rope is unscaled.
    json local = json::object();
    if (r.has("rope_parameters") && hf.at("rope_parameters").contains("full_attention")) {
      const json& nested = hf.at("rope_parameters");
      local = nested.contains("sliding_attention") ? nested.at("sliding_attention") : json::object();
      rope = nested.at("full_attention");
      if (r.has("rope_scaling")) rope.update(hf.at("rope_scaling"));
    }
    if (!rope.is_object() || !local.is_object()) {
      r.fail("rope_parameters", "is " + hf.at("rope_parameters").dump(), "full_attention and sliding_attention objects");
    }
    const std::string local_type = local.contains("rope_type") ? local.at("rope_type").dump() : "\"default\"";
    if (local_type != "\"default\"") {
      r.fail("rope_parameters.sliding_attention.rope_type", "is " + local_type, "default");
    }
    m.rope_local_theta = r.number_in(local, "rope_theta", r.number("rope_local_base_freq", 10000.0));
    default_theta = 1000000.0;
    if (!r.has("sliding_window")) r.fail("sliding_window", "is missing", "the sliding layers' window");
  }
  m.rope_theta = r.number_in(rope, "rope_theta", r.number("rope_theta", default_theta));
  std::string rope_type = "default";
  if (rope.contains("rope_type") && rope.at("rope_type").is_string()) {
    rope_type = rope.at("rope_type").get<std::string>();
  } else if (rope.contains("type") && rope.at("type").is_string()) {
    rope_type = rope.at("type").get<std::string>();
  }
  if (rope_type == "su") rope_type = "longrope";  // Phi-3's first name for it
  if (rope.contains("partial_rotary_factor") && r.number_in(rope, "partial_rotary_factor", 1.0) != 1.0) {
    r.fail("rope_parameters.partial_rotary_factor", "is " + rope.at("partial_rotary_factor").dump(),
           "1: loom rotates every dim of a head");
  }
  if (r.number("partial_rotary_factor", 1.0) != 1.0) {  // Phi-4-mini keeps it at the top level
    r.fail("partial_rotary_factor", "is " + hf.at("partial_rotary_factor").dump(), "1: loom rotates every dim of a head");
  }
  RopeScalingConfig& scaling = m.rope_scaling;
  if (rope_type == "default") {
    scaling.type = "none";
  } else if (rope_type == "llama3" || rope_type == "linear" || rope_type == "yarn" || rope_type == "dynamic" ||
             rope_type == "longrope") {
    scaling.type = rope_type;
    // The pretraining context: Phi-3 keeps it at the top level, which wins
    // in transformers; else the rope dict's, else max_position_embeddings.
    const double context = r.number("original_max_position_embeddings",
                                    r.number_in(rope, "original_max_position_embeddings", static_cast<double>(m.max_seq_len)));
    scaling.original_max_position_embeddings = static_cast<int64_t>(context);
    // yarn and longrope without a factor: the ratio of the two contexts.
    const bool derived_factor = rope_type == "yarn" || rope_type == "longrope";
    scaling.factor = r.number_in(rope, "factor", derived_factor ? static_cast<double>(m.max_seq_len) / context : 1.0);
    if (rope_type == "llama3") {
      scaling.low_freq_factor = r.number_in(rope, "low_freq_factor", 1.0);
      scaling.high_freq_factor = r.number_in(rope, "high_freq_factor", 4.0);
    }
    if (rope_type == "yarn" || rope_type == "longrope") scaling.attention_factor = r.number_in(rope, "attention_factor", 0.0);
    if (rope_type == "yarn") {
      // transformers takes a missing or zero beta as its default.
      scaling.beta_fast = r.number_in(rope, "beta_fast", 0.0);
      if (scaling.beta_fast == 0) scaling.beta_fast = 32.0;
      scaling.beta_slow = r.number_in(rope, "beta_slow", 0.0);
      if (scaling.beta_slow == 0) scaling.beta_slow = 1.0;
      scaling.mscale = r.number_in(rope, "mscale", 0.0);
      scaling.mscale_all_dim = r.number_in(rope, "mscale_all_dim", 0.0);
      if (rope.contains("truncate") && !rope.at("truncate").is_null()) {
        if (!rope.at("truncate").is_boolean()) r.fail("rope_parameters.truncate", "is " + rope.at("truncate").dump(), "true or false");
        scaling.truncate = rope.at("truncate").get<bool>();
      }
    }
    if (rope_type == "longrope") {
      const size_t half = static_cast<size_t>(m.head_dim / 2);
      for (const char* key : {"short_factor", "long_factor"}) {
        const json list = rope.contains(key) ? rope.at(key) : json();
        std::vector<double>& out = std::string(key) == "short_factor" ? scaling.short_factor : scaling.long_factor;
        if (!list.is_array() || list.size() != half) {
          r.fail(std::string("rope_parameters.") + key, "is " + list.dump(),
                 "a list of head_dim / 2 = " + std::to_string(half) + " numbers");
        }
        for (const json& value : list) {
          if (!value.is_number()) r.fail(std::string("rope_parameters.") + key, "is " + list.dump(), "numbers");
          out.push_back(value.get<double>());
        }
      }
    }
  } else {
    r.fail("rope_scaling.rope_type", "is '" + rope_type + "'", "default, linear, llama3, yarn, dynamic or longrope");
  }
  validate_model_config(m, source);
  return m;
}

nlohmann::ordered_json model_config_to_hf(const ModelConfig& m, const std::string& dtype) {
  using ojson = nlohmann::ordered_json;
  const bool qwen2 = m.qwen2_biases();
  ojson rope_scaling = nullptr;
  ojson rope_parameters = {{"rope_type", "default"}, {"rope_theta", m.rope_theta}};
  const RopeScalingConfig& scaling = m.rope_scaling;
  if (scaling.type != "none") {
    rope_scaling = {{"rope_type", scaling.type}, {"factor", scaling.factor}};
    if (scaling.type == "llama3") {
      rope_scaling["low_freq_factor"] = scaling.low_freq_factor;
      rope_scaling["high_freq_factor"] = scaling.high_freq_factor;
    }
    if (scaling.type == "llama3" || scaling.type == "yarn" || scaling.type == "longrope") {
      rope_scaling["original_max_position_embeddings"] = scaling.original_max_position_embeddings;
    }
    if ((scaling.type == "yarn" || scaling.type == "longrope") && scaling.attention_factor > 0) {
      rope_scaling["attention_factor"] = scaling.attention_factor;
    }
    if (scaling.type == "yarn") {
      rope_scaling["beta_fast"] = scaling.beta_fast;
      rope_scaling["beta_slow"] = scaling.beta_slow;
      if (scaling.mscale != 0) rope_scaling["mscale"] = scaling.mscale;
      if (scaling.mscale_all_dim != 0) rope_scaling["mscale_all_dim"] = scaling.mscale_all_dim;
      rope_scaling["truncate"] = scaling.truncate;
    }
    if (scaling.type == "longrope") {
      rope_scaling["short_factor"] = scaling.short_factor;
      rope_scaling["long_factor"] = scaling.long_factor;
    }
    rope_parameters = rope_scaling;
    rope_parameters["rope_theta"] = m.rope_theta;
  }
  auto token = [](int64_t id) { return id >= 0 ? ojson(id) : ojson(nullptr); };
  ojson hf;
  hf["architectures"] = {hf_class_name(m.architecture)};
  hf["model_type"] = m.architecture;
  hf["vocab_size"] = m.vocab_size;
  hf["hidden_size"] = m.hidden_size;
  hf["intermediate_size"] = m.intermediate_size;
  hf["num_hidden_layers"] = m.num_layers;
  hf["num_attention_heads"] = m.num_heads;
  hf["num_key_value_heads"] = m.kv_heads();
  hf["head_dim"] = m.head_size();
  hf["hidden_act"] = m.activation();
  if (m.architecture == "gemma2" || m.architecture == "gemma3_text") hf["hidden_activation"] = m.activation();
  hf["max_position_embeddings"] = m.max_seq_len;
  hf["initializer_range"] = m.init_std;
  hf["rms_norm_eps"] = m.rms_norm_eps;
  hf["rope_theta"] = m.rope_theta;
  hf["rope_scaling"] = rope_scaling;
  if (m.architecture == "gemma3_text") {
    // transformers 5's nesting by layer type; 4.x reads rope_local_base_freq.
    hf["rope_local_base_freq"] = m.rope_local_theta;
    hf["rope_parameters"] = {{"full_attention", rope_parameters},
                             {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", m.rope_local_theta}}}};
  } else {
    hf["rope_parameters"] = rope_parameters;
  }
  if (!qwen2) hf["attention_bias"] = m.attention_bias;
  if (m.architecture == "llama" || m.architecture == "smollm3") hf["mlp_bias"] = m.mlp_bias;
  if (m.architecture == "mistral" || m.architecture == "phi3" || m.architecture == "mixtral") {
    hf["sliding_window"] = m.sliding_window > 0 ? ojson(m.sliding_window) : ojson(nullptr);
  }
  if (m.architecture == "phi3") {
    // Phi3Config's own original_max_position_embeddings (default 4096) wins
    // over the rope dict's in transformers.
    const bool scaled = scaling.type == "llama3" || scaling.type == "yarn" || scaling.type == "longrope";
    hf["original_max_position_embeddings"] = scaled ? scaling.original_max_position_embeddings : m.max_seq_len;
  }
  if (m.architecture == "qwen2" || m.architecture == "qwen3" || m.architecture == "smollm3") {
    const bool windowed = m.sliding_window > 0;
    hf["use_sliding_window"] = windowed;
    hf["sliding_window"] = windowed ? ojson(m.sliding_window) : ojson(nullptr);
    if (windowed) {
      ojson types = ojson::array();
      int64_t first_window_layer = m.num_layers;
      for (int64_t layer = m.num_layers - 1; layer >= 0; --layer) {
        if (m.window_of(layer) > 0) first_window_layer = layer;
      }
      for (int64_t layer = 0; layer < m.num_layers; ++layer) {
        types.push_back(m.window_of(layer) > 0 ? "sliding_attention" : "full_attention");
      }
      // transformers 5 reads layer_types; max_window_layers is what 4.x reads.
      if (m.architecture != "smollm3") hf["max_window_layers"] = first_window_layer;
      hf["layer_types"] = types;
    }
  }
  if (m.gemma() && m.architecture != "gemma") {
    const auto cap = [](double value) { return value > 0 ? ojson(value) : ojson(nullptr); };
    // An int in transformers' (strict) Gemma configs.
    const double scalar = m.query_pre_attn_scalar > 0 ? m.query_pre_attn_scalar : static_cast<double>(m.head_size());
    hf["query_pre_attn_scalar"] = scalar == std::floor(scalar) ? ojson(static_cast<int64_t>(scalar)) : ojson(scalar);
    hf["attn_logit_softcapping"] = cap(m.attn_logit_softcapping);
    hf["final_logit_softcapping"] = cap(m.final_logit_softcapping);
    hf["sliding_window"] = m.sliding_window > 0 ? ojson(m.sliding_window) : ojson(nullptr);
    ojson types = ojson::array();
    for (int64_t layer = 0; layer < m.num_layers; ++layer) {
      types.push_back(m.window_of(layer) > 0 ? "sliding_attention" : "full_attention");
    }
    hf["layer_types"] = types;
  }
  if (m.moe()) {
    hf[m.architecture == "mixtral" ? "num_local_experts" : "num_experts"] = m.num_experts;
    hf["num_experts_per_tok"] = m.num_experts_per_tok;
    if (m.architecture == "mixtral") {
      hf["router_jitter_noise"] = 0.0;
    } else {
      hf["moe_intermediate_size"] = m.moe_intermediate_size;
      if (m.architecture == "qwen2_moe") {
        hf["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size;
        hf["qkv_bias"] = true;
      }
      hf["norm_topk_prob"] = m.norm_topk_prob;
      hf["decoder_sparse_step"] = m.decoder_sparse_step;
      hf["mlp_only_layers"] = m.mlp_only_layers;
      hf["use_sliding_window"] = false;
    }
    hf["router_aux_loss_coef"] = m.router_aux_loss_coef;
    hf["output_router_logits"] = m.output_router_logits;
  }
  if (m.architecture == "smollm3") {
    ojson flags = ojson::array();
    for (int64_t layer = 0; layer < m.num_layers; ++layer) flags.push_back(m.uses_rotary(layer) ? 1 : 0);
    hf["no_rope_layers"] = flags;
  }
  hf["attention_dropout"] = 0.0;
  hf["tie_word_embeddings"] = m.tie_embeddings;
  hf["bos_token_id"] = token(m.bos_token_id);
  hf["eos_token_id"] = token(m.eos_token_id);
  // loom keeps no padding token. Written as null so that a family's own
  // default (SmolLM3's 128004, OLMo2's 1) does not name a row a smaller
  // vocabulary lacks; generation_config.json keeps the base model's.
  hf["pad_token_id"] = nullptr;
  hf["use_cache"] = true;
  hf["torch_dtype"] = dtype;
  hf["dtype"] = dtype;
  return hf;
}

nlohmann::ordered_json generation_config_to_hf(const ModelConfig& m) {
  nlohmann::ordered_json g = nlohmann::ordered_json::object();
  if (m.bos_token_id >= 0) g["bos_token_id"] = m.bos_token_id;
  if (m.eos_token_id >= 0) g["eos_token_id"] = m.eos_token_id;
  return g;
}

}  // namespace loom
