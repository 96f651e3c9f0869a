#include "data/chat_encoding.h"

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "util/error.h"

namespace loom {
namespace {

using nlohmann::ordered_json;

// transformers' _REASONING_FIELDS: the names a message's reasoning comes
// under, the first the one templates read.
constexpr const char* kReasoningFields[] = {"reasoning_content", "thinking", "reasoning"};

// transformers' _alias_reasoning_fields for one message:
// {"thinking": reasoning, **message, "reasoning_content": reasoning}.
ordered_json alias_reasoning(const ordered_json& message) {
  const ordered_json* reasoning = nullptr;
  for (const char* field : kReasoningFields)
    if (reasoning == nullptr && message.contains(field)) reasoning = &message.at(field);
  if (reasoning == nullptr) return message;
  ordered_json aliased = ordered_json::object();
  aliased["thinking"] = *reasoning;
  for (const auto& [key, value] : message.items()) aliased[key] = value;
  aliased["reasoning_content"] = *reasoning;
  return aliased;
}

std::string clip(const std::string& text) { return text.size() > 60 ? text.substr(0, 57) + "..." : text; }

}  // namespace

ordered_json parse_conversation(std::string_view line) {
  ordered_json record;
  try {
    record = ordered_json::parse(line);
  } catch (const ordered_json::exception& e) {  // parse_error, and out_of_range for 1e999
    throw BadInput(std::string("not a JSON object (") + e.what() + ")");
  }
  if (!record.is_object()) throw BadInput("expected a JSON object {\"messages\": [...]}, found " + clip(record.dump()));
  if (!record.contains("messages") || !record.at("messages").is_array() || record.at("messages").empty())
    throw BadInput("no 'messages' list (expected {\"messages\": [{\"role\": ..., \"content\": ...}, ...]})");
  ordered_json messages = ordered_json::array();
  for (size_t i = 0; i < record.at("messages").size(); ++i) {
    const ordered_json& message = record.at("messages").at(i);
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!message.is_object()) throw BadInput(where + ": expected an object, found " + clip(message.dump()));
    if (!message.contains("role")) throw BadInput(where + ": no 'role'");
    if (!message.at("role").is_string())
      throw BadInput(where + ".role: expected a string such as \"user\" or \"assistant\", found " +
                     clip(message.at("role").dump()));
    // transformers' _normalize_chat_messages: templates handle a missing
    // key, while a null one renders as "None" in some.
    ordered_json kept = ordered_json::object();
    for (const auto& [key, value] : message.items())
      if (!value.is_null()) kept[key] = value;
    messages.push_back(alias_reasoning(kept));
  }
  return messages;
}

// Note [Assistant spans]: which tokens an assistant turn adds is found by
// rendering prefixes of the conversation, as the template would for a
// model generating turn i: rendering messages[:i] with add_generation_prompt
// gives the prompt P_i, rendering messages[:i+1] without it gives T_i, and the
// characters T_i adds after P_i are what the model would generate (its
// content and end-of-turn). That holds only where the template renders
// prefix-stably there: P_i a prefix of T_i, and T_i a prefix of the whole
// conversation's text (templates that render the last turn differently, such
// as those that keep the reasoning of the last assistant turn only, are not).
// Where it does not, the conversation is refused rather than given a wrong
// mask. The whole text is tokenized once (the ids of apply_chat_template);
// each token's bytes are its place in that text, and a token is masked in
// when any of its bytes lies in a span, as transformers'
// return_assistant_tokens_mask does with its offsets.
ChatDocument encode_conversation(const ChatTemplate& chat_template, const Tokenizer& tokenizer,
                                 const ordered_json& messages) {
  const std::string text = chat_template.render(messages, /*add_generation_prompt=*/false);
  ChatDocument document;
  document.ids = tokenizer.encode(text);

  std::vector<std::pair<size_t, size_t>> spans;  // [begin, end) bytes of `text`
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].at("role") != "assistant") continue;
    const ordered_json before(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(i));
    const ordered_json through(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    const std::string prompt = chat_template.render(before, /*add_generation_prompt=*/true);
    const std::string turn = chat_template.render(through, /*add_generation_prompt=*/false);
    const std::string where = "messages[" + std::to_string(i) + "] (assistant)";
    if (!turn.starts_with(prompt))
      throw BadInput(where + ": the chat template is not prefix-stable here: messages[:" + std::to_string(i) +
                     "] rendered with add_generation_prompt is not a prefix of messages[:" + std::to_string(i + 1) +
                     "] rendered, so the tokens of this turn cannot be told apart");
    if (!text.starts_with(turn))
      throw BadInput(where + ": the chat template is not prefix-stable here: messages[:" + std::to_string(i + 1) +
                     "] renders differently from the start of the whole conversation (the template renders this "
                     "turn differently when later messages follow), so the tokens of this turn cannot be told apart");
    if (turn.size() > prompt.size()) spans.emplace_back(prompt.size(), turn.size());
  }

  document.loss_mask.assign(document.ids.size(), 0);
  size_t position = 0;
  size_t span = 0;
  for (size_t t = 0; t < document.ids.size(); ++t) {
    const std::string_view bytes = tokenizer.token_bytes(document.ids[t]);
    if (text.compare(position, bytes.size(), bytes) != 0)
      throw BadInput("token " + std::to_string(t) + " (id " + std::to_string(document.ids[t]) +
                     ") does not spell the rendered text at byte " + std::to_string(position) +
                     ": the tokenizer drops or absorbs characters there (an unknown character, or an added token "
                     "that strips spaces), so its tokens cannot be mapped to the assistant turns");
    const size_t end = position + bytes.size();
    while (span < spans.size() && spans[span].second <= position) ++span;
    if (span < spans.size() && spans[span].first < end && position < spans[span].second) document.loss_mask[t] = 1;
    position = end;
  }
  if (position != text.size())
    throw BadInput("the tokens spell " + std::to_string(position) + " of the rendered text's " +
                   std::to_string(text.size()) + " bytes: the tokenizer drops characters at the end");
  return document;
}

}  // namespace loom
