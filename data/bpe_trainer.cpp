#include "data/bpe_trainer.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <queue>
#include <set>
#include <unordered_map>

#include "data/added_tokens.h"
#include "data/pretokenizer.h"
#include "data/tokenizer_json.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

using namespace tokenization;

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
int32_t pair_left(uint64_t key) { return static_cast<int32_t>(key >> 32); }
int32_t pair_right(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

struct Word {
  std::vector<int32_t> symbols;
  int64_t count;
};

// The vocabulary being built: JSON key and raw bytes per id.
struct Vocabulary {
  std::vector<std::string> keys;   // as in tokenizer.json
  std::vector<std::string> bytes;  // raw bytes, for tie-breaking
  std::unordered_map<std::string, int32_t> id_of_key;

  // The id of `key`, added when new (as `tokenizers`' trainer: a merge whose
  // result already exists reuses that id).
  int32_t intern(const std::string& key, const std::string& raw) {
    const auto [it, inserted] = id_of_key.emplace(key, static_cast<int32_t>(keys.size()));
    if (inserted) {
      keys.push_back(key);
      bytes.push_back(raw);
    }
    return it->second;
  }
};

struct HeapEntry {
  int64_t count;
  uint64_t pair;
};

std::string byte_level_key(std::string_view raw) {
  std::string key;
  for (unsigned char b : raw) key += byte_to_unicode(b);
  return key;
}

// Counts the pre-tokens of every text.
std::unordered_map<std::string, int64_t> count_words(const std::vector<std::string_view>& texts,
                                                     const std::vector<std::string>& special_tokens,
                                                     const std::vector<std::string>& names) {
  std::vector<AddedToken> specials;
  for (const std::string& content : special_tokens) specials.push_back({content, 0, false, false, false, false, true});
  const AddedTokenSplitter splitter(specials);
  const PreTokenizer pre_tokenizer = PreTokenizer::gpt2_byte_level();
  PreTokenizerScratch scratch;
  std::vector<Segment> segments, segment_scratch;
  std::unordered_map<std::string, int64_t> counts;
  for (size_t t = 0; t < texts.size(); ++t) {
    const std::string_view text = texts[t];
    if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos)
      throw BadInput((t < names.size() ? names[t] : "text " + std::to_string(t)) +
                     ": not valid UTF-8 at byte " + std::to_string(bad));
    segments.assign({{text, -1}});
    if (!splitter.empty()) splitter.split(segments, segment_scratch);
    for (const Segment& segment : segments) {
      if (segment.id >= 0) continue;  // special tokens are not learned from
      pre_tokenizer.split(segment.text, scratch, [&](std::string_view piece) { ++counts[std::string(piece)]; });
    }
  }
  return counts;
}

}  // namespace

