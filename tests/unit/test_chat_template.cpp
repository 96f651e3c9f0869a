// Chat templates (llama.cpp's Jinja engine behind data/chat_template.h) and
// the encoding of a conversation with its loss mask (data/chat_encoding.h).
// tests/interop/test_chat_prepare.py compares both with transformers on real
// templates; these pin the rules on small ones.
#include "data/chat_encoding.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/pretokenizer.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/file_io.h"
#include "tests/unit/bad_input.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

#define EXPECT_BAD_INPUT(statement, ...) test_support::expect_bad_input([&] { statement; }, {__VA_ARGS__})

// The 256 byte symbols (id = byte) and special tokens <|user|> (256),
// <|assistant|> (257) and <|end|> (258).
Tokenizer byte_tokenizer() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tokenization::byte_to_unicode(static_cast<uint8_t>(b))] = b;
  json added = json::array();
  int id = 256;
  for (const char* token : {"<|user|>", "<|assistant|>", "<|end|>"}) {
    vocab[token] = id;
    added.push_back({{"id", id++}, {"content", token}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
  }
  const json spec = {{"version", "1.0"},
                     {"added_tokens", added},
                     {"normalizer", nullptr},
                     {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                     {"post_processor", nullptr},
                     {"decoder", {{"type", "ByteLevel"}}},
                     {"model",
                      {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
                       {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab},
                       {"merges", json::array()}}}};
  return Tokenizer::from_json(spec.dump(), "bytes.json");
}

constexpr const char* kTurnTemplate =
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}";

ChatTemplate make_template(const std::string& text, const ChatTemplateOptions& options = {}) {
  return ChatTemplate({text, "test.jinja"}, ordered_json{{"bos_token", "<s>"}}, options);
}

ordered_json conversation(const std::string& line) { return parse_conversation(line); }

// The text of the ids whose mask is 1, run by run.
std::vector<std::string> masked_runs(const Tokenizer& tokenizer, const ChatDocument& document) {
  std::vector<std::string> runs;
  std::string run;
  for (size_t i = 0; i < document.ids.size(); ++i) {
    if (document.loss_mask[i]) {
      run += tokenizer.token_bytes(document.ids[i]);
    } else if (!run.empty()) {
      runs.push_back(run);
      run.clear();
    }
  }
  if (!run.empty()) runs.push_back(run);
  return runs;
}

TEST(ChatTemplate, RendersMessagesSpecialTokensAndTheGenerationPrompt) {
  const ChatTemplate chat_template = make_template("{{ bos_token }}" + std::string(kTurnTemplate));
  const ordered_json messages = conversation(R"({"messages": [{"role": "user", "content": "Hi"}]})");
  EXPECT_EQ(chat_template.render(messages, false), "<s><|user|>Hi<|end|>");
  EXPECT_EQ(chat_template.render(messages, true), "<s><|user|>Hi<|end|><|assistant|>");
}

TEST(ChatTemplate, TrimsBlocksAndStripsTheirIndentationAsTransformersDoes) {
  // trim_blocks and lstrip_blocks: the newline after a tag and the spaces
  // before one go.
  const ChatTemplate chat_template = make_template("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}\n");
  EXPECT_EQ(chat_template.render(conversation(R"({"messages": [{"role": "user", "content": "a"},
                                                               {"role": "user", "content": "b"}]})"),
                                 false),
            "    a\n    b\n");
}

TEST(ChatTemplate, StrftimeNowGivesTheFixedDateAndDateStringStaysUndefined) {
  const std::string text =
      "{{ strftime_now('%d %b %Y') }}|{% if date_string is defined %}set{% else %}unset{% endif %}";
  EXPECT_EQ(make_template(text).render(ordered_json::array(), false), "26 Jul 2024|unset");
  EXPECT_EQ(make_template(text, {.date = "2025-01-02"}).render(ordered_json::array(), false), "02 Jan 2025|unset");
  EXPECT_BAD_INPUT(make_template(text, {.date = "2025-13-01"}), "--chat-date", "2025-13-01");
  EXPECT_BAD_INPUT(make_template(text, {.date = "yesterday"}), "--chat-date", "YYYY-MM-DD");
}

TEST(ChatTemplate, SyntaxAndRuntimeErrorsAreBadInputNamingTheTemplate) {
  EXPECT_BAD_INPUT(make_template("{% for m in messages %}{{ m.content }"), "test.jinja", "cannot parse");
  const ChatTemplate raising = make_template("{{ raise_exception('Conversation roles must alternate') }}");
  EXPECT_BAD_INPUT(raising.render(ordered_json::array(), false), "test.jinja", "Conversation roles must alternate");
}

TEST(ChatEncoding, MaskCoversWhatEachAssistantTurnAddsAfterItsPrompt) {
  const Tokenizer tokenizer = byte_tokenizer();
  const ChatTemplate chat_template = make_template(kTurnTemplate);
  const ordered_json messages = conversation(R"({"messages": [
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
      {"role": "user", "content": "ü?"}, {"role": "assistant", "content": "Grüße 🚀"}]})");
  const ChatDocument document = encode_conversation(chat_template, tokenizer, messages);
  EXPECT_EQ(document.ids, tokenizer.encode(chat_template.render(messages, false)));
  ASSERT_EQ(document.loss_mask.size(), document.ids.size());
  // The prompt's <|assistant|> is not the turn's; its content and <|end|> are.
  EXPECT_EQ(masked_runs(tokenizer, document), (std::vector<std::string>{"4<|end|>", "Grüße 🚀<|end|>"}));
  EXPECT_EQ(document.ids.front(), 256);  // <|user|>, a special token
}

