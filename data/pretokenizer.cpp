#include "data/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "util/error.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

// --- byte-level table ----------------------------------------------------------------

struct ByteTable {
  std::array<std::string, 256> byte_to_utf8;
  std::array<int16_t, 324> code_point_to_byte;  // 256 + 68 code points in use
};

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

const ByteTable& byte_table() {
  static const ByteTable table = [] {
    ByteTable t;
    t.code_point_to_byte.fill(-1);
    uint32_t next_extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : next_extra++;
      append_utf8(cp, t.byte_to_utf8[b]);
      t.code_point_to_byte[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return table;
}

// Scans the UTF-8 sequence at text[i] (Unicode Table 3-7). Returns how many
// bytes of it are well formed so far (at least 1); `complete` says whether
// they form a whole character. An incomplete prefix is the "maximal
// ill-formed part" that gets one U+FFFD in lossy decoding.
size_t utf8_scan(std::string_view text, size_t i, bool& complete) {
  const auto lead = static_cast<uint8_t>(text[i]);
  complete = lead < 0x80;
  if (complete) return 1;
  size_t len = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    len = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    len = 3;
    lo = lead == 0xE0 ? 0xA0 : 0x80;
    hi = lead == 0xED ? 0x9F : 0xBF;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    len = 4;
    lo = lead == 0xF0 ? 0x90 : 0x80;
    hi = lead == 0xF4 ? 0x8F : 0xBF;
  } else {
    return 1;
  }
  size_t k = 1;
  for (; k < len && i + k < text.size(); ++k) {
    const auto b = static_cast<uint8_t>(text[i + k]);
    if (k == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) break;
  }
  complete = k == len;
  return k;
}

// Length of the well-formed character at text[i], or 0.
size_t utf8_sequence_length(std::string_view text, size_t i) {
  bool complete;
  const size_t len = utf8_scan(text, i, complete);
  return complete ? len : 0;
}

// Decodes the well-formed character at text[i]; sets `len`.
uint32_t decode_utf8(std::string_view text, size_t i, size_t& len) {
  len = utf8_sequence_length(text, i);
  const auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(text[i + k])); };
  switch (len) {
    case 1: return byte(0);
    case 2: return ((byte(0) & 0x1F) << 6) | (byte(1) & 0x3F);
    case 3: return ((byte(0) & 0x0F) << 12) | ((byte(1) & 0x3F) << 6) | (byte(2) & 0x3F);
    case 4:
      return ((byte(0) & 0x07) << 18) | ((byte(1) & 0x3F) << 12) | ((byte(2) & 0x3F) << 6) | (byte(3) & 0x3F);
    default: len = 1; return 0xFFFD;
  }
}

// Rust's char::is_whitespace (the Unicode White_Space property), which
// `tokenizers` uses for lstrip/rstrip of added tokens.
bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// Note [onig vs PCRE2]: Oniguruma's \s is exactly the White_Space property;
// PCRE2's (with UCP) also matches U+180E. Rewriting \s and \S to the property
// makes them agree; both forms are valid inside and outside a class.
std::string onig_to_pcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    const char next = pattern[i + 1];
    if (next == 's') {
      out += "\\p{White_Space}";
    } else if (next == 'S') {
      out += "\\P{White_Space}";
    } else if (next == 'Q') {  // \Q...\E quotes literally: copy it as it is
      const size_t end = pattern.find("\\E", i + 2);
      const size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
      out.append(pattern.substr(i, stop - i));
      i = stop - 1;
      continue;
    } else {
      out += '\\';
      out += next;
    }
    ++i;
  }
  return out;
}

bool is_word_character(std::string_view text, size_t pos, MatchData& match) {
  // Rust regex's Unicode \w, used by `tokenizers` for single_word tokens.
  static const Regex word = Regex::compile(R"(^[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])", false,
                                           "single_word check");
  size_t begin, end;
  return word.find(text.substr(pos), 0, match, begin, end);
}

// Start of the last character of text (text non-empty, valid UTF-8).
size_t last_char_start(std::string_view text) {
  size_t i = text.size() - 1;
  while (i > 0 && (static_cast<uint8_t>(text[i]) & 0xC0) == 0x80) --i;
  return i;
}

}  // namespace

// --- byte-level, UTF-8 ------------------------------------------------------------------

const std::string& byte_to_unicode(uint8_t b) { return byte_table().byte_to_utf8[b]; }

int unicode_char_to_byte(uint32_t code_point) {
  const auto& t = byte_table().code_point_to_byte;
  return code_point < t.size() ? t[code_point] : -1;
}

