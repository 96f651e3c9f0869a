// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (GPT-2,
// Llama-3, SmolLM2, and what `loom tokenizer train` writes).
//
// Contract: encode(text) returns exactly the ids that the Python `tokenizers`
// package returns for `Tokenizer.from_file(path).encode(text,
// add_special_tokens=False).ids`, and decode(ids) what its
// `decode(ids, skip_special_tokens=False)` returns; decode(encode(x)) == x
// whenever every byte of x is in the vocabulary (always, for a byte-level
// vocabulary with all 256 byte symbols).
//
// Pipeline, as in `tokenizers`: added tokens are split out of the text first
// (leftmost-longest; lstrip/rstrip/single_word honoured), the rest is
// pre-tokenized (Split / Digits / ByteLevel, see pretokenizer.h) and every
// pre-token is merged by BPE (lowest merge rank first, leftmost on ties).
//
// Supported: model BPE (merges as "a b" strings or ["a", "b"] pairs,
// ignore_merges, unk_token, fuse_unk, byte_fallback); normalizer null;
// decoder ByteLevel. Everything else is refused at load with BadInput naming
// the file and the JSON key. `truncation` and `padding` are ignored: loom
// never truncates or pads. As in `tokenizers`, the "id" fields of
// `added_tokens` are not read: an added token takes its id from the model
// vocabulary, or the next free id after it, in file order.
//
// Thread safety: a Tokenizer is immutable after load; encode and decode may
// run on many threads at once. Each thread keeps its own cache of BPE results
// per pre-token (a thread_local, bounded in size), so no lock is taken.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

class Tokenizer {
 public:
  // Reads and validates a tokenizer.json. Throws BadInput naming the file.
  static Tokenizer load(const std::string& path);
  // The same from text already in memory; `source` names it in messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& source);

  // Token ids of `text`, without special tokens added. Throws BadInput when
  // `text` is not valid UTF-8 (naming the byte offset).
  std::vector<int32_t> encode(std::string_view text) const;
  // Appends the ids of `text` to `ids` (saves an allocation per document).
  void encode_append(std::string_view text, std::vector<int32_t>& ids) const;

  // Text of `ids`; ids with no token are skipped, bytes that do not form
  // valid UTF-8 become U+FFFD (as `tokenizers` does).
  std::string decode(std::span<const int32_t> ids) const;

  // The bytes token `id` stands for in a decoded text, before decode()'s
  // UTF-8 repair: decode(ids) is utf8_lossy of their concatenation. Empty
  // for an id with no token. `loom prepare --chat` maps a text's bytes to
  // its tokens with it (data/chat_encoding.cpp).
  std::string_view token_bytes(int32_t id) const;

  // Largest id of the vocabulary or of an added token, plus one.
  int64_t vocab_size() const;
  // Id of a token string (added tokens first, then the BPE vocabulary), as
  // written in tokenizer.json: "<|endoftext|>", "Ġthe".
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;

  // CRC-32C of the canonical JSON (keys sorted, no whitespace), as 8 hex
  // digits: equal for files that differ only in formatting. Datasets record
  // it to name the tokenizer that produced them.
  const std::string& hash() const;
  // The path (or `source`) it was loaded from.
  const std::string& source() const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;  // shared and immutable: copies are cheap
};

}  // namespace loom
