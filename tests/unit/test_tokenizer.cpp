// Tokenizer: the byte-level table, pre-tokenization as `tokenizers` does it,
// BPE merge order, added tokens, training, and refusal of unsupported or
// malformed tokenizer.json files with a message naming the file.
// (tests/interop/test_tokenizer_interop.py compares with `tokenizers` itself.)
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "data/bpe_trainer.h"
#include "data/pretokenizer.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/file_io.h"
#include "tests/unit/bad_input.h"

namespace loom {
namespace {

using nlohmann::json;
using tokenization::byte_to_unicode;
using tokenization::unicode_to_bytes;
using Ids = std::vector<int32_t>;

// --- helpers ---------------------------------------------------------------------------

// A tokenizer.json whose vocabulary is the 256 byte symbols (id = byte value)
// plus `extra` tokens (ids 256..), with `merges` as ["a", "b"] pairs.
json spec_with(const std::vector<std::string>& extra, const std::vector<std::pair<std::string, std::string>>& merges,
               json pre_tokenizer = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_to_unicode(static_cast<uint8_t>(b))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + static_cast<int>(i);
  json merge_list = json::array();
  for (const auto& [a, b] : merges) merge_list.push_back({a, b});
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
            {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab}, {"merges", merge_list}}}};
}

Tokenizer load_spec(const json& spec, const std::string& name = "test.json") {
  return Tokenizer::from_json(spec.dump(), name);
}

// "hello" merges: he=256, ll=257, hell=258, hello=259.
json hello_spec() {
  return spec_with({"he", "ll", "hell", "hello"}, {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}});
}

std::vector<std::string> pieces_of(const tokenization::PreTokenizer& pre, std::string_view text) {
  tokenization::PreTokenizerScratch scratch;
  std::vector<std::string> pieces;
  pre.split(text, scratch, [&](std::string_view piece) { pieces.emplace_back(piece); });
  return pieces;
}

