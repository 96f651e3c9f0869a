// Added tokens (special tokens and tokens added after training): found in
// the text before pre-tokenization, as `tokenizers`' AddedVocabulary does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loom::tokenization {

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

}  // namespace loom::tokenization
