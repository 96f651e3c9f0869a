#include "data/normalizer.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>

#include <nlohmann/json.hpp>
#include <variant>

#include "data/text_unicode.h"
#include "data/tokenizer_json.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

struct UnicodeForm {
  const icu::Normalizer2* normalizer;
};
struct Lowercase {};
struct Strip {
  bool left;
  bool right;
};
struct StripAccents {};
struct Replace {
  Regex pattern;
  std::string content;
};
struct Prepend {
  std::string text;
};

const icu::Normalizer2* unicode_form(const std::string& name) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = name == "NFC"    ? icu::Normalizer2::getNFCInstance(status)
                                       : name == "NFD"  ? icu::Normalizer2::getNFDInstance(status)
                                       : name == "NFKC" ? icu::Normalizer2::getNFKCInstance(status)
                                                        : icu::Normalizer2::getNFKDInstance(status);
  if (U_FAILURE(status)) throw std::runtime_error("ICU could not load its " + name + " data: " + u_errorName(status));
  return normalizer;
}

}  // namespace

struct Normalizer::Step {
  template <typename Kind>
  explicit Step(Kind step) : kind(std::move(step)) {}
  std::variant<UnicodeForm, Lowercase, Strip, StripAccents, Replace, Prepend> kind;
};

namespace {

void parse_steps(const json& spec, const std::string& where, const std::string& file,
                 std::vector<Normalizer::Step>& steps) {
  if (!spec.is_object()) json_fail(file, where, "expected an object, found " + json_preview(spec));
  const std::string type = json_string(spec, "type", where, file);
  if (type == "Sequence") {
    const json& list = json_list(spec, "normalizers", where, file);
    for (size_t i = 0; i < list.size(); ++i)
      parse_steps(list[i], where + ".normalizers[" + std::to_string(i) + "]", file, steps);
  } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    steps.emplace_back(UnicodeForm{unicode_form(type)});
  } else if (type == "Lowercase") {
    steps.emplace_back(Lowercase{});
  } else if (type == "Strip") {
    steps.emplace_back(Strip{json_bool(spec, "strip_left", false, where, file),
                           json_bool(spec, "strip_right", false, where, file)});
  } else if (type == "StripAccents") {
    steps.emplace_back(StripAccents{});
  } else if (type == "Replace") {
    steps.emplace_back(Replace{json_pattern(spec, where, file), json_string(spec, "content", where, file)});
  } else if (type == "Prepend") {
    steps.emplace_back(Prepend{json_string(spec, "prepend", where, file)});
  } else {
    json_fail(file, where + ".type",
              "'" + clip(type) + "' is not supported (loom reads the NFC, NFD, NFKC, NFKD, Lowercase, Strip, "
                                 "StripAccents, Replace, Prepend and Sequence normalizers)");
  }
}

// Rust's char::to_lowercase, one character at a time as `tokenizers` does
// (so a final sigma stays σ): the simple mapping, except İ, whose full
// lowercase is two characters.
void lowercase(std::string_view text, std::string& out) {
  for (size_t i = 0; i < text.size();) {
    size_t len;
    const uint32_t cp = decode_utf8(text, i, len);
    if (cp == 0x130) {
      out += "i\xCC\x87";  // U+0069 U+0307
    } else {
      append_utf8(static_cast<uint32_t>(u_tolower(static_cast<UChar32>(cp))), out);
    }
    i += len;
  }
}

void strip(const Strip& step, std::string_view text, std::string& out, bool& start_kept) {
  size_t begin = 0, end = text.size();
  if (step.left) {
    while (begin < end) {
      size_t len;
      if (!is_white_space(decode_utf8(text, begin, len))) break;
      begin += len;
    }
    if (begin > 0) start_kept = false;
  }
  if (step.right) {
    while (end > begin) {
      size_t start = end - 1;
      while (start > begin && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
      size_t len;
      if (!is_white_space(decode_utf8(text, start, len))) break;
      end = start;
    }
  }
  out.append(text.substr(begin, end - begin));
}

void strip_accents(std::string_view text, std::string& out) {
  for (size_t i = 0; i < text.size();) {
    size_t len;
    const uint32_t cp = decode_utf8(text, i, len);
    if ((U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_M_MASK) == 0) out.append(text.substr(i, len));
    i += len;
  }
}

void replace(const Replace& step, std::string_view text, std::string& out, bool& start_kept) {
  thread_local MatchData match;
  thread_local std::vector<SplitSpan> spans;
  find_matches(step.pattern, text, match, spans);
  for (const SplitSpan& span : spans) {
    if (!span.is_match) {
      out.append(text.substr(span.begin, span.end - span.begin));
      continue;
    }
    if (span.begin == 0 && span.end > 0 && step.content.empty()) start_kept = false;
    out += step.content;
  }
}

}  // namespace

Normalizer::Normalizer() = default;
Normalizer::~Normalizer() = default;
Normalizer::Normalizer(const Normalizer&) = default;
Normalizer::Normalizer(Normalizer&&) noexcept = default;
Normalizer& Normalizer::operator=(const Normalizer&) = default;
Normalizer& Normalizer::operator=(Normalizer&&) noexcept = default;

Normalizer Normalizer::from_json(const json& spec, const std::string& file) {
  Normalizer result;
  if (!spec.is_null()) parse_steps(spec, "normalizer", file, result.steps_);
  return result;
}

void Normalizer::apply(std::string_view text, std::string& out, std::string& scratch, bool& start_kept) const {
  // Each step reads the previous step's result and writes the other buffer;
  // the steps are laid out so that the last one writes `out`.
  std::string* target = steps_.size() % 2 == 1 ? &out : &scratch;
  std::string* other = target == &out ? &scratch : &out;
  std::string_view input = text;
  for (const Step& step : steps_) {
    target->clear();
    std::visit(
        [&](const auto& s) {
          using S = std::decay_t<decltype(s)>;
          if constexpr (std::is_same_v<S, UnicodeForm>) {
            UErrorCode status = U_ZERO_ERROR;
            icu::StringByteSink<std::string> sink(target, static_cast<int32_t>(input.size()));
            s.normalizer->normalizeUTF8(0, icu::StringPiece(input.data(), static_cast<int32_t>(input.size())),
                                        sink, nullptr, status);
            if (U_FAILURE(status))
              throw std::runtime_error(std::string("ICU normalization failed: ") + u_errorName(status));
          } else if constexpr (std::is_same_v<S, Lowercase>) {
            lowercase(input, *target);
          } else if constexpr (std::is_same_v<S, Strip>) {
            strip(s, input, *target, start_kept);
          } else if constexpr (std::is_same_v<S, StripAccents>) {
            strip_accents(input, *target);
          } else if constexpr (std::is_same_v<S, Replace>) {
            replace(s, input, *target, start_kept);
          } else {
            if (!input.empty()) *target += s.text;
            target->append(input);
          }
        },
        step.kind);
    input = *target;
    std::swap(target, other);
  }
  if (steps_.empty()) out.assign(text);
}

}  // namespace loom::tokenization
