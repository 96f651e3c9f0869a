// One conversation of `loom prepare --chat` -> its token ids and loss mask
// (docs/data.md, "Chat data").
//
// The ids are exactly those of transformers'
// tokenizer.apply_chat_template(messages, tokenize=True): the template's text
// (data/chat_template.h) encoded without special tokens added. The loss mask
// is 1 on every token an assistant turn adds after the generation prompt
// (its end-of-turn token included), 0 elsewhere (Note [Assistant spans] in
// data/chat_encoding.cpp).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string_view>
#include <vector>

#include "data/chat_template.h"
#include "data/tokenizer.h"

namespace loom {

struct ChatDocument {
  std::vector<int32_t> ids;
  std::vector<uint8_t> loss_mask;  // one per id: 1 = an assistant token (a target of the loss)
};

// The messages of one JSONL line {"messages": [{"role": ..., "content": ...},
// ...]}, as transformers hands them to the template: keys whose value is
// null dropped, a message's reasoning (reasoning_content, thinking or
// reasoning) also given as "thinking" and "reasoning_content". BadInput
// (without a location: the caller adds file and line) when the line is not a
// JSON object, has no non-empty "messages" list, or a message is not an
// object with a string "role".
nlohmann::ordered_json parse_conversation(std::string_view line);

// Renders and tokenizes `messages` and marks the assistant tokens. BadInput
// (without a location) when the template fails, when its rendering is not
// prefix-stable where an assistant span must be found, or when the tokens do
// not spell the rendered text (a tokenizer that drops or absorbs characters).
ChatDocument encode_conversation(const ChatTemplate& chat_template, const Tokenizer& tokenizer,
                                 const nlohmann::ordered_json& messages);

}  // namespace loom
