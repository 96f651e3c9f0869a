// The one file of loom that includes llama.cpp's Jinja engine (data/chat_template.h).
#include "data/chat_template.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <utility>

// llama.cpp's engine, from LOOM_LLAMA_CPP_DIR/common (CMakeLists.txt: these
// include paths are set for this file alone).
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "json.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

// transformers' SPECIAL_TOKENS_ATTRIBUTES (tokenization_utils_base.py), in its order.
constexpr const char* kSpecialTokenNames[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                              "pad_token", "cls_token", "mask_token"};

ordered_json read_json_file(const fs::path& path) {
  try {
    return ordered_json::parse(read_file(path.string()));
  } catch (const ordered_json::exception& e) {
    throw BadInput(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

// The text of a special-token entry: "<s>", or an AddedToken object's "content".
std::optional<std::string> special_token_text(const ordered_json& entry) {
  if (entry.is_string()) return entry.get<std::string>();
  if (entry.is_object() && entry.contains("content") && entry.at("content").is_string())
    return entry.at("content").get<std::string>();
  return std::nullopt;
}

// 12:00 local time of `date` (YYYY-MM-DD): strftime_now formats it with
// localtime, as Python's datetime.now() does.
std::time_t noon_of(const std::string& date) {
  int year = 0, month = 0, day = 0;
  char tail = 0;
  if (std::sscanf(date.c_str(), "%4d-%2d-%2d%c", &year, &month, &day, &tail) != 3 || date.size() != 10 ||
      month < 1 || month > 12 || day < 1 || day > 31)
    throw BadInput("--chat-date '" + date + "': expected a date YYYY-MM-DD, e.g. " + kDefaultChatDate);
  std::tm when{};
  when.tm_year = year - 1900;
  when.tm_mon = month - 1;
  when.tm_mday = day;
  when.tm_hour = 12;
  when.tm_isdst = -1;
  const std::time_t time = std::mktime(&when);
  if (time == static_cast<std::time_t>(-1) || when.tm_mday != day)
    throw BadInput("--chat-date '" + date + "': not a day of the calendar");
  return time;
}

}  // namespace

ChatTemplateSource find_chat_template(const std::string& tokenizer_path) {
  const fs::path folder = fs::path(tokenizer_path).parent_path();
  // transformers 5 reads chat_template.jinja first: "If independent chat
  // template file(s) exist, they take priority over template entries in the
  // tokenizer config".
  const fs::path jinja_file = folder / "chat_template.jinja";
  if (fs::exists(jinja_file)) return {read_file(jinja_file.string()), jinja_file.string()};
  const fs::path config_file = folder / "tokenizer_config.json";
  if (fs::exists(config_file)) {
    const ordered_json config = read_json_file(config_file);
    if (config.is_object() && config.contains("chat_template") && !config.at("chat_template").is_null()) {
      const ordered_json& entry = config.at("chat_template");
      const std::string origin = config_file.string() + " (key 'chat_template')";
      if (entry.is_string()) return {entry.get<std::string>(), origin};
      // Named templates (transformers' get_chat_template): "default" unless
      // the caller names one, and loom names none.
      if (entry.is_array()) {
        std::string names;
        for (const ordered_json& named : entry) {
          if (!named.is_object() || !named.contains("name") || !named.contains("template") ||
              !named.at("name").is_string() || !named.at("template").is_string())
            throw BadInput(origin + ": expected a string or a list of {\"name\", \"template\"} objects");
          const std::string name = named.at("name").get<std::string>();
          if (name == "default")
            return {named.at("template").get<std::string>(), origin + " (the template named \"default\")"};
          names += (names.empty() ? "" : ", ") + name;
        }
        throw BadInput(origin + ": a list of named templates (" + names +
                       ") without one named \"default\", the one loom prepare --chat uses");
      }
      throw BadInput(origin + ": expected a string or a list of {\"name\", \"template\"} objects, found " +
                     std::string(entry.type_name()));
    }
  }
  throw BadInput(folder.string() + ": no chat template beside " + tokenizer_path +
                 " (neither chat_template.jinja nor a 'chat_template' in tokenizer_config.json); loom prepare "
                 "--chat renders conversations with the model's own template");
}

ordered_json read_special_tokens(const std::string& tokenizer_path) {
  const fs::path folder = fs::path(tokenizer_path).parent_path();
  ordered_json tokens = ordered_json::object();
  for (const char* file : {"tokenizer_config.json", "special_tokens_map.json"}) {
    const fs::path path = folder / file;
    if (!fs::exists(path)) continue;
    const ordered_json config = read_json_file(path);
    if (!config.is_object()) continue;
    for (const char* name : kSpecialTokenNames) {
      if (tokens.contains(name) || !config.contains(name)) continue;
      if (const auto text = special_token_text(config.at(name))) tokens[name] = *text;
    }
  }
  // In transformers' order, whichever file each came from.
  ordered_json ordered = ordered_json::object();
  for (const char* name : kSpecialTokenNames)
    if (tokens.contains(name)) ordered[name] = tokens.at(name);
  return ordered;
}

struct ChatTemplate::Impl {
  std::string origin;
  std::string source;  // as the lexer kept it, for the engine's error messages
  jinja::program program;
  ordered_json variables;
  std::time_t noon = 0;
};

ChatTemplate::ChatTemplate(const ChatTemplateSource& source, const ordered_json& special_tokens,
                           const ChatTemplateOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->origin = source.origin;
  impl_->noon = noon_of(options.date);
  impl_->variables = special_tokens.is_object() ? special_tokens : ordered_json::object();
  try {
    jinja::lexer lexer;
    const jinja::lexer_result tokens = lexer.tokenize(source.text);
    impl_->program = jinja::parse_from_tokens(tokens);
    impl_->source = tokens.source;
  } catch (const std::exception& e) {
    throw BadInput(source.origin + ": cannot parse the chat template: " + e.what());
  }
}

ChatTemplate ChatTemplate::for_tokenizer(const std::string& tokenizer_path, const ChatTemplateOptions& options) {
  return ChatTemplate(find_chat_template(tokenizer_path), read_special_tokens(tokenizer_path), options);
}

ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

const std::string& ChatTemplate::origin() const { return impl_->origin; }

std::string ChatTemplate::render(const ordered_json& messages, bool add_generation_prompt) const {
  // What transformers' render_jinja_template passes: messages, tools and
  // documents (None when not given), add_generation_prompt, then the special
  // tokens.
  ordered_json input = ordered_json::object();
  input["messages"] = messages;
  input["tools"] = nullptr;
  input["documents"] = nullptr;
  input["add_generation_prompt"] = add_generation_prompt;
  for (const auto& [name, value] : impl_->variables.items()) input[name] = value;
  try {
    jinja::context context(impl_->source);
    context.current_time = impl_->noon;
    // The engine takes its own JSON type (common/json.h); the text is the
    // one way between the two.
    jinja::global_from_json(context, common_json::parse(input.dump()), /*mark_input=*/false);
    jinja::runtime runtime(context);
    const jinja::value results = runtime.execute(impl_->program);
    return jinja::runtime::gather_string_parts(results)->as_string().str();
  } catch (const std::exception& e) {
    throw BadInput(impl_->origin + ": the chat template failed: " + e.what());
  }
}

}  // namespace loom
