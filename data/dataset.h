// loom's token dataset: a folder of HDF5 shards described by index.json.
//
//   DIR/index.json        what the folder holds (written last: its presence
//                         means the dataset is complete)
//   DIR/shard-00000.h5    /tokens       1-D uint16 (vocab_size <= 65536) or
//   DIR/shard-00001.h5                  uint32, little-endian, chunked
//   ...                   /doc_offsets  1-D uint64, num_documents + 1 entries:
//                                       document i is tokens[doc_offsets[i] :
//                                       doc_offsets[i + 1]], its EOS included
//                         /loss_mask    1-D uint8 of 0/1, as long as /tokens:
//                                       only in a chat dataset (format 2)
//                         root attributes format_version (1, or 2 with
//                         /loss_mask), vocab_size, eos_id, tokenizer_hash
//
// The token stream of the dataset is the shards' /tokens concatenated in
// index order; a global token offset indexes it. docs/data.md describes the
// format field by field, including what the CRC32C covers.
//
// Every problem with the data is loom::BadInput naming the file and the key,
// shard, attribute or offset. HDF5 is called only under the process-wide
// HDF5 lock (Note [HDF5 lock] in data/hdf5_handle.h), so Dataset and
// DatasetWriter objects may be used from any thread; a DatasetWriter one
// call at a time, a Dataset from several threads at once (it serialises its
// reads and its cache of open shards itself).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace loom {

// Format 1: tokens and document offsets. Format 2: also a loss mask
// (/loss_mask in every shard, "loss_mask": true in index.json), written only
// for the datasets that have one (`loom prepare --chat`), so that every other
// dataset stays readable by a loom that knows format 1 alone, and such a loom
// refuses a format-2 dataset instead of training on it without the mask.
inline constexpr int kDatasetFormatVersion = 1;
inline constexpr int kDatasetFormatVersionLossMask = 2;
inline constexpr const char* kDatasetFormatName = "loom-dataset";
inline constexpr const char* kDatasetIndexFile = "index.json";
// Default shard size, in tokens (128 MiB of uint16 tokens).
inline constexpr uint64_t kDefaultShardTokens = uint64_t{64} << 20;
// HDF5 chunk of /tokens, in elements: large enough for sequential reads to be
// cheap, small enough that a sample read touches one or two chunks.
inline constexpr uint64_t kTokenChunkElements = uint64_t{1} << 20;
// Largest vocabulary: token ids must fit int32 (the model's embedding index).
inline constexpr int64_t kMaxVocabSize = int64_t{1} << 31;

enum class TokenDtype { kUint16, kUint32 };

// "uint16" / "uint32".
const char* token_dtype_name(TokenDtype dtype);
// uint16 when every id < vocab_size fits in 16 bits, else uint32.
TokenDtype token_dtype_for_vocab(int64_t vocab_size);
size_t token_dtype_bytes(TokenDtype dtype);

// "shard-00042.h5".
std::string shard_file_name(size_t shard);

// One entry of index.json's "shards".
struct ShardEntry {
  std::string file;            // name inside the dataset folder
  uint64_t num_tokens = 0;
  uint64_t num_documents = 0;
  uint32_t crc32c = 0;         // see docs/data.md: /tokens, /doc_offsets, then /loss_mask, little-endian
  uint64_t bytes = 0;          // size of the .h5 file
  // CRC-32C of the .h5 file's bytes, checked before HDF5 reads the file
  // (Note [Shard file checksum]). Absent in datasets written before it
  // existed.
  std::optional<uint32_t> file_crc32c;
};

// index.json, parsed.
struct DatasetIndex {
  int64_t vocab_size = 0;
  int64_t eos_id = 0;
  std::string tokenizer_hash;
  TokenDtype token_dtype = TokenDtype::kUint16;
  // Every shard holds /loss_mask (format_version 2).
  bool has_loss_mask = false;
  uint64_t num_tokens = 0;
  uint64_t num_documents = 0;
  std::vector<ShardEntry> shards;

  // 2 with a loss mask, else 1 (index.json's and every shard's format_version).
  int format_version() const { return has_loss_mask ? kDatasetFormatVersionLossMask : kDatasetFormatVersion; }

  // index.json's text (pretty-printed, keys in the documented order).
  std::string to_json() const;
  // Parses and validates index.json's text. `path` names the file in errors:
  // BadInput "<path>: key 'shards[2].crc32c': expected ..., found ...".
  static DatasetIndex parse(const std::string& text, const std::string& path);
};

