// YAML -> Config: walk the file and the --set overrides key by key through the
// schema table (config_schema.cpp), then validate the whole config once.
//
// Note [where a value came from]: every key that is set records its origin
// (file:line:col, or the --set argument). Validation runs after all overrides,
// so a check that involves several keys blames the one set last: the override
// that broke a valid file, or the later of two lines in the file.
#include "config/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <initializer_list>
#include <map>
#include <sstream>

#include "config/config_compose.h"
#include "config/config_schema.h"
#include "util/error.h"

namespace loom {
namespace {

using config_schema::fail;
using config_schema::find_key;
using config_schema::KeySpec;
using config_schema::Origin;

// Where each key was set (Note [where a value came from]).
class Origins {
 public:
  explicit Origins(std::string source) : source_(std::move(source)) {}

  void record(const std::string& key, std::string where) { by_key_[key] = {std::move(where), next_order_++}; }
  // Drops the origins of `prefix` and its keys (a map that replaces a whole
  // setting, such as model.rope_scaling, resets the keys it leaves out).
  void forget(const std::string& prefix) {
    for (auto it = by_key_.begin(); it != by_key_.end();) {
      it = it->first == prefix || it->first.starts_with(prefix + ".") ? by_key_.erase(it) : std::next(it);
    }
  }
  // key -> where, for every key set (ConfigOrigins).
  ConfigOrigins all() const {
    ConfigOrigins out;
    for (const auto& [key, entry] : by_key_) out[key] = entry.where;
    return out;
  }
  bool was_set(const std::string& key) const { return by_key_.count(key) > 0; }
  // The key's origin. A key left at its default is placed at its section
  // ("model:") when the file has one, else at the source as a whole.
  std::string where(std::string key) const {
    for (;;) {
      if (auto it = by_key_.find(key); it != by_key_.end()) return it->second.where;
      size_t dot = key.rfind('.');
      if (dot == std::string::npos) return source_;
      key.resize(dot);
    }
  }
  // Of `keys`, the one set last; the first when none was set.
  std::string_view latest(std::initializer_list<std::string_view> keys) const {
    std::string_view best = *keys.begin();
    int64_t best_order = -1;
    for (std::string_view key : keys) {
      auto it = by_key_.find(std::string(key));
      if (it != by_key_.end() && it->second.order > best_order) best = key, best_order = it->second.order;
    }
    return best;
  }

 private:
  struct Entry {
    std::string where;
    int64_t order;
  };
  std::string source_;
  std::map<std::string, Entry> by_key_;
  int64_t next_order_ = 0;
};

std::string trim(std::string_view text) {
  size_t begin = text.find_first_not_of(" \t");
  size_t end = text.find_last_not_of(" \t");
  return begin == std::string_view::npos ? std::string() : std::string(text.substr(begin, end - begin + 1));
}

// --- reading -------------------------------------------------------------------

class Loader {
 public:
  Loader(Config& config, Origins& origins, std::string source)
      : config_(config), origins_(origins), source_(std::move(source)) {}

  // One file of the base: chain (its top-level `base` key was read by
  // config_compose and is not a config key).
  void apply_document(const YAML::Node& root) {
    Origin origin{source_, ""};
    if (!root.IsMap())
      fail(origin.of(root), "(top level)", "wrong type", describe(root), "a map of sections such as run:, model:");
    apply_map(root, "", origin);
  }

  // "a.b.c=value": the value is YAML, so lists and maps work too.
  void apply_override(const std::string& argument) {
    Origin origin{source_, "--set " + argument};
    size_t equals = argument.find('=');
    std::string key = trim(std::string_view(argument).substr(0, equals));
    if (equals == std::string::npos || key.empty())
      fail(origin.override_arg, key.empty() ? "(no key)" : key, "malformed override", argument,
           "key=value, e.g. --set run.name=test");
    std::string text = argument.substr(equals + 1);
    YAML::Node value;
    try {
      value = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      fail(origin.override_arg, key, "value is not valid YAML: " + e.msg, text);
    }
    // One environment variable at a time: --set launch.env.OMP_NUM_THREADS=1.
    const std::string env_prefix = "launch.env.";
    if (key.starts_with(env_prefix) && key.size() > env_prefix.size()) {
      if (!value.IsNull() && !value.IsScalar())
        fail(origin.override_arg, key, "wrong type", describe(value), "a string");
      config_compose::interpolate_node(value, key, origin);
      config_.launch.env[key.substr(env_prefix.size())] = value.IsNull() ? "" : value.Scalar();
      origins_.record("launch.env", origin.override_arg);
      return;
    }
    apply_key(std::string(config_schema::canonical_key(key)), YAML::Node(), value, origin);
  }

 private:
  static std::string describe(const YAML::Node& node) { return config_schema::describe_node(node); }