TrainedTokenizer train_bpe_on_texts(const std::vector<std::string_view>& texts, int64_t vocab_size,
                                    const std::vector<std::string>& special_tokens,
                                    const std::vector<std::string>& names) {
  std::set<std::string> distinct;
  for (const std::string& token : special_tokens) {
    if (token.empty()) throw BadInput("special tokens: an empty string is not a token");
    if (find_invalid_utf8(token) != std::string::npos) throw BadInput("special tokens: '" + clip(token) + "' is not UTF-8");
    if (!distinct.insert(token).second) throw BadInput("special tokens: '" + clip(token) + "' is given twice");
  }
  const int64_t minimum = static_cast<int64_t>(special_tokens.size()) + 256;
  if (vocab_size < minimum || vocab_size > (int64_t{1} << 24))
    throw BadInput("vocab size " + std::to_string(vocab_size) + " must be in [" + std::to_string(minimum) +
                   ", 16777216] (the special tokens and the 256 byte symbols come first)");

  Vocabulary vocab;
  for (const std::string& token : special_tokens) vocab.intern(token, token);
  std::vector<int> byte_order(256);
  for (int b = 0; b < 256; ++b) byte_order[b] = b;
  // GPT-2's order: by the code point each byte maps to.
  std::sort(byte_order.begin(), byte_order.end(), [](int a, int b) {
    return byte_to_unicode(static_cast<uint8_t>(a)) < byte_to_unicode(static_cast<uint8_t>(b)) ;
  });
  std::array<int32_t, 256> byte_id{};
  for (int b : byte_order) {
    const std::string raw(1, static_cast<char>(b));
    byte_id[b] = vocab.intern(byte_level_key(raw), raw);
  }

  std::vector<Word> words;
  {
    auto counts = count_words(texts, special_tokens, names);
    // Sorted, so that word indices (and so the order of pair_words lists)
    // do not depend on hash-map iteration order.
    std::vector<std::pair<std::string, int64_t>> sorted(counts.begin(), counts.end());
    std::sort(sorted.begin(), sorted.end());
    words.reserve(sorted.size());
    for (const auto& [piece, count] : sorted) {
      Word word{{}, count};
      for (unsigned char b : piece) word.symbols.push_back(byte_id[b]);
      words.push_back(std::move(word));
    }
  }

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;  // may hold stale or repeated words
  for (size_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].symbols;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t key = pair_key(s[i], s[i + 1]);
      pair_count[key] += words[w].count;
      auto& list = pair_words[key];
      if (list.empty() || list.back() != static_cast<int32_t>(w)) list.push_back(static_cast<int32_t>(w));
    }
  }

  // Max-heap on count; on equal counts the pair whose raw bytes sort first.
  const auto lower_priority = [&vocab](const HeapEntry& x, const HeapEntry& y) {
    if (x.count != y.count) return x.count < y.count;
    const std::string& xa = vocab.bytes[pair_left(x.pair)];
    const std::string& ya = vocab.bytes[pair_left(y.pair)];
    if (xa != ya) return xa > ya;
    return vocab.bytes[pair_right(x.pair)] > vocab.bytes[pair_right(y.pair)];
  };
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, decltype(lower_priority)> heap(lower_priority);
  for (const auto& [key, count] : pair_count) heap.push({count, key});

  TrainedTokenizer result;
  std::vector<int64_t> word_stamp(words.size(), -1);  // merge index that last visited each word
  std::vector<std::pair<uint64_t, int64_t>> changes;
  std::vector<uint64_t> grown;
  std::vector<int32_t> merged;
  while (static_cast<int64_t>(vocab.keys.size()) < vocab_size && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    const auto found = pair_count.find(top.pair);
    const int64_t current = found == pair_count.end() ? 0 : found->second;
    if (current != top.count) {  // stale: counts only fall, so re-queue at the true count
      if (current > 0) heap.push({current, top.pair});
      continue;
    }
    if (current <= 0) continue;

    const int32_t a = pair_left(top.pair), b = pair_right(top.pair);
    const int32_t new_id = vocab.intern(vocab.keys[a] + vocab.keys[b], vocab.bytes[a] + vocab.bytes[b]);
    result.merges.emplace_back(a, b);
    const auto merge_index = static_cast<int64_t>(result.merges.size());

    grown.clear();
    const std::vector<int32_t> affected = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    for (int32_t w : affected) {
      if (word_stamp[w] == merge_index) continue;
      word_stamp[w] = merge_index;
      Word& word = words[w];
      const auto& s = word.symbols;
      // Replace (a, b) left to right, as `tokenizers`' Word::merge: the
      // neighbours' pairs lose a count and the pairs with the new symbol gain one.
      changes.clear();
      merged.clear();
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          if (!merged.empty()) {
            changes.emplace_back(pair_key(merged.back(), a), -1);
            changes.emplace_back(pair_key(merged.back(), new_id), +1);
          }
          if (i + 2 < s.size()) {
            changes.emplace_back(pair_key(b, s[i + 2]), -1);
            changes.emplace_back(pair_key(new_id, s[i + 2]), +1);
          }
          merged.push_back(new_id);
          i += 2;
        } else {
          merged.push_back(s[i]);
          ++i;
        }
      }
      if (merged.size() == s.size()) continue;  // a stale entry: the pair is no longer here
      word.symbols.swap(merged);
      for (const auto& [key, delta] : changes) {
        if (key == top.pair) continue;
        pair_count[key] += delta * word.count;
        if (delta > 0) {
          auto& list = pair_words[key];
          if (list.empty() || list.back() != w) list.push_back(w);
          grown.push_back(key);
        }
      }
    }
    pair_count.erase(top.pair);
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (uint64_t key : grown) heap.push({pair_count[key], key});
  }

  result.vocab = std::move(vocab.keys);
  result.num_special_tokens = static_cast<int32_t>(special_tokens.size());
  return result;
}

TrainedTokenizer train_bpe(const std::vector<std::string>& files, int64_t vocab_size,
                           const std::vector<std::string>& special_tokens) {
  if (files.empty()) throw BadInput("tokenizer training needs at least one input file");
  std::vector<std::string> contents;
  contents.reserve(files.size());
  for (const std::string& file : files) contents.push_back(read_file(file));
  std::vector<std::string_view> texts(contents.begin(), contents.end());
  return train_bpe_on_texts(texts, vocab_size, special_tokens, files);
}

// --- tokenizer.json ---------------------------------------------------------------------

std::string TrainedTokenizer::to_json() const {
  using nlohmann::json;
  const auto quote = [](const std::string& text) { return json(text).dump(); };
  const std::string byte_level =
      R"({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})";
  std::string out;
  out += "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [";
  for (int32_t id = 0; id < num_special_tokens; ++id) {
    out += id == 0 ? "\n" : ",\n";
    out += "    {\"id\": " + std::to_string(id) + ", \"content\": " + quote(vocab[id]) +
           ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, "
           "\"special\": true}";
  }
  out += num_special_tokens > 0 ? "\n  ],\n" : "],\n";
  out += "  \"normalizer\": null,\n";
  out += "  \"pre_tokenizer\": " + byte_level + ",\n";
  out += "  \"post_processor\": " + byte_level + ",\n";
  out += "  \"decoder\": " + byte_level + ",\n";
  out += "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n"
         "    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n"
         "    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n"
         "    \"vocab\": {";
  for (size_t id = 0; id < vocab.size(); ++id)
    out += (id == 0 ? "\n      " : ",\n      ") + quote(vocab[id]) + ": " + std::to_string(id);
  out += "\n    },\n    \"merges\": [";
  for (size_t i = 0; i < merges.size(); ++i)
    out += (i == 0 ? "\n      [" : ",\n      [") + quote(vocab[merges[i].first]) + ", " +
           quote(vocab[merges[i].second]) + "]";
  out += merges.empty() ? "]\n  }\n}\n" : "\n    ]\n  }\n}\n";
  return out;
}

void TrainedTokenizer::write_tokenizer_json(const std::string& path) const { write_file_atomic(path, to_json()); }

}  // namespace loom
