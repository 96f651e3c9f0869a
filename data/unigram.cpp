#include "data/unigram.h"

#include <algorithm>
#include <cstdlib>
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

// Note [scores as serde_json reads them]: `tokenizers` reads tokenizer.json
// with serde_json, whose default number parser is fast but not correctly
// rounded: it gathers up to 19 digits into an integer, converts that to a
// double and divides by a power of ten, which can land one ulp away from
// the nearest double (178 of the 1,500 scores of a Unigram model trained by
// `tokenizers` come out so). Viterbi compares sums of scores, so near-ties
// break differently unless the scores are the same doubles: loom reads
// them with serde_json's algorithm (de.rs: parse_integer, parse_decimal,
// parse_exponent, f64_from_parts), from the number's text.
bool digit_overflows(uint64_t value, uint64_t digit) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  return value >= kMax / 10 && (value > kMax / 10 || digit > kMax % 10);
}

}  // namespace

double serde_json_f64(std::string_view text) {
  size_t i = 0;
  const bool positive = !(i < text.size() && text[i] == '-');
  if (!positive) ++i;
  const auto digit_at = [&](size_t k) { return k < text.size() && text[k] >= '0' && text[k] <= '9'; };
  uint64_t significand = 0;
  int64_t exponent = 0;
  bool overflowed = false;
  for (; digit_at(i); ++i) {  // the integer part; digits past u64 only scale
    const uint64_t digit = static_cast<uint64_t>(text[i] - '0');
    if (overflowed || digit_overflows(significand, digit)) {
      overflowed = true;
      ++exponent;
    } else {
      significand = significand * 10 + digit;
    }
  }
  if (i < text.size() && text[i] == '.') {
    for (++i; digit_at(i); ++i) {  // digits past u64 are dropped
      const uint64_t digit = static_cast<uint64_t>(text[i] - '0');
      if (overflowed || digit_overflows(significand, digit)) {
        overflowed = true;
        continue;
      }
      significand = significand * 10 + digit;
      --exponent;
    }
  }
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    bool positive_exp = true;
    if (i < text.size() && (text[i] == '+' || text[i] == '-')) positive_exp = text[i++] == '+';
    int64_t exp = 0;
    for (; digit_at(i); ++i) exp = std::min<int64_t>(exp * 10 + (text[i] - '0'), int64_t{1} << 40);
    exponent += positive_exp ? exp : -exp;
  }
  double f = static_cast<double>(significand);
  while (true) {
    const uint64_t magnitude = static_cast<uint64_t>(exponent < 0 ? -exponent : exponent);
    if (magnitude <= 308) {
      // serde_json's table holds the literals 1e0..1e308: the nearest doubles.
      static const std::vector<double> kPow10 = [] {
        std::vector<double> table;
        for (int k = 0; k <= 308; ++k) table.push_back(std::strtod(("1e" + std::to_string(k)).c_str(), nullptr));
        return table;
      }();
      f = exponent >= 0 ? f * kPow10[magnitude] : f / kPow10[magnitude];
      break;
    }
    if (f == 0.0 || exponent >= 0) break;  // (an overflow is refused by nlohmann first)
    f /= 1e308;
    exponent += 308;
  }
  return positive ? f : -f;
}

namespace {

// The text of every number at model.vocab[i][1], by i: nlohmann's SAX
// interface hands over each number's text with its value.
class ScoreTexts : public nlohmann::json_sax<json> {
 public:
  std::vector<std::pair<size_t, std::string>> texts;

  bool null() override { return value(); }
  bool boolean(bool) override { return value(); }
  bool number_integer(number_integer_t) override { return value(); }
  bool number_unsigned(number_unsigned_t) override { return value(); }
  bool number_float(number_float_t, const string_t& text) override {
    if (at_score()) texts.emplace_back(path_[2].index, text);
    return value();
  }
  bool string(string_t&) override { return value(); }
  bool binary(binary_t&) override { return value(); }
  bool start_object(std::size_t) override { return open(false); }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(true); }
  bool end_array() override { return close(); }
  bool key(string_t& key) override {
    path_.back().key = key;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  struct Frame {
    bool array;
    std::string key;
    size_t index = 0;
  };
  bool at_score() const {
    return path_.size() == 4 && !path_[0].array && path_[0].key == "model" && !path_[1].array &&
           path_[1].key == "vocab" && path_[2].array && path_[3].array && path_[3].index == 1;
  }
  bool value() {
    if (!path_.empty() && path_.back().array) ++path_.back().index;
    return true;
  }
  bool open(bool array) {
    path_.push_back({array, ""});
    return true;
  }
  bool close() {
    path_.pop_back();
    return value();
  }
  std::vector<Frame> path_;
};

}  // namespace

UnigramModel UnigramModel::from_json(const json& model, std::string_view json_text, const std::string& file) {
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
  // See Note [scores as serde_json reads them].
  ScoreTexts score_texts;
  json::sax_parse(json_text, &score_texts);
  for (const auto& [id, text] : score_texts.texts)
    if (id < result.scores_.size()) result.scores_[id] = serde_json_f64(text);
  min_score = *std::min_element(result.scores_.begin(), result.scores_.end());
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