  void apply_map(const YAML::Node& map, const std::string& prefix, const Origin& origin) {
    std::map<std::string, YAML::Mark> seen;  // yaml-cpp keeps repeated keys: refuse them here
    for (const auto& kv : map) {
      const YAML::Node& key_node = kv.first;
      if (!key_node.IsScalar())
        fail(origin.of(key_node), prefix.empty() ? "(top level)" : prefix, "a key must be a plain name",
             describe(key_node));
      if (prefix.empty() && key_node.Scalar() == "base") continue;  // read by config_compose
      std::string key = prefix.empty() ? key_node.Scalar() : prefix + "." + key_node.Scalar();
      std::string canonical(config_schema::canonical_key(key));
      auto [first, inserted] = seen.emplace(canonical, key_node.Mark());
      if (!inserted)
        fail(origin.of(key_node), key, "key given twice in the same map", "",
             "each key once; the first is at line " + std::to_string(first->second.line + 1));
      apply_key(canonical, key_node, kv.second, origin);
    }
  }

  void apply_key(const std::string& key, const YAML::Node& key_node, const YAML::Node& value, const Origin& origin) {
    std::string key_where = origin.of(key_node.IsDefined() ? key_node : value);
    if (key == "model.rope_scaling") return apply_rope_scaling(key_node, value, origin);
    if (config_schema::is_section(key)) {
      origins_.record(key, key_where);
      if (value.IsMap()) return apply_map(value, key, origin);
      if (value.IsNull()) return;  // a section whose keys are all commented out
      fail(key_where, key, "a section must be a map", describe(value), "a map of " + key + ".* keys");
    }
    const KeySpec* spec = find_key(key);
    if (spec == nullptr) fail(key_where, key, "unknown key" + config_schema::suggest_for_unknown(key));
    config_compose::interpolate_node(value, spec->key, origin);
    config_schema::set_field(config_, *spec, value, origin.of(value, key_node), origin);
    origins_.record(spec->key, key_where);
  }

  // null or `none`, or a map whose keys replace the whole previous setting.
  void apply_rope_scaling(const YAML::Node& key_node, const YAML::Node& value, const Origin& origin) {
    const std::string key = "model.rope_scaling";
    std::string key_where = origin.of(key_node.IsDefined() ? key_node : value);
    config_.model.rope_scaling = RopeScalingConfig{};
    origins_.forget(key);
    origins_.record(key, key_where);
    if (value.IsNull() || (value.IsScalar() && value.Scalar() == "none")) return;
    if (!value.IsMap()) fail(key_where, key, "wrong type", describe(value), "null, none, or a map with a type key");
    if (!value["type"] && !value["rope_type"])
      fail(key_where, key + ".type", "missing key in model.rope_scaling", "",
           "type: none, llama3, linear, yarn, dynamic or longrope");
    apply_map(value, key, origin);
  }

  Config& config_;
  Origins& origins_;
  std::string source_;
};

// --- validation ----------------------------------------------------------------

// a * b without overflow: user input may be as large as int64 allows.
int64_t product(int64_t a, int64_t b) {
  int64_t result = 0;
  return __builtin_mul_overflow(a, b, &result) ? INT64_MAX : result;
}

std::string num(int64_t value) { return std::to_string(value); }
std::string num(double value) { return config_schema::format_number(value); }

class Validator {
 public:
  Validator(const Config& config, const Origins& origins) : c_(config), origins_(origins) {}

  // Types were checked while reading; here: ranges, allowed values, required keys.
  void check_keys(std::string_view prefix) {
    bool shape_from_hub = !c_.model.init_from.empty();
    for (const KeySpec& spec : config_schema::key_specs()) {
      if (!spec.key.starts_with(prefix) || spec.is_section()) continue;
      std::vector<double> values = config_schema::numeric_values(c_, spec);
      if (spec.required() && values == std::vector<double>{0} && !origins_.was_set(spec.key)) {
        if (shape_from_hub) continue;  // model.init_from's config.json supplies it
        fail(origins_.where(spec.key), spec.key, "missing required key", "",
             "a positive integer, or model.init_from naming a Hugging Face folder to take the shape from");
      }
      for (double value : values) {
        if (!spec.bounds.contains(value))
          fail(origins_.where(spec.key), spec.key, "out of range", config_schema::format_value(c_, spec),
               spec.bounds.describe());
      }
      if (!spec.choices.empty()) {
        std::string value = config_schema::format_value(c_, spec);
        if (std::find(spec.choices.begin(), spec.choices.end(), value) == spec.choices.end()) {
          std::string allowed;
          for (const std::string& choice : spec.choices) allowed += (allowed.empty() ? "" : ", ") + choice;
          fail(origins_.where(spec.key), spec.key, "not an allowed value", value, "one of " + allowed);
        }
      }
    }
  }