// Writes a dataset folder, one document at a time.
//
// Crash safety: each shard is written as `shard-NNNNN.h5.tmp`, closed,
// fsynced and renamed to `shard-NNNNN.h5` when full; finish() writes
// index.json last, atomically. A folder without index.json is not a dataset,
// so an interrupted write never looks complete. Destroying a writer without
// finish() (an exception while preparing) removes every shard it wrote.
class DatasetWriter {
 public:
  // Creates `dir` if needed. Throws BadInput when `dir` already holds an
  // index.json (a finished dataset is never overwritten), when vocab_size is
  // not in [1, 2^31], eos_id not in [0, vocab_size), or shard_tokens is 0.
  // Leftovers of an interrupted writer in `dir` (shard-NNNNN.h5 and
  // shard-NNNNN.h5.tmp without an index.json) are removed. `with_loss_mask`:
  // a format-2 dataset, whose documents come with their loss mask.
  DatasetWriter(std::string dir, int64_t vocab_size, int64_t eos_id, std::string tokenizer_hash,
                uint64_t shard_tokens = kDefaultShardTokens, bool with_loss_mask = false);
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;
  ~DatasetWriter();

  // Appends one document (the caller appends EOS). Documents are never split:
  // when the document does not fit in the current shard's remaining
  // shard_tokens, the shard is completed and the document starts the next one
  // (a document longer than shard_tokens gets a shard of its own). Throws
  // BadInput naming the document and position for an id outside
  // [0, vocab_size); the document is then not added. Only for a writer
  // without a loss mask (std::logic_error otherwise).
  void add_document(std::span<const int32_t> ids);
  // The same with the document's loss mask (one 0 or 1 per id), for a writer
  // made with_loss_mask (std::logic_error otherwise). BadInput naming the
  // document and position for a value other than 0 or 1, std::logic_error
  // when the lengths differ.
  void add_document(std::span<const int32_t> ids, std::span<const uint8_t> loss_mask);

  // Completes the last shard and writes index.json. Returns the index.
  // Call once; the writer accepts nothing afterwards.
  const DatasetIndex& finish();
  // As finish(), but writes no index.json: for one part of a dataset
  // prepared in parts (`loom prepare --part`), whose merge writes the index.
  // The shards are complete and durable when it returns.
  const DatasetIndex& finish_part();

  const std::string& dir() const { return dir_; }
  uint64_t num_tokens() const;
  uint64_t num_documents() const;

 private:
  struct OpenShard;
  void start_shard();
  void add_checked_document(std::span<const int32_t> ids, std::span<const uint8_t> loss_mask);
  void flush_pending();
  void complete_shard();
  void remove_written_files() noexcept;

  std::string dir_;
  uint64_t shard_tokens_;
  DatasetIndex index_;
  std::unique_ptr<OpenShard> shard_;
  std::vector<std::string> completed_paths_;  // final names of completed shards
  bool finished_ = false;
};

// Whether a shard's tokens are all scanned for ids >= vocab_size when the
// shard is first used. Reads check the ids they return in any case (a cheap
// comparison per token), so the scan only moves the error to the shard's
// first use.
enum class TokenRangeScan {
  kAuto,    // scan datasets of at most kAutoScanMaxTokens tokens
  kAlways,
  kNever,
};
inline constexpr uint64_t kAutoScanMaxTokens = uint64_t{64} << 20;

// Whether a shard file is checked before this process's libhdf5 reads it,
// the first time this process needs the shard (Note [Lazy shard checks]):
// the file's bytes against index.json's file_crc32c (Note [Shard file
// checksum]; shards without one skip this part), then a child process opens
// and reads the shard first (Note [Reading shards in a probe process]), so
// that a file that crashes or hangs libhdf5 is refused.
enum class ShardFileCheck {
  kAuto,    // check the shards of datasets whose shard files total at most kAutoCheckMaxBytes
  kAlways,
  kNever,
};
inline constexpr uint64_t kAutoCheckMaxBytes = uint64_t{4} << 30;

ShardFileCheck parse_shard_file_check(const std::string& text);  // "auto", "always", "never"; else invalid_argument

// Shard files one Dataset keeps open at once (Note [Open shard cache]).
inline constexpr size_t kDefaultMaxOpenShards = 64;

struct DatasetOpenOptions {
  bool verify_checksums = false;  // recompute each shard's CRC32C at its first use (reads the shard)
  TokenRangeScan scan_token_range = TokenRangeScan::kAuto;
  ShardFileCheck check_shard_files = ShardFileCheck::kAuto;
  // Where the files are checked, read them in a probe process first. Off
  // only where a test or fuzz target must run loom's reading code in its own
  // process.
  bool probe_in_child = true;
  // How long one probe may take; 0: 120 s plus 1 s per 8 MiB of the shard
  // files it reads.
  uint32_t probe_timeout_seconds = 0;
  // At most this many shard files open at once (least recently used closed
  // first); 0 counts as 1.
  size_t max_open_shards = kDefaultMaxOpenShards;
};

