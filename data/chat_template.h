// A model's chat template, rendered as transformers' apply_chat_template
// renders it, for `loom prepare --chat` (docs/data.md).
//
// The engine is llama.cpp's own C++ Jinja engine (common/jinja/, MIT), built
// from the pinned llama-cpp-python source distribution that launch/setup.sh
// extracts outside the checkout (CMake: LOOM_LLAMA_CPP_DIR). Only
// data/chat_template.cpp includes its headers; the rest of loom sees this
// interface.
//
// What the template sees is what transformers 5 gives it (render_jinja_template
// in transformers/utils/chat_template_utils.py): `messages`, `tools` and
// `documents` (none), `add_generation_prompt`, the tokenizer's named special
// tokens (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
// mask_token, where set), the functions raise_exception and strftime_now, and
// whitespace control trim_blocks and lstrip_blocks. strftime_now formats a
// fixed date (ChatTemplateOptions::date, at 12:00 local time) instead of the
// clock, so that a dataset does not depend on the day it was prepared.
// `date_string` is not set, as in transformers: a template that reads it
// falls back to its own default.
#pragma once

#include <ctime>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace loom {

// The date strftime_now gives, by default: Llama-3.1's template's own
// default date_string (26 Jul 2024).
inline constexpr const char* kDefaultChatDate = "2024-07-26";

struct ChatTemplateOptions {
  std::string date = kDefaultChatDate;  // YYYY-MM-DD
};

// The template of a tokenizer folder, as transformers 5 picks it: the folder's
// chat_template.jinja when it exists, else tokenizer_config.json's
// "chat_template": a string, or a list of {"name", "template"} entries of
// which the one named "default" is used.
struct ChatTemplateSource {
  std::string text;
  std::string origin;  // the file (and key) it came from, for messages
};

// BadInput naming the folder when it has no chat template, naming the key
// when tokenizer_config.json's is malformed or a list without "default".
ChatTemplateSource find_chat_template(const std::string& tokenizer_path);

// The named special tokens of tokenizer_config.json beside `tokenizer_path`
// (a string, or an object with "content"), completed from
// special_tokens_map.json: {"bos_token": "<|begin_of_text|>", ...}.
nlohmann::ordered_json read_special_tokens(const std::string& tokenizer_path);

// A parsed template. Not thread-safe: render() runs the engine, whose values
// are shared without locks; give each thread its own ChatTemplate.
class ChatTemplate {
 public:
  // Parses `source`; BadInput "<origin>: <the engine's message>" on a syntax
  // error. `special_tokens` (an object) become template variables; BadInput
  // when options.date is not a YYYY-MM-DD date.
  ChatTemplate(const ChatTemplateSource& source, const nlohmann::ordered_json& special_tokens,
               const ChatTemplateOptions& options = {});
  // find_chat_template and read_special_tokens of a tokenizer folder.
  static ChatTemplate for_tokenizer(const std::string& tokenizer_path, const ChatTemplateOptions& options = {});

  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // The text of `messages` (a JSON array of message objects, as the template
  // expects them). BadInput "<origin>: <message>" when the template fails
  // (raise_exception, a type error, an unsupported feature of the engine).
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const;

  const std::string& origin() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loom
