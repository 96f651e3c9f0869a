// Reading a tokenizer.json: field access whose every failure is BadInput
// "<file>: <where>: <what>", shared by the parsers of the tokenizer's parts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>

#include "data/text_unicode.h"

namespace loom::tokenization {

// Ids beyond this are refused: the id -> token tables are dense (4 bytes per
// id each, so a stray huge id costs at most ~34 MB), and the largest
// published vocabularies have ~260k tokens.
inline constexpr int64_t kMaxTokenId = (int64_t{1} << 22) - 1;

// A token id in [0, kMaxTokenId].
int32_t json_token_id(const nlohmann::json& value, const std::string& where, const std::string& file);
// Every failure is BadInput "<file>: <where>: <what>"; `where` is the JSON
// path ("model.vocab", "pre_tokenizer.pretokenizers[1]").
[[noreturn]] void json_fail(const std::string& file, const std::string& where, const std::string& what);
// `object[key]`; fails when `object` is not an object or has no `key`.
const nlohmann::json& json_field(const nlohmann::json& object, const char* key, const std::string& where,
                                 const std::string& file);
std::string json_string(const nlohmann::json& object, const char* key, const std::string& where,
                        const std::string& file);
// `fallback` when the key is absent or null.
bool json_bool(const nlohmann::json& object, const char* key, bool fallback, const std::string& where,
               const std::string& file);
// `object[key]`, which must be a list.
const nlohmann::json& json_list(const nlohmann::json& object, const char* key, const std::string& where,
                                const std::string& file);
// `object[key]`, which must be one character (a Rust `char` field).
std::string json_char(const nlohmann::json& object, const char* key, const std::string& where,
                      const std::string& file);
// The `pattern` of a Split, Replace or decoder Replace: {"String": text}
// (matched literally) or {"Regex": pattern}.
Regex json_pattern(const nlohmann::json& object, const std::string& where, const std::string& file);
// Text from an untrusted file, capped for messages.
std::string clip(std::string_view text, size_t max_chars = 120);
std::string json_preview(const nlohmann::json& value);

}  // namespace loom::tokenization
