#include "data/tokenizer_json.h"

#include <nlohmann/json.hpp>

#include "util/error.h"

namespace loom::tokenization {

using nlohmann::json;

int32_t json_token_id(const json& value, const std::string& where, const std::string& file) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > kMaxTokenId)
    json_fail(file, where, "expected a token id in [0, " + std::to_string(kMaxTokenId) + "], found " +
                               json_preview(value));
  return static_cast<int32_t>(value.get<int64_t>());
}

void json_fail(const std::string& file, const std::string& where, const std::string& what) {
  throw BadInput(file + ": " + (where.empty() ? "" : where + ": ") + what);
}

const json& json_field(const json& object, const char* key, const std::string& where, const std::string& file) {
  if (!object.is_object()) json_fail(file, where, "expected an object, found " + json_preview(object));
  const auto it = object.find(key);
  if (it == object.end()) json_fail(file, where.empty() ? key : where + "." + key, "missing");
  return *it;
}

std::string json_string(const json& object, const char* key, const std::string& where, const std::string& file) {
  const json& value = json_field(object, key, where, file);
  if (!value.is_string())
    json_fail(file, where.empty() ? key : where + "." + key, "expected a string, found " + json_preview(value));
  return value.get<std::string>();
}

bool json_bool(const json& object, const char* key, bool fallback, const std::string& where,
               const std::string& file) {
  if (!object.is_object()) json_fail(file, where, "expected an object, found " + json_preview(object));
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean())
    json_fail(file, where.empty() ? key : where + "." + key, "expected true or false, found " + json_preview(*it));
  return it->get<bool>();
}

const json& json_list(const json& object, const char* key, const std::string& where, const std::string& file) {
  const json& value = json_field(object, key, where, file);
  if (!value.is_array())
    json_fail(file, where.empty() ? key : where + "." + key, "expected a list, found " + json_preview(value));
  return value;
}

std::string json_char(const json& object, const char* key, const std::string& where, const std::string& file) {
  const std::string text = json_string(object, key, where, file);
  size_t len = 0;
  if (text.empty() || find_invalid_utf8(text) != std::string::npos || (decode_utf8(text, 0, len), len) != text.size())
    json_fail(file, where + "." + key, "expected one character, found " + json_preview(object[key]));
  return text;
}

Regex json_pattern(const json& object, const std::string& where, const std::string& file) {
  const json& pattern = json_field(object, "pattern", where, file);
  const std::string pattern_where = where + ".pattern";
  const bool literal = pattern.is_object() && pattern.contains("String");
  if (!pattern.is_object() || pattern.size() != 1 || (!literal && !pattern.contains("Regex")))
    json_fail(file, pattern_where, "expected {\"Regex\": ...} or {\"String\": ...}, found " + json_preview(pattern));
  const std::string text = json_string(pattern, literal ? "String" : "Regex", pattern_where, file);
  return Regex::compile(text, literal, file + ": " + pattern_where);
}

std::string clip(std::string_view text, size_t max_chars) {
  if (text.size() <= max_chars) return std::string(text);
  return std::string(text.substr(0, max_chars)) + "...";
}

std::string json_preview(const json& value) {
  return clip(value.dump(-1, ' ', false, json::error_handler_t::replace));
}

}  // namespace loom::tokenization
