// Text plumbing shared by the tokenizer's parts (data/pretokenizer.*,
// data/normalizer.*, data/token_decoder.*, data/added_tokens.*): UTF-8
// validation and repair, the GPT-2 byte <-> unicode table, and a PCRE2
// regex wrapper that behaves as the Oniguruma regexes `tokenizers` uses.
//
// Note [onig vs PCRE2]: `tokenizers` compiles patterns with Oniguruma; loom
// uses PCRE2 in UTF + UCP mode. They agree on the constructs tokenizer files
// use (\p{L}, \p{N}, \s, (?i:...), lookahead, bounded repeats); the Unicode
// tables may differ for code points assigned in recent Unicode versions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

struct pcre2_real_code_8;
struct pcre2_real_match_data_8;

namespace loom::tokenization {

// A map from strings that is looked up by string_view without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// --- GPT-2 byte-level alphabet ---------------------------------------------------
// GPT-2 maps every byte to a printable code point: '!'..'~', '¡'..'¬', '®'..'ÿ'
// map to themselves, the other 68 bytes to U+0100.. in byte order.

// UTF-8 of the code point byte `b` maps to.
const std::string& byte_to_unicode(uint8_t b);
// The bytes a byte-level token string stands for; false (and `out`
// unspecified) when a character of `token` is not in the table.
bool unicode_to_bytes(std::string_view token, std::string& out);
// Code point -> byte, or -1 when the code point is not in the table.
int unicode_char_to_byte(uint32_t code_point);

// --- UTF-8 -------------------------------------------------------------------------
// Offset of the first byte that does not start a well-formed UTF-8 sequence,
// or npos when all of `text` is well formed.
size_t find_invalid_utf8(std::string_view text);
// `bytes` with every ill-formed sequence replaced by U+FFFD, as Rust's
// String::from_utf8_lossy does (one replacement per maximal ill-formed part).
std::string utf8_lossy(std::string_view bytes);
// Appends the UTF-8 of code point `cp`.
void append_utf8(uint32_t cp, std::string& out);
// Decodes the character at text[i] and sets `len` to its byte length; an
// ill-formed sequence gives U+FFFD with `len` 1.
uint32_t decode_utf8(std::string_view text, size_t i, size_t& len);
// Rust's char::is_whitespace: the Unicode White_Space property.
bool is_white_space(uint32_t code_point);

// --- PCRE2 -------------------------------------------------------------------------
struct Pcre2CodeDeleter {
  void operator()(pcre2_real_code_8* code) const;
};
struct Pcre2MatchDataDeleter {
  void operator()(pcre2_real_match_data_8* data) const;
};

// Match state for one thread. Regexes are shared between threads; this is not.
class MatchData {
 public:
  MatchData();
  pcre2_real_match_data_8* get() const { return data_.get(); }

 private:
  std::unique_ptr<pcre2_real_match_data_8, Pcre2MatchDataDeleter> data_;
};

// A compiled pattern (UTF, UCP, JIT when available). Immutable; matching from
// several threads at once is safe with one MatchData per thread.
class Regex {
 public:
  // Throws BadInput "<context>: invalid regex '<pattern>': <reason>".
  static Regex compile(std::string_view pattern, bool literal, const std::string& context);

  // The first match in `subject` starting at or after byte `start`. The
  // subject must be valid UTF-8 (callers validate once; see
  // Tokenizer::encode). Returns false when there is none.
  bool find(std::string_view subject, size_t start, MatchData& match, size_t& begin, size_t& end) const;

 private:
  std::shared_ptr<pcre2_real_code_8> code_;
};

// One piece of a split: bytes [begin, end) of the subject and whether they
// are a match of the pattern.
struct SplitSpan {
  size_t begin;
  size_t end;
  bool is_match;
};

// All matches of `regex` in `subject`, with the gaps between them, as
// `tokenizers`' Pattern::find_matches on an Oniguruma regex: an empty match
// right after the previous match is skipped (the search moves one character
// on), so empty matches act as split points but never loop.
void find_matches(const Regex& regex, std::string_view subject, MatchData& match, std::vector<SplitSpan>& out);

}  // namespace loom::tokenization
