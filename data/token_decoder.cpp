#include "data/token_decoder.h"

#include <nlohmann/json.hpp>
#include <optional>
#include <variant>

#include "data/pretokenizer.h"
#include "data/text_unicode.h"
#include "data/tokenizer_json.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

struct ByteLevel {};
struct ByteFallback {};
struct Fuse {};
struct Strip {
  std::string content;  // one character
  size_t start;
  size_t stop;
};
struct Replace {
  Regex pattern;
  std::string content;
};
struct Metaspace {
  std::string replacement;
  bool prepend_never;
};

// The byte a "<0xXX>" token stands for. Rust's u8::from_str_radix reads the
// two characters, so "+A" is accepted as well as "0A".
std::optional<uint8_t> fallback_byte(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token.back() != '>') return std::nullopt;
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  const int high = token[3] == '+' ? 0 : digit(token[3]);
  const int low = digit(token[4]);
  if (high < 0 || low < 0) return std::nullopt;
  return static_cast<uint8_t>(high * 16 + low);
}

// ByteLevel's bytes for one token: its characters through the GPT-2 table,
// or its own UTF-8 when a character is not in the table.
void append_byte_level(std::string_view token, std::string& out) {
  std::string bytes;
  out += unicode_to_bytes(token, bytes) ? bytes : std::string(token);
}

std::string strip(const Strip& step, std::string_view token) {
  size_t begin = 0;
  for (size_t n = 0; n < step.start && token.substr(begin).starts_with(step.content); ++n)
    begin += step.content.size();
  size_t end = token.size();
  for (size_t n = 0; n < step.stop && end > begin && token.substr(begin, end - begin).ends_with(step.content); ++n)
    end -= step.content.size();
  return std::string(token.substr(begin, end - begin));
}

std::string replace(const Replace& step, std::string_view token) {
  thread_local MatchData match;
  thread_local std::vector<SplitSpan> spans;
  std::string out;
  find_matches(step.pattern, token, match, spans);
  for (const SplitSpan& span : spans) out += span.is_match ? step.content : token.substr(span.begin, span.end - span.begin);
  return out;
}

// Metaspace's decode_chain: replacements become spaces, except in the first
// token, where they are dropped unless the prefix scheme is "never".
std::string metaspace(const Metaspace& step, std::string_view token, bool first) {
  std::string out;
  for (size_t i = 0; i < token.size();) {
    if (token.substr(i).starts_with(step.replacement)) {
      if (!first || step.prepend_never) out += ' ';
      i += step.replacement.size();
    } else {
      out += token[i++];
    }
  }
  return out;
}

size_t count(const json& spec, const char* key, const std::string& where, const std::string& file) {
  const json& value = json_field(spec, key, where, file);
  if (!value.is_number_integer() || value.get<int64_t>() < 0)
    json_fail(file, where + "." + key, "expected a count, found " + json_preview(value));
  return value.get<size_t>();
}

}  // namespace

struct TokenDecoder::Step {
  template <typename Kind>
  explicit Step(Kind step) : kind(std::move(step)) {}
  std::variant<ByteLevel, ByteFallback, Fuse, Strip, Replace, Metaspace> kind;
};

namespace {

void parse_steps(const json& spec, const std::string& where, const std::string& file,
                 std::vector<TokenDecoder::Step>& steps) {
  if (!spec.is_object()) json_fail(file, where, "expected an object, found " + json_preview(spec));
  const std::string type = json_string(spec, "type", where, file);
  if (type == "Sequence") {
    const json& list = json_list(spec, "decoders", where, file);
    for (size_t i = 0; i < list.size(); ++i)
      parse_steps(list[i], where + ".decoders[" + std::to_string(i) + "]", file, steps);
  } else if (type == "ByteLevel") {
    steps.emplace_back(ByteLevel{});
  } else if (type == "ByteFallback") {
    steps.emplace_back(ByteFallback{});
  } else if (type == "Fuse") {
    steps.emplace_back(Fuse{});
  } else if (type == "Strip") {
    steps.emplace_back(Strip{json_char(spec, "content", where, file), count(spec, "start", where, file),
                           count(spec, "stop", where, file)});
  } else if (type == "Replace") {
    steps.emplace_back(Replace{json_pattern(spec, where, file), json_string(spec, "content", where, file)});
  } else if (type == "Metaspace") {
    const bool never = parse_prepend_scheme(spec, where, file) == MetaspaceStep::Prepend::kNever;
    steps.emplace_back(Metaspace{json_char(spec, "replacement", where, file), never});
  } else {
    json_fail(file, where + ".type",
              "'" + clip(type) + "' is not supported (loom reads the ByteLevel, ByteFallback, Fuse, Strip, "
                                 "Replace, Metaspace and Sequence decoders)");
  }
}

}  // namespace

