#include "data/pretokenizer.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <optional>

#include "data/tokenizer_json.h"

namespace loom::tokenization {

using nlohmann::json;

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

SplitBehavior parse_behavior(const json& spec, const std::string& where, const std::string& file,
                             std::optional<SplitBehavior> fallback = std::nullopt) {
  if (fallback && (!spec.contains("behavior") || spec["behavior"].is_null())) return *fallback;
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

}  // namespace

MetaspaceStep::Prepend parse_prepend_scheme(const json& spec, const std::string& where, const std::string& file) {
  if (const auto it = spec.find("prepend_scheme"); it == spec.end() || it->is_null()) {
    // Files written before prepend_scheme existed say add_prefix_space.
    return json_bool(spec, "add_prefix_space", true, where, file) ? MetaspaceStep::Prepend::kAlways
                                                                  : MetaspaceStep::Prepend::kNever;
  }
  const std::string scheme = json_string(spec, "prepend_scheme", where, file);
  if (scheme == "always") return MetaspaceStep::Prepend::kAlways;
  if (scheme == "first") return MetaspaceStep::Prepend::kFirst;
  if (scheme == "never") return MetaspaceStep::Prepend::kNever;
  json_fail(file, where + ".prepend_scheme", "'" + clip(scheme) + "' is not first, always or never");
}

namespace {

MetaspaceStep parse_metaspace(const json& spec, const std::string& where, const std::string& file) {
  MetaspaceStep step;
  step.replacement = json_char(spec, "replacement", where, file);
  step.prepend = parse_prepend_scheme(spec, where, file);
  if (json_bool(spec, "split", true, where, file))
    step.split = SplitStep{Regex::compile(step.replacement, true, file + ": " + where),
                           SplitBehavior::kMergedWithNext, false};
  return step;
}

SplitStep pattern_step(std::string_view pattern, SplitBehavior behavior, bool invert, const std::string& name) {
  return SplitStep{Regex::compile(pattern, false, name), behavior, invert};
}

// Appends the steps of `spec` (recursing into Sequence) to `steps`.
// Steps after ByteLevel (Falcon's Digits and Split) go to `after_byte_level`
// and must be splits: they see the GPT-2 characters, not the text.
void parse_steps(const json& spec, const std::string& where, const std::string& file,
                 std::vector<PreTokenizerStep>& steps, std::optional<ByteLevelStep>& byte_level,
                 std::vector<SplitStep>& after_byte_level) {
  if (!spec.is_object()) json_fail(file, where, "expected an object, found " + json_preview(spec));
  const std::string type = json_string(spec, "type", where, file);
  if (byte_level && (type == "ByteLevel" || type == "Metaspace"))
    json_fail(file, where, "'" + clip(type) + "' after ByteLevel is not supported (only splits may follow it)");
  const std::string word(kWordClass);
  if (type == "Sequence") {
    const json& list = json_list(spec, "pretokenizers", where, file);
    for (size_t i = 0; i < list.size(); ++i)
      parse_steps(list[i], where + ".pretokenizers[" + std::to_string(i) + "]", file, steps, byte_level,
                  after_byte_level);
    return;
  }
  if (byte_level) {  // a split after ByteLevel: parse it as usual, then move it over
    std::vector<PreTokenizerStep> one;
    std::optional<ByteLevelStep> none;
    parse_steps(spec, where, file, one, none, after_byte_level);
    after_byte_level.push_back(std::get<SplitStep>(std::move(one.front())));
    return;
  }
  if (type == "ByteLevel") {
    byte_level = ByteLevelStep{json_bool(spec, "add_prefix_space", true, where, file),
                               json_bool(spec, "use_regex", true, where, file)};
  } else if (type == "Split") {
    steps.push_back(SplitStep{json_pattern(spec, where, file), parse_behavior(spec, where, file),
                              json_bool(spec, "invert", false, where, file)});
  } else if (type == "Digits") {
    // `tokenizers` splits on char::is_numeric (categories Nd, Nl, No = \p{N}):
    // each digit alone (Isolated), or runs of digits (Contiguous, which is
    // the same as isolating maximal runs).
    const bool individual = json_bool(spec, "individual_digits", false, where, file);
    steps.push_back(pattern_step(individual ? R"(\p{N})" : R"(\p{N}+)", SplitBehavior::kIsolated, false, "Digits"));
  } else if (type == "Punctuation") {
    // char::is_ascii_punctuation (which counts $+<=>^`|~ too) or a Unicode
    // punctuation category; one match per character.
    steps.push_back(pattern_step(R"([\p{P}\x{21}-\x{2F}\x{3A}-\x{40}\x{5B}-\x{60}\x{7B}-\x{7E}])",
                                 parse_behavior(spec, where, file, SplitBehavior::kIsolated), false, "Punctuation"));
  } else if (type == "Whitespace") {
    // Runs of word characters, and runs of what is neither word nor space;
    // the spaces between them are dropped.
    steps.push_back(pattern_step("[" + word + "]+|[^" + word + R"(\p{White_Space}]+)", SplitBehavior::kRemoved, true,
                                 "Whitespace"));
  } else if (type == "WhitespaceSplit") {
    steps.push_back(pattern_step(R"(\p{White_Space})", SplitBehavior::kRemoved, false, "WhitespaceSplit"));
  } else if (type == "CharDelimiterSplit") {
    const std::string delimiter = json_char(spec, "delimiter", where, file);
    steps.push_back(SplitStep{Regex::compile(delimiter, true, file + ": " + where), SplitBehavior::kRemoved, false});
  } else if (type == "Metaspace") {
    steps.push_back(parse_metaspace(spec, where, file));
  } else {
    json_fail(file, where + ".type",
              "'" + clip(type) + "' is not supported (loom reads the ByteLevel, Metaspace, Split, Digits, "
                                 "Punctuation, Whitespace, WhitespaceSplit, CharDelimiterSplit and Sequence "
                                 "pre-tokenizers)");
  }
}

// Splits every piece of `pieces` into `next` as `step` says.
void apply_split(const SplitStep& step, const std::vector<Piece>& pieces, PreTokenizerScratch& scratch,
                 std::vector<Piece>& next) {
  for (const Piece& piece : pieces) {
    find_matches(step.regex, piece.text, scratch.match, scratch.spans);
    if (step.invert)
      for (auto& s : scratch.spans) s.is_match = !s.is_match;
    apply_behavior(scratch.spans, step.behavior);
    for (const SplitSpan& s : scratch.spans)
      if (!s.is_match && s.end > s.begin)
        next.push_back({piece.text.substr(s.begin, s.end - s.begin), piece.at_start && s.begin == 0});
  }
}

// `tokenizers`' Metaspace::pre_tokenize: rewrites every piece into `buffer`.
void apply_metaspace(const MetaspaceStep& step, const std::vector<Piece>& pieces, PreTokenizerScratch& scratch,
                     std::string& buffer, std::vector<Piece>& next) {
  // The pieces must not move while `next` points into the buffer: reserve
  // what the longest rewrite can take (every byte a space, plus a prefix).
  size_t bound = 0;
  for (const Piece& piece : pieces) bound += (piece.text.size() + 1) * step.replacement.size();
  buffer.clear();
  buffer.reserve(bound);
  std::vector<Piece>& rewritten = scratch.rewritten_pieces;
  rewritten.clear();
  for (const Piece& piece : pieces) {
    const size_t begin = buffer.size();
    // The prefix goes where the rewritten piece does not already start with it.
    const bool starts_with_replacement = piece.text.starts_with(' ') || piece.text.starts_with(step.replacement);
    const bool prepend = step.prepend == MetaspaceStep::Prepend::kAlways ||
                         (step.prepend == MetaspaceStep::Prepend::kFirst && piece.at_start);
    if (prepend && !starts_with_replacement) buffer += step.replacement;
    for (char c : piece.text) {
      if (c == ' ') {
        buffer += step.replacement;
      } else {
        buffer += c;
      }
    }
    rewritten.push_back({std::string_view(buffer).substr(begin), piece.at_start});
  }
  if (step.split) {
    apply_split(*step.split, rewritten, scratch, next);
  } else {
    for (const Piece& piece : rewritten)
      if (!piece.text.empty()) next.push_back(piece);
  }
}

}  // namespace

// --- PreTokenizer ----------------------------------------------------------------------

PreTokenizer PreTokenizer::from_json(const json& spec, const std::string& file) {
  PreTokenizer result;
  result.gpt2_regex_ = Regex::compile(kGpt2Pattern, false, "GPT-2 pattern");
  if (spec.is_null()) return result;
  parse_steps(spec, "pre_tokenizer", file, result.steps_, result.byte_level_, result.after_byte_level_);
  return result;
}

PreTokenizer PreTokenizer::gpt2_byte_level() {
  PreTokenizer result;
  result.byte_level_ = ByteLevelStep{false, true};
  result.gpt2_regex_ = Regex::compile(kGpt2Pattern, false, "GPT-2 pattern");
  return result;
}

void PreTokenizer::split(std::string_view text, bool at_start, PreTokenizerScratch& scratch,
                         const std::function<void(std::string_view)>& emit) const {
  auto& pieces = scratch.pieces;
  pieces.clear();
  if (!text.empty()) pieces.push_back({text, at_start});
  size_t buffers = 0;
  for (const PreTokenizerStep& step : steps_) buffers += std::holds_alternative<MetaspaceStep>(step);
  if (scratch.rewritten.size() < buffers) scratch.rewritten.resize(buffers);
  size_t buffer = 0;
  auto& next = scratch.next_pieces;
  for (const PreTokenizerStep& step : steps_) {
    next.clear();
    if (const auto* split_step = std::get_if<SplitStep>(&step)) {
      apply_split(*split_step, pieces, scratch, next);
    } else {
      apply_metaspace(std::get<MetaspaceStep>(step), pieces, scratch, scratch.rewritten[buffer++], next);
    }
    pieces.swap(next);
  }
  for (const Piece& piece : pieces) {
    if (!byte_level_) {
      emit(piece.text);
      continue;
    }
    std::string_view subject = piece.text;
    if (byte_level_->add_prefix_space && subject.front() != ' ') {
      scratch.prefixed.assign(" ");
      scratch.prefixed.append(subject);
      subject = scratch.prefixed;
    }
    const auto emit_byte_level = [&](std::string_view bytes) {
      if (after_byte_level_.empty()) {
        emit(bytes);
      } else {
        split_after_byte_level(bytes, scratch, emit);
      }
    };
    if (!byte_level_->use_regex) {
      emit_byte_level(subject);
      continue;
    }
    find_matches(gpt2_regex_, subject, scratch.match, scratch.spans);
    std::vector<SplitSpan> spans;
    spans.swap(scratch.spans);  // split_after_byte_level needs scratch.spans
    for (const SplitSpan& s : spans)
      if (s.end > s.begin) emit_byte_level(subject.substr(s.begin, s.end - s.begin));
    spans.swap(scratch.spans);
  }
}

void PreTokenizer::split_after_byte_level(std::string_view bytes, PreTokenizerScratch& scratch,
                                          const std::function<void(std::string_view)>& emit) const {
  // The steps see each byte as its GPT-2 character (so byte 0xB2 is '²', a
  // digit to Digits); their pieces go back to bytes for the model.
  std::string& mapped = scratch.mapped;
  mapped.clear();
  for (unsigned char b : bytes) mapped += byte_to_unicode(b);
  std::vector<Piece> pieces = {{mapped, false}};
  std::vector<Piece> next;
  std::vector<SplitSpan> spans;
  for (const SplitStep& step : after_byte_level_) {
    next.clear();
    for (const Piece& piece : pieces) {
      find_matches(step.regex, piece.text, scratch.match, spans);
      if (step.invert)
        for (auto& s : spans) s.is_match = !s.is_match;
      apply_behavior(spans, step.behavior);
      for (const SplitSpan& s : spans)
        if (!s.is_match && s.end > s.begin) next.push_back({piece.text.substr(s.begin, s.end - s.begin), false});
    }
    pieces.swap(next);
  }
  std::string raw;
  for (const Piece& piece : pieces) {
    unicode_to_bytes(piece.text, raw);  // every character is in the table: it came from it
    emit(raw);
  }
}

}  // namespace loom::tokenization