tokenization::PreTokenizer split_then_bytes(const std::string& pattern, const std::string& behavior,
                                            bool invert = false, bool literal = true) {
  const json spec = {{"type", "Sequence"},
                     {"pretokenizers",
                      {{{"type", "Split"},
                        {"pattern", {{literal ? "String" : "Regex", pattern}}},
                        {"behavior", behavior},
                        {"invert", invert}},
                       {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  return tokenization::PreTokenizer::from_json(spec, "test.json");
}

using test_support::expect_bad_input;

const std::vector<std::string> kTrickyTexts = {
    "",
    " ",
    "Hello, world! It's 2024; they're here, we've gone, I'm sure you'll see he'd know.",
    "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂🙂 👩‍👩‍👧‍👦 🇩🇪 👍🏽 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "digits 0 12 123 1234 3.14159 1,000,000 ١٢٣ ½",
    "whitespace\t\truns   and\n\n\nnewlines\r\n",
    "trailing spaces    ",
    "    leading spaces",
    std::string("\x01\x02\x7f control bytes"),
    "combining e\u0301 and \u0915\u094d\u0937",
};

// --- byte-level table ---------------------------------------------------------------------

TEST(ByteLevel, every_byte_maps_to_a_distinct_character_and_back) {
  std::set<std::string> seen;
  for (int b = 0; b < 256; ++b) {
    const std::string& character = byte_to_unicode(static_cast<uint8_t>(b));
    EXPECT_TRUE(seen.insert(character).second) << b;
    std::string bytes;
    ASSERT_TRUE(unicode_to_bytes(character, bytes)) << b;
    EXPECT_EQ(bytes, std::string(1, static_cast<char>(b)));
  }
  EXPECT_EQ(byte_to_unicode(' '), "Ġ");
  EXPECT_EQ(byte_to_unicode('\n'), "Ċ");
  EXPECT_EQ(byte_to_unicode('a'), "a");
  EXPECT_EQ(byte_to_unicode(0xE9), "é");  // printable Latin-1 maps to itself
  std::string bytes;
  EXPECT_FALSE(unicode_to_bytes("a b", bytes));  // a plain space is not in the table
  EXPECT_TRUE(unicode_to_bytes("Ġthe", bytes));
  EXPECT_EQ(bytes, " the");
}

TEST(Utf8, lossy_decoding_replaces_each_maximal_ill_formed_part) {
  using tokenization::utf8_lossy;
  EXPECT_EQ(utf8_lossy("plain"), "plain");
  EXPECT_EQ(utf8_lossy("a\xE6\x97z"), "a\uFFFDz");          // truncated 3-byte sequence: one U+FFFD
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), "\uFFFD\uFFFD");        // overlong: two
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\uFFFD\uFFFD\uFFFD");  // surrogate: three
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x99"), "\uFFFD");
  EXPECT_EQ(tokenization::find_invalid_utf8("ok \xFF"), 3u);
}

// --- pre-tokenization -------------------------------------------------------------------------

TEST(PreTokenizer, gpt2_pattern_splits_words_contractions_and_whitespace) {
  const auto pre = tokenization::PreTokenizer::gpt2_byte_level();
  EXPECT_EQ(pieces_of(pre, "Hello world's  end\n\n"),
            (std::vector<std::string>{"Hello", " world", "'s", " ", " end", "\n\n"}));
  EXPECT_TRUE(pieces_of(pre, "").empty());
}

TEST(PreTokenizer, split_behaviors_match_tokenizers) {
  const std::string text = "the-final--countdown";
  using V = std::vector<std::string>;
  EXPECT_EQ(pieces_of(split_then_bytes("-", "Removed"), text), (V{"the", "final", "countdown"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "Isolated"), text), (V{"the", "-", "final", "-", "-", "countdown"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "MergedWithPrevious"), text), (V{"the-", "final-", "-", "countdown"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "MergedWithNext"), text), (V{"the", "-final", "-", "-countdown"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "Contiguous"), text), (V{"the", "-", "final", "--", "countdown"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "Removed", true), text), (V{"-", "-", "-"}));
  EXPECT_EQ(pieces_of(split_then_bytes("-", "MergedWithNext", true), text), (V{"the-", "final-", "-", "countdown"}));
  // A String pattern is literal; a Regex that matches empty splits like Oniguruma.
  EXPECT_EQ(pieces_of(split_then_bytes(".", "Isolated"), "a.b..c"), (V{"a", ".", "b", ".", ".", "c"}));
  EXPECT_EQ(pieces_of(split_then_bytes("x*", "Isolated", false, false), "abxxc"), (V{"a", "b", "xx", "c"}));
  EXPECT_EQ(pieces_of(split_then_bytes("x*", "Removed", false, false), "abxxc"), (V{"a", "b", "c"}));
}

TEST(PreTokenizer, digits_individual_or_in_runs) {
  using V = std::vector<std::string>;
  const auto digits = [](bool individual) {
    return tokenization::PreTokenizer::from_json(
        {{"type", "Sequence"},
         {"pretokenizers",
          {{{"type", "Digits"}, {"individual_digits", individual}},
           {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}},
        "test.json");
  };
  EXPECT_EQ(pieces_of(digits(true), "abc123d45"), (V{"abc", "1", "2", "3", "d", "4", "5"}));
  EXPECT_EQ(pieces_of(digits(false), "abc123d45"), (V{"abc", "123", "d", "45"}));
}

TEST(PreTokenizer, add_prefix_space_prepends_a_space_to_each_piece) {
  const auto pre = tokenization::PreTokenizer::from_json(
      {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}, "test.json");
  EXPECT_EQ(pieces_of(pre, "Hello"), (std::vector<std::string>{" Hello"}));
  EXPECT_EQ(pieces_of(pre, " Hello"), (std::vector<std::string>{" Hello"}));
}

// --- BPE ---------------------------------------------------------------------------------

TEST(Bpe, merges_apply_by_rank) {
  const Tokenizer tokenizer = load_spec(hello_spec());
  EXPECT_EQ(tokenizer.encode("hello hello"), (Ids{259, ' ', 259}));
  EXPECT_EQ(tokenizer.encode("hell"), (Ids{258}));
  EXPECT_EQ(tokenizer.encode(""), Ids{});
  // Rank decides: with "b c" first, "abc" is a + bc; with "a b" first, ab + c.
  EXPECT_EQ(load_spec(spec_with({"bc", "ab"}, {{"b", "c"}, {"a", "b"}})).encode("abc"), (Ids{'a', 256}));
  EXPECT_EQ(load_spec(spec_with({"ab", "bc"}, {{"a", "b"}, {"b", "c"}})).encode("abc"), (Ids{256, 'c'}));
}

TEST(Bpe, dropout_is_read_and_ignored) {
  json spec = hello_spec();
  spec["model"]["dropout"] = 0.1;
  const Tokenizer with_dropout = load_spec(spec);
  const Tokenizer without = load_spec(hello_spec());
  for (int i = 0; i < 20; ++i) EXPECT_EQ(with_dropout.encode("hello hello"), without.encode("hello hello"));
}

TEST(Bpe, legacy_string_merges_read_like_pairs) {
  json spec = hello_spec();
  json legacy = json::array();
  for (const auto& pair : spec["model"]["merges"]) legacy.push_back(pair[0].get<std::string>() + " " + pair[1].get<std::string>());
  spec["model"]["merges"] = legacy;
  EXPECT_EQ(load_spec(spec).encode("hello hello"), (Ids{259, ' ', 259}));
}

TEST(Bpe, ignore_merges_emits_a_vocabulary_word_whole) {
  // "Ġhello" is in the vocabulary but no merge builds it.
  json spec = spec_with({"he", "ll", "hell", "hello", "Ġhello"}, {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}});
  EXPECT_EQ(load_spec(spec).encode(" hello"), (Ids{' ', 259}));
  spec["model"]["ignore_merges"] = true;
  EXPECT_EQ(load_spec(spec).encode(" hello"), (Ids{260}));
}

TEST(Bpe, characters_outside_the_vocabulary_are_dropped_or_unk_as_in_tokenizers) {
  json spec = hello_spec();
  spec["model"]["vocab"].erase("x");
  EXPECT_EQ(load_spec(spec).encode("hexx"), (Ids{256}));  // `tokenizers` drops them without an unk token
  spec["model"]["vocab"]["<unk>"] = 300;
  spec["model"]["unk_token"] = "<unk>";
  EXPECT_EQ(load_spec(spec).encode("hexx"), (Ids{256, 300, 300}));
  spec["model"]["fuse_unk"] = true;
  EXPECT_EQ(load_spec(spec).encode("hexx"), (Ids{256, 300}));
}

TEST(Tokenizer, round_trips_tricky_text) {
  std::vector<std::string_view> corpus(kTrickyTexts.begin(), kTrickyTexts.end());
  const TrainedTokenizer trained = train_bpe_on_texts(corpus, 400, {"<|endoftext|>"});
  const Tokenizer tokenizer = Tokenizer::from_json(trained.to_json(), "trained.json");
  for (const std::string& text : kTrickyTexts) EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text) << text;
  // A text it was not trained on still round trips: every byte is a symbol.
  const std::string unseen = "Zebra QUIZ 🦓 ωμέγα ∑ 9999999\t\t\n";
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(unseen)), unseen);
}