// How a Dataset has used its shard files so far.
struct ShardCacheStats {
  size_t shards = 0;           // in the dataset
  size_t distinct_opened = 0;  // shards this process has opened at least once
  size_t checked = 0;          // shards that passed their first-use checks (Note [Lazy shard checks])
  size_t open_now = 0;
  size_t peak_open = 0;        // most open at once
  size_t max_open = 0;         // the limit
};

// A dataset opened read-only. Each Dataset holds its own HDF5 handles, at
// most options.max_open_shards shard files at a time.
class Dataset {
 public:
  // Parses DIR/index.json; touches no shard (Note [Lazy shard checks]). A
  // shard is opened the first time a read needs it, and then checked against
  // the index: it exists, its size, its file CRC-32C and a probe process's
  // reading of it (as options.check_shard_files says), /tokens dtype and
  // length, /doc_offsets length and values (0 first, num_tokens last,
  // non-decreasing), the root attributes, /loss_mask's dtype (uint8) and
  // length where the dataset has one, and (as the options say) its token ids,
  // its mask values (0 or 1) and its data CRC32C. Any mismatch is BadInput naming the shard file
  // (or index.json and the key), thrown by the read that needed the shard.
  static Dataset open(const std::string& dir, const DatasetOpenOptions& options = {});

  Dataset(Dataset&&) noexcept;
  Dataset& operator=(Dataset&&) noexcept;
  ~Dataset();

  const std::string& dir() const;
  const DatasetIndex& index() const;
  uint64_t num_tokens() const { return index().num_tokens; }
  uint64_t num_documents() const { return index().num_documents; }
  int64_t vocab_size() const { return index().vocab_size; }
  int64_t eos_id() const { return index().eos_id; }

  // Copies tokens [begin, begin + out.size()) of the token stream into `out`,
  // crossing shard boundaries as needed. Throws std::out_of_range when the
  // range ends past num_tokens(), BadInput naming the shard and offset when a
  // token id is >= vocab_size.
  void read_tokens(uint64_t begin, std::span<int32_t> out) const;
  void read_tokens(uint64_t begin, std::span<int64_t> out) const;

  // Whether the dataset has a loss mask (index.json's loss_mask, format 2).
  bool has_loss_mask() const { return index().has_loss_mask; }
  // Copies the loss mask of tokens [begin, begin + out.size()) into `out`, as
  // read_tokens: 1 where the token is a target of the loss, 0 where it is
  // not. A dataset without a loss mask gives all ones (every token counts).
  // BadInput naming the shard and offset for a stored value other than 0 or 1.
  void read_loss_mask(uint64_t begin, std::span<uint8_t> out) const;

  // The shard's /doc_offsets (offsets local to the shard), read from the
  // file on every call: nothing keeps them (Note [Lazy shard checks]).
  std::vector<uint64_t> read_doc_offsets(size_t shard) const;
  // Global token offset of the shard's first token.
  uint64_t shard_first_token(size_t shard) const;
  size_t num_shards() const { return index().shards.size(); }
  // The non-empty shards holding tokens [begin, begin + count), in order.
  std::vector<size_t> shards_of(uint64_t begin, uint64_t count) const;

  // Runs the first-use checks of the given shards that have not had them,
  // all in one probe process where the files are checked. The loader calls
  // it with the shards of the step it is about to read, so that a rank
  // checks the shards it reads, and only those, one probe per step.
  void check_shards(const std::vector<size_t>& shards) const;
  void check_all_shards() const;
  // Whether first-use checks run in a probe process (the files are checked
  // and options.probe_in_child): only then does checking a batch of shards
  // ahead of the reads save anything (one fork for the batch). Otherwise the
  // read that needs a shard checks it, and checking ahead would open shards
  // that the bounded cache closes again before they are read.
  bool checks_in_probe() const;
  // Each shard file i with i % stride == first exists and has index.json's
  // size (one stat per file: no HDF5, no descriptor kept). BadInput naming
  // the first file that does not.
  void check_shard_sizes(size_t first = 0, size_t stride = 1) const;

  // Checks every token id against vocab_size, and every loss-mask value
  // (0 or 1) where there is a mask (BadInput naming shard, offset).
  void scan_token_range() const;
  // Recomputes every shard's CRC32C and compares it with index.json.
  void verify_checksums() const;

  ShardCacheStats shard_cache_stats() const;

 private:
  struct Impl;
  explicit Dataset(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace loom