TokenDecoder::TokenDecoder() = default;
TokenDecoder::~TokenDecoder() = default;
TokenDecoder::TokenDecoder(const TokenDecoder&) = default;
TokenDecoder::TokenDecoder(TokenDecoder&&) noexcept = default;
TokenDecoder& TokenDecoder::operator=(const TokenDecoder&) = default;
TokenDecoder& TokenDecoder::operator=(TokenDecoder&&) noexcept = default;

TokenDecoder TokenDecoder::from_json(const json& spec, const std::string& file) {
  TokenDecoder result;
  if (spec.is_null()) {
    result.join_with_spaces_ = true;
  } else {
    parse_steps(spec, "decoder", file, result.steps_);
  }
  return result;
}

std::string TokenDecoder::decode(std::vector<std::string> tokens) const {
  if (join_with_spaces_) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (const Step& step : steps_) {
    std::vector<std::string> next;
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, ByteLevel>) {
            std::string bytes;
            for (const std::string& token : tokens) append_byte_level(token, bytes);
            next.push_back(utf8_lossy(bytes));
          } else if constexpr (std::is_same_v<S, ByteFallback>) {
            // Runs of byte tokens become their UTF-8 text, or one U+FFFD per
            // byte when the run is not valid UTF-8.
            std::string run;
            size_t run_tokens = 0;
            const auto flush = [&] {
              if (run_tokens == 0) return;
              if (find_invalid_utf8(run) == std::string::npos) {
                next.push_back(run);
              } else {
                for (size_t k = 0; k < run_tokens; ++k) next.emplace_back("\xEF\xBF\xBD");
              }
              run.clear();
              run_tokens = 0;
            };
            for (std::string& token : tokens) {
              if (const auto byte = fallback_byte(token)) {
                run += static_cast<char>(*byte);
                ++run_tokens;
              } else {
                flush();
                next.push_back(std::move(token));
              }
            }
            flush();
          } else if constexpr (std::is_same_v<S, Fuse>) {
            std::string all;
            for (const std::string& token : tokens) all += token;
            next.push_back(std::move(all));
          } else if constexpr (std::is_same_v<S, Strip>) {
            for (const std::string& token : tokens) next.push_back(strip(s, token));
          } else if constexpr (std::is_same_v<S, Replace>) {
            for (const std::string& token : tokens) next.push_back(replace(s, token));
          } else {
            for (size_t i = 0; i < tokens.size(); ++i) next.push_back(metaspace(s, tokens[i], i == 0));
          }
        },
        step.kind);
    tokens.swap(next);
  }
  std::string out;
  for (const std::string& token : tokens) out += token;
  return out;
}

std::string TokenDecoder::token_bytes(std::string_view token_text) const {
  if (join_with_spaces_) return std::string(token_text);
  std::string token(token_text);
  bool fused = false;  // after a Fuse or ByteLevel, steps see the whole text, not this token
  for (const Step& step : steps_) {
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, ByteLevel>) {
            std::string bytes;
            append_byte_level(token, bytes);
            token = std::move(bytes);
            fused = true;
          } else if constexpr (std::is_same_v<S, ByteFallback>) {
            if (const auto byte = fallback_byte(token)) token.assign(1, static_cast<char>(*byte));
          } else if constexpr (std::is_same_v<S, Fuse>) {
            fused = true;
          } else if constexpr (std::is_same_v<S, Strip>) {
            if (!fused) token = strip(s, token);
          } else if constexpr (std::is_same_v<S, Replace>) {
            token = replace(s, token);
          } else {
            token = metaspace(s, token, /*first=*/fused);
          }
        },
        step.kind);
  }
  return token;
}

}  // namespace loom::tokenization