TEST(Tokenizer, decode_skips_unknown_ids_and_replaces_broken_utf8) {
  const Tokenizer tokenizer = load_spec(hello_spec());
  EXPECT_EQ(tokenizer.decode(Ids{259, -1, 100000, ' ', 259}), "hello hello");
  EXPECT_EQ(tokenizer.decode(Ids{0xE6, 'a'}), "\uFFFDa");  // a lone UTF-8 lead byte
  EXPECT_EQ(tokenizer.vocab_size(), 260);
  EXPECT_EQ(tokenizer.token_to_id("hello"), 259);
  EXPECT_EQ(tokenizer.token_to_id("Ġ"), ' ');
  EXPECT_EQ(tokenizer.token_to_id("nope"), std::nullopt);
  EXPECT_EQ(tokenizer.id_to_token(256), "he");
}

TEST(Tokenizer, long_runs_of_one_character_class_do_not_hit_regex_limits) {
  const std::string llama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  json spec = hello_spec();
  const Tokenizer gpt2 = load_spec(spec);
  spec["pre_tokenizer"] = {{"type", "Sequence"},
                           {"pretokenizers",
                            {{{"type", "Split"}, {"pattern", {{"Regex", llama3}}}, {"behavior", "Isolated"}},
                             {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  const Tokenizer llama = load_spec(spec);
  for (const std::string& text : {std::string(300000, ' ') + "x", std::string(300000, 'a'), std::string(300000, '7'),
                                  std::string(100000, '\n') + std::string(100000, ' '), std::string(300000, '!')}) {
    EXPECT_EQ(gpt2.decode(gpt2.encode(text)), text);
    EXPECT_EQ(llama.decode(llama.encode(text)), text);
  }
}

TEST(Tokenizer, encode_refuses_invalid_utf8_naming_the_offset) {
  const Tokenizer tokenizer = load_spec(hello_spec());
  expect_bad_input([&] { tokenizer.encode("abc\xC3("); }, {"not valid UTF-8", "byte 3"});
}

TEST(Tokenizer, encode_is_thread_safe_and_cache_is_per_tokenizer) {
  const Tokenizer a = load_spec(hello_spec());
  const Tokenizer b = load_spec(spec_with({"ab", "bc"}, {{"a", "b"}, {"b", "c"}}));
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) texts.push_back("hello abc " + std::to_string(i) + " hellabc " + kTrickyTexts[i % kTrickyTexts.size()]);
  std::vector<Ids> expected_a, expected_b;
  for (const auto& text : texts) expected_a.push_back(a.encode(text)), expected_b.push_back(b.encode(text));
  // One thread switching between tokenizers must not reuse the other's cache.
  EXPECT_EQ(a.encode("abc"), (Ids{'a', 'b', 'c'}));
  EXPECT_EQ(b.encode("abc"), (Ids{256, 'c'}));
  EXPECT_EQ(a.encode("abc"), (Ids{'a', 'b', 'c'}));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round)
        for (size_t i = t; i < texts.size(); i += 2) {
          if (a.encode(texts[i]) != expected_a[i]) ++mismatches;
          if (b.encode(texts[i]) != expected_b[i]) ++mismatches;
        }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// --- added tokens --------------------------------------------------------------------------

json added(const std::string& content, bool special, json flags = json::object()) {
  json entry = {{"id", 0},          {"content", content}, {"single_word", false}, {"lstrip", false},
                {"rstrip", false},  {"normalized", !special}, {"special", special}};
  for (auto& [key, value] : flags.items()) entry[key] = value;
  return entry;
}

TEST(AddedTokens, are_split_out_before_pre_tokenization_leftmost_longest) {
  json spec = hello_spec();
  spec["added_tokens"] = {added("<|end|>", true), added("<|end|><|end|>", true), added("hel", false)};
  const Tokenizer tokenizer = load_spec(spec);
  // Ids follow the vocabulary (260..) in file order; the JSON "id" is not read.
  EXPECT_EQ(tokenizer.token_to_id("<|end|>"), 260);
  EXPECT_EQ(tokenizer.token_to_id("<|end|><|end|>"), 261);
  EXPECT_EQ(tokenizer.token_to_id("hel"), 262);
  EXPECT_EQ(tokenizer.vocab_size(), 263);
  EXPECT_EQ(tokenizer.encode("hello<|end|>hello"), (Ids{262, 'l', 'o', 260, 262, 'l', 'o'}));
  EXPECT_EQ(tokenizer.encode("<|end|><|end|><|end|>"), (Ids{261, 260}));
  EXPECT_EQ(tokenizer.encode("<|end|"), (Ids{'<', '|', 'e', 'n', 'd', '|'}));
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("a<|end|>b")), "a<|end|>b");
}

TEST(AddedTokens, lstrip_rstrip_and_single_word) {
  json spec = hello_spec();
  spec["added_tokens"] = {added("[M]", false, {{"lstrip", true}, {"rstrip", true}}),
                          added("he", false, {{"single_word", true}})};
  const Tokenizer tokenizer = load_spec(spec);
  const int32_t mask = *tokenizer.token_to_id("[M]");
  EXPECT_EQ(tokenizer.encode("a  [M]\t b"), (Ids{'a', mask, 'b'}));  // the spaces go into the token
  // "he" (already in the vocabulary as 256) only matches as a whole word.
  EXPECT_EQ(tokenizer.encode("he said"), (Ids{256, ' ', 's', 'a', 'i', 'd'}));
  EXPECT_EQ(tokenizer.encode("hello"), (Ids{259}));
}

// --- training --------------------------------------------------------------------------------

TEST(Training, most_frequent_pair_first_with_counts_updated_after_each_merge) {
  const TrainedTokenizer trained = train_bpe_on_texts({"aaa aaa aaa"}, 259, {});
  // Words: "aaa" x1, " aaa" x2. (a,a) occurs 6 times; then (aa,a) 3; then (Ġ,aaa) 2.
  ASSERT_EQ(trained.vocab.size(), 259u);
  const auto merge = [&](size_t i) { return trained.vocab[trained.merges[i].first] + " " + trained.vocab[trained.merges[i].second]; };
  EXPECT_EQ(merge(0), "a a");
  EXPECT_EQ(merge(1), "aa a");
  EXPECT_EQ(merge(2), "Ġ aaa");
  EXPECT_EQ(trained.vocab[256], "aa");
  EXPECT_EQ(trained.vocab[0], "!");  // GPT-2's byte order
  EXPECT_EQ(trained.vocab[188], "Ā");
}

TEST(Training, ties_go_to_the_pair_whose_bytes_sort_first) {
  const TrainedTokenizer trained = train_bpe_on_texts({"ab cd"}, 259, {});
  // All pairs occur once: (" ", "c") < ("a", "b") < ("c", "d") by bytes.
  std::vector<std::string> merges;
  for (const auto& [a, b] : trained.merges) merges.push_back(trained.vocab[a] + " " + trained.vocab[b]);
  EXPECT_EQ(merges, (std::vector<std::string>{"Ġ c", "Ġc d", "a b"}));
}

TEST(Training, special_tokens_come_first_and_are_not_learned_from) {
  std::string text;
  for (int i = 0; i < 50; ++i) text += "<|endoftext|>word ";
  const TrainedTokenizer trained = train_bpe_on_texts({text}, 300, {"<|endoftext|>", "<pad>"});
  EXPECT_EQ(trained.vocab[0], "<|endoftext|>");
  EXPECT_EQ(trained.vocab[1], "<pad>");
  EXPECT_EQ(trained.num_special_tokens, 2);
  for (size_t id = 2; id < trained.vocab.size(); ++id)
    EXPECT_EQ(trained.vocab[id].find("endoftext"), std::string::npos) << trained.vocab[id];
  const Tokenizer tokenizer = Tokenizer::from_json(trained.to_json(), "trained.json");
  EXPECT_EQ(tokenizer.token_to_id("<|endoftext|>"), 0);
  EXPECT_EQ(tokenizer.encode("<|endoftext|>")[0], 0);
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text);
}

