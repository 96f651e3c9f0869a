// Fuzz target: the tokenizer.json loader and pipeline (data/tokenizer.cpp,
// normalizer, pretokenizer, unigram, token_decoder, post_processor). The
// input is the file's text; a tokenizer that loads then encodes a fixed
// mixed text (ASCII, digits, whitespace runs, multi-byte UTF-8, combining
// marks and jamo for the normalizers, U+2581 and <0xXX> look-alikes,
// special-token look-alikes) with and without special tokens, decodes the
// ids, reads each id's token bytes, and decodes ids around the vocabulary's
// edges, as `loom prepare` and `loom generate` would.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  loom::fuzz::expect_accept_or_bad_input("Tokenizer::from_json", [&] {
    const loom::Tokenizer tokenizer = loom::Tokenizer::from_json(text, "fuzz/tokenizer.json");
    static const std::string sample =
        "Hello, world! It's 2024-05-17: 3.14159 x 1000000 \t\n\n  spaced   out\r\n"
        "<|endoftext|><s></s>[UNK] caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80 "
        "don't WE'LL I'm   \xc2\xa0nbsp e\xcc\x81 \xe1\x84\x80\xe1\x85\xa1 \xe2\x96\x81\xe2\x96\x81x <0x41> "
        "\xc4\xb0\xce\xa3 \xef\xac\x81 - ,.;!? \xe3\x80\x80" "end  ";
    const std::vector<int32_t> ids = tokenizer.encode(sample);
    (void)tokenizer.decode(ids);
    for (int32_t id : ids) (void)tokenizer.token_bytes(id);
    (void)tokenizer.decode(tokenizer.encode(sample, loom::Tokenizer::SpecialTokens::kAdd));
    const int64_t vocab = tokenizer.vocab_size();
    const std::vector<int32_t> edges = {-1, 0, 1, static_cast<int32_t>(vocab - 1), static_cast<int32_t>(vocab),
                                        INT32_MAX};
    (void)tokenizer.decode(edges);
    for (int32_t id : edges) (void)tokenizer.id_to_token(id);
    (void)tokenizer.token_to_id("<|endoftext|>");
    (void)tokenizer.hash();
  });
  return 0;
}
