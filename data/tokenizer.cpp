#include "data/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <unordered_map>

#include "data/added_tokens.h"
#include "data/bpe_model.h"
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

// A thread's cache of pre-token encodings is dropped when it holds this many
// words (~20 MB); natural text reuses far fewer distinct pre-tokens than that.
constexpr size_t kMaxCachedWords = size_t{1} << 18;

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

  std::optional<BpeModel> bpe;          // the model: BPE,
  std::optional<UnigramModel> unigram;  // or Unigram
  int64_t model_size = 0;               // ids of the model's vocabulary
  StringMap<int32_t> added;             // added token content -> id

  // The model's vocabulary, token string -> id.
  const StringMap<int32_t>& vocab() const { return bpe ? bpe->vocab() : unigram->vocab(); }

  int64_t vocab_size = 0;
  StringTable id_token;        // id -> token string
  StringTable id_bytes;        // id -> TokenDecoder::token_bytes of its token
  std::vector<bool> has_token;  // false for ids no token has
};

namespace {

// --- per-thread state -------------------------------------------------------------------

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
  BpeModel::Scratch bpe;
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

void load_model(const json& root, std::string_view json_text, const std::string& file, Tokenizer::Impl& impl) {
  const json& model = json_field(root, "model", "", file);
  if (!model.is_object()) json_fail(file, "model", "expected an object, found " + json_preview(model));
  // Files from old `tokenizers` versions have no "type"; BPE is the one with merges.
  const std::string type = model.contains("type") ? json_string(model, "type", "model", file)
                                                  : (model.contains("merges") ? "BPE" : "unknown");
  if (type == "Unigram") {
    impl.unigram = UnigramModel::from_json(model, json_text, file);
    impl.model_size = static_cast<int64_t>(impl.unigram->tokens().size());
  } else if (type == "BPE") {
    impl.bpe = BpeModel::from_json(model, file);
    impl.model_size = static_cast<int64_t>(impl.bpe->vocab().size());
  } else {
    json_fail(file, "model.type", "'" + clip(type) + "' is not supported (loom reads the BPE and Unigram models)");
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
    } else if (const auto v = impl.vocab().find(token.content); v != impl.vocab().end()) {
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
  for (const auto& [token, id] : impl.vocab()) max_id = std::max<int64_t>(max_id, id);
  for (const auto& [id, token] : by_id) max_id = std::max<int64_t>(max_id, id);
  impl.vocab_size = max_id + 1;
  std::vector<std::pair<int32_t, std::string>> tokens_by_id, bytes_by_id;
  if (impl.unigram) {  // a Unigram vocabulary is a list: every id has its piece
    const auto& tokens = impl.unigram->tokens();
    for (size_t id = 0; id < tokens.size(); ++id)
      if (!by_id.count(static_cast<int32_t>(id))) tokens_by_id.emplace_back(static_cast<int32_t>(id), tokens[id]);
  } else {
    for (const auto& [token, id] : impl.vocab())
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

// The model's ids for one pre-token, through the thread's cache.
void encode_piece(const Tokenizer::Impl& impl, EncodeState& state, std::string_view piece, std::vector<int32_t>& ids) {
  const bool byte_level = impl.pre_tokenizer.byte_level();
  if (impl.bpe) {
    if (const auto id = impl.bpe->whole(piece, byte_level)) {
      ids.push_back(*id);
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
    impl.bpe->encode(piece, byte_level, state.bpe, state.cached_ids);
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
  if (const auto it = impl_->vocab().find(token); it != impl_->vocab().end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size || !impl_->has_token[id]) return std::nullopt;
  return std::string(impl_->id_token.at(id));
}

const std::string& Tokenizer::hash() const { return impl_->hash; }
const std::string& Tokenizer::source() const { return impl_->source; }

}  // namespace loom
