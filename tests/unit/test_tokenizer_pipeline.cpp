// The parts of the tokenizer pipeline beyond byte-level BPE, on hand-checked
// cases: normalizers, the Metaspace and splitting pre-tokenizers,
// SentencePiece-style BPE with byte fallback, Unigram's Viterbi, decoders and
// post-processors. (tests/interop/test_tokenizer_families.py compares whole
// real tokenizers with `tokenizers` itself.)
#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/normalizer.h"
#include "data/pretokenizer.h"
#include "data/token_decoder.h"
#include "data/unigram.h"
#include "data/tokenizer.h"
#include "tests/unit/bad_input.h"

namespace loom {
namespace {

using nlohmann::json;
using Ids = std::vector<int32_t>;

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's word boundary

std::string normalize(const json& spec, std::string_view text, bool* start_kept = nullptr) {
  const auto normalizer = tokenization::Normalizer::from_json(spec, "test.json");
  std::string out, scratch;
  bool kept = true;
  normalizer.apply(text, out, scratch, kept);
  if (start_kept) *start_kept = kept;
  return out;
}

std::vector<std::string> pieces(const json& spec, std::string_view text, bool at_start = true) {
  const auto pre = tokenization::PreTokenizer::from_json(spec, "test.json");
  tokenization::PreTokenizerScratch scratch;
  std::vector<std::string> out;
  pre.split(text, at_start, scratch, [&](std::string_view piece) { out.emplace_back(piece); });
  return out;
}

std::string decode(const json& spec, std::vector<std::string> tokens) {
  return tokenization::TokenDecoder::from_json(spec, "test.json").decode(std::move(tokens));
}

json llama2_decoder() {
  return {{"type", "Sequence"},
          {"decoders",
           {{{"type", "Replace"}, {"pattern", {{"String", kSpace}}}, {"content", " "}},
            {{"type", "ByteFallback"}},
            {{"type", "Fuse"}},
            {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
}

// A Llama-2-style tokenizer: <unk> <s> </s>, the 256 byte tokens, then
// characters and merges for "▁hello" and "▁world".
json sentencepiece_bpe_spec() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int next = 259;
  for (const std::string& token : {kSpace, std::string("h"), std::string("e"), std::string("l"), std::string("o"),
                                  std::string("w"), std::string("r"), std::string("d"), kSpace + "h", kSpace + "w",
                                  std::string("ll"), kSpace + "he", kSpace + "hell", kSpace + "hello",
                                  std::string("or"), kSpace + "wor", kSpace + "world"})
    vocab[token] = next++;
  vocab[kSpace + "worl"] = next++;
  json merges_all = json::array();
  for (const auto& [a, b] : std::vector<std::pair<std::string, std::string>>{
           {kSpace, "h"}, {kSpace, "w"}, {"l", "l"}, {kSpace + "h", "e"}, {kSpace + "he", "ll"}, {kSpace + "hell", "o"},
           {"o", "r"}, {kSpace + "w", "or"}, {kSpace + "wor", "l"}, {kSpace + "worl", "d"}})
    merges_all.push_back(json::array({a, b}));
  return {{"added_tokens",
           {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
            {{"id", 1}, {"content", "<s>"}, {"special", true}},
            {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "first"}, {"split", false}}},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair", json::array()},
            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
          {"decoder", llama2_decoder()},
          {"model",
           {{"type", "BPE"}, {"unk_token", "<unk>"}, {"fuse_unk", true}, {"byte_fallback", true},
            {"vocab", vocab}, {"merges", merges_all}}}};
}

// --- normalizers -----------------------------------------------------------------------

TEST(Normalizer, unicode_forms_compose_and_decompose) {
  EXPECT_EQ(normalize({{"type", "NFC"}}, "e\xCC\x81"), "\xC3\xA9");     // e + combining acute -> é
  EXPECT_EQ(normalize({{"type", "NFD"}}, "\xC3\xA9"), "e\xCC\x81");
  EXPECT_EQ(normalize({{"type", "NFKC"}}, "\xEF\xAC\x81 \xEF\xBC\xA1"), "fi A");  // ligature fi, fullwidth A
  EXPECT_EQ(normalize({{"type", "NFKD"}}, "\xE2\x84\xAB"), "A\xCC\x8A");         // Angstrom sign
  EXPECT_EQ(normalize({{"type", "NFC"}}, "\xE1\x84\x80\xE1\x85\xA1"), "\xEA\xB0\x80");  // Hangul jamo -> 가
}

TEST(Normalizer, lowercase_goes_character_by_character) {
  // No final-sigma rule (Rust's char::to_lowercase), and İ becomes two characters.
  EXPECT_EQ(normalize({{"type", "Lowercase"}}, "\xCE\xA3\xCE\x91\xCE\xA3 \xC4\xB0 ABC"),
            "\xCF\x83\xCE\xB1\xCF\x83 i\xCC\x87 abc");
}

TEST(Normalizer, strip_replace_prepend_and_sequence_in_order) {
  bool kept = true;
  EXPECT_EQ(normalize({{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, " \t hi \xE3\x80\x80", &kept),
            "hi");
  EXPECT_FALSE(kept);  // the first character is no longer the input's first
  EXPECT_EQ(normalize({{"type", "Strip"}, {"strip_left", false}, {"strip_right", true}}, "  hi  ", &kept), "  hi");
  EXPECT_TRUE(kept);
  EXPECT_EQ(normalize({{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}}, "a  b   c d"),
            "a b c d");
  EXPECT_EQ(normalize({{"type", "Replace"}, {"pattern", {{"String", "."}}}, {"content", "!"}}, "a.b"), "a!b");
  EXPECT_EQ(normalize({{"type", "Prepend"}, {"prepend", kSpace}}, "x"), kSpace + "x");
  EXPECT_EQ(normalize({{"type", "Prepend"}, {"prepend", kSpace}}, ""), "");
  const json llama2 = {{"type", "Sequence"},
                       {"normalizers",
                        {{{"type", "Prepend"}, {"prepend", kSpace}},
                         {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}}}}};
  EXPECT_EQ(normalize(llama2, "Hi there"), kSpace + "Hi" + kSpace + "there");
  EXPECT_EQ(normalize({{"type", "StripAccents"}}, "e\xCC\x81t\xC3\xA9"), "et\xC3\xA9");  // only the combining mark
}

// --- pre-tokenizers ----------------------------------------------------------------------

TEST(PreTokenizer, metaspace_prepends_first_always_or_never_and_splits_before_each_boundary) {
  const auto spec = [](const char* scheme, bool split) {
    return json{{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", scheme}, {"split", split}};
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces(spec("first", true), "Hello world"), (V{kSpace + "Hello", kSpace + "world"}));
  EXPECT_EQ(pieces(spec("first", true), "Hello world", /*at_start=*/false), (V{"Hello", kSpace + "world"}));
  EXPECT_EQ(pieces(spec("always", true), "Hello", false), (V{kSpace + "Hello"}));
  EXPECT_EQ(pieces(spec("never", true), "Hello world"), (V{"Hello", kSpace + "world"}));
  EXPECT_EQ(pieces(spec("first", false), "a  b"), (V{kSpace + "a" + kSpace + kSpace + "b"}));
  EXPECT_EQ(pieces(spec("first", true), "a  b"), (V{kSpace + "a", kSpace, kSpace + "b"}));
  EXPECT_EQ(pieces(spec("first", true), " lead"), (V{kSpace + "lead"}));  // already starts with one
  // Files from before prepend_scheme say add_prefix_space.
  EXPECT_EQ(pieces({{"type", "Metaspace"}, {"replacement", kSpace}, {"add_prefix_space", false}}, "x y"),
            (V{"x", kSpace + "y"}));
}

TEST(PreTokenizer, punctuation_whitespace_and_delimiter_splits) {
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces({{"type", "Punctuation"}}, "Hi!! a$b \xC2\xBF"), (V{"Hi", "!", "!", " a", "$", "b ", "\xC2\xBF"}));
  EXPECT_EQ(pieces({{"type", "Punctuation"}, {"behavior", "Contiguous"}}, "a!!b"), (V{"a", "!!", "b"}));
  EXPECT_EQ(pieces({{"type", "Whitespace"}}, "Hey, you_2  there\xE3\x80\x80!"), (V{"Hey", ",", "you_2", "there", "!"}));
  EXPECT_EQ(pieces({{"type", "WhitespaceSplit"}}, " a\tb,c \xC2\xA0 d"), (V{"a", "b,c", "d"}));
  EXPECT_EQ(pieces({{"type", "CharDelimiterSplit"}, {"delimiter", "-"}}, "-a-b--c"), (V{"a", "b", "c"}));
  const json sequence = {{"type", "Sequence"},
                         {"pretokenizers", {{{"type", "WhitespaceSplit"}}, {{"type", "Digits"}, {"individual_digits", true}}}}};
  EXPECT_EQ(pieces(sequence, "ab12 3"), (V{"ab", "1", "2", "3"}));
  EXPECT_EQ(pieces(nullptr, "no pre-tokenizer at all"), (V{"no pre-tokenizer at all"}));
}

TEST(PreTokenizer, splits_after_byte_level_see_gpt2_characters) {
  // As Falcon's file: Digits after ByteLevel. The GPT-2 pattern makes "²"
  // (C2 B2) a piece; its bytes are the GPT-2 characters 'Â' and '²', and the
  // second is a digit, so Digits splits the character between its bytes.
  const json spec = {{"type", "Sequence"},
                     {"pretokenizers",
                      {{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}},
                       {{"type", "Digits"}, {"individual_digits", false}}}}};
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces(spec, "a\xC2\xB2 x12y"), (V{"a", "\xC2", "\xB2", " x", "12", "y"}));
}

// --- SentencePiece-style BPE -----------------------------------------------------------------

TEST(SentencePieceBpe, merges_words_falls_back_to_bytes_and_frames_with_bos) {
  const Tokenizer tokenizer = Tokenizer::from_json(sentencepiece_bpe_spec().dump(), "spm.json");
  const int32_t hello = *tokenizer.token_to_id(kSpace + "hello");
  const int32_t world = *tokenizer.token_to_id(kSpace + "world");
  EXPECT_EQ(tokenizer.encode("hello world"), (Ids{hello, world}));
  EXPECT_EQ(tokenizer.encode("hello world", Tokenizer::SpecialTokens::kAdd), (Ids{1, hello, world}));
  EXPECT_EQ((std::vector<int32_t>(tokenizer.special_ids_before().begin(), tokenizer.special_ids_before().end())),
            (Ids{1}));
  // "é" is not in the vocabulary: its two UTF-8 bytes become <0xC3> <0xA9>.
  const Ids accented = tokenizer.encode("\xC3\xA9");
  EXPECT_EQ(accented, (Ids{*tokenizer.token_to_id(kSpace), 3 + 0xC3, 3 + 0xA9}));
  // After an added token the text is not at the start: no boundary prepended.
  EXPECT_EQ(tokenizer.encode("<s>hello"), (Ids{1, *tokenizer.token_to_id("h"), *tokenizer.token_to_id("e"),
                                              *tokenizer.token_to_id("ll"), *tokenizer.token_to_id("o")}));
  // Decoding undoes it all: boundaries become spaces, bytes rejoin, the first space goes.
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("hello world \xC3\xA9")), "hello world \xC3\xA9");
  EXPECT_EQ(tokenizer.token_bytes(world), " world");
  EXPECT_EQ(tokenizer.token_bytes(3 + '\n'), "\n");
}

TEST(SentencePieceBpe, unknown_characters_fuse_into_one_unk_without_byte_fallback) {
  json spec = sentencepiece_bpe_spec();
  spec["model"]["byte_fallback"] = false;
  const Tokenizer tokenizer = Tokenizer::from_json(spec.dump(), "spm.json");
  const int32_t boundary = *tokenizer.token_to_id(kSpace);
  EXPECT_EQ(tokenizer.encode("\xC3\xA9\xC3\xA9"), (Ids{boundary, 0}));
  spec["model"]["fuse_unk"] = false;
  EXPECT_EQ(Tokenizer::from_json(spec.dump(), "spm.json").encode("\xC3\xA9\xC3\xA9"), (Ids{boundary, 0, 0}));
}

// --- Unigram --------------------------------------------------------------------------------

json unigram_spec(bool byte_fallback) {
  json vocab = json::array();
  for (const auto& [piece, score] : std::vector<std::pair<std::string, double>>{
           {"<unk>", 0.0}, {kSpace, -1.0}, {"a", -2.0}, {"b", -2.0}, {"ab", -3.0}, {kSpace + "a", -2.5}})
    vocab.push_back(json::array({piece, score}));
  if (byte_fallback)
    for (const char* byte : {"<0xC3>", "<0xA9>"}) vocab.push_back(json::array({byte, -9.0}));
  return {{"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "always"}, {"split", true}}},
          {"decoder", {{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "always"}, {"split", true}}},
          {"model", {{"type", "Unigram"}, {"unk_id", 0}, {"vocab", vocab}, {"byte_fallback", byte_fallback}}}};
}

TEST(Unigram, viterbi_picks_the_highest_scoring_cut) {
  const Tokenizer tokenizer = Tokenizer::from_json(unigram_spec(false).dump(), "unigram.json");
  // "▁ab": ▁ + ab = -4 beats ▁a + b = -4.5, though ▁a is the likelier first piece.
  EXPECT_EQ(tokenizer.encode("ab"), (Ids{1, 4}));
  // "▁ba": ▁ + b + a = -5 is the only cut.
  EXPECT_EQ(tokenizer.encode("ba"), (Ids{1, 3, 2}));
  // Unknown characters cost min score - 10 each and fuse into one <unk>.
  EXPECT_EQ(tokenizer.encode("a\xC3\xA9\xC3\xA9"), (Ids{5, 0}));
  EXPECT_EQ(tokenizer.decode(Ids{5, 3, 1, 2}), "ab a");
}

TEST(Unigram, scores_are_read_as_serde_json_reads_them) {
  // Scores of a Unigram model trained by `tokenizers`, and what its
  // to_str() wrote back after reading them: one ulp off the nearest double.
  const std::vector<std::pair<std::string, std::string>> read_back = {
      {"-1.9564018276107227", "-1.956401827610723"}, {"-3.7015295786580813", "-3.7015295786580817"},
      {"-3.7882166189393374", "-3.788216618939338"}, {"-6.2578312600601524", "-6.257831260060152"},
      {"-7.3230751572116155", "-7.323075157211616"}};
  for (const auto& [text, seen] : read_back) {
    EXPECT_EQ(tokenization::serde_json_f64(text), std::strtod(seen.c_str(), nullptr)) << text;
    EXPECT_NE(std::strtod(text.c_str(), nullptr), std::strtod(seen.c_str(), nullptr)) << text;
  }
  for (const char* exact : {"0", "-0.0", "-10", "1e-3", "-2.5E+2", "123456789012345678901234.5e-10"})
    EXPECT_DOUBLE_EQ(tokenization::serde_json_f64(exact), std::strtod(exact, nullptr)) << exact;
}

TEST(Unigram, byte_fallback_spells_unknown_characters_in_bytes) {
  const Tokenizer tokenizer = Tokenizer::from_json(unigram_spec(true).dump(), "unigram.json");
  EXPECT_EQ(tokenizer.encode("\xC3\xA9"), (Ids{1, 6, 7}));
}

TEST(Unigram, without_unk_id_an_uncovered_character_is_bad_input) {
  json spec = unigram_spec(false);
  spec["model"]["unk_id"] = nullptr;
  const Tokenizer tokenizer = Tokenizer::from_json(spec.dump(), "unigram.json");
  EXPECT_EQ(tokenizer.encode("ab"), (Ids{1, 4}));
  test_support::expect_bad_input([&] { tokenizer.encode("z"); }, {"unigram.json", "no unk_id"});
}

// --- decoders and post-processors ---------------------------------------------------------------

TEST(Decoder, byte_fallback_runs_that_are_not_utf8_become_one_replacement_per_byte) {
  const json spec = {{"type", "Sequence"}, {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}};
  EXPECT_EQ(decode(spec, {"<0xE2>", "<0x82>", "<0xAC>", "x"}), "\xE2\x82\xAC" "x");  // €
  EXPECT_EQ(decode(spec, {"<0xE2>", "<0x82>", "x"}), "\xEF\xBF\xBD\xEF\xBF\xBD" "x");
  EXPECT_EQ(decode(spec, {"<0x+A>"}), "\n");  // read as Rust's from_str_radix reads it
}

TEST(Decoder, metaspace_and_strip_act_on_the_first_token_and_no_decoder_joins_with_spaces) {
  const json metaspace = {{"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "always"}};
  EXPECT_EQ(decode(metaspace, {kSpace + "a" + kSpace + "b", kSpace + "c"}), "ab c");
  EXPECT_EQ(decode(llama2_decoder(), {kSpace + kSpace + "x", kSpace + "y"}), " x y");
  EXPECT_EQ(decode(nullptr, {"a", "b"}), "a b");
  EXPECT_EQ(decode({{"type", "Strip"}, {"content", "x"}, {"start", 2}, {"stop", 1}}, {"xxxaxx"}), "xax");
}

TEST(PostProcessor, roberta_inside_a_sequence_wraps_what_came_before) {
  json spec = sentencepiece_bpe_spec();
  spec["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       {spec["post_processor"], {{"type", "RobertaProcessing"}, {"sep", {"</s>", 2}}, {"cls", {"<unk>", 0}}}}}};
  const Tokenizer tokenizer = Tokenizer::from_json(spec.dump(), "spm.json");
  const int32_t hello = *tokenizer.token_to_id(kSpace + "hello");
  EXPECT_EQ(tokenizer.encode("hello", Tokenizer::SpecialTokens::kAdd), (Ids{0, 1, hello, 2}));
}

}  // namespace
}  // namespace loom