bool unicode_to_bytes(std::string_view token, std::string& out) {
  out.clear();
  for (size_t i = 0; i < token.size();) {
    size_t len;
    if (utf8_sequence_length(token, i) == 0) return false;
    const int b = unicode_char_to_byte(decode_utf8(token, i, len));
    if (b < 0) return false;
    out += static_cast<char>(b);
    i += len;
  }
  return true;
}

size_t find_invalid_utf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = utf8_sequence_length(text, i);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view bytes) {
  if (find_invalid_utf8(bytes) == std::string_view::npos) return std::string(bytes);
  std::string out;
  out.reserve(bytes.size() + 16);
  for (size_t i = 0; i < bytes.size();) {
    bool complete;
    const size_t len = utf8_scan(bytes, i, complete);
    if (complete) {
      out.append(bytes.substr(i, len));
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
    }
    i += len;
  }
  return out;
}

// --- PCRE2 ----------------------------------------------------------------------------

void Pcre2CodeDeleter::operator()(pcre2_code_8* code) const { pcre2_code_free_8(code); }
void Pcre2MatchDataDeleter::operator()(pcre2_match_data_8* data) const { pcre2_match_data_free_8(data); }

MatchData::MatchData() : data_(pcre2_match_data_create_8(1, nullptr)) {
  if (!data_) throw std::bad_alloc();
}

Regex Regex::compile(std::string_view pattern, bool literal, const std::string& context) {
  const std::string translated = literal ? std::string(pattern) : onig_to_pcre2(pattern);
  const uint32_t options = literal ? (PCRE2_UTF | PCRE2_LITERAL) : (PCRE2_UTF | PCRE2_UCP);
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code_8* code = pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(translated.data()), translated.size(),
                                       options, &error, &error_offset, nullptr);
  if (code == nullptr) {
    std::array<PCRE2_UCHAR8, 256> message{};
    pcre2_get_error_message_8(error, message.data(), message.size());
    throw BadInput(context + ": invalid regex '" + std::string(pattern) + "': " +
                   reinterpret_cast<const char*>(message.data()) + " at offset " + std::to_string(error_offset));
  }
  // JIT makes matching several times faster; when it is unavailable the
  // interpreter gives the same results.
  pcre2_jit_compile_8(code, PCRE2_JIT_COMPLETE);
  Regex regex;
  regex.code_ = std::shared_ptr<pcre2_code_8>(code, Pcre2CodeDeleter());
  return regex;
}

