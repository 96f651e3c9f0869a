#include "data/tokenizer.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <unordered_map>

#include "data/added_tokens.h"
#include "data/normalizer.h"
#include "data/post_processor.h"
#include "data/pretokenizer.h"
#include "data/token_decoder.h"
#include "data/tokenizer_json.h"
#include "data/unigram.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

using nlohmann::json;
using namespace tokenization;

// Ids beyond this are refused: the id -> token tables are dense (4 bytes per
// id each, so a stray huge id costs at most ~34 MB), and the largest
// published vocabularies have ~260k tokens.
constexpr int64_t kMaxTokenId = (int64_t{1} << 22) - 1;
// A thread's BPE cache is dropped when it holds this many words (~20 MB);
// natural text reuses far fewer distinct pre-tokens than that.
constexpr size_t kMaxCachedWords = size_t{1} << 18;

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

struct MergeRule {
  int32_t rank;
  int32_t new_id;
};

// What the BPE model starts from for one raw byte (one ByteLevel character).
struct ByteSymbol {
  std::array<int32_t, 2> ids{};  // the character's id, or its byte_fallback ids
  uint8_t count = 0;             // 0: not in the vocabulary (unk or dropped)
  bool fallback = false;         // ids are <0xXX> byte_fallback tokens
};

std::atomic<uint64_t> next_instance_id{1};

// Strings by dense id, concatenated: 4 bytes per id however short the strings.
class StringTable {
 public:
  void build(const std::vector<std::pair<int32_t, std::string>>& entries, int64_t size) {
    std::vector<const std::string*> by_id(size, nullptr);
    for (const auto& [id, text] : entries) by_id[id] = &text;
    ends_.assign(size, 0);
    for (int64_t id = 0; id < size; ++id) {
      if (by_id[id]) text_ += *by_id[id];
      ends_[id] = static_cast<uint32_t>(text_.size());
    }
  }
  std::string_view at(int32_t id) const {
    const uint32_t begin = id == 0 ? 0 : ends_[id - 1];
    return std::string_view(text_).substr(begin, ends_[id] - begin);
  }

 private:
  std::string text_;
  std::vector<uint32_t> ends_;
};

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::string hash;
  uint64_t instance_id = 0;

  Normalizer normalizer;
  PreTokenizer pre_tokenizer;
  TokenDecoder decoder;
  SpecialTokenFrame special;              // what add_special_tokens puts around a text
  AddedTokenSplitter split_unnormalized;  // first pass, over the whole text
  AddedTokenSplitter split_normalized;    // second pass, over what is left once normalized

  std::optional<UnigramModel> unigram;  // else the model is BPE
  int64_t model_size = 0;               // ids of the model's vocabulary
  StringMap<int32_t> vocab;      // model vocabulary, token string -> id
  StringMap<int32_t> added;      // added token content -> id
  StringMap<int32_t> raw_vocab;  // raw bytes of byte-level tokens -> id (ignore_merges)
  std::unordered_map<uint64_t, MergeRule> merges;
  std::array<ByteSymbol, 256> byte_symbols;     // byte-level pieces: what each raw byte starts as
  std::array<int32_t, 256> byte_fallback_ids{};  // text pieces: the <0xXX> token of each byte, or -1
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;

  int64_t vocab_size = 0;
  StringTable id_token;        // id -> token string
  StringTable id_bytes;        // id -> TokenDecoder::token_bytes of its token
  std::vector<bool> has_token;  // false for ids no token has
};

namespace {

// --- per-thread state -------------------------------------------------------------------

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
  // std::priority_queue pops the largest: make that the lowest rank, then
  // the leftmost position, as `tokenizers`' Word::merge_all.
  bool operator<(const QueuedMerge& other) const {
    return rank != other.rank ? rank > other.rank : pos > other.pos;
  }
};

