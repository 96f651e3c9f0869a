// Pre-tokenization, matching Hugging Face `tokenizers`: a list of steps, each
// applied to every piece the steps before it made (Split, Digits,
// Punctuation, Whitespace, WhitespaceSplit, CharDelimiterSplit, Metaspace,
// nested in any Sequence), optionally followed by ByteLevel and then more
// splits (Falcon's Digits and Split), which see GPT-2 characters.
//
// Pieces are views of the input, or of a per-thread buffer once a Metaspace
// step has rewritten them. ByteLevel's byte -> unicode mapping is not applied
// here: a byte-level BPE model starts from one symbol per raw byte (see
// tokenizer.cpp), which is equivalent and avoids a copy per piece; only the
// rare splits after ByteLevel map a piece to characters and back.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "data/text_unicode.h"

namespace loom::tokenization {

// `tokenizers`' SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits every piece at the matches of a pattern. Split, Digits,
// Punctuation, Whitespace, WhitespaceSplit and CharDelimiterSplit are all
// this step with their own pattern and behavior.
struct SplitStep {
  Regex regex;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

// SentencePiece's word boundary: spaces become `replacement` (U+2581 "▁"),
// which is prepended to the first piece of the input ("first"), to every
// piece ("always") or never, and each piece is split before every
// replacement when `split`.
struct MetaspaceStep {
  enum class Prepend { kAlways, kFirst, kNever };
  std::string replacement;
  Prepend prepend = Prepend::kAlways;
  std::optional<SplitStep> split;  // at the replacement, MergedWithNext
};

using PreTokenizerStep = std::variant<SplitStep, MetaspaceStep>;

// A Metaspace's `prepend_scheme` (or the older `add_prefix_space`), for the
// pre-tokenizer and the decoder alike.
MetaspaceStep::Prepend parse_prepend_scheme(const nlohmann::json& spec, const std::string& where,
                                            const std::string& file);

struct ByteLevelStep {
  bool add_prefix_space = false;
  bool use_regex = true;
};

// A piece being split: its text, and whether it begins at the first byte of
// the text given to encode (what Metaspace's prepend_scheme "first" asks).
struct Piece {
  std::string_view text;
  bool at_start = false;
};

// Reusable buffers for one thread's calls to PreTokenizer::split.
struct PreTokenizerScratch {
  MatchData match;
  std::vector<Piece> pieces;
  std::vector<Piece> next_pieces;
  std::vector<Piece> rewritten_pieces;  // a Metaspace step's pieces before its split
  std::vector<SplitSpan> spans;
  std::vector<std::string> rewritten;  // one buffer per Metaspace step; pieces point into them
  std::string prefixed;                // " " + piece, for ByteLevel(add_prefix_space)
  std::string mapped;                  // a piece in GPT-2 characters, for the splits after ByteLevel
};

class PreTokenizer {
 public:
  // Parses the `pre_tokenizer` value of a tokenizer.json (null: the text is
  // one piece). Throws BadInput naming `file` and the unsupported or
  // malformed part.
  static PreTokenizer from_json(const nlohmann::json& spec, const std::string& file);
  // ByteLevel(add_prefix_space=false, use_regex=true): GPT-2's pre-tokenizer.
  static PreTokenizer gpt2_byte_level();

  // Whether the pieces are raw bytes to be read through the GPT-2 byte
  // alphabet (the pre-tokenizer ends with ByteLevel); otherwise they are
  // UTF-8 text whose characters the model looks up as they are.
  bool byte_level() const { return byte_level_.has_value(); }

  // Calls `emit` with every pre-token of `text` (in order, never empty). The
  // views are valid only during the call. `text` must be valid UTF-8;
  // `at_start` says it begins the text given to encode.
  void split(std::string_view text, bool at_start, PreTokenizerScratch& scratch,
             const std::function<void(std::string_view)>& emit) const;
  void split(std::string_view text, PreTokenizerScratch& scratch,
             const std::function<void(std::string_view)>& emit) const {
    split(text, true, scratch, emit);
  }

 private:
  // Splits a ByteLevel piece further with after_byte_level_.
  void split_after_byte_level(std::string_view bytes, PreTokenizerScratch& scratch,
                              const std::function<void(std::string_view)>& emit) const;

  std::vector<PreTokenizerStep> steps_;  // before ByteLevel
  std::optional<ByteLevelStep> byte_level_;
  std::vector<SplitStep> after_byte_level_;  // run on GPT-2 characters
  Regex gpt2_regex_;  // used when byte_level_->use_regex
};

// The GPT-2 pre-tokenization pattern (what ByteLevel(use_regex=true) splits on).
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Rust's Unicode \w (Alphabetic, marks, decimal digits, connector
// punctuation, joiners), as a class body to put inside [...].
inline constexpr std::string_view kWordClass = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D})";

}  // namespace loom::tokenization