bool Regex::find(std::string_view subject, size_t start, MatchData& match, size_t& begin, size_t& end) const {
  static const char kEmpty[] = "";
  const char* data = subject.empty() ? kEmpty : subject.data();
  // NO_UTF_CHECK: otherwise PCRE2 re-validates the whole subject on every
  // call, which is quadratic over a long piece. Callers validate once.
  const int rc = pcre2_match_8(code_.get(), reinterpret_cast<PCRE2_SPTR8>(data), subject.size(), start,
                               PCRE2_NO_UTF_CHECK, match.get(), nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    std::array<PCRE2_UCHAR8, 256> message{};
    pcre2_get_error_message_8(rc, message.data(), message.size());
    throw std::runtime_error(std::string("regex match failed: ") + reinterpret_cast<const char*>(message.data()));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(match.get());
  begin = ovector[0];
  end = std::max(ovector[0], ovector[1]);
  return true;
}

void find_matches(const Regex& regex, std::string_view subject, MatchData& match, std::vector<SplitSpan>& out) {
  out.clear();
  if (subject.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  size_t prev = 0;
  size_t search_from = 0;
  size_t last_match_end = std::string_view::npos;
  size_t begin, end;
  while (search_from <= subject.size() && regex.find(subject, search_from, match, begin, end)) {
    // Oniguruma's FindMatches: an empty match where the previous one ended
    // is not reported; the search moves on by one character instead.
    if (begin == end && end == last_match_end) {
      size_t step = 1;
      if (search_from < subject.size()) {
        decode_utf8(subject, search_from, step);
      }
      search_from += step;
      continue;
    }
    search_from = end;
    last_match_end = end;
    if (prev != begin) out.push_back({prev, begin, false});
    out.push_back({begin, end, true});
    prev = end;
  }
  if (prev != subject.size()) out.push_back({prev, subject.size(), false});
}

namespace {

// `tokenizers`' NormalizedString::split: turns matches into the pieces kept.
void apply_behavior(std::vector<SplitSpan>& spans, SplitBehavior behavior) {
  std::vector<SplitSpan> out;
  out.reserve(spans.size());
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (auto& s : spans) s.is_match = false;
      return;
    case SplitBehavior::kRemoved:
      return;  // matches are dropped by the caller
    case SplitBehavior::kContiguous:
      for (const auto& s : spans) {
        if (s.is_match == previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.begin, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const auto& s : spans) {
        if (s.is_match && !previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back({s.begin, s.end, false});
        }
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty()) {
          out.back().begin = it->begin;
        } else {
          out.push_back({it->begin, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  spans.swap(out);
}

SplitBehavior parse_behavior(const json& spec, const std::string& where, const std::string& file) {
  const std::string name = json_string(spec, "behavior", where, file);
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  json_fail(file, where + ".behavior",
            "'" + clip(name) + "' is not a split behavior (Removed, Isolated, MergedWithPrevious, "
                               "MergedWithNext, Contiguous)");
}

// Appends the steps of `spec` (recursing into Sequence) to `steps`.
void parse_steps(const json& spec, const std::string& where, const std::string& file,
                 std::vector<SplitStep>& steps, std::optional<ByteLevelStep>& byte_level) {
  if (!spec.is_object()) json_fail(file, where, "expected an object, found " + json_preview(spec));
  const std::string type = json_string(spec, "type", where, file);
  if (type != "Sequence" && byte_level)
    json_fail(file, where, "'" + clip(type) + "' after ByteLevel is not supported (ByteLevel must come last)");
  if (type == "Sequence") {
    const json& list = json_field(spec, "pretokenizers", where, file);
    if (!list.is_array()) json_fail(file, where + ".pretokenizers", "expected a list, found " + json_preview(list));
    for (size_t i = 0; i < list.size(); ++i)
      parse_steps(list[i], where + ".pretokenizers[" + std::to_string(i) + "]", file, steps, byte_level);
  } else if (type == "ByteLevel") {
    byte_level = ByteLevelStep{json_bool(spec, "add_prefix_space", true, where, file),
                               json_bool(spec, "use_regex", true, where, file)};
  } else if (type == "Split") {
    const json& pattern = json_field(spec, "pattern", where, file);
    const std::string pattern_where = where + ".pattern";
    if (!pattern.is_object() || pattern.size() != 1)
      json_fail(file, pattern_where, "expected {\"Regex\": ...} or {\"String\": ...}, found " + json_preview(pattern));
    const bool literal = pattern.contains("String");
    if (!literal && !pattern.contains("Regex"))
      json_fail(file, pattern_where, "expected {\"Regex\": ...} or {\"String\": ...}, found " + json_preview(pattern));
    const std::string text = json_string(pattern, literal ? "String" : "Regex", pattern_where, file);
    steps.push_back({Regex::compile(text, literal, file + ": " + pattern_where), parse_behavior(spec, where, file),
                     json_bool(spec, "invert", false, where, file)});
  } else if (type == "Digits") {
    // `tokenizers` splits on char::is_numeric (categories Nd, Nl, No = \p{N}):
    // each digit alone (Isolated), or runs of digits (Contiguous, which is
    // the same as isolating maximal runs).
    const bool individual = json_bool(spec, "individual_digits", false, where, file);
    steps.push_back({Regex::compile(individual ? R"(\p{N})" : R"(\p{N}+)", false, "Digits"),
                     SplitBehavior::kIsolated, false});
  } else {
    json_fail(file, where + ".type",
              "'" + clip(type) + "' is not supported (loom reads byte-level BPE: ByteLevel, Split, Digits "
                                 "and Sequence pre-tokenizers)");
  }
}

}  // namespace

// --- PreTokenizer ----------------------------------------------------------------------

PreTokenizer PreTokenizer::from_json(const json& spec, const std::string& file) {
  if (spec.is_null())
    json_fail(file, "pre_tokenizer", "is null; loom reads byte-level BPE, which needs a ByteLevel pre-tokenizer");
  PreTokenizer result;
  std::optional<ByteLevelStep> byte_level;
  parse_steps(spec, "pre_tokenizer", file, result.steps_, byte_level);
  if (!byte_level)
    json_fail(file, "pre_tokenizer", "has no ByteLevel step; loom reads byte-level BPE only");
  result.byte_level_ = *byte_level;
  result.gpt2_regex_ = Regex::compile(kGpt2Pattern, false, "GPT-2 pattern");
  return result;
}

PreTokenizer PreTokenizer::gpt2_byte_level() {
  PreTokenizer result;
  result.byte_level_ = ByteLevelStep{false, true};
  result.gpt2_regex_ = Regex::compile(kGpt2Pattern, false, "GPT-2 pattern");
  return result;
}

void PreTokenizer::split(std::string_view text, PreTokenizerScratch& scratch,
                         const std::function<void(std::string_view)>& emit) const {
  auto& pieces = scratch.pieces;
  pieces.clear();
  if (!text.empty()) pieces.push_back(text);
  for (const SplitStep& step : steps_) {
    auto& next = scratch.next_pieces;
    next.clear();
    for (std::string_view piece : pieces) {
      find_matches(step.regex, piece, scratch.match, scratch.spans);
      if (step.invert)
        for (auto& s : scratch.spans) s.is_match = !s.is_match;
      apply_behavior(scratch.spans, step.behavior);
      for (const SplitSpan& s : scratch.spans)
        if (!s.is_match && s.end > s.begin) next.push_back(piece.substr(s.begin, s.end - s.begin));
    }
    pieces.swap(next);
  }
  for (std::string_view piece : pieces) {
    std::string_view subject = piece;
    if (byte_level_.add_prefix_space && piece.front() != ' ') {
      scratch.prefixed.assign(" ");
      scratch.prefixed.append(piece);
      subject = scratch.prefixed;
    }
    if (!byte_level_.use_regex) {
      emit(subject);
      continue;
    }
    find_matches(gpt2_regex_, subject, scratch.match, scratch.spans);
    for (const SplitSpan& s : scratch.spans)
      if (s.end > s.begin) emit(subject.substr(s.begin, s.end - s.begin));
  }
}

// --- added tokens ----------------------------------------------------------------------

AddedTokenSplitter::AddedTokenSplitter(std::vector<AddedToken> tokens)
    : tokens_(std::move(tokens)), by_first_byte_(256) {
  for (uint32_t i = 0; i < tokens_.size(); ++i)
    by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(i);
  for (auto& list : by_first_byte_)
    std::stable_sort(list.begin(), list.end(), [&](uint32_t a, uint32_t b) {
      return tokens_[a].content.size() > tokens_[b].content.size();
    });
}

void AddedTokenSplitter::split(std::vector<Segment>& segments, std::vector<Segment>& scratch) const {
  scratch.clear();
  for (const Segment& segment : segments) {
    if (segment.id >= 0) {
      scratch.push_back(segment);
    } else {
      split_one(segment.text, scratch);
    }
  }
  segments.swap(scratch);
}

// `tokenizers`' AddedVocabulary::find_matches. The search is an Aho-Corasick
// leftmost-longest scan: after a match, even a discarded one, it resumes at
// the match's end.
void AddedTokenSplitter::split_one(std::string_view text, std::vector<Segment>& out) const {
  thread_local MatchData match;
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* found = nullptr;
    size_t start = pos;
    for (; start < text.size(); ++start) {
      for (uint32_t index : by_first_byte_[static_cast<uint8_t>(text[start])]) {
        const std::string& content = tokens_[index].content;
        if (text.compare(start, content.size(), content) == 0) {
          found = &tokens_[index];
          break;
        }
      }
      if (found != nullptr) break;
    }
    if (found == nullptr) break;
    size_t stop = start + found->content.size();
    pos = stop;
    if (found->single_word) {
      const bool start_space = start == 0 || !is_word_character(text, last_char_start(text.substr(0, start)), match);
      const bool stop_space = stop == text.size() || !is_word_character(text, stop, match);
      if (!start_space || !stop_space) continue;
    }
    if (found->lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        const size_t prev = last_char_start(text.substr(0, new_start));
        size_t len;
        if (!is_white_space(decode_utf8(text, prev, len))) break;
        new_start = prev;
      }
      start = std::max(new_start, start_offset);
    }
    if (found->rstrip) {
      while (stop < text.size()) {
        size_t len;
        if (!is_white_space(decode_utf8(text, stop, len))) break;
        stop += len;
      }
    }
    if (start_offset < start) out.push_back({text.substr(start_offset, start - start_offset), -1});
    out.push_back({text.substr(start, stop - start), found->id});
    start_offset = stop;
  }
  if (start_offset < text.size()) out.push_back({text.substr(start_offset), -1});
}

// --- tokenizer.json field access ---------------------------------------------------------

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

std::string clip(std::string_view text, size_t max_chars) {
  if (text.size() <= max_chars) return std::string(text);
  return std::string(text.substr(0, max_chars)) + "...";
}

std::string json_preview(const json& value) {
  return clip(value.dump(-1, ' ', false, json::error_handler_t::replace));
}

}  // namespace loom::tokenization