  void check_model() {
    const ModelConfig& m = c_.model;
    if (m.num_heads > 0 && m.num_kv_heads > 0 && m.num_heads % m.num_kv_heads != 0)
      fail_at(
          {"model.num_kv_heads", "model.num_heads"},
          "model.num_kv_heads (" + num(m.num_kv_heads) + ") does not divide model.num_heads (" + num(m.num_heads) + ")",
          "num_heads a multiple of num_kv_heads: each kv head serves a group of query heads");
    if (m.head_dim == 0 && m.num_heads > 0 && m.hidden_size > 0 && m.hidden_size % m.num_heads != 0)
      fail_at({"model.hidden_size", "model.num_heads"},
              "model.hidden_size (" + num(m.hidden_size) + ") is not divisible by model.num_heads (" +
                  num(m.num_heads) + ")",
              "a multiple of num_heads, or model.head_dim set explicitly");
    // transformers' LlamaConfig (and Gemma2Config) refuse a config.json whose
    // hidden_size is not a multiple of num_attention_heads, head_dim given or
    // not: the run's Hub export would not load.
    if ((m.architecture == "llama" || m.architecture == "gemma2") && m.head_dim > 0 && m.num_heads > 0 &&
        m.hidden_size > 0 && m.hidden_size % m.num_heads != 0)
      fail_at({"model.hidden_size", "model.num_heads", "model.head_dim"},
              "model.hidden_size (" + num(m.hidden_size) + ") is not divisible by model.num_heads (" +
                  num(m.num_heads) + ") for architecture " + m.architecture,
              "a multiple of num_heads, even with model.head_dim set: transformers refuses other " + m.architecture +
                  " configs, so the Hub export would not load");
    // Qwen2's modules have fixed biases (q/k/v yes, o and MLP no); a flag the
    // Hub format cannot express would make an export transformers misreads.
    if (m.qwen2_biases() && (m.mlp_bias || m.attention_bias))
      fail_at({m.mlp_bias ? "model.mlp_bias" : "model.attention_bias", "model.architecture"},
              std::string(m.mlp_bias ? "model.mlp_bias" : "model.attention_bias") + " is true for architecture " +
                  m.architecture,
              "false: " + m.architecture + " always has q/k/v biases and no others");
    if ((m.architecture == "mistral" || m.architecture == "phi3" || m.architecture == "mixtral") &&
        (m.mlp_bias || m.attention_bias))
      fail_at({m.mlp_bias ? "model.mlp_bias" : "model.attention_bias", "model.architecture"},
              std::string(m.mlp_bias ? "model.mlp_bias" : "model.attention_bias") + " is true for architecture " +
                  m.architecture,
              "false: " + m.architecture + " has no biases");
    // Qwen3's and OLMo2's MLPs have no bias in the Hub format either.
    if ((m.architecture == "qwen3" || m.architecture == "olmo2" || m.moe()) && m.mlp_bias)
      fail_at({"model.mlp_bias", "model.architecture"}, "model.mlp_bias is true for architecture " + m.architecture,
              "false: " + m.architecture + " has no MLP biases");
    if (!m.nope_layers.empty() && m.architecture != "smollm3")
      fail_at({"model.nope_layers", "model.architecture"},
              "model.nope_layers is set for architecture " + m.architecture,
              "an empty list: only smollm3 has layers without rotary (HF no_rope_layers)");
    for (int64_t layer : m.nope_layers) {
      if (m.num_layers > 0 && layer >= m.num_layers)
        fail_at({"model.nope_layers", "model.num_layers"},
                "model.nope_layers names layer " + num(layer) + " of a model of " + num(m.num_layers) + " layers",
                "layer numbers below model.num_layers");
    }
    check_sliding_window(m);
    check_gemma(m);
    check_experts(m);
    const RopeScalingConfig& rope = m.rope_scaling;
    if (rope.type == "llama3" || rope.type == "linear" || rope.type == "yarn" || rope.type == "dynamic") {
      if (rope.factor < 1)
        fail_at({"model.rope_scaling.factor", "model.rope_scaling.type"},
                "model.rope_scaling.factor (" + num(rope.factor) + ") is below 1 for " + rope.type + " scaling",
                ">= 1: scaling stretches the context, never shrinks it");
    }
    // transformers' Phi3Config takes no other scaling: it renames yarn (and
    // su) to longrope, and refuses the rest, so the export would not load.
    if (m.architecture == "phi3" && rope.type != "none" && rope.type != "longrope")
      fail_at({"model.rope_scaling.type", "model.architecture"},
              "model.rope_scaling.type is " + rope.type + " for architecture phi3",
              "none or longrope: transformers' Phi3Config reads no other scaling, so the Hub export would not load");
    if (rope.type == "longrope") {
      const int64_t half = m.head_dim > 0 ? m.head_dim / 2 : (m.num_heads > 0 ? m.hidden_size / m.num_heads / 2 : 0);
      for (auto [key, factors] : {std::pair{"model.rope_scaling.short_factor", &rope.short_factor},
                                  {"model.rope_scaling.long_factor", &rope.long_factor}}) {
        if (half > 0 && static_cast<int64_t>(factors->size()) != half)
          fail_at({key, "model.head_dim"},
                  std::string(key) + " has " + num(static_cast<int64_t>(factors->size())) + " entries",
                  "head_dim / 2 = " + num(half) + ", one per rotary frequency");
      }
    }
    if (rope.type == "llama3" && !(rope.high_freq_factor > rope.low_freq_factor))
      fail_at({"model.rope_scaling.high_freq_factor", "model.rope_scaling.low_freq_factor"},
              "model.rope_scaling.high_freq_factor (" + num(rope.high_freq_factor) +
                  ") is not above model.rope_scaling.low_freq_factor (" + num(rope.low_freq_factor) + ")",
              "high_freq_factor > low_freq_factor");
    for (auto [key, id] : {std::pair{"model.bos_token_id", m.bos_token_id}, {"model.eos_token_id", m.eos_token_id}}) {
      if (m.vocab_size > 0 && id >= m.vocab_size)
        fail_at({key, "model.vocab_size"},
                std::string(key) + " (" + num(id) + ") is outside model.vocab_size (" + num(m.vocab_size) + ")",
                "a token id below vocab_size, or -1");
    }
  }

