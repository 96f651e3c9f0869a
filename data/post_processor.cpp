#include "data/post_processor.h"

#include <nlohmann/json.hpp>

#include "data/tokenizer_json.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

int32_t token_id(const json& value, const std::string& where, const std::string& file) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > INT32_MAX)
    json_fail(file, where, "expected a token id, found " + json_preview(value));
  return static_cast<int32_t>(value.get<int64_t>());
}

// TemplateProcessing's "single" template: special tokens around "$A".
SpecialTokenFrame parse_template(const json& spec, const std::string& where, const std::string& file) {
  const json& single = json_field(spec, "single", where, file);
  const json& special = json_field(spec, "special_tokens", where, file);
  if (!single.is_array()) json_fail(file, where + ".single", "expected a list, found " + json_preview(single));
  SpecialTokenFrame frame;
  bool seen_a = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const std::string piece_where = where + ".single[" + std::to_string(i) + "]";
    const json& piece = single[i];
    if (piece.is_object() && piece.contains("Sequence")) {
      const std::string id = json_string(piece["Sequence"], "id", piece_where + ".Sequence", file);
      if (id != "A" || seen_a)
        json_fail(file, piece_where, "a single-sequence template holds sequence A once, found " + json_preview(piece));
      seen_a = true;
      continue;
    }
    if (!piece.is_object() || !piece.contains("SpecialToken"))
      json_fail(file, piece_where, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}, found " +
                                       json_preview(piece));
    const std::string name = json_string(piece["SpecialToken"], "id", piece_where + ".SpecialToken", file);
    const std::string token_where = where + ".special_tokens['" + clip(name) + "']";
    const json& entry = special.is_object() && special.contains(name) ? special[name] : json();
    if (entry.is_null()) json_fail(file, token_where, "missing (the template names it)");
    const json& ids = json_field(entry, "ids", token_where, file);
    if (!ids.is_array()) json_fail(file, token_where + ".ids", "expected a list, found " + json_preview(ids));
    for (size_t k = 0; k < ids.size(); ++k)
      (seen_a ? frame.after : frame.before).push_back(token_id(ids[k], token_where + ".ids", file));
  }
  if (!seen_a) json_fail(file, where + ".single", "has no sequence A");
  return frame;
}

// Roberta's and Bert's ["token", id] pairs.
int32_t pair_id(const json& spec, const char* key, const std::string& where, const std::string& file) {
  const json& pair = json_field(spec, key, where, file);
  if (!pair.is_array() || pair.size() != 2 || !pair[0].is_string())
    json_fail(file, where + "." + key, "expected [\"token\", id], found " + json_preview(pair));
  return token_id(pair[1], where + "." + key, file);
}

void parse(const json& spec, const std::string& where, const std::string& file, SpecialTokenFrame& frame) {
  if (!spec.is_object()) json_fail(file, where, "expected an object, found " + json_preview(spec));
  const std::string type = json_string(spec, "type", where, file);
  if (type == "Sequence") {
    const json& list = json_list(spec, "processors", where, file);
    for (size_t i = 0; i < list.size(); ++i)
      parse(list[i], where + ".processors[" + std::to_string(i) + "]", file, frame);
  } else if (type == "ByteLevel") {
    // Trims offsets only.
  } else if (type == "TemplateProcessing" || type == "RobertaProcessing" || type == "BertProcessing") {
    SpecialTokenFrame outer;
    if (type == "TemplateProcessing") {
      outer = parse_template(spec, where, file);
    } else {
      outer.before = {pair_id(spec, "cls", where, file)};
      outer.after = {pair_id(spec, "sep", where, file)};
    }
    // A later processor wraps what the earlier ones made.
    outer.before.insert(outer.before.end(), frame.before.begin(), frame.before.end());
    frame.after.insert(frame.after.end(), outer.after.begin(), outer.after.end());
    frame.before = std::move(outer.before);
  } else {
    json_fail(file, where + ".type",
              "'" + clip(type) + "' is not supported (loom reads the TemplateProcessing, ByteLevel, "
                                 "RobertaProcessing, BertProcessing and Sequence post-processors)");
  }
}

}  // namespace

SpecialTokenFrame parse_post_processor(const json& spec, const std::string& file) {
  SpecialTokenFrame frame;
  if (!spec.is_null()) parse(spec, "post_processor", file, frame);
  return frame;
}

}  // namespace loom::tokenization
