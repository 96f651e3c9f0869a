// index.json (parse, print), token dtypes and shard names. The read-only
// Dataset is in data/dataset.cpp, the writer in data/dataset_writer.cpp.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "data/dataset.h"
#include "util/crc32c.h"
#include "util/error.h"

namespace loom {
namespace {

using nlohmann::json;

// A JSON value for an error message, cut short.
std::string clip(const json& value) {
  std::string text = value.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// --- index.json --------------------------------------------------------------

// Reads typed keys, naming the file and the full key path in every error.
class IndexReader {
 public:
  explicit IndexReader(const std::string& path) : path_(path) {}

  [[noreturn]] void fail(const std::string& key, const std::string& message) const {
    throw BadInput(path_ + ": key '" + key + "': " + message);
  }

  const json& member(const json& object, const std::string& name, const std::string& key,
                     const std::string& expected) const {
    const auto it = object.find(name);
    if (it == object.end()) fail(key, "missing (expected " + expected + ")");
    return *it;
  }

  uint64_t unsigned_int(const json& object, const std::string& name, const std::string& key) const {
    const json& value = member(object, name, key, "a non-negative integer");
    if (!value.is_number_unsigned()) fail(key, "expected a non-negative integer, found " + clip(value));
    return value.get<uint64_t>();
  }

  std::string string(const json& object, const std::string& name, const std::string& key) const {
    const json& value = member(object, name, key, "a string");
    if (!value.is_string()) fail(key, "expected a string, found " + clip(value));
    return value.get<std::string>();
  }

 private:
  const std::string& path_;
};

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

uint32_t parse_crc_hex(const IndexReader& reader, const std::string& text, const std::string& key) {
  const bool valid = text.size() == 8 && std::all_of(text.begin(), text.end(), [](char c) {
                       return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
                     });
  if (!valid) reader.fail(key, "expected 8 hexadecimal digits, found \"" + text.substr(0, 40) + "\"");
  return static_cast<uint32_t>(std::stoul(text, nullptr, 16));
}

}  // namespace

// --- dtype and names -------------------------------------------------------------

const char* token_dtype_name(TokenDtype dtype) { return dtype == TokenDtype::kUint16 ? "uint16" : "uint32"; }

TokenDtype token_dtype_for_vocab(int64_t vocab_size) {
  return vocab_size <= 65536 ? TokenDtype::kUint16 : TokenDtype::kUint32;
}

size_t token_dtype_bytes(TokenDtype dtype) { return dtype == TokenDtype::kUint16 ? 2 : 4; }

std::string shard_file_name(size_t shard) {
  char name[32];
  std::snprintf(name, sizeof name, "shard-%05zu.h5", shard);
  return name;
}

// --- DatasetIndex ----------------------------------------------------------------

std::string DatasetIndex::to_json() const {
  nlohmann::ordered_json root;
  root["format"] = kDatasetFormatName;
  root["format_version"] = format_version();
  root["vocab_size"] = vocab_size;
  root["eos_id"] = eos_id;
  root["tokenizer_hash"] = tokenizer_hash;
  root["token_dtype"] = token_dtype_name(token_dtype);
  if (has_loss_mask) root["loss_mask"] = true;
  root["num_tokens"] = num_tokens;
  root["num_documents"] = num_documents;
  root["shards"] = nlohmann::ordered_json::array();
  for (const ShardEntry& shard : shards) {
    root["shards"].push_back({{"file", shard.file},
                              {"num_tokens", shard.num_tokens},
                              {"num_documents", shard.num_documents},
                              {"crc32c", crc32c_hex(shard.crc32c)},
                              {"bytes", shard.bytes}});
    if (shard.file_crc32c) root["shards"].back()["file_crc32c"] = crc32c_hex(*shard.file_crc32c);
  }
  return root.dump(2) + "\n";
}

DatasetIndex DatasetIndex::parse(const std::string& text, const std::string& path) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
    throw BadInput(path + ": not valid JSON: " + e.what());
  }
  if (!root.is_object()) throw BadInput(path + ": expected a JSON object, found " + clip(root));
  const IndexReader reader(path);

  if (reader.string(root, "format", "format") != kDatasetFormatName)
    reader.fail("format", "expected \"" + std::string(kDatasetFormatName) + "\", found " + clip(root["format"]));
  const uint64_t format_version = reader.unsigned_int(root, "format_version", "format_version");
  if (format_version != kDatasetFormatVersion && format_version != kDatasetFormatVersionLossMask)
    reader.fail("format_version", "expected " + std::to_string(kDatasetFormatVersion) + " or " +
                                      std::to_string(kDatasetFormatVersionLossMask) + " (what this loom reads), found " +
                                      clip(root["format_version"]));

