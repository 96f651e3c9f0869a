// The decoder of a tokenizer.json: how `tokenizers` turns the token strings
// of a list of ids back into text. Steps ByteLevel, ByteFallback, Fuse,
// Strip, Replace, Metaspace and Sequence of them; without a decoder the
// tokens are joined with spaces, as `tokenizers` does. Anything else is
// refused at load with BadInput naming the file and the JSON path.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace loom::tokenization {

class TokenDecoder {
 public:
  // Out of line: Step is complete only in the .cpp.
  TokenDecoder();
  ~TokenDecoder();
  TokenDecoder(const TokenDecoder&);
  TokenDecoder(TokenDecoder&&) noexcept;
  TokenDecoder& operator=(const TokenDecoder&);
  TokenDecoder& operator=(TokenDecoder&&) noexcept;

  // Parses the `decoder` value (null: join with spaces).
  static TokenDecoder from_json(const nlohmann::json& spec, const std::string& file);

  // `tokenizers`' Decoder::decode: every step over the whole list, then the
  // pieces joined. Valid UTF-8 out.
  std::string decode(std::vector<std::string> tokens) const;

  // The bytes `token` adds to a decoded text when it is neither the first
  // token nor next to byte tokens that must combine: the steps that act on
  // each token alone (ByteLevel's and ByteFallback's bytes before the UTF-8
  // repair, Replace, Metaspace), without those that act on the start of the
  // whole text (a Strip after a Fuse). `loom prepare --chat` maps a text's
  // bytes to its tokens with these.
  std::string token_bytes(std::string_view token) const;

  struct Step;

 private:
  std::vector<Step> steps_;
  bool join_with_spaces_ = false;  // no decoder
};

}  // namespace loom::tokenization