struct EncodeState {
  uint64_t owner = 0;  // Impl::instance_id the cache belongs to
  StringMap<std::pair<uint32_t, uint32_t>> cache;  // piece -> [offset, count) in cached_ids
  std::vector<int32_t> cached_ids;
  PreTokenizerScratch pre;
  std::vector<Segment> segments;
  std::vector<Segment> normalized_segments;
  std::vector<Segment> segment_scratch;
  std::string normalized;
  std::string normalize_scratch;
  std::vector<Symbol> symbols;
  std::vector<QueuedMerge> queue;
};

EncodeState& encode_state(uint64_t owner) {
  thread_local EncodeState state;
  if (state.owner != owner || state.cache.size() > kMaxCachedWords) {
    state.owner = owner;
    state.cache.clear();
    state.cached_ids.clear();
  }
  return state;
}

// --- loading ----------------------------------------------------------------------------

int32_t parse_id(const json& value, const std::string& where, const std::string& file) {
  if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() > kMaxTokenId)
    json_fail(file, where, "expected a token id in [0, " + std::to_string(kMaxTokenId) + "], found " +
                               json_preview(value));
  return static_cast<int32_t>(value.get<int64_t>());
}

std::optional<std::string> optional_string(const json& model, const char* key, const std::string& file) {
  const auto it = model.find(key);
  if (it == model.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) json_fail(file, std::string("model.") + key, "expected a string, found " + json_preview(*it));
  return it->get<std::string>();
}