  // Only the families whose Hub config can say where the window applies.
  void check_sliding_window(const ModelConfig& m) {
    const bool has_window = m.sliding_window > 0;
    const std::string& arch = m.architecture;
    if (has_window && arch != "mistral" && arch != "qwen2" && arch != "qwen3" && arch != "smollm3" && arch != "gemma2" &&
        arch != "gemma3_text" && arch != "phi3" && arch != "mixtral")
      fail_at({"model.sliding_window", "model.architecture"},
              "model.sliding_window is " + num(m.sliding_window) + " for architecture " + arch,
              "0, or architecture mistral, qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3 or mixtral (whose Hub config "
              "has a window)");
    if (m.layer_types.empty()) return;
    if (!has_window)
      fail_at({"model.layer_types", "model.sliding_window"}, "model.layer_types is set without model.sliding_window",
              "an empty list, or model.sliding_window > 0");
    if (arch == "mistral" || arch == "phi3" || arch == "mixtral")
      fail_at({"model.layer_types", "model.architecture"}, "model.layer_types is set for architecture " + arch,
              "an empty list: " + arch + "'s window applies to every layer");
    if (m.num_layers > 0 && static_cast<int64_t>(m.layer_types.size()) != m.num_layers)
      fail_at({"model.layer_types", "model.num_layers"},
              "model.layer_types has " + num(static_cast<int64_t>(m.layer_types.size())) + " entries for " +
                  num(m.num_layers) + " layers",
              "one entry per layer");
    for (const std::string& type : m.layer_types) {
      if (type != "full_attention" && type != "sliding_attention")
        fail_at({"model.layer_types"}, "model.layer_types has an unknown entry", type,
                "full_attention or sliding_attention");
    }
  }

