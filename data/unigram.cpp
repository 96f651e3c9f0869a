#include "data/unigram.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

#include "data/text_unicode.h"
#include "data/tokenizer_json.h"
#include "util/error.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

// SentencePiece's penalty for an unknown character, below the rarest piece.
constexpr double kUnkPenalty = 10.0;

}  // namespace

UnigramModel UnigramModel::from_json(const json& model, const std::string& file) {
  UnigramModel result;
  result.source_ = file;
  const json& vocab = json_field(model, "vocab", "model", file);
  if (!vocab.is_array() || vocab.empty())
    json_fail(file, "model.vocab", "expected a non-empty list of [\"piece\", score], found " + json_preview(vocab));
  double min_score = std::numeric_limits<double>::infinity();
  for (size_t id = 0; id < vocab.size(); ++id) {
    const json& entry = vocab[id];
    const std::string where = "model.vocab[" + std::to_string(id) + "]";
    if (!entry.is_array() || entry.size() != 2 || !entry[0].is_string() || !entry[1].is_number())
      json_fail(file, where, "expected [\"piece\", score], found " + json_preview(entry));
    std::string token = entry[0].get<std::string>();
    if (find_invalid_utf8(token) != std::string::npos) json_fail(file, where, "the piece is not valid UTF-8");
    const double score = entry[1].get<double>();
    min_score = std::min(min_score, score);
    result.max_token_bytes_ = std::max(result.max_token_bytes_, token.size());
    // A repeated piece takes its last id, as in `tokenizers` (a map insert).
    result.ids_.insert_or_assign(token, static_cast<int32_t>(id));
    result.tokens_.push_back(std::move(token));
    result.scores_.push_back(score);
  }
  result.unk_score_ = min_score - kUnkPenalty;
  if (const auto it = model.find("unk_id"); it != model.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<uint64_t>() >= vocab.size())
      json_fail(file, "model.unk_id", "expected an id below " + std::to_string(vocab.size()) + ", found " +
                                          json_preview(*it));
    result.unk_id_ = static_cast<int32_t>(it->get<uint64_t>());
  }
  result.byte_fallback_ = json_bool(model, "byte_fallback", false, "model", file);
  return result;
}

std::optional<int32_t> UnigramModel::token_to_id(std::string_view token) const {
  const auto it = ids_.find(token);
  if (it == ids_.end()) return std::nullopt;
  return it->second;
}

// `tokenizers`' Unigram::encode_optimized, then tokenize's byte fallback.
void UnigramModel::encode(std::string_view piece, std::vector<int32_t>& ids) const {
  struct Node {
    int32_t id = -1;
    double score = 0.0;
    size_t starts_at = std::string_view::npos;  // npos: no path reaches here yet
  };
  const size_t size = piece.size();
  std::vector<Node> best(size + 1);
  for (size_t start = 0; start < size;) {
    const double score_here = best[start].score;
    size_t char_len;
    decode_utf8(piece, start, char_len);
    bool has_single_char = false;
    // Every piece that starts here, shortest first (a strictly better score
    // wins, so the first of equal paths stays).
    const size_t longest = std::min(max_token_bytes_, size - start);
    for (size_t len = 1; len <= longest; ++len) {
      const auto it = ids_.find(piece.substr(start, len));
      if (it == ids_.end()) continue;
      Node& target = best[start + len];
      const double candidate = scores_[it->second] + score_here;
      if (target.starts_at == std::string_view::npos || candidate > target.score) target = {it->second, candidate, start};
      if (len == char_len) has_single_char = true;
    }
    if (!has_single_char) {
      if (!unk_id_)
        throw BadInput(source_ + ": the Unigram model has no unk_id, and no piece covers the character at byte " +
                       std::to_string(start) + " of '" + clip(piece) + "'");
      Node& target = best[start + char_len];
      const double candidate = unk_score_ + score_here;
      if (target.starts_at == std::string_view::npos || candidate > target.score) target = {*unk_id_, candidate, start};
    }
    start += char_len;
  }

  // Back from the end; with fuse_unk (always on for Unigram) neighbouring
  // unknowns become one token.
  std::vector<std::pair<size_t, size_t>> spans;  // [begin, end) per token, reversed
  std::vector<bool> unknown;
  for (size_t end = size; end > 0;) {
    const Node& node = best[end];
    const bool is_unk = unk_id_ && node.id == *unk_id_;
    if (is_unk && fuse_unk_ && !unknown.empty() && unknown.back()) {
      spans.back().first = node.starts_at;
    } else {
      spans.emplace_back(node.starts_at, end);
      unknown.push_back(is_unk);
    }
    end = node.starts_at;
  }
  for (size_t k = spans.size(); k-- > 0;) {
    const std::string_view text = piece.substr(spans[k].first, spans[k].second - spans[k].first);
    if (const auto it = ids_.find(text); it != ids_.end()) {
      ids.push_back(it->second);
      continue;
    }
    if (byte_fallback_) {
      const size_t mark = ids.size();
      bool all = true;
      for (unsigned char byte : text) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned>(byte));
        const auto found = ids_.find(std::string_view(name));
        if (found == ids_.end()) {
          all = false;
          break;
        }
        ids.push_back(found->second);
      }
      if (all) continue;
      ids.resize(mark);
    }
    if (!unk_id_)
      throw BadInput(source_ + ": the Unigram model has no unk_id for '" + clip(text) + "'");
    ids.push_back(*unk_id_);
  }
}

}  // namespace loom::tokenization
