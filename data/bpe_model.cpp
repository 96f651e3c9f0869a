#include "data/bpe_model.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "data/tokenizer_json.h"

namespace loom::tokenization {
namespace {

using nlohmann::json;

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

std::optional<std::string> optional_string(const json& model, const char* key, const std::string& file) {
  const auto it = model.find(key);
  if (it == model.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) json_fail(file, std::string("model.") + key, "expected a string, found " + json_preview(*it));
  return it->get<std::string>();
}

}  // namespace

BpeModel BpeModel::from_json(const json& model, const std::string& file) {
  BpeModel result;
  // BPE-dropout skips merges at random to regularize a model's training;
  // loom encodes datasets and prompts deterministically, as `tokenizers`
  // does with dropout off, so the value is checked and ignored.
  if (const auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number() || it->get<double>() < 0.0 || it->get<double>() > 1.0)
      json_fail(file, "model.dropout", "expected a probability in [0, 1] or null, found " + json_preview(*it));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (auto value = optional_string(model, key, file); value && !value->empty())
      json_fail(file, std::string("model.") + key,
                "'" + clip(*value) + "' is not supported (the BPE models of decoder-only LLMs use none)");
  result.ignore_merges_ = json_bool(model, "ignore_merges", false, "model", file);
  result.fuse_unk_ = json_bool(model, "fuse_unk", false, "model", file);
  const bool byte_fallback = json_bool(model, "byte_fallback", false, "model", file);
  result.byte_fallback_ = byte_fallback;

  const json& vocab = json_field(model, "vocab", "model", file);
  if (!vocab.is_object()) json_fail(file, "model.vocab", "expected an object, found " + json_preview(vocab));
  // Load time matters for 256k-token vocabularies with half a million
  // merges: no per-entry strings beyond the map's own, and messages built
  // only on failure.
  result.vocab_.reserve(vocab.size());
  std::vector<bool> id_taken(static_cast<size_t>(kMaxTokenId) + 1, false);
  for (const auto& [token, value] : vocab.items()) {
    const int32_t id = json_token_id(value, "model.vocab['" + clip(token) + "']", file);
    if (id_taken[id]) {
      const auto other = std::find_if(result.vocab_.begin(), result.vocab_.end(),
                                      [id](const auto& entry) { return entry.second == id; });
      json_fail(file, "model.vocab", "tokens '" + clip(other->first) + "' and '" + clip(token) + "' both have id " +
                                         std::to_string(id));
    }
    id_taken[id] = true;
    result.vocab_.emplace(token, id);
  }
  if (auto unk = optional_string(model, "unk_token", file)) {
    const auto it = result.vocab_.find(*unk);
    if (it == result.vocab_.end())
      json_fail(file, "model.unk_token", "'" + clip(*unk) + "' is not in model.vocab");
    result.unk_id_ = it->second;
  }

  const json& merges = json_field(model, "merges", "model", file);
  if (!merges.is_array()) json_fail(file, "model.merges", "expected a list, found " + json_preview(merges));
  result.merges_.reserve(merges.size());
  std::string merged;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& merge = merges[rank];
    const auto where = [rank] { return "model.merges[" + std::to_string(rank) + "]"; };
    std::string_view left, right;
    if (merge.is_string()) {  // "a b", the format of tokenizers < 0.20
      const std::string_view text = merge.get_ref<const std::string&>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        json_fail(file, where(), "expected two tokens separated by one space, found " + json_preview(merge));
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get_ref<const std::string&>();
      right = merge[1].get_ref<const std::string&>();
    } else {
      json_fail(file, where(), "expected \"a b\" or [\"a\", \"b\"], found " + json_preview(merge));
    }
    const auto id_of = [&](std::string_view token) {
      const auto it = result.vocab_.find(token);
      if (it == result.vocab_.end()) json_fail(file, where(), "token '" + clip(token) + "' is not in model.vocab");
      return it->second;
    };
    // A repeated pair takes its last rank, as in `tokenizers` (a map insert).
    const int32_t left_id = id_of(left);
    const int32_t right_id = id_of(right);
    merged.assign(left);
    merged.append(right);
    const int32_t merged_id = id_of(merged);
    result.merges_.insert_or_assign(pair_key(left_id, right_id), MergeRule{static_cast<int32_t>(rank), merged_id});
  }

  std::string bytes;
  for (const auto& [token, id] : result.vocab_)
    if (unicode_to_bytes(token, bytes)) result.raw_vocab_.emplace(bytes, id);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned>(b));
    const auto found = result.vocab_.find(std::string_view(name));
    result.byte_fallback_ids_[b] = byte_fallback && found != result.vocab_.end() ? found->second : -1;
  }
  for (int b = 0; b < 256; ++b) {
    ByteSymbol& symbol = result.byte_symbols_[b];
    const std::string& character = byte_to_unicode(static_cast<uint8_t>(b));
    if (const auto it = result.vocab_.find(character); it != result.vocab_.end()) {
      symbol.ids[0] = it->second;
      symbol.count = 1;
    } else if (byte_fallback) {
      // `tokenizers` falls back on the UTF-8 bytes of the (mapped) character.
      uint8_t count = 0;
      for (char c : character) {
        const int32_t id = result.byte_fallback_ids_[static_cast<uint8_t>(c)];
        if (id < 0) {
          count = 0;
          break;
        }
        symbol.ids[count++] = id;
      }
      symbol.count = count;
      symbol.fallback = count > 0;
    }
  }
  return result;
}