  // Note [mixture of experts] in model/moe.h: what the MoE families' Hub configs can say.
  void check_experts(const ModelConfig& m) {
    const std::string& arch = m.architecture;
    if (!m.moe()) {
      for (auto [key, value] : {std::pair{"model.num_experts", m.num_experts},
                                {"model.num_experts_per_tok", m.num_experts_per_tok},
                                {"model.moe_intermediate_size", m.moe_intermediate_size},
                                {"model.shared_expert_intermediate_size", m.shared_expert_intermediate_size}}) {
        if (value > 0)
          fail_at({key, "model.architecture"}, std::string(key) + " is set for architecture " + arch,
                  "0, or architecture mixtral, qwen2_moe or qwen3_moe");
      }
      if (!m.mlp_only_layers.empty())
        fail_at({"model.mlp_only_layers", "model.architecture"}, "model.mlp_only_layers is set for architecture " + arch,
                "an empty list: only qwen2_moe and qwen3_moe have dense layers among sparse ones");
      if (m.output_router_logits)
        fail_at({"model.output_router_logits", "model.architecture"},
                "model.output_router_logits is set for architecture " + arch + ", which has no router",
                "false, or architecture mixtral, qwen2_moe or qwen3_moe");
      return;
    }
    // model.init_from's config.json supplies whatever the YAML leaves at 0.
    const bool from_folder = !m.init_from.empty();
    if (m.num_experts <= 0 && !from_folder)
      fail_at({"model.num_experts", "model.architecture"}, "model.num_experts is 0 for architecture " + arch,
              "the number of experts (HF num_local_experts or num_experts), or model.init_from");
    if ((m.num_experts_per_tok <= 0 && !from_folder) || (m.num_experts > 0 && m.num_experts_per_tok > m.num_experts))
      fail_at({"model.num_experts_per_tok", "model.num_experts"},
              "model.num_experts_per_tok is " + num(m.num_experts_per_tok) + " for " + num(m.num_experts) + " experts",
              "between 1 and model.num_experts");
    if (arch != "mixtral" && m.moe_intermediate_size <= 0 && !from_folder)
      fail_at({"model.moe_intermediate_size", "model.architecture"},
              "model.moe_intermediate_size is " + num(m.moe_intermediate_size) + " for architecture " + arch,
              "a positive width of one expert");
    if (arch == "mixtral" && m.moe_intermediate_size > 0)
      fail_at({"model.moe_intermediate_size", "model.architecture"}, "model.moe_intermediate_size is set for mixtral",
              "0: mixtral's experts are model.intermediate_size wide");
    if (arch == "qwen2_moe" && m.shared_expert_intermediate_size <= 0 && !from_folder)
      fail_at({"model.shared_expert_intermediate_size", "model.architecture"},
              "model.shared_expert_intermediate_size is " + num(m.shared_expert_intermediate_size) + " for qwen2_moe",
              "a positive width: every qwen2_moe sparse layer has a shared expert");
    if (arch != "qwen2_moe" && m.shared_expert_intermediate_size > 0)
      fail_at({"model.shared_expert_intermediate_size", "model.architecture"},
              "model.shared_expert_intermediate_size is set for architecture " + arch,
              "0: only qwen2_moe has a shared expert");
    if (arch == "mixtral" && (m.norm_topk_prob || m.decoder_sparse_step != 1 || !m.mlp_only_layers.empty()))
      fail_at({"model.architecture"}, "model.norm_topk_prob, decoder_sparse_step or mlp_only_layers is set for mixtral",
              "their defaults: every mixtral layer is sparse and renormalizes its top-k weights");
    for (int64_t layer : m.mlp_only_layers) {
      if (m.num_layers > 0 && layer >= m.num_layers)
        fail_at({"model.mlp_only_layers", "model.num_layers"},
                "model.mlp_only_layers names layer " + num(layer) + " of a model of " + num(m.num_layers) + " layers",
                "layer numbers below model.num_layers");
    }
  }

  // What only the gemma families' Hub configs can say.
  void check_gemma(const ModelConfig& m) {
    if (!m.hidden_act.empty() && (m.hidden_act != "silu") != m.gemma())
      fail_at({"model.hidden_act", "model.architecture"},
              "model.hidden_act is " + m.hidden_act + " for architecture " + m.architecture,
              m.gemma() ? "gelu_pytorch_tanh or gelu: the gemma families' MLP is GeGLU" : "silu, or \"\"");
    if (m.gemma() && m.mlp_bias)
      fail_at({"model.mlp_bias", "model.architecture"}, "model.mlp_bias is true for architecture " + m.architecture,
              "false: gemma has no MLP biases");
    const bool gemma2_or_3 = m.architecture == "gemma2" || m.architecture == "gemma3_text";
    for (auto [key, value] : {std::pair{"model.attn_logit_softcapping", m.attn_logit_softcapping},
                              {"model.final_logit_softcapping", m.final_logit_softcapping},
                              {"model.query_pre_attn_scalar", m.query_pre_attn_scalar}}) {
      if (value > 0 && !gemma2_or_3)
        fail_at({key, "model.architecture"}, std::string(key) + " is set for architecture " + m.architecture,
                "0: only gemma2 and gemma3_text have it");
    }
    if (m.rope_local_theta > 0 && m.architecture != "gemma3_text")
      fail_at({"model.rope_local_theta", "model.architecture"},
              "model.rope_local_theta is set for architecture " + m.architecture, "0: only gemma3_text has it");
  }