TEST(Training, stops_early_when_no_pair_is_left) {
  // Words "one", " two" x2, " three" x3, "\n": 9 merges turn each into one symbol.
  const TrainedTokenizer trained = train_bpe_on_texts({"one two three two three three\n"}, 1000, {"<|endoftext|>"});
  EXPECT_EQ(trained.vocab.size(), 257u + 9u);
  const Tokenizer tokenizer = Tokenizer::from_json(trained.to_json(), "trained.json");
  EXPECT_EQ(tokenizer.encode("one two three").size(), 3u);
}

TEST(Training, is_deterministic_and_refuses_impossible_sizes) {
  const std::vector<std::string_view> corpus(kTrickyTexts.begin(), kTrickyTexts.end());
  EXPECT_EQ(train_bpe_on_texts(corpus, 350, {"<s>"}).to_json(), train_bpe_on_texts(corpus, 350, {"<s>"}).to_json());
  expect_bad_input([&] { train_bpe_on_texts(corpus, 256, {"<s>"}); }, {"vocab size 256", "[257,"});
  expect_bad_input([&] { train_bpe_on_texts(corpus, 300, {"<s>", "<s>"}); }, {"'<s>' is given twice"});
  expect_bad_input([&] { train_bpe_on_texts({"ok", "bad \xFF"}, 300, {}, {"a.txt", "b.txt"}); },
                   {"b.txt", "not valid UTF-8 at byte 4"});
  expect_bad_input([] { train_bpe({"/nonexistent/corpus.txt"}, 300, {}); }, {"/nonexistent/corpus.txt"});
}