void load_model(const json& root, std::string_view json_text, const std::string& file, Tokenizer::Impl& impl) {
  const json& model = json_field(root, "model", "", file);
  if (!model.is_object()) json_fail(file, "model", "expected an object, found " + json_preview(model));
  // Files from old `tokenizers` versions have no "type"; BPE is the one with merges.
  const std::string type = model.contains("type") ? json_string(model, "type", "model", file)
                                                  : (model.contains("merges") ? "BPE" : "unknown");
  if (type == "Unigram") {
    impl.unigram = UnigramModel::from_json(model, json_text, file);
    const auto& tokens = impl.unigram->tokens();
    impl.model_size = static_cast<int64_t>(tokens.size());
    for (size_t id = 0; id < tokens.size(); ++id) impl.vocab.insert_or_assign(tokens[id], static_cast<int32_t>(id));
    return;
  }
  if (type != "BPE")
    json_fail(file, "model.type", "'" + clip(type) + "' is not supported (loom reads the BPE and Unigram models)");

  if (const auto it = model.find("dropout"); it != model.end() && !it->is_null()) {
    if (!it->is_number()) json_fail(file, "model.dropout", "expected a number or null, found " + json_preview(*it));
    if (it->get<double>() != 0.0)
      json_fail(file, "model.dropout",
                json_preview(*it) + " is not supported (loom's encoding is deterministic; use null)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (auto value = optional_string(model, key, file); value && !value->empty())
      json_fail(file, std::string("model.") + key,
                "'" + clip(*value) + "' is not supported (the BPE models of decoder-only LLMs use none)");
  impl.ignore_merges = json_bool(model, "ignore_merges", false, "model", file);
  impl.fuse_unk = json_bool(model, "fuse_unk", false, "model", file);
  const bool byte_fallback = json_bool(model, "byte_fallback", false, "model", file);
  impl.byte_fallback = byte_fallback;

  const json& vocab = json_field(model, "vocab", "model", file);
  if (!vocab.is_object()) json_fail(file, "model.vocab", "expected an object, found " + json_preview(vocab));
  std::map<int32_t, std::string> by_id;
  for (const auto& [token, value] : vocab.items()) {
    const int32_t id = parse_id(value, "model.vocab['" + clip(token) + "']", file);
    if (const auto [it, inserted] = by_id.emplace(id, token); !inserted)
      json_fail(file, "model.vocab", "tokens '" + clip(it->second) + "' and '" + clip(token) + "' both have id " +
                                         std::to_string(id));
    impl.vocab.emplace(token, id);
  }
  impl.model_size = static_cast<int64_t>(impl.vocab.size());
  if (auto unk = optional_string(model, "unk_token", file)) {
    const auto it = impl.vocab.find(*unk);
    if (it == impl.vocab.end())
      json_fail(file, "model.unk_token", "'" + clip(*unk) + "' is not in model.vocab");
    impl.unk_id = it->second;
  }

  const json& merges = json_field(model, "merges", "model", file);
  if (!merges.is_array()) json_fail(file, "model.merges", "expected a list, found " + json_preview(merges));
  impl.merges.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& merge = merges[rank];
    const std::string where = "model.merges[" + std::to_string(rank) + "]";
    std::string left, right;
    if (merge.is_string()) {  // "a b", the format of tokenizers < 0.20
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        json_fail(file, where, "expected two tokens separated by one space, found " + json_preview(merge));
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      json_fail(file, where, "expected \"a b\" or [\"a\", \"b\"], found " + json_preview(merge));
    }
    const auto id_of = [&](const std::string& token) {
      const auto it = impl.vocab.find(token);
      if (it == impl.vocab.end()) json_fail(file, where, "token '" + clip(token) + "' is not in model.vocab");
      return it->second;
    };
    // A repeated pair takes its last rank, as in `tokenizers` (a map insert).
    const int32_t left_id = id_of(left);
    const int32_t right_id = id_of(right);
    const int32_t merged_id = id_of(left + right);
    impl.merges.insert_or_assign(pair_key(left_id, right_id), MergeRule{static_cast<int32_t>(rank), merged_id});
  }

  std::string bytes;
  for (const auto& [token, id] : impl.vocab)
    if (unicode_to_bytes(token, bytes)) impl.raw_vocab.emplace(bytes, id);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", static_cast<unsigned>(b));
    const auto found = impl.vocab.find(std::string_view(name));
    impl.byte_fallback_ids[b] = byte_fallback && found != impl.vocab.end() ? found->second : -1;
  }
  for (int b = 0; b < 256; ++b) {
    ByteSymbol& symbol = impl.byte_symbols[b];
    const std::string& character = byte_to_unicode(static_cast<uint8_t>(b));
    if (const auto it = impl.vocab.find(character); it != impl.vocab.end()) {
      symbol.ids[0] = it->second;
      symbol.count = 1;
    } else if (byte_fallback) {
      // `tokenizers` falls back on the UTF-8 bytes of the (mapped) character.
      uint8_t count = 0;
      for (char c : character) {
        const int32_t id = impl.byte_fallback_ids[static_cast<uint8_t>(c)];
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
}

// `tokenizers`' AddedVocabulary::add_tokens, then refresh_added_tokens.
void load_added_tokens(const json& root, const std::string& file, Tokenizer::Impl& impl) {
  std::vector<AddedToken> tokens;
  if (const auto it = root.find("added_tokens"); it != root.end() && !it->is_null()) {
    if (!it->is_array()) json_fail(file, "added_tokens", "expected a list, found " + json_preview(*it));
    for (size_t i = 0; i < it->size(); ++i) {
      const json& entry = (*it)[i];
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      AddedToken token;
      token.content = json_string(entry, "content", where, file);
      token.special = json_bool(entry, "special", false, where, file);
      token.single_word = json_bool(entry, "single_word", false, where, file);
      token.lstrip = json_bool(entry, "lstrip", false, where, file);
      token.rstrip = json_bool(entry, "rstrip", false, where, file);
      token.normalized = json_bool(entry, "normalized", !token.special, where, file);
      tokens.push_back(std::move(token));
    }
  }
  const int64_t model_size = impl.model_size;
  const auto same = [](const AddedToken& t) {
    return std::make_tuple(t.content, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized);
  };
  std::set<std::string> special_set;
  std::vector<AddedToken> special_list, plain_list;
  for (const AddedToken& token : tokens)
    if (token.special && !token.content.empty() && special_set.insert(token.content).second)
      special_list.push_back(token);
  std::set<decltype(same(tokens[0]))> seen;
  std::unordered_map<int32_t, AddedToken> by_id;
  int64_t max_added = -1;
  for (const AddedToken& token : tokens) {
    if (token.content.empty() || seen.count(same(token))) continue;
    int64_t id;
    if (const auto it = impl.added.find(token.content); it != impl.added.end()) {
      id = it->second;
    } else if (const auto v = impl.vocab.find(token.content); v != impl.vocab.end()) {
      id = v->second;
    } else if (max_added < 0) {
      id = model_size;
    } else {
      id = (max_added >= model_size || model_size == 0) ? max_added + 1 : model_size;
    }
    if (id > kMaxTokenId) json_fail(file, "added_tokens", "too many tokens (ids beyond " + std::to_string(kMaxTokenId) + ")");
    if (const auto old = by_id.find(static_cast<int32_t>(id)); old != by_id.end()) seen.erase(same(old->second));
    seen.insert(same(token));
    impl.added[token.content] = static_cast<int32_t>(id);
    by_id[static_cast<int32_t>(id)] = token;
    max_added = std::max(max_added, id);
    if (!special_set.count(token.content)) plain_list.push_back(token);
  }
  std::vector<AddedToken> unnormalized, normalized;
  for (const auto* list : {&special_list, &plain_list}) {
    for (const AddedToken& entry : *list) {
      const int32_t id = impl.added.at(entry.content);
      AddedToken matcher = by_id.at(id);  // flags of the token that owns the id
      matcher.content = entry.content;
      matcher.id = id;
      (entry.normalized ? normalized : unnormalized).push_back(std::move(matcher));
    }
  }
  impl.split_unnormalized = AddedTokenSplitter(std::move(unnormalized));
  impl.split_normalized = AddedTokenSplitter(std::move(normalized));

  // id -> token for decoding: added tokens first, as `tokenizers`' id_to_token.
  int64_t max_id = impl.model_size - 1;
  for (const auto& [token, id] : impl.vocab) max_id = std::max<int64_t>(max_id, id);
  for (const auto& [id, token] : by_id) max_id = std::max<int64_t>(max_id, id);
  impl.vocab_size = max_id + 1;
  std::vector<std::pair<int32_t, std::string>> tokens_by_id, bytes_by_id;
  if (impl.unigram) {  // a Unigram vocabulary is a list: every id has its piece
    const auto& tokens = impl.unigram->tokens();
    for (size_t id = 0; id < tokens.size(); ++id)
      if (!by_id.count(static_cast<int32_t>(id))) tokens_by_id.emplace_back(static_cast<int32_t>(id), tokens[id]);
  } else {
    for (const auto& [token, id] : impl.vocab)
      if (!by_id.count(id)) tokens_by_id.emplace_back(id, token);
  }
  for (const auto& [id, token] : by_id) tokens_by_id.emplace_back(id, token.content);
  impl.has_token.assign(impl.vocab_size, false);
  for (const auto& [id, token] : tokens_by_id) {
    impl.has_token[id] = true;
    bytes_by_id.emplace_back(id, impl.decoder.token_bytes(token));
  }
  impl.id_token.build(tokens_by_id, impl.vocab_size);
  impl.id_bytes.build(bytes_by_id, impl.vocab_size);
}

// --- encoding -----------------------------------------------------------------------------

// The BPE model's first symbols for `piece`: one per character, from the
// vocabulary, else the character's <0xXX> byte tokens (byte_fallback), else
// unk_token (neighbours fused when fuse_unk), else nothing, as `tokenizers`'
// BPE::merge_word. A byte-level piece is raw bytes, each standing for its
// GPT-2 character, whose symbols were worked out at load.
void initial_symbols(const Tokenizer::Impl& impl, std::string_view piece, std::vector<Symbol>& symbols) {
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
    if (!impl.unk_id) return;  // dropped, as `tokenizers` does without an unk token
    if (pending_unk && impl.fuse_unk) {
      pending_unk->second += len;
    } else {
      if (pending_unk) add(pending_unk->first, pending_unk->second);
      pending_unk = std::make_pair(*impl.unk_id, len);
    }
  };
  if (impl.pre_tokenizer.byte_level()) {
    for (unsigned char byte : piece) {
      const ByteSymbol& symbol = impl.byte_symbols[byte];
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
      if (const auto it = impl.vocab.find(character); it != impl.vocab.end()) {
        known(it->second, static_cast<int32_t>(len));
        continue;
      }
      const bool fallback = impl.byte_fallback && std::all_of(character.begin(), character.end(), [&](char c) {
                              return impl.byte_fallback_ids[static_cast<uint8_t>(c)] >= 0;
                            });
      if (fallback) {
        for (char c : character) add(impl.byte_fallback_ids[static_cast<uint8_t>(c)], 1);
      } else {
        unknown(static_cast<int32_t>(len));
      }
    }
  }
  if (pending_unk) add(pending_unk->first, pending_unk->second);
}

// `tokenizers`' Word::merge_all: the lowest-ranked pair first, leftmost on ties.
void merge_all(const Tokenizer::Impl& impl, EncodeState& state) {
  auto& symbols = state.symbols;
  auto& queue = state.queue;
  queue.clear();
  for (size_t i = 0; i + 1 < symbols.size(); ++i)
    if (const auto it = impl.merges.find(pair_key(symbols[i].id, symbols[i + 1].id)); it != impl.merges.end())
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
    const auto rule = impl.merges.find(pair_key(left.id, right.id));
    if (rule == impl.merges.end() || rule->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    left.len += right.len;
    symbols[left.next].len = 0;
    left.next = right.next;
    if (right.next != -1) symbols[right.next].prev = top.pos;
    const auto push = [&](int32_t pos, int32_t a, int32_t b) {
      if (const auto it = impl.merges.find(pair_key(a, b)); it != impl.merges.end()) {
        queue.push_back({it->second.rank, pos, it->second.new_id});
        std::push_heap(queue.begin(), queue.end());
      }
    };
    if (left.prev != -1) push(left.prev, symbols[left.prev].id, left.id);
    if (left.next != -1) push(top.pos, left.id, symbols[left.next].id);
  }
}

// The model's ids for one pre-token, through the thread's cache.
void encode_piece(const Tokenizer::Impl& impl, EncodeState& state, std::string_view piece, std::vector<int32_t>& ids) {
  if (impl.ignore_merges) {  // BPE's ignore_merges: a piece in the vocabulary is that token
    const auto& whole = impl.pre_tokenizer.byte_level() ? impl.raw_vocab : impl.vocab;
    if (const auto it = whole.find(piece); it != whole.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  if (const auto it = state.cache.find(piece); it != state.cache.end()) {
    const auto [offset, count] = it->second;
    ids.insert(ids.end(), state.cached_ids.begin() + offset, state.cached_ids.begin() + offset + count);
    return;
  }
  const auto offset = static_cast<uint32_t>(state.cached_ids.size());
  if (impl.unigram) {
    impl.unigram->encode(piece, state.cached_ids);
  } else {
    initial_symbols(impl, piece, state.symbols);
    merge_all(impl, state);
    for (const Symbol& symbol : state.symbols)
      if (symbol.len != 0) state.cached_ids.push_back(symbol.id);
  }
  const auto count = static_cast<uint32_t>(state.cached_ids.size() - offset);
  ids.insert(ids.end(), state.cached_ids.begin() + offset, state.cached_ids.end());
  state.cache.emplace(std::string(piece), std::make_pair(offset, count));
}

// `tokenizers`' encode: added tokens split out of the raw text; the rest
// normalized, split again by the added tokens that match normalized text,
// pre-tokenized, and every pre-token given to the model.
void encode_text(const Tokenizer::Impl& impl, std::string_view text, std::vector<int32_t>& ids) {
  if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos)
    throw BadInput("text to tokenize is not valid UTF-8 at byte " + std::to_string(bad));
  EncodeState& state = encode_state(impl.instance_id);
  auto& segments = state.segments;
  segments.clear();
  if (!text.empty()) segments.push_back({text, -1});
  if (!impl.split_unnormalized.empty()) impl.split_unnormalized.split(segments, state.segment_scratch);
  const auto emit = [&](std::string_view piece) { encode_piece(impl, state, piece, ids); };
  for (const Segment& segment : segments) {
    if (segment.id >= 0) {
      ids.push_back(segment.id);
      continue;
    }
    bool at_start = segment.text.data() == text.data();
    std::string_view normalized = segment.text;
    if (!impl.normalizer.empty()) {
      impl.normalizer.apply(segment.text, state.normalized, state.normalize_scratch, at_start);
      normalized = state.normalized;
    }
    auto& parts = state.normalized_segments;
    parts.clear();
    if (!normalized.empty()) parts.push_back({normalized, -1});
    if (!impl.split_normalized.empty()) impl.split_normalized.split(parts, state.segment_scratch);
    for (const Segment& part : parts) {
      if (part.id >= 0) {
        ids.push_back(part.id);
      } else {
        impl.pre_tokenizer.split(part.text, at_start && part.text.data() == normalized.data(), state.pre, emit);
      }
    }
  }
}

}  // namespace

// --- Tokenizer ---------------------------------------------------------------------------

Tokenizer Tokenizer::load(const std::string& path) { return from_json(read_file(path), path); }

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    throw BadInput(source + ": not valid JSON: " + e.what());
  }
  if (!root.is_object()) json_fail(source, "", "expected a JSON object at the top, found " + json_preview(root));
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  impl->instance_id = next_instance_id.fetch_add(1);
  try {
    // An absent part is as null (files written by hand often leave them out).
    const auto part = [&root](const char* key) { return root.contains(key) ? root[key] : json(); };
    load_model(root, json_text, source, *impl);
    impl->normalizer = Normalizer::from_json(part("normalizer"), source);
    impl->pre_tokenizer = PreTokenizer::from_json(part("pre_tokenizer"), source);
    impl->decoder = TokenDecoder::from_json(part("decoder"), source);
    impl->special = parse_post_processor(part("post_processor"), source);
    load_added_tokens(root, source, *impl);
  } catch (const json::exception& e) {  // a type mismatch the checks above missed
    throw BadInput(source + ": malformed tokenizer.json: " + e.what());
  }
  const std::string canonical = root.dump(-1, ' ', false, json::error_handler_t::replace);
  impl->hash = crc32c_hex(crc32c(std::as_bytes(std::span(canonical.data(), canonical.size()))));
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, SpecialTokens special) const {
  std::vector<int32_t> ids;
  encode_append(text, ids, special);
  return ids;
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& ids, SpecialTokens special) const {
  const bool add = special == SpecialTokens::kAdd;
  if (add) ids.insert(ids.end(), impl_->special.before.begin(), impl_->special.before.end());
  encode_text(*impl_, text, ids);
  if (add) ids.insert(ids.end(), impl_->special.after.begin(), impl_->special.after.end());
}

std::span<const int32_t> Tokenizer::special_ids_before() const { return impl_->special.before; }
std::span<const int32_t> Tokenizer::special_ids_after() const { return impl_->special.after; }

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids)
    if (id >= 0 && id < impl_->vocab_size && impl_->has_token[id]) tokens.emplace_back(impl_->id_token.at(id));
  return impl_->decoder.decode(std::move(tokens));
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size || !impl_->has_token[id]) return {};
  return impl_->id_bytes.at(id);
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (const auto it = impl_->added.find(token); it != impl_->added.end()) return it->second;
  if (const auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size || !impl_->has_token[id]) return std::nullopt;
  return std::string(impl_->id_token.at(id));
}

const std::string& Tokenizer::hash() const { return impl_->hash; }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace loom