  void check_run_and_training() {
    const std::string& name = c_.run.name;
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
      fail_at({"run.name"}, "not a plain folder name", name.empty() ? "\"\"" : name, "a name without '/', e.g. tiny");
    if (c_.run.output_dir.empty()) fail_at({"run.output_dir"}, "empty folder", "\"\"", "a folder, e.g. runs");

    const ParallelConfig& p = c_.parallel;
    const ModelConfig& m = c_.model;
    // The initializer fills every norm weight with 1 by name; a gemma norm
    // stores 1 + w and would start at 2.
    if (m.gemma() && m.init_from.empty())
      fail_at({"model.architecture", "model.init_from"},
              "architecture " + m.architecture + " is not initialized at random",
              "model.init_from naming a Hugging Face folder of the model");
    for (auto [key, heads] : {std::pair{"model.num_heads", m.num_heads}, {"model.num_kv_heads", m.num_kv_heads}}) {
      if (heads > 0 && heads % p.tp != 0)
        fail_at({"parallel.tp", key},
                "parallel.tp (" + num(p.tp) + ") does not divide " + key + " (" + num(heads) + ")",
                "tp dividing the attention heads, so that each tp rank holds whole heads");
    }
    if (m.num_layers > 0 && product(p.pp, p.virtual_stages) > m.num_layers) {
      std::string stages = p.virtual_stages == 1
                               ? "parallel.pp (" + num(p.pp) + ")"
                               : "parallel.pp (" + num(p.pp) + ") * parallel.virtual_stages (" + num(p.virtual_stages) +
                                     ") = " + num(product(p.pp, p.virtual_stages));
      fail_at({"parallel.pp", "parallel.virtual_stages", "model.num_layers"},
              stages + " > model.num_layers (" + num(m.num_layers) + ")", "at least one layer per pipeline stage");
    }
    if (p.virtual_stages > 1 && p.pp_schedule != "interleaved")
      fail_at({"parallel.virtual_stages", "parallel.pp_schedule"},
              "parallel.virtual_stages (" + num(p.virtual_stages) + ") > 1 needs parallel.pp_schedule interleaved",
              p.pp_schedule, "parallel.pp_schedule: interleaved, or virtual_stages: 1");
    if (p.pp_schedule == "interleaved" && p.virtual_stages < 2)
      fail_at({"parallel.pp_schedule", "parallel.virtual_stages"}, "interleaved needs parallel.virtual_stages >= 2",
              num(p.virtual_stages), "virtual_stages >= 2, or pp_schedule: 1f1b");
    if (p.sequence_parallel && p.tp < 2)
      fail_at({"parallel.sequence_parallel", "parallel.tp"}, "sequence parallelism needs parallel.tp > 1",
              "tp " + num(p.tp), "parallel.tp >= 2, or sequence_parallel: false");
    if (p.cp > 1) check_context_parallel();
    if (p.ep > 1) check_expert_parallel();

    if (c_.data.seq_len > m.max_seq_len)
      fail_at({"data.seq_len", "model.max_seq_len"},
              "data.seq_len (" + num(c_.data.seq_len) + ") > model.max_seq_len (" + num(m.max_seq_len) + ")",
              "sequences no longer than the model is built for");

    const BatchConfig& b = c_.batch;
    if (b.global_batch_size > 0) {
      int64_t per_step = p.dp > 0 ? product(b.micro_batch_size, p.dp) : b.micro_batch_size;
      if (b.global_batch_size % per_step != 0) {
        std::string divisor = p.dp > 0 ? "batch.micro_batch_size (" + num(b.micro_batch_size) + ") * parallel.dp (" +
                                             num(p.dp) + ") = " + num(per_step)
                                       : "batch.micro_batch_size (" + num(b.micro_batch_size) + ")";
        fail_at({"batch.global_batch_size", "batch.micro_batch_size", "parallel.dp"},
                "batch.global_batch_size (" + num(b.global_batch_size) + ") is not a multiple of " + divisor,
                "a whole number of micro-batches per data-parallel rank");
      }
    }

    const ScheduleConfig& s = c_.schedule;
    if (s.train_steps > 0 && s.warmup_steps > s.train_steps)
      fail_at({"schedule.warmup_steps", "schedule.train_steps"},
              "schedule.warmup_steps (" + num(s.warmup_steps) + ") > schedule.train_steps (" + num(s.train_steps) + ")",
              "warmup_steps <= train_steps");
    // A window past the last step would profile nothing and say nothing.
    // (Written without start_step + steps, which could overflow.)
    const ProfileConfig& prof = c_.profile;
    if (prof.start_step > 0 && s.train_steps > 0 && prof.start_step > s.train_steps - prof.steps + 1)
      fail_at({"profile.start_step", "profile.steps", "schedule.train_steps"},
              "profile.start_step (" + num(prof.start_step) + ") + profile.steps (" + num(prof.steps) +
                  ") - 1 > schedule.train_steps (" + num(s.train_steps) + ")",
              "profiled steps within the run's steps");
    if (c_.checkpoint.resume.empty())
      fail_at({"checkpoint.resume"}, "empty", "\"\"", "auto, none or a checkpoint folder");
    const OptimizerConfig& o = c_.optimizer;
    if (o.loss_spike_policy != "none" && !(o.loss_spike_factor > 1))
      fail_at({"optimizer.loss_spike_factor", "optimizer.loss_spike_policy"},
              "optimizer.loss_spike_factor (" + num(o.loss_spike_factor) + ") is not above 1",
              "> 1: a loss above the running mean itself is no spike");
    if (o.loss_spike_policy == "rollback" && !c_.checkpoint.enabled)
      fail_at({"optimizer.loss_spike_policy", "checkpoint.enabled"},
              "optimizer.loss_spike_policy rollback needs checkpoints", "checkpoint.enabled false",
              "checkpoint.enabled: true, or loss_spike_policy: skip");
  }

