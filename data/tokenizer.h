// Tokenizer read from a Hugging Face tokenizer.json: the byte-level BPE of
// GPT-2, Llama-3, Qwen2/3, SmolLM2 (and what `loom tokenizer train` writes),
// the SentencePiece-style BPE of Llama-2, Mistral and Gemma, and Unigram.
//
// Contract: encode(text) returns exactly the ids that the Python `tokenizers`
// package returns for `Tokenizer.from_file(path).encode(text,
// add_special_tokens=False).ids` (encode(text, SpecialTokens::kAdd): with
// add_special_tokens=True), and decode(ids) what its `decode(ids,
// skip_special_tokens=False)` returns.
//
// Pipeline, as in `tokenizers`: added tokens are split out of the text first
// (leftmost-longest; lstrip/rstrip/single_word honoured), the rest is
// normalized (normalizer.h), split again by the added tokens that match
// normalized text, pre-tokenized (pretokenizer.h), and every pre-token is
// encoded by the model: BPE (bpe_model.h: lowest merge rank first, leftmost
// on ties; merges as "a b" strings or ["a", "b"] pairs, ignore_merges,
// unk_token, fuse_unk, byte_fallback; dropout ignored) or Unigram
// (unigram.h). The
// post-processor (post_processor.h) adds special tokens around a text when
// asked; the decoder (token_decoder.h) turns ids back into text.
//
// Anything else is refused at load with BadInput naming the file and the
// JSON key. `truncation` and `padding` are ignored: loom never truncates or
// pads. As in `tokenizers`, the "id" fields of `added_tokens` are not read:
// an added token takes its id from the model vocabulary, or the next free id
// after it, in file order.
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

  // Whether encode adds the special tokens of the file's post-processor
  // (Llama-3's <|begin_of_text|> before the text): `tokenizers`'
  // add_special_tokens.
  enum class SpecialTokens { kOmit, kAdd };

  // Token ids of `text`. Throws BadInput when `text` is not valid UTF-8
  // (naming the byte offset).
  std::vector<int32_t> encode(std::string_view text, SpecialTokens special = SpecialTokens::kOmit) const;
  // Appends the ids of `text` to `ids` (saves an allocation per document).
  void encode_append(std::string_view text, std::vector<int32_t>& ids,
                     SpecialTokens special = SpecialTokens::kOmit) const;
  // The ids SpecialTokens::kAdd puts before and after a text.
  std::span<const int32_t> special_ids_before() const;
  std::span<const int32_t> special_ids_after() const;

  // Text of `ids`; ids with no token are skipped, bytes that do not form
  // valid UTF-8 become U+FFFD (as `tokenizers` does).
  std::string decode(std::span<const int32_t> ids) const;

  // The bytes token `id` adds to a decoded text in the middle of it, before
  // decode()'s UTF-8 repair (TokenDecoder::token_bytes): for byte-level BPE
  // decode(ids) is utf8_lossy of their concatenation; a SentencePiece
  // decoder also drops the space its first token begins with. Empty for an
  // id with no token. `loom prepare --chat` maps a text's bytes to its
  // tokens with it (data/chat_encoding.cpp).
  std::string_view token_bytes(int32_t id) const;

  // Largest id of the vocabulary or of an added token, plus one.
  int64_t vocab_size() const;
  // Id of a token string (added tokens first, then the model vocabulary), as
  // written in tokenizer.json: "<|endoftext|>", "Ġthe", "▁the".
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