TEST(Training, write_tokenizer_json_writes_a_loadable_file) {
  const auto dir = std::filesystem::temp_directory_path() / ("loom_tok_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string corpus = (dir / "corpus.txt").string(), out = (dir / "tokenizer.json").string();
  write_file_atomic(corpus, "one two three two three three\n");
  train_bpe({corpus}, 262, {"<|endoftext|>"}).write_tokenizer_json(out);
  const Tokenizer tokenizer = Tokenizer::load(out);
  EXPECT_EQ(tokenizer.vocab_size(), 262);
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("three two one")), "three two one");
  EXPECT_EQ(tokenizer.source(), out);
  std::filesystem::remove_all(dir);
}

// --- hash ---------------------------------------------------------------------------------

TEST(Tokenizer, hash_ignores_formatting_and_changes_with_content) {
  const json spec = hello_spec();
  const std::string compact = Tokenizer::from_json(spec.dump(), "a").hash();
  EXPECT_EQ(compact.size(), 8u);
  EXPECT_EQ(Tokenizer::from_json(spec.dump(4), "b").hash(), compact);
  json other = spec;
  other["model"]["ignore_merges"] = true;
  EXPECT_NE(Tokenizer::from_json(other.dump(), "c").hash(), compact);
}

// --- refusals --------------------------------------------------------------------------------

