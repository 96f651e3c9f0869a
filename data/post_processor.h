// The post-processor of a tokenizer.json, reduced to what it does to one
// sequence encoded with add_special_tokens: the ids it puts before and after
// it (Llama-3's TemplateProcessing puts <|begin_of_text|> before; Roberta-
// and BertProcessing put cls before and sep after; ByteLevel only trims
// offsets and adds nothing). Sequence applies each in turn.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace loom::tokenization {

struct SpecialTokenFrame {
  std::vector<int32_t> before;
  std::vector<int32_t> after;
};

// Throws BadInput naming `file` and the JSON path for a post-processor loom
// does not read, or a template that does not hold sequence A exactly once.
SpecialTokenFrame parse_post_processor(const nlohmann::json& spec, const std::string& file);

}  // namespace loom::tokenization
