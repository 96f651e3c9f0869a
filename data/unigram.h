// The Unigram model of a tokenizer.json (SentencePiece's unigram language
// model, as Hugging Face `tokenizers` runs it): each pre-token is cut into
// the vocabulary pieces whose scores (log probabilities) sum highest, by
// Viterbi over every piece that starts at each character. A character no
// piece covers costs the lowest score minus 10 and becomes unk_id (runs of
// them fused into one when fuse_unk), or its UTF-8 bytes as <0xXX> tokens
// when byte_fallback finds them all.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "data/text_unicode.h"

namespace loom::tokenization {

// A JSON number's text read as serde_json (and so `tokenizers`) reads it,
// not always the nearest double (Note [scores as serde_json reads them]).
double serde_json_f64(std::string_view text);

class UnigramModel {
 public:
  // `model` is the tokenizer.json's "model" object with type "Unigram";
  // `json_text` the whole file, whose number texts give the scores (see
  // Note [scores as serde_json reads them] in unigram.cpp).
  static UnigramModel from_json(const nlohmann::json& model, std::string_view json_text, const std::string& file);

  // The vocabulary: token string by id.
  const std::vector<std::string>& tokens() const { return tokens_; }
  // Token string -> id (a repeated piece: its last id).
  const StringMap<int32_t>& vocab() const { return ids_; }
  std::optional<int32_t> token_to_id(std::string_view token) const;

  // Appends the ids of `piece` (valid UTF-8). Throws BadInput when a
  // character needs an unknown token and the model has no unk_id.
  void encode(std::string_view piece, std::vector<int32_t>& ids) const;

 private:
  std::vector<std::string> tokens_;
  std::vector<double> scores_;
  StringMap<int32_t> ids_;
  std::optional<int32_t> unk_id_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = true;
  double unk_score_ = 0.0;
  size_t max_token_bytes_ = 0;
  std::string source_;
};

}  // namespace loom::tokenization