  // The split parallel.cp > 1 needs (parallel/context_parallel.h, Note
  // [zig-zag chunks]).
  void check_context_parallel() {
    const ParallelConfig& p = c_.parallel;
    const ModelConfig& m = c_.model;
    const int64_t seq_len = c_.data.seq_len > 0 ? c_.data.seq_len : m.max_seq_len;
    if (seq_len > 0 && seq_len % product(2, p.cp) != 0)
      fail_at({"parallel.cp", "data.seq_len"},
              "the sequence length (" + num(seq_len) + ") is not divisible by 2 * parallel.cp (" +
                  num(product(2, p.cp)) + ")",
              "a seq_len divisible by 2 * cp: each cp rank holds two of 2 * cp equal chunks");
  }

  // What parallel.ep > 1 needs and does not compose with yet
  // (parallel/expert_parallel.h); ep | dp is checked with the world size
  // (ParallelDims::from_config), dp being possibly auto here.
  void check_expert_parallel() {
    const ParallelConfig& p = c_.parallel;
    const ModelConfig& m = c_.model;
    const std::string ep = "parallel.ep " + num(p.ep);
    if (m.num_experts == 0 && m.init_from.empty())
      fail_at({"parallel.ep", "model.architecture"}, "parallel.ep needs a mixture of experts",
              ep + " with architecture " + m.architecture, "parallel.ep: 1, or architecture mixtral, qwen2_moe or qwen3_moe");
    if (m.num_experts > 0 && m.num_experts % p.ep != 0)
      fail_at({"parallel.ep", "model.num_experts"},
              "parallel.ep (" + num(p.ep) + ") does not divide model.num_experts (" + num(m.num_experts) + ")",
              ep, "an ep that divides the number of experts: each ep rank holds num_experts / ep of them");
    if (p.dp > 0 && p.dp % p.ep != 0)
      fail_at({"parallel.ep", "parallel.dp"},
              "parallel.ep (" + num(p.ep) + ") does not divide parallel.dp (" + num(p.dp) + ")", ep,
              "an ep that divides dp: expert parallelism is carved out of the data-parallel ranks");
  }

  void check_launch() {
    const LaunchConfig& l = c_.launch;
    const ParallelConfig& p = c_.parallel;
    int64_t tp_pp = product(product(p.tp, p.pp), p.cp);
    const std::string cp = p.cp > 1 ? " * parallel.cp (" + num(p.cp) + ")" : "";
    if (p.dp > 0 && product(p.dp, tp_pp) != l.ranks)
      fail_at({"launch.ranks", "parallel.dp", "parallel.tp", "parallel.pp", "parallel.cp"},
              "parallel.dp (" + num(p.dp) + ")" + cp + " * parallel.tp (" + num(p.tp) + ") * parallel.pp (" +
                  num(p.pp) + ") = " + num(product(p.dp, tp_pp)) + " != launch.ranks (" + num(l.ranks) + ")",
              p.cp > 1 ? "launch.ranks = dp * cp * tp * pp, or parallel.dp: auto"
                       : "launch.ranks = dp * tp * pp, or parallel.dp: auto");
    // With dp auto, launch.ranks is not held against tp * pp here: `loom train`
    // started by a foreign mpirun takes its world size from MPI, and
    // ParallelDims checks world % (tp * pp) at start-up.
    if (l.procs_per_node > 0 && product(l.procs_per_node, l.nodes) != l.ranks)
      fail_at({"launch.procs_per_node", "launch.nodes", "launch.ranks"},
              "launch.procs_per_node (" + num(l.procs_per_node) + ") * launch.nodes (" + num(l.nodes) +
                  ") = " + num(product(l.procs_per_node, l.nodes)) + " != launch.ranks (" + num(l.ranks) + ")",
              "procs_per_node * nodes = ranks");
    if (l.procs_per_node == 0 && l.ranks % l.nodes != 0)
      fail_at({"launch.nodes", "launch.ranks"},
              "launch.ranks (" + num(l.ranks) + ") is not a multiple of launch.nodes (" + num(l.nodes) + ")",
              "the same number of ranks on every node");
    for (const auto& [name, value] : l.env) {
      bool valid = !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0]));
      for (char ch : name) valid = valid && (std::isalnum(static_cast<unsigned char>(ch)) || ch == '_');
      if (!valid)
        fail_at({"launch.env"}, "not an environment variable name", name,
                "letters, digits and _, e.g. OMP_NUM_THREADS");
    }
  }

 private:
  // Blames the key of `keys` set last (Note [where a value came from]).
  [[noreturn]] void fail_at(std::initializer_list<std::string_view> keys, const std::string& what,
                            const std::string& expected) {
    fail_at(keys, what, "", expected);
  }
  [[noreturn]] void fail_at(std::initializer_list<std::string_view> keys, const std::string& what,
                            const std::string& got, const std::string& expected) {
    std::string key(origins_.latest(keys));
    fail(origins_.where(key), key, what, got, expected);
  }

  const Config& c_;
  const Origins& origins_;
};

