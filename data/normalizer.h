// The normalizer of a tokenizer.json, as Hugging Face `tokenizers` applies
// it to the text before pre-tokenization: Unicode forms (NFC, NFD, NFKC,
// NFKD, from ICU), Lowercase, Strip, StripAccents, Replace (string or
// regex), Prepend, and Sequence of them. Anything else is refused at load
// with BadInput naming the file and the JSON path.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace loom::tokenization {

class Normalizer {
 public:
  // Out of line: Step is complete only in the .cpp.
  Normalizer();
  ~Normalizer();
  Normalizer(const Normalizer&);
  Normalizer(Normalizer&&) noexcept;
  Normalizer& operator=(const Normalizer&);
  Normalizer& operator=(Normalizer&&) noexcept;

  // Parses the `normalizer` value (null: the text is left as it is).
  static Normalizer from_json(const nlohmann::json& spec, const std::string& file);

  bool empty() const { return steps_.empty(); }

  // The normalized `text` (valid UTF-8 in, valid UTF-8 out), written into
  // `out`; `scratch` is a second buffer for the steps to alternate with.
  // `start_kept` becomes false when normalizing removed the first character
  // (a Strip, or a Replace by nothing at the start): the normalized text then
  // no longer begins where the input began, which Metaspace's "first" reads.
  void apply(std::string_view text, std::string& out, std::string& scratch, bool& start_kept) const;

  struct Step;

 private:
  std::vector<Step> steps_;
};

}  // namespace loom::tokenization