TEST(ChatEncoding, ConversationWithoutAnAssistantTurnHasAnAllZeroMask) {
  const Tokenizer tokenizer = byte_tokenizer();
  const ChatDocument document = encode_conversation(
      make_template(kTurnTemplate), tokenizer, conversation(R"({"messages": [{"role": "user", "content": "hi"}]})"));
  EXPECT_FALSE(document.ids.empty());
  EXPECT_EQ(document.loss_mask, std::vector<uint8_t>(document.ids.size(), 0));
}

TEST(ChatEncoding, TemplateThatIsNotPrefixStableAtAnAssistantTurnIsRefused) {
  const Tokenizer tokenizer = byte_tokenizer();
  // EOS after the last message only (as Phi-3.5's template).
  const ChatTemplate chat_template = make_template(std::string(kTurnTemplate) + "{% if not add_generation_prompt %}"
                                                                                 "<|end|>{% endif %}");
  const ordered_json single = conversation(R"({"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]})");
  EXPECT_NO_THROW(encode_conversation(chat_template, tokenizer, single));
  const ordered_json two = conversation(R"({"messages": [{"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]})");
  EXPECT_BAD_INPUT(encode_conversation(chat_template, tokenizer, two), "messages[1] (assistant)", "prefix-stable");
  // A generation prompt the turn does not start with.
  const ChatTemplate other_prompt = make_template(
      "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}");
  EXPECT_BAD_INPUT(encode_conversation(other_prompt, tokenizer, single), "messages[1] (assistant)", "prefix-stable");
}

TEST(ChatEncoding, LinesThatAreNotConversationsAreRefusedNamingWhatIsWrong) {
  EXPECT_BAD_INPUT(conversation("not json"), "not a JSON object");
  EXPECT_BAD_INPUT(conversation("[1, 2]"), "expected a JSON object");
  EXPECT_BAD_INPUT(conversation(R"({"text": "x"})"), "no 'messages' list");
  EXPECT_BAD_INPUT(conversation(R"({"messages": []})"), "no 'messages' list");
  EXPECT_BAD_INPUT(conversation(R"({"messages": ["hi"]})"), "messages[0]", "expected an object");
  EXPECT_BAD_INPUT(conversation(R"({"messages": [{"content": "hi"}]})"), "messages[0]", "no 'role'");
  EXPECT_BAD_INPUT(conversation(R"({"messages": [{"role": ["user"]}]})"), "messages[0].role", "expected a string");
}

TEST(ChatEncoding, MessagesReachTheTemplateAsTransformersGivesThem) {
  // Keys whose value is null are dropped; reasoning is aliased as
  // {"thinking": r, **message, "reasoning_content": r}.
  const ordered_json messages = conversation(
      R"({"messages": [{"role": "assistant", "content": null, "reasoning": "hmm", "name": "x"}]})");
  EXPECT_EQ(messages.dump(),
            R"([{"thinking":"hmm","role":"assistant","reasoning":"hmm","name":"x","reasoning_content":"hmm"}])");
}

class ChatTemplateFolder : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("loom-test-chat-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string tokenizer() const { return (dir_ / "tokenizer.json").string(); }
  void write(const std::string& name, const std::string& text) const { write_file_atomic((dir_ / name).string(), text); }
  fs::path dir_;
};

TEST_F(ChatTemplateFolder, ChatTemplateJinjaComesBeforeTheConfigsTemplate) {
  write("tokenizer_config.json", R"({"chat_template": "from config", "eos_token": {"content": "<e>"}})");
  EXPECT_EQ(find_chat_template(tokenizer()).text, "from config");
  write("chat_template.jinja", "from file");
  const ChatTemplateSource source = find_chat_template(tokenizer());
  EXPECT_EQ(source.text, "from file");
  EXPECT_NE(source.origin.find("chat_template.jinja"), std::string::npos);
}

TEST_F(ChatTemplateFolder, NamedTemplatesUseDefaultAndAListWithoutOneIsRefused) {
  write("tokenizer_config.json",
        R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
  EXPECT_EQ(find_chat_template(tokenizer()).text, "D");
  write("tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
  EXPECT_BAD_INPUT(find_chat_template(tokenizer()), "tokenizer_config.json", "tool_use", "\"default\"");
  write("tokenizer_config.json", R"({"chat_template": 5})");
  EXPECT_BAD_INPUT(find_chat_template(tokenizer()), "tokenizer_config.json", "'chat_template'");
  write("tokenizer_config.json", R"({"eos_token": "<e>"})");
  EXPECT_BAD_INPUT(find_chat_template(tokenizer()), "no chat template");
}

TEST_F(ChatTemplateFolder, SpecialTokensComeFromTheConfigThenTheSpecialTokensMap) {
  write("tokenizer_config.json", R"({"eos_token": {"content": "<e>", "special": true}, "pad_token": null,
                                     "chat_template": "x"})");
  write("special_tokens_map.json", R"({"eos_token": "<other>", "bos_token": "<b>", "unk_token": "<u>"})");
  EXPECT_EQ(read_special_tokens(tokenizer()).dump(), R"({"bos_token":"<b>","eos_token":"<e>","unk_token":"<u>"})");
}

}  // namespace
}  // namespace loom
