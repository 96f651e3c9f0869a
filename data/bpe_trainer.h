// Training a byte-level BPE tokenizer (what `loom tokenizer train` runs).
//
// The text is split like GPT-2's (special tokens first, then ByteLevel with
// the GPT-2 pattern, no prefix space); each distinct pre-token is a word with
// a count. Training starts from the special tokens (ids 0..k-1) and the 256
// byte symbols (ids k.., in the order of GPT-2's vocabulary: '!'..'~', '¡'..'¬',
// '®'..'ÿ', then the remaining bytes), and repeatedly merges the most frequent
// adjacent pair until the vocabulary has `vocab_size` entries or no pair is
// left. Ties go to the pair whose (left, right) raw bytes sort first, so the
// result does not depend on hash-map order. Pair counts are updated
// incrementally (a pair -> words index and a lazily refreshed max-heap, as in
// `tokenizers`' BpeTrainer), so each merge touches only the words that
// contain the pair.
//
// The result is written as a tokenizer.json that the Python `tokenizers`
// package loads and encodes exactly as loom::Tokenizer does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loom {

struct TrainedTokenizer {
  // Vocabulary entries by id, as written in tokenizer.json: the special
  // tokens' contents, then byte-level strings ("Ġthe").
  std::vector<std::string> vocab;
  int32_t num_special_tokens = 0;  // ids [0, num_special_tokens) are special
  // Merges in rank order, as (left, right) ids.
  std::vector<std::pair<int32_t, int32_t>> merges;

  // The tokenizer.json text (see the note at the top for its settings).
  std::string to_json() const;
  // Writes to_json() to `path` atomically.
  void write_tokenizer_json(const std::string& path) const;
};

// Trains on the contents of `files` (each read whole; must be UTF-8).
// Throws BadInput naming the file that cannot be read or is not UTF-8, or
// when vocab_size cannot hold the special tokens and the 256 byte symbols.
TrainedTokenizer train_bpe(const std::vector<std::string>& files, int64_t vocab_size,
                           const std::vector<std::string>& special_tokens);

// The same on texts in memory; `names` (parallel to `texts`, or empty) name
// them in messages.
TrainedTokenizer train_bpe_on_texts(const std::vector<std::string_view>& texts, int64_t vocab_size,
                                    const std::vector<std::string>& special_tokens,
                                    const std::vector<std::string>& names = {});

}  // namespace loom
