// Hugging Face `config.json` <-> loom's ModelConfig, for the model families
// of Note [model families] in config/model_config.h (model_type llama,
// mistral without a sliding window, qwen2, qwen3, olmo2, smollm3).
//
// Written so that old and new transformers read it: rope_theta and
// rope_scaling at the top level (what 4.x reads) and rope_parameters (what
// 5.x reads); both torch_dtype (before 4.56) and dtype. Reading accepts
// either form.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "config/config.h"

namespace loom {

// Parses config.json's object; `source` (the file path) names errors.
// Throws BadInput for unsupported architectures or missing/invalid fields.
ModelConfig model_config_from_hf(const nlohmann::json& hf, const std::string& source);

// `dtype` is the transformers name of the stored weights ("float32", "bfloat16").
nlohmann::ordered_json model_config_to_hf(const ModelConfig& model, const std::string& dtype);

// generation_config.json: bos/eos ids where known.
nlohmann::ordered_json generation_config_to_hf(const ModelConfig& model);

}  // namespace loom