std::optional<int32_t> BpeModel::whole(std::string_view piece, bool byte_level) const {
  if (!ignore_merges_) return std::nullopt;
  const auto& entries = byte_level ? raw_vocab_ : vocab_;
  const auto it = entries.find(piece);
  if (it == entries.end()) return std::nullopt;
  return it->second;
}

void BpeModel::encode(std::string_view piece, bool byte_level, Scratch& scratch, std::vector<int32_t>& ids) const {
  initial_symbols(piece, byte_level, scratch.symbols);
  merge_all(scratch);
  for (const Symbol& symbol : scratch.symbols)
    if (symbol.len != 0) ids.push_back(symbol.id);
}

// The BPE model's first symbols for `piece`: one per character, from the
// vocabulary, else the character's <0xXX> byte tokens (byte_fallback), else
// unk_token (neighbours fused when fuse_unk), else nothing, as `tokenizers`'
// BPE::merge_word. A byte-level piece is raw bytes, each standing for its
// GPT-2 character, whose symbols were worked out at load.
void BpeModel::initial_symbols(std::string_view piece, bool byte_level, std::vector<Symbol>& symbols) const {
  symbols.clear();
  const auto add = [&](int32_t id, int32_t len) {
    const auto index = static_cast<int32_t>(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, len});
  };
  std::optional<std::pair<int32_t, int32_t>> pending_unk;  // id, byte length
  const auto known = [&](int32_t id, int32_t len) {
    if (pending_unk) {
      add(pending_unk->first, pending_unk->second);
      pending_unk.reset();
    }
    add(id, len);
  };
  const auto unknown = [&](int32_t len) {
    if (!unk_id_) return;  // dropped, as `tokenizers` does without an unk token
    if (pending_unk && fuse_unk_) {
      pending_unk->second += len;
    } else {
      if (pending_unk) add(pending_unk->first, pending_unk->second);
      pending_unk = std::make_pair(*unk_id_, len);
    }
  };
  if (byte_level) {
    for (unsigned char byte : piece) {
      const ByteSymbol& symbol = byte_symbols_[byte];
      const auto char_len = static_cast<int32_t>(byte_to_unicode(byte).size());
      if (symbol.count > 0 && !symbol.fallback) {
        known(symbol.ids[0], char_len);
      } else if (symbol.fallback) {
        // As `tokenizers`: byte_fallback tokens do not flush a pending unk.
        for (uint8_t k = 0; k < symbol.count; ++k) add(symbol.ids[k], 1);
      } else {
        unknown(char_len);
      }
    }
  } else {
    for (size_t i = 0; i < piece.size();) {
      size_t len;
      decode_utf8(piece, i, len);
      const std::string_view character = piece.substr(i, len);
      i += len;
      if (const auto it = vocab_.find(character); it != vocab_.end()) {
        known(it->second, static_cast<int32_t>(len));
        continue;
      }
      const bool fallback = byte_fallback_ && std::all_of(character.begin(), character.end(), [&](char c) {
                              return byte_fallback_ids_[static_cast<uint8_t>(c)] >= 0;
                            });
      if (fallback) {
        for (char c : character) add(byte_fallback_ids_[static_cast<uint8_t>(c)], 1);
      } else {
        unknown(static_cast<int32_t>(len));
      }
    }
  }
  if (pending_unk) add(pending_unk->first, pending_unk->second);
}

// `tokenizers`' Word::merge_all: the lowest-ranked pair first, leftmost on ties.
void BpeModel::merge_all(Scratch& scratch) const {
  auto& symbols = scratch.symbols;
  auto& queue = scratch.queue;
  queue.clear();
  for (size_t i = 0; i + 1 < symbols.size(); ++i)
    if (const auto it = merges_.find(pair_key(symbols[i].id, symbols[i + 1].id)); it != merges_.end())
      queue.push_back({it->second.rank, static_cast<int32_t>(i), it->second.new_id});
  std::make_heap(queue.begin(), queue.end());
  while (!queue.empty()) {
    std::pop_heap(queue.begin(), queue.end());
    const QueuedMerge top = queue.back();
    queue.pop_back();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next == -1) continue;
    const Symbol right = symbols[left.next];
    // Skip entries made stale by an earlier merge.
    const auto rule = merges_.find(pair_key(left.id, right.id));
    if (rule == merges_.end() || rule->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    left.len += right.len;
    symbols[left.next].len = 0;
    left.next = right.next;
    if (right.next != -1) symbols[right.next].prev = top.pos;
    const auto push = [&](int32_t pos, int32_t a, int32_t b) {
      if (const auto it = merges_.find(pair_key(a, b)); it != merges_.end()) {
        queue.push_back({it->second.rank, pos, it->second.new_id});
        std::push_heap(queue.begin(), queue.end());
      }
    };
    if (left.prev != -1) push(left.prev, symbols[left.prev].id, left.id);
    if (left.next != -1) push(top.pos, left.id, symbols[left.next].id);
  }
}

}  // namespace loom::tokenization
