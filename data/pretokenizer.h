// Pre-tokenization for byte-level BPE, matching Hugging Face `tokenizers`:
// the GPT-2 byte <-> unicode table, a PCRE2 regex wrapper, the split steps
// (Split, Digits, ByteLevel, Sequence of them) and the added-token splitter.
//
// Pieces are views of the raw UTF-8 input. ByteLevel's byte -> unicode
// mapping is not applied here: the BPE model starts from one symbol per raw
// byte (see tokenizer.cpp), which is equivalent and avoids a copy per piece.
// That is why ByteLevel must be the last step of a pre-tokenizer.
//
// Note [onig vs PCRE2]: `tokenizers` compiles patterns with Oniguruma; loom
// uses PCRE2 in UTF + UCP mode. They agree on the constructs tokenizer files
// use (\p{L}, \p{N}, \s, (?i:...), lookahead, bounded repeats); the Unicode
// tables may differ for code points assigned in recent Unicode versions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

struct pcre2_real_code_8;
struct pcre2_real_match_data_8;

namespace loom::tokenization {

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

// --- pre-tokenizer steps -----------------------------------------------------------
// `tokenizers`' SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  Regex regex;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

struct ByteLevelStep {
  bool add_prefix_space = false;
  bool use_regex = true;
};

// Reusable buffers for one thread's calls to PreTokenizer::split.
struct PreTokenizerScratch {
  MatchData match;
  std::vector<std::string_view> pieces;
  std::vector<std::string_view> next_pieces;
  std::vector<SplitSpan> spans;
  std::string prefixed;  // " " + piece, for ByteLevel(add_prefix_space)
};

// A list of split steps ending in ByteLevel.
class PreTokenizer {
 public:
  // Parses the `pre_tokenizer` object of a tokenizer.json. Throws BadInput
  // naming `file` and the unsupported or malformed part.
  static PreTokenizer from_json(const nlohmann::json& spec, const std::string& file);
  // ByteLevel(add_prefix_space=false, use_regex=true): GPT-2's pre-tokenizer.
  static PreTokenizer gpt2_byte_level();

  // Calls `emit` with every pre-token of `text` (raw bytes, in order, never
  // empty). The views are valid only during the call. `text` must be valid UTF-8.
  void split(std::string_view text, PreTokenizerScratch& scratch,
             const std::function<void(std::string_view)>& emit) const;

 private:
  std::vector<SplitStep> steps_;  // before ByteLevel
  ByteLevelStep byte_level_;
  Regex gpt2_regex_;  // used when byte_level_.use_regex
};

// The GPT-2 pre-tokenization pattern (what ByteLevel(use_regex=true) splits on).
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// --- added tokens ------------------------------------------------------------------
struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

// A segment of the input: either an added token (id >= 0) or text still to be
// pre-tokenized (id == -1).
struct Segment {
  std::string_view text;
  int32_t id;
};

// Finds added tokens in text as `tokenizers`' AddedVocabulary does:
// leftmost-longest, non-overlapping, honouring single_word, lstrip, rstrip.
class AddedTokenSplitter {
 public:
  AddedTokenSplitter() = default;
  // `tokens`: the entries to match (non-empty contents), in priority order
  // for equal contents.
  explicit AddedTokenSplitter(std::vector<AddedToken> tokens);

  bool empty() const { return tokens_.empty(); }
  // Replaces the text segments of `segments` by their splits.
  void split(std::vector<Segment>& segments, std::vector<Segment>& scratch) const;

 private:
  void split_one(std::string_view text, std::vector<Segment>& out) const;
  std::vector<AddedToken> tokens_;
  // For each first byte, indices into tokens_ sorted by length, longest first.
  std::vector<std::vector<uint32_t>> by_first_byte_;
};

// --- tokenizer.json field access (shared by the parsers) -----------------------
// Every failure is BadInput "<file>: <where>: <what>"; `where` is the JSON
// path ("model.vocab", "pre_tokenizer.pretokenizers[1]").
[[noreturn]] void json_fail(const std::string& file, const std::string& where, const std::string& what);
// `object[key]`; fails when `object` is not an object or has no `key`.
const nlohmann::json& json_field(const nlohmann::json& object, const char* key, const std::string& where,
                                 const std::string& file);
std::string json_string(const nlohmann::json& object, const char* key, const std::string& where,
                        const std::string& file);
// `fallback` when the key is absent or null.
bool json_bool(const nlohmann::json& object, const char* key, bool fallback, const std::string& where,
               const std::string& file);
// Text from an untrusted file, capped for messages.
std::string clip(std::string_view text, size_t max_chars = 120);
std::string json_preview(const nlohmann::json& value);

}  // namespace loom::tokenization