TEST(Refusal, unsupported_kinds_name_the_file_and_key) {
  const auto refused = [](const std::function<void(json&)>& edit, const std::vector<std::string>& parts) {
    json spec = hello_spec();
    edit(spec);
    std::vector<std::string> all = {"my/tokenizer.json"};
    all.insert(all.end(), parts.begin(), parts.end());
    expect_bad_input([&] { load_spec(spec, "my/tokenizer.json"); }, all);
  };
  refused([](json& s) { s["model"]["type"] = "WordPiece"; },
          {"model.type", "'WordPiece' is not supported (loom reads the BPE and Unigram models)"});
  refused([](json& s) { s["model"]["type"] = "WordLevel"; }, {"'WordLevel' is not supported"});
  refused([](json& s) { s["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}}; },
          {"normalizer.type", "'Precompiled' is not supported"});
  refused([](json& s) {
    s["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFC"}}, {{"type", "BertNormalizer"}}}}};
  }, {"normalizer.normalizers[1].type", "'BertNormalizer'"});
  refused([](json& s) { s["pre_tokenizer"] = {{"type", "UnicodeScripts"}}; }, {"pre_tokenizer.type", "'UnicodeScripts'"});
  refused([](json& s) { s["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "ab"}}; },
          {"pre_tokenizer.replacement", "expected one character"});
  refused([](json& s) {
    s["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}, {"prepend_scheme", "sometimes"}};
  }, {"pre_tokenizer.prepend_scheme", "'sometimes' is not first, always or never"});
  refused([](json& s) {
    s["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "ByteLevel"}}, {{"type", "Metaspace"}, {"replacement", "_"}}}}};
  }, {"pre_tokenizer.pretokenizers[1]", "after ByteLevel"});
  refused([](json& s) { s["post_processor"] = {{"type", "Template"}}; }, {"post_processor.type", "'Template'"});
  refused([](json& s) {
    s["post_processor"] = {{"type", "TemplateProcessing"},
                           {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}}},
                           {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}}}}};
  }, {"post_processor.single", "has no sequence A"});
  refused([](json& s) {
    s["post_processor"] = {{"type", "TemplateProcessing"},
                           {"single", {{{"SpecialToken", {{"id", "<bos>"}, {"type_id", 0}}}},
                                       {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                           {"special_tokens", json::object()}};
  }, {"post_processor.special_tokens['<bos>']", "missing"});
  refused([](json& s) {
    s["model"] = {{"type", "Unigram"}, {"unk_id", 0},
                  {"vocab", json::array({json::array({"<unk>", 0.0}), json::array({"a", "x"})})}};
  }, {"model.vocab[1]", "expected [\"piece\", score]"});
  refused([](json& s) {
    s["model"] = {{"type", "Unigram"}, {"unk_id", 9}, {"vocab", json::array({json::array({"<unk>", 0.0})})}};
  },
          {"model.unk_id", "expected an id below 1"});
  refused([](json& s) { s["decoder"] = {{"type", "WordPiece"}}; }, {"decoder", "'WordPiece' is not supported"});
  refused([](json& s) {
    s["decoder"] = {{"type", "Sequence"}, {"decoders", {{{"type", "Strip"}, {"content", " "}, {"start", -1}, {"stop", 0}}}}};
  }, {"decoder.decoders[0].start", "expected a count"});
  refused([](json& s) { s["model"]["dropout"] = 1.5; }, {"model.dropout", "expected a probability in [0, 1]"});
  refused([](json& s) { s["model"]["continuing_subword_prefix"] = "##"; }, {"model.continuing_subword_prefix"});
  refused([](json& s) {
    s["pre_tokenizer"] = {{"type", "Sequence"},
                          {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}},
                                             {{"type", "ByteLevel"}}}}};
  }, {"pre_tokenizer.pretokenizers[0].pattern", "invalid regex '(unclosed'"});
  refused([](json& s) { s["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", "Sideways"}}, {{"type", "ByteLevel"}}}}}; },
          {"behavior", "'Sideways' is not a split behavior"});
}

