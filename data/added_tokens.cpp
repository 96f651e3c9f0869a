#include "data/added_tokens.h"

#include <algorithm>

#include "data/text_unicode.h"

namespace loom::tokenization {
namespace {


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

}  // namespace loom::tokenization