void validate(const Config& config, const Origins& origins) {
  Validator validator(config, origins);
  validator.check_keys("");
  validator.check_model();
  validator.check_run_and_training();
  validator.check_launch();
}

}  // namespace

// --- public API -------------------------------------------------------------------

namespace {

// Applies the documents of a base: chain in order, then the overrides, and
// validates the result once (Note [where a value came from]).
Config compose(const std::vector<config_compose::Document>& chain, const std::string& source_name,
               const std::vector<std::string>& overrides, ConfigOrigins* origins_out) {
  Config config;
  Origins origins(source_name);
  for (const config_compose::Document& document : chain) {
    if (document.root.IsNull())
      throw BadInput(document.source + ": empty config (expected a map of sections such as run:, model:)");
    Loader(config, origins, document.source).apply_document(document.root);
    if (&document != &chain.back()) config.base_files.push_back(document.source);
  }
  Loader loader(config, origins, source_name);
  for (const std::string& argument : overrides) loader.apply_override(argument);
  validate(config, origins);
  for (const auto& [key, where] : origins.all()) config.given.insert(key);
  if (origins_out != nullptr) *origins_out = origins.all();
  return config;
}

}  // namespace

Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides, ConfigOrigins* origins) {
  return compose(config_compose::chain_from_text(yaml_text, source_name), source_name, overrides, origins);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides, ConfigOrigins* origins) {
  Config config = compose(config_compose::load_chain(path), path, overrides, origins);
  config.source_path = path;
  return config;
}

void validate_model_config(const ModelConfig& model, const std::string& source_name) {
  Config config;
  config.model = model;
  Origins origins(source_name);  // no key has a line: messages name the source
  Validator validator(config, origins);
  validator.check_keys("model.");
  validator.check_model();
}

// Where `key` came from for config_to_yaml's comments: its own origin, the
// model.rope_scaling setting that reset it, or "default".
std::string origin_of(const ConfigOrigins& origins, const std::string& key) {
  if (auto it = origins.find(key); it != origins.end()) return it->second;
  const std::string rope = "model.rope_scaling";
  if (key.starts_with(rope + ".")) {
    if (auto it = origins.find(rope); it != origins.end()) return it->second;
  }
  return "default";
}

std::string config_to_yaml(const Config& config, const ConfigOrigins* origins) {
  YAML::Emitter out;
  out << YAML::Comment(origins == nullptr
                           ? "loom config: every key, defaults filled in (docs/configuration.md)"
                           : "loom config: every key, each with where its value came from: file:line:column, "
                             "--set, or default");
  out << YAML::BeginMap;
  // Keys of a section are contiguous in the table: open and close maps as the
  // dotted prefix changes.
  std::vector<std::string> open;
  for (const KeySpec& spec : config_schema::key_specs()) {
    if (spec.is_section()) continue;
    std::vector<std::string> parts;
    for (size_t begin = 0, dot = 0; dot != std::string::npos; begin = dot + 1) {
      dot = spec.key.find('.', begin);
      parts.push_back(spec.key.substr(begin, dot == std::string::npos ? dot : dot - begin));
    }
    size_t common = 0;
    while (common < open.size() && common + 1 < parts.size() && open[common] == parts[common]) ++common;
    for (; open.size() > common; open.pop_back()) out << YAML::EndMap;
    for (; open.size() + 1 < parts.size(); open.push_back(parts[open.size()]))
      out << YAML::Key << parts[open.size()] << YAML::Value << YAML::BeginMap;
    out << YAML::Key << parts.back() << YAML::Value;
    config_schema::emit_value(out, config, spec);
    if (origins != nullptr) out << YAML::Comment(origin_of(*origins, spec.key));
  }
  for (; !open.empty(); open.pop_back()) out << YAML::EndMap;
  out << YAML::EndMap;
  if (!out.good()) throw std::logic_error("config_to_yaml: " + out.GetLastError());
  return std::string(out.c_str()) + "\n";
}

}  // namespace loom