  DatasetIndex index;
  // Format 2 is the format of a dataset with a loss mask, and says so twice:
  // a reader that knows format 1 alone refuses the version, and one that
  // knows both reads the key.
  const auto loss_mask = root.find("loss_mask");
  if (format_version == kDatasetFormatVersionLossMask) {
    if (loss_mask == root.end() || *loss_mask != true)
      reader.fail("loss_mask", "format_version 2 is a dataset with a loss mask: expected true, found " +
                                   (loss_mask == root.end() ? std::string("no key") : clip(*loss_mask)));
    index.has_loss_mask = true;
  } else if (loss_mask != root.end() && *loss_mask != false) {
    reader.fail("loss_mask", "a loss mask needs format_version 2, found format_version 1 and loss_mask " +
                                 clip(*loss_mask));
  }
  const uint64_t vocab_size = reader.unsigned_int(root, "vocab_size", "vocab_size");
  if (vocab_size == 0 || vocab_size > static_cast<uint64_t>(kMaxVocabSize))
    reader.fail("vocab_size", "expected 1 to 2^31, found " + std::to_string(vocab_size));
  index.vocab_size = static_cast<int64_t>(vocab_size);
  const uint64_t eos_id = reader.unsigned_int(root, "eos_id", "eos_id");
  if (eos_id >= vocab_size)
    reader.fail("eos_id", "expected an id below vocab_size " + std::to_string(vocab_size) + ", found " +
                              std::to_string(eos_id));
  index.eos_id = static_cast<int64_t>(eos_id);
  index.tokenizer_hash = reader.string(root, "tokenizer_hash", "tokenizer_hash");

  const std::string dtype = reader.string(root, "token_dtype", "token_dtype");
  if (dtype == "uint16") {
    index.token_dtype = TokenDtype::kUint16;
    if (vocab_size > 65536)
      reader.fail("token_dtype", "uint16 cannot hold the ids of vocab_size " + std::to_string(vocab_size));
  } else if (dtype == "uint32") {
    index.token_dtype = TokenDtype::kUint32;
  } else {
    reader.fail("token_dtype", "expected \"uint16\" or \"uint32\", found \"" + dtype.substr(0, 40) + "\"");
  }
  index.num_tokens = reader.unsigned_int(root, "num_tokens", "num_tokens");
  index.num_documents = reader.unsigned_int(root, "num_documents", "num_documents");

  const json& shards = reader.member(root, "shards", "shards", "an array");
  if (!shards.is_array()) reader.fail("shards", "expected an array, found " + clip(shards));
  uint64_t sum_tokens = 0;
  uint64_t sum_documents = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string key = "shards[" + std::to_string(i) + "]";
    const json& item = shards[i];
    if (!item.is_object()) reader.fail(key, "expected an object, found " + clip(item));
    ShardEntry shard;
    shard.file = reader.string(item, "file", key + ".file");
    if (!is_plain_file_name(shard.file))
      reader.fail(key + ".file", "expected a file name inside the dataset folder, found \"" + shard.file + "\"");
    for (const ShardEntry& earlier : index.shards)
      if (earlier.file == shard.file) reader.fail(key + ".file", "\"" + shard.file + "\" is listed twice");
    shard.num_tokens = reader.unsigned_int(item, "num_tokens", key + ".num_tokens");
    shard.num_documents = reader.unsigned_int(item, "num_documents", key + ".num_documents");
    shard.crc32c = parse_crc_hex(reader, reader.string(item, "crc32c", key + ".crc32c"), key + ".crc32c");
    shard.bytes = reader.unsigned_int(item, "bytes", key + ".bytes");
    if (item.contains("file_crc32c"))
      shard.file_crc32c =
          parse_crc_hex(reader, reader.string(item, "file_crc32c", key + ".file_crc32c"), key + ".file_crc32c");
    // Sums that wrap around would let a forged total match; a shard's
    // /doc_offsets has num_documents + 1 entries, which must not wrap to 0.
    if (__builtin_add_overflow(sum_tokens, shard.num_tokens, &sum_tokens))
      reader.fail(key + ".num_tokens", "the shards' num_tokens overflow 64 bits");
    if (shard.num_documents == UINT64_MAX || __builtin_add_overflow(sum_documents, shard.num_documents, &sum_documents))
      reader.fail(key + ".num_documents", "the shards' num_documents overflow 64 bits");
    index.shards.push_back(std::move(shard));
  }
  if (sum_tokens != index.num_tokens)
    reader.fail("num_tokens", std::to_string(index.num_tokens) + " is not the sum of the shards' num_tokens (" +
                                  std::to_string(sum_tokens) + ")");
  if (sum_documents != index.num_documents)
    reader.fail("num_documents", std::to_string(index.num_documents) +
                                     " is not the sum of the shards' num_documents (" + std::to_string(sum_documents) +
                                     ")");
  return index;
}

}  // namespace loom
