// The BPE model of a tokenizer.json, as Hugging Face `tokenizers` runs it:
// a pre-token starts as one symbol per character (from the vocabulary, else
// its <0xXX> byte tokens with byte_fallback, else unk_token, neighbours
// fused with fuse_unk), then the adjacent pair of lowest merge rank is merged
// until none is left (leftmost on ties). With ignore_merges a pre-token that
// is a vocabulary entry is that token. Byte-level pre-tokens (raw bytes,
// each standing for its GPT-2 character) start from a table built at load.
#pragma once

#include <array>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/text_unicode.h"

namespace loom::tokenization {

class BpeModel {
 public:
  // `model` is the tokenizer.json's "model" object with type "BPE". Throws
  // BadInput naming `file` and the JSON path.
  static BpeModel from_json(const nlohmann::json& model, const std::string& file);

  const StringMap<int32_t>& vocab() const { return vocab_; }

  // Per-thread buffers for encode.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t len;  // bytes; 0 once merged into its left neighbour
  };
  struct QueuedMerge {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    // std::push_heap keeps the largest first: make that the lowest rank,
    // then the leftmost position, as `tokenizers`' Word::merge_all.
    bool operator<(const QueuedMerge& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  struct Scratch {
    std::vector<Symbol> symbols;
    std::vector<QueuedMerge> queue;
  };

  // With ignore_merges, the id of a pre-token that is one vocabulary entry.
  std::optional<int32_t> whole(std::string_view piece, bool byte_level) const;
  // Appends the ids of `piece`: raw bytes when `byte_level`, else UTF-8 text.
  void encode(std::string_view piece, bool byte_level, Scratch& scratch, std::vector<int32_t>& ids) const;

 private:
  struct MergeRule {
    int32_t rank;
    int32_t new_id;
  };
  // What a raw byte (one ByteLevel character) starts as.
  struct ByteSymbol {
    std::array<int32_t, 2> ids{};  // the character's id, or its byte_fallback ids
    uint8_t count = 0;             // 0: not in the vocabulary (unk or dropped)
    bool fallback = false;         // ids are <0xXX> byte_fallback tokens
  };

  void initial_symbols(std::string_view piece, bool byte_level, std::vector<Symbol>& symbols) const;
  void merge_all(Scratch& scratch) const;

  StringMap<int32_t> vocab_;      // token string -> id
  StringMap<int32_t> raw_vocab_;  // raw bytes of byte-level tokens -> id (ignore_merges)
  std::unordered_map<uint64_t, MergeRule> merges_;
  std::array<ByteSymbol, 256> byte_symbols_;
  std::array<int32_t, 256> byte_fallback_ids_{};  // the <0xXX> token of each byte, or -1
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  bool fuse_unk_ = false;
  std::optional<int32_t> unk_id_;
};

}  // namespace loom::tokenization