TEST(Refusal, malformed_files_are_bad_input) {
  const auto refused = [](const std::function<void(json&)>& edit, const std::vector<std::string>& parts) {
    json spec = hello_spec();
    edit(spec);
    std::vector<std::string> all = {"t.json"};
    all.insert(all.end(), parts.begin(), parts.end());
    expect_bad_input([&] { load_spec(spec, "t.json"); }, all);
  };
  refused([](json& s) { s.erase("model"); }, {"model: missing"});
  refused([](json& s) { s["model"].erase("vocab"); }, {"model.vocab: missing"});
  refused([](json& s) { s["model"]["vocab"]["x"] = -1; }, {"model.vocab['x']", "expected a token id"});
  refused([](json& s) { s["model"]["vocab"]["x"] = "7"; }, {"model.vocab['x']"});
  refused([](json& s) { s["model"]["vocab"]["zz"] = 5; }, {"both have id 5"});
  refused([](json& s) { s["model"]["merges"].push_back({"q", "nope"}); }, {"model.merges[4]", "'nope' is not in model.vocab"});
  refused([](json& s) { s["model"]["merges"].push_back({"q", "q"}); }, {"model.merges[4]", "'qq' is not in model.vocab"});
  refused([](json& s) { s["model"]["merges"] = {"h e x"}; }, {"model.merges[0]", "separated by one space"});
  refused([](json& s) { s["model"]["merges"] = {42}; }, {"model.merges[0]"});
  refused([](json& s) { s["model"]["merges"] = "h e"; }, {"model.merges", "expected a list"});
  refused([](json& s) { s["model"]["ignore_merges"] = "yes"; }, {"model.ignore_merges", "expected true or false"});
  refused([](json& s) { s["added_tokens"] = {{{"id", 1}}}; }, {"added_tokens[0].content: missing"});
  refused([](json& s) { s["added_tokens"] = 3; }, {"added_tokens", "expected a list"});
  refused([](json& s) { s["model"]["unk_token"] = "<unk>"; }, {"model.unk_token", "not in model.vocab"});
  refused([](json& s) { s = json::array(); }, {"expected a JSON object"});
  expect_bad_input([] { Tokenizer::from_json("{\"model\": ", "cut.json"); }, {"cut.json", "not valid JSON"});
  expect_bad_input([] { Tokenizer::load("/nonexistent/tokenizer.json"); }, {"/nonexistent/tokenizer.json"});
}

TEST(Refusal, mutated_files_load_or_throw_bad_input_never_crash) {
  json spec = hello_spec();
  spec["added_tokens"] = {added("<|end|>", true), added("[M]", false, {{"lstrip", true}})};
  spec["pre_tokenizer"] = {{"type", "Sequence"},
                           {"pretokenizers",
                            {{{"type", "Split"}, {"pattern", {{"Regex", "\\p{N}{1,3}"}}}, {"behavior", "Isolated"}},
                             {{"type", "ByteLevel"}, {"add_prefix_space", true}}}}};
  const std::string text = spec.dump();
  std::mt19937 rng(1234);
  const std::string alphabet = "{}[]\":,0123456789-abcdeftrunl \\";
  int loaded = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::string mutated = text;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % mutated.size();
      switch (rng() % 3) {
        case 0: mutated[pos] = alphabet[rng() % alphabet.size()]; break;
        case 1: mutated.erase(pos, 1 + rng() % 8); break;
        default: mutated.resize(pos); break;
      }
    }
    try {
      const Tokenizer tokenizer = Tokenizer::from_json(mutated, "mutated.json");
      const Ids ids = tokenizer.encode("hello 123 <|end|> [M] world");
      (void)tokenizer.decode(ids);
      ++loaded;
    } catch (const BadInput& e) {
      EXPECT_NE(std::string(e.what()).find("mutated.json"), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(loaded, 0);  // some mutations (inside strings) still load
}

}  // namespace
}  // namespace loom
