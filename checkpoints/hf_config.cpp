#include "checkpoints/hf_config.h"

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

}  // namespace

ModelConfig model_config_from_hf(const json& hf, const std::string& source) {
  if (!hf.is_object()) throw BadInput(source + ": not a JSON object");
  Reader r(hf, source);
  ModelConfig m;
  const std::string model_type = r.string("model_type", "");
  if (model_type == "llama") {
    m.architecture = "llama";
  } else if (model_type == "mistral") {
    // Mistral is Llama-shaped apart from sliding-window attention; without a
    // window it is exactly a Llama model.
    if (r.has("sliding_window")) {
      r.fail("sliding_window", "is " + hf.at("sliding_window").dump(), "null: loom has no sliding-window attention");
    }
    m.architecture = "llama";
  } else if (model_type == "qwen2") {
    if (r.boolean("use_sliding_window", false)) {
      r.fail("use_sliding_window", "is true", "false: loom has no sliding-window attention");
    }
    m.architecture = "qwen2";
  } else {
    r.fail("model_type", "is '" + model_type + "'", "llama, mistral or qwen2");
  }
  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", "is '" + act + "'", "silu");

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
  if (m.architecture == "llama") {
    m.attention_bias = r.boolean("attention_bias", false);
    m.mlp_bias = r.boolean("mlp_bias", false);
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
  m.rope_theta = r.number_in(rope, "rope_theta", r.number("rope_theta", 10000.0));
  std::string rope_type = "default";
  if (rope.contains("rope_type") && rope.at("rope_type").is_string()) {
    rope_type = rope.at("rope_type").get<std::string>();
  } else if (rope.contains("type") && rope.at("type").is_string()) {
    rope_type = rope.at("type").get<std::string>();
  }
  if (rope_type == "default") {
    m.rope_scaling.type = "none";
  } else if (rope_type == "llama3" || rope_type == "linear") {
    m.rope_scaling.type = rope_type;
    m.rope_scaling.factor = r.number_in(rope, "factor", 1.0);
    if (rope_type == "llama3") {
      m.rope_scaling.low_freq_factor = r.number_in(rope, "low_freq_factor", 1.0);
      m.rope_scaling.high_freq_factor = r.number_in(rope, "high_freq_factor", 4.0);
      m.rope_scaling.original_max_position_embeddings =
          static_cast<int64_t>(r.number_in(rope, "original_max_position_embeddings", static_cast<double>(m.max_seq_len)));
    }
  } else {
    r.fail("rope_scaling.rope_type", "is '" + rope_type + "'", "default, linear or llama3");
  }
  validate_model_config(m, source);
  return m;
}

nlohmann::ordered_json model_config_to_hf(const ModelConfig& m, const std::string& dtype) {
  using ojson = nlohmann::ordered_json;
  const bool qwen2 = m.architecture == "qwen2";
  ojson rope_scaling = nullptr;
  ojson rope_parameters = {{"rope_type", "default"}, {"rope_theta", m.rope_theta}};
  if (m.rope_scaling.type != "none") {
    rope_scaling = {{"rope_type", m.rope_scaling.type}, {"factor", m.rope_scaling.factor}};
    if (m.rope_scaling.type == "llama3") {
      rope_scaling["low_freq_factor"] = m.rope_scaling.low_freq_factor;
      rope_scaling["high_freq_factor"] = m.rope_scaling.high_freq_factor;
      rope_scaling["original_max_position_embeddings"] = m.rope_scaling.original_max_position_embeddings;
    }
    rope_parameters = rope_scaling;
    rope_parameters["rope_theta"] = m.rope_theta;
  }
  auto token = [](int64_t id) { return id >= 0 ? ojson(id) : ojson(nullptr); };
  ojson hf;
  hf["architectures"] = {qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"};
  hf["model_type"] = qwen2 ? "qwen2" : "llama";
  hf["vocab_size"] = m.vocab_size;
  hf["hidden_size"] = m.hidden_size;
  hf["intermediate_size"] = m.intermediate_size;
  hf["num_hidden_layers"] = m.num_layers;
  hf["num_attention_heads"] = m.num_heads;
  hf["num_key_value_heads"] = m.kv_heads();
  hf["head_dim"] = m.head_size();
  hf["hidden_act"] = "silu";
  hf["max_position_embeddings"] = m.max_seq_len;
  hf["initializer_range"] = m.init_std;
  hf["rms_norm_eps"] = m.rms_norm_eps;
  hf["rope_theta"] = m.rope_theta;
  hf["rope_scaling"] = rope_scaling;
  hf["rope_parameters"] = rope_parameters;
  if (qwen2) {
    hf["use_sliding_window"] = false;
    hf["sliding_window"] = nullptr;
  } else {
    hf["attention_bias"] = m.attention_bias;
    hf["mlp_bias"] = m.mlp_bias;
  }
  hf["attention_dropout"] = 0.0;
  hf["tie_word_embeddings"] = m.tie_embeddings;
  hf["bos_token_id"] = token(m.bos_token_id);
  hf["eos_token_id"] = token(m.eos_token_id);
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
