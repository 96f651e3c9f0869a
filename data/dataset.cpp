// The read-only Dataset: shards opened lazily through a bounded cache and
// checked on first use. index.json is parsed in data/dataset_index.cpp, the
// writer is in data/dataset_writer.cpp.
#include "data/dataset.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "data/hdf5_handle.h"
#include "data/shard_cache.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"
#include "util/isolated.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

// --- HDF5 reading helpers ------------------------------------------------------

std::string describe_type(hid_t type) {
  const H5T_class_t type_class = H5Tget_class(type);
  const size_t bytes = H5Tget_size(type);
  switch (type_class) {
    case H5T_INTEGER:
      return std::string(H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(bytes * 8);
    case H5T_FLOAT:
      return "float" + std::to_string(bytes * 8);
    case H5T_STRING:
      return "string";
    default:
      return "a non-numeric type";
  }
}

bool is_unsigned_integer(hid_t type, size_t bytes) {
  return H5Tget_class(type) == H5T_INTEGER && H5Tget_sign(type) == H5T_SGN_NONE && H5Tget_size(type) == bytes;
}

// Opens root attribute `name`, which must hold exactly one value.
hdf5::AttrId open_root_attribute(hid_t file, const char* name, const std::string& path) {
  if (H5Aexists(file, name) <= 0) throw BadInput(path + ": root attribute '" + name + "' is missing");
  hdf5::AttrId attr(H5Aopen(file, name, H5P_DEFAULT));
  hdf5::SpaceId space(H5Aget_space(attr.get()));
  if (!attr.valid() || !space.valid() || H5Sget_simple_extent_npoints(space.get()) != 1)
    throw BadInput(path + ": root attribute '" + name + "' is not a single value" + hdf5::take_error_detail());
  return attr;
}

int64_t read_int_attribute(hid_t file, const char* name, const std::string& path) {
  hdf5::AttrId attr = open_root_attribute(file, name, path);
  hdf5::TypeId type(H5Aget_type(attr.get()));
  if (H5Tget_class(type.get()) != H5T_INTEGER)
    throw BadInput(path + ": root attribute '" + name + "' is " + describe_type(type.get()) + ", expected an integer");
  int64_t value = 0;
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0)
    throw BadInput(path + ": cannot read root attribute '" + name + "'" + hdf5::take_error_detail());
  return value;
}

// Accepts variable-length strings (what loom and h5py write for str) and
// fixed-length ones (h5py's bytes).
std::string read_string_attribute(hid_t file, const char* name, const std::string& path) {
  hdf5::AttrId attr = open_root_attribute(file, name, path);
  hdf5::TypeId type(H5Aget_type(attr.get()));
  if (H5Tget_class(type.get()) != H5T_STRING)
    throw BadInput(path + ": root attribute '" + name + "' is " + describe_type(type.get()) + ", expected a string");
  if (H5Tis_variable_str(type.get()) > 0) {
    hdf5::TypeId memory_type(H5Tcopy(H5T_C_S1));
    H5Tset_size(memory_type.get(), H5T_VARIABLE);
    H5Tset_cset(memory_type.get(), H5Tget_cset(type.get()));
    char* text = nullptr;
    if (H5Aread(attr.get(), memory_type.get(), &text) < 0)
      throw BadInput(path + ": cannot read root attribute '" + name + "'" + hdf5::take_error_detail());
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  std::string value(H5Tget_size(type.get()), '\0');
  if (H5Aread(attr.get(), type.get(), value.data()) < 0)
    throw BadInput(path + ": cannot read root attribute '" + name + "'" + hdf5::take_error_detail());
  value.resize(std::min(value.size(), value.find('\0')));
  if (H5Tget_strpad(type.get()) == H5T_STR_SPACEPAD) value.erase(value.find_last_not_of(' ') + 1);
  return value;
}

// Opens dataset `/name`, checks it is 1-D with `length` elements.
hdf5::DatasetId open_vector(hid_t file, const char* name, uint64_t length, const std::string& path,
                            const std::string& length_source) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) throw BadInput(path + ": dataset '/" + name + "' is missing");
  hdf5::DatasetId dataset(H5Dopen2(file, name, H5P_DEFAULT));
  if (!dataset.valid()) throw BadInput(path + ": cannot open dataset '/" + name + "'" + hdf5::take_error_detail());
  hdf5::SpaceId space(H5Dget_space(dataset.get()));
  hsize_t dims[1] = {0};
  if (!space.valid() || H5Sget_simple_extent_ndims(space.get()) != 1)
    throw BadInput(path + ": dataset '/" + name + "' is not one-dimensional");
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  if (dims[0] != length)
    throw BadInput(path + ": dataset '/" + name + "' has " + std::to_string(dims[0]) + " elements, " + length_source +
                   " says " + std::to_string(length));
  return dataset;
}

// Reads elements [begin, begin + count) of a 1-D dataset as `memory_type`.
void read_slice(hid_t dataset, hid_t memory_type, uint64_t begin, uint64_t count, void* out,
                const std::string& path, const char* name) {
  if (count == 0) return;
  hdf5::SpaceId file_space(H5Dget_space(dataset));
  const hsize_t start[1] = {begin};
  const hsize_t size[1] = {count};
  hdf5::SpaceId memory_space(H5Screate_simple(1, size, nullptr));
  if (!file_space.valid() || !memory_space.valid() ||
      H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, size, nullptr) < 0 ||
      H5Dread(dataset, memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT, out) < 0) {
    throw BadInput(path + ": cannot read /" + name + "[" + std::to_string(begin) + ":" +
                   std::to_string(begin + count) + "]" + hdf5::take_error_detail());
  }
}

// Shards are read in pieces of this many tokens by scans and checksums.
constexpr uint64_t kScanPieceTokens = uint64_t{1} << 20;

}  // namespace

// --- Dataset -----------------------------------------------------------------------

ShardFileCheck parse_shard_file_check(const std::string& text) {
  if (text == "auto") return ShardFileCheck::kAuto;
  if (text == "always") return ShardFileCheck::kAlways;
  if (text == "never") return ShardFileCheck::kNever;
  throw std::invalid_argument("shard file check \"" + text + "\": expected auto, always or never");
}

namespace {

// One shard file, open: what the open-shard cache holds.
struct OpenedShard {
  // Declared before `tokens` so that it is closed after it.
  hdf5::FileId file;
  hdf5::DatasetId tokens;
  hdf5::DatasetId doc_offsets;
  hdf5::DatasetId loss_mask;  // datasets with a loss mask only
};

bool scan_wanted(const DatasetOpenOptions& options, uint64_t num_tokens) {
  return options.scan_token_range == TokenRangeScan::kAlways ||
         (options.scan_token_range == TokenRangeScan::kAuto && num_tokens <= kAutoScanMaxTokens);
}

bool file_check_wanted(const DatasetOpenOptions& options, const DatasetIndex& index) {
  uint64_t shard_bytes = 0;
  for (const ShardEntry& shard : index.shards)
    if (__builtin_add_overflow(shard_bytes, shard.bytes, &shard_bytes)) shard_bytes = UINT64_MAX;
  return options.check_shard_files == ShardFileCheck::kAlways ||
         (options.check_shard_files == ShardFileCheck::kAuto && shard_bytes <= kAutoCheckMaxBytes);
}

}  // namespace

// Note [Open shard cache]: a trillion-token dataset is thousands of shard
// files (1 TB of uint32 tokens in 256 MiB shards is about 4,000), past the
// usual limit of 1,024 open descriptors per process, and a rank reads a few
// of them per step. So a Dataset opens a shard when a read needs it and keeps
// at most options.max_open_shards (64) open, closing the least recently used
// first (data/shard_cache.h). An open shard costs one descriptor and HDF5's
// metadata and chunk caches (about 1 MiB); reopening one costs a few small
// metadata reads, rare next to the chunk reads of a sample. Per shard the
// Dataset keeps a few bytes (first token, checked, opened) whatever is open.
// Samples come in a random order, so a read often needs a shard that is
// closed: at worst one open per sample (a few small metadata reads), far
// below what a training step consumes per sample.
//
// Note [Lazy shard checks]: opening a Dataset reads index.json only. The
// checks of a shard (its file, Note [Shard file checksum]; the probe, Note
// [Reading shards in a probe process]; its structure and /doc_offsets; the
// token scan and data checksum where asked) run the first time this process
// needs it, before its tokens are read, and once: a shard reopened after
// eviction gets only the structural checks of open_file. A rank therefore
// checks exactly the shards it reads, and check_shard_files: always means
// "every shard this rank reads is checked before it is read". /doc_offsets is
// read then to check it, and not kept (the loader packs samples by token
// offset and never needs it; read_doc_offsets reads it again), so memory
// does not grow with the dataset. A shard found bad is BadInput naming its
// file, thrown by the read that needed it (in training: on the rank that
// reads it, from the loader, which ends the job through the usual abort).
struct Dataset::Impl {
  std::string dir;
  DatasetIndex index;
  DatasetOpenOptions options;
  bool check_files = false;  // options.check_shard_files, resolved for this dataset's size
  bool scan_range = false;   // options.scan_token_range, resolved
  bool read_every_token = false;  // a probe child: first use reads the whole shard, as training will
  std::vector<uint64_t> first_tokens;  // per shard: global offset of its first token

  // Everything below changes as shards are used: guarded by `mutex`, which
  // is taken before the HDF5 lock, never after it (the loader's prefetch
  // thread and validation on the main thread may share a Dataset).
  std::mutex mutex;
  std::vector<uint8_t> checked;  // per shard: passed its first-use checks
  std::vector<uint8_t> opened;   // per shard: opened at least once
  size_t distinct_opened = 0;
  ShardCache<OpenedShard> cache{kDefaultMaxOpenShards};
  std::vector<uint16_t> scratch16;  // stored tokens, read under the HDF5 lock
  std::vector<uint32_t> scratch32;

  Impl(std::string dir_in, DatasetIndex index_in, const DatasetOpenOptions& options_in)
      : dir(std::move(dir_in)), index(std::move(index_in)), options(options_in), cache(options_in.max_open_shards) {
    check_files = file_check_wanted(options, index);
    scan_range = scan_wanted(options, index.num_tokens);
    uint64_t first_token = 0;
    for (const ShardEntry& shard : index.shards) {
      first_tokens.push_back(first_token);
      first_token += shard.num_tokens;
    }
    checked.assign(index.shards.size(), 0);
    opened.assign(index.shards.size(), 0);
  }

  const ShardEntry& entry(size_t shard) const { return index.shards[shard]; }
  std::string path_of(size_t shard) const { return (fs::path(dir) / entry(shard).file).string(); }

  // Its existence, kind and size against index.json: one stat.
  void check_size(size_t shard_index) const {
    const ShardEntry& entry = index.shards[shard_index];
    const std::string path = path_of(shard_index);
    std::error_code error;
    const fs::file_status status = fs::status(path, error);
    if (!fs::exists(status))
      throw BadInput(path + ": missing (index.json lists it as shards[" + std::to_string(shard_index) + "])");
    if (!fs::is_regular_file(status)) throw BadInput(path + ": not a regular file");
    const uint64_t bytes = fs::file_size(path, error);
    if (error) throw BadInput(path + ": cannot read its size: " + error.message());
    if (bytes != entry.bytes)
      throw BadInput(path + ": file is " + std::to_string(bytes) + " bytes, index.json says " +
                     std::to_string(entry.bytes) + " (truncated or replaced)");
  }

  // Opens one shard file and checks its structure against the index (no
  // data read). `check_file`: its CRC-32C first.
  OpenedShard open_file(size_t shard_index, bool check_file) const {
    const ShardEntry& entry = index.shards[shard_index];
    const std::string path = path_of(shard_index);
    check_size(shard_index);
    // Note [Shard file checksum]: libhdf5 trusts the structures it finds in a
    // file. Fuzzing (docs/fuzzing.md) showed damaged object headers and
    // global heaps making HDF5 1.10 read past its buffers or loop forever,
    // inside the library, where no check of loom's can intervene. So the
    // whole file's CRC-32C, which DatasetWriter records after writing it, is
    // compared before H5Fopen: a damaged shard becomes BadInput and HDF5 never
    // sees it. The check reads each file once (which warms the page cache for
    // the reads that follow); kAuto skips it for large datasets. A crafted
    // file shipped with an index that matches it passes; Note [Reading
    // shards in a probe process] is about those.
    if (check_file && entry.file_crc32c) {
      const uint32_t crc = crc32c_file(path);
      if (crc != *entry.file_crc32c)
        throw BadInput(path + ": file CRC32C " + crc32c_hex(crc) + " does not match index.json's file_crc32c " +
                       crc32c_hex(*entry.file_crc32c) + " (the file is damaged or was replaced; not opened)");
    }

    OpenedShard shard;
    hdf5::Lock lock;
    // Shards are never modified once written, so HDF5's file locks protect
    // nothing here, and they fail on some network file systems.
    hdf5::PlistId access(H5Pcreate(H5P_FILE_ACCESS));
#if H5_VERSION_GE(1, 10, 7)
    H5Pset_file_locking(access.get(), false, true);
#endif
    shard.file = hdf5::FileId(H5Fopen(path.c_str(), H5F_ACC_RDONLY, access.get()));
    if (!shard.file.valid()) throw BadInput(path + ": cannot open as an HDF5 file" + hdf5::take_error_detail());
    const hid_t file = shard.file.get();

    const int64_t format_version = read_int_attribute(file, "format_version", path);
    if (format_version != index.format_version())
      throw BadInput(path + ": root attribute 'format_version' is " + std::to_string(format_version) +
                     ", index.json says " + std::to_string(index.format_version()));
    const auto check_attribute = [&](const char* name, const std::string& found, const std::string& expected) {
      if (found != expected)
        throw BadInput(path + ": root attribute '" + name + "' is " + found + ", index.json says " + expected);
    };
    check_attribute("vocab_size", std::to_string(read_int_attribute(file, "vocab_size", path)),
                    std::to_string(index.vocab_size));
    check_attribute("eos_id", std::to_string(read_int_attribute(file, "eos_id", path)), std::to_string(index.eos_id));
    check_attribute("tokenizer_hash", "\"" + read_string_attribute(file, "tokenizer_hash", path) + "\"",
                    "\"" + index.tokenizer_hash + "\"");

    shard.tokens = open_vector(file, "tokens", entry.num_tokens, path, "index.json's num_tokens");
    hdf5::TypeId token_type(H5Dget_type(shard.tokens.get()));
    if (!is_unsigned_integer(token_type.get(), token_dtype_bytes(index.token_dtype)))
      throw BadInput(path + ": dataset '/tokens' is " + describe_type(token_type.get()) +
                     ", index.json says token_dtype " + token_dtype_name(index.token_dtype));

    shard.doc_offsets =
        open_vector(file, "doc_offsets", entry.num_documents + 1, path, "index.json's num_documents + 1");
    hdf5::TypeId offset_type(H5Dget_type(shard.doc_offsets.get()));
    if (!is_unsigned_integer(offset_type.get(), 8))
      throw BadInput(path + ": dataset '/doc_offsets' is " + describe_type(offset_type.get()) + ", expected uint64");

    if (index.has_loss_mask) {
      shard.loss_mask = open_vector(file, "loss_mask", entry.num_tokens, path, "index.json's num_tokens");
      hdf5::TypeId mask_type(H5Dget_type(shard.loss_mask.get()));
      if (!is_unsigned_integer(mask_type.get(), 1))
        throw BadInput(path + ": dataset '/loss_mask' is " + describe_type(mask_type.get()) + ", expected uint8");
    }
    return shard;
  }

  // Opens the shard into the cache (closing the least recently used first
  // when it is full). The caller holds `mutex`.
  OpenedShard& open_into_cache(size_t shard_index, bool check_file) {
    cache.make_room();
    OpenedShard shard = open_file(shard_index, check_file);
    if (!opened[shard_index]) {
      opened[shard_index] = 1;
      ++distinct_opened;
    }
    return cache.insert(shard_index, std::move(shard));
  }

  // The shard, open, its first-use checks done. The caller holds `mutex`;
  // the reference is valid until the next acquire.
  OpenedShard& acquire(size_t shard_index) {
    if (!checked[shard_index]) check_first_use({shard_index});
    if (OpenedShard* shard = cache.find(shard_index)) return *shard;
    return open_into_cache(shard_index, /*check_file=*/false);
  }

  // Note [Lazy shard checks]. The caller holds `mutex`.
  void check_first_use(const std::vector<size_t>& shards) {
    std::vector<size_t> unchecked;
    for (const size_t s : shards)
      if (!checked[s] && std::find(unchecked.begin(), unchecked.end(), s) == unchecked.end()) unchecked.push_back(s);
    if (unchecked.empty()) return;
    if (check_files && options.probe_in_child) {
      // The child has done every check and read of these shards; this
      // process opens them when it reads them.
      probe_in_child(unchecked);
      for (const size_t s : unchecked) checked[s] = 1;
      return;
    }
    for (const size_t s : unchecked) check_in_this_process(s);
  }

  // Opens the shard (its file checked first when check_files) and checks
  // what open_file does not: /doc_offsets' values, and the token scan and
  // data checksum where asked. Checksums first: a corrupt shard is better
  // reported as corrupt than as holding an out-of-range id.
  void check_in_this_process(size_t s, IsolatedChannel* progress = nullptr) {
    if (progress != nullptr) progress->progress(path_of(s));
    try {
      OpenedShard& shard = open_into_cache(s, check_files);
      check_doc_offsets(s, read_doc_offsets(s, shard));
      if (options.verify_checksums) verify_shard(s, shard);
      if (scan_range || read_every_token) read_whole_shard(s, shard, scan_range);
    } catch (...) {
      cache.erase(s);  // not checked: the next use checks it again
      throw;
    }
    checked[s] = 1;
  }

  // Note [Reading shards in a probe process]: throws BadInput if a child
  // process cannot open and read these shards.
  void probe_in_child(const std::vector<size_t>& shards) const;

  // Recomputes the shard's CRC32C over its stored bytes and compares it with
  // index.json's.
  void verify_shard(size_t s, const OpenedShard& shard) const {
    const size_t width = token_dtype_bytes(index.token_dtype);
    // Read as little-endian: the checksum is defined over the stored
    // little-endian bytes, whatever the host's byte order.
    const hid_t token_type = width == 2 ? H5T_STD_U16LE : H5T_STD_U32LE;
    const ShardEntry& shard_entry = entry(s);
    const std::string path = path_of(s);
    std::vector<std::byte> bytes;
    uint32_t crc = 0;
    hdf5::Lock lock;
    for (uint64_t begin = 0; begin < shard_entry.num_tokens; begin += kScanPieceTokens) {
      const uint64_t count = std::min(kScanPieceTokens, shard_entry.num_tokens - begin);
      bytes.resize(count * width);
      read_slice(shard.tokens.get(), token_type, begin, count, bytes.data(), path, "tokens");
      crc = crc32c(bytes, crc);
    }
    bytes.resize((shard_entry.num_documents + 1) * 8);
    read_slice(shard.doc_offsets.get(), H5T_STD_U64LE, 0, shard_entry.num_documents + 1, bytes.data(), path,
               "doc_offsets");
    crc = crc32c(bytes, crc);
    if (index.has_loss_mask) {
      for (uint64_t begin = 0; begin < shard_entry.num_tokens; begin += kScanPieceTokens) {
        const uint64_t count = std::min(kScanPieceTokens, shard_entry.num_tokens - begin);
        bytes.resize(count);
        read_slice(shard.loss_mask.get(), H5T_STD_U8LE, begin, count, bytes.data(), path, "loss_mask");
        crc = crc32c(bytes, crc);
      }
    }
    if (crc != shard_entry.crc32c)
      throw BadInput(path + ": CRC32C " + crc32c_hex(crc) + " does not match index.json's " +
                     crc32c_hex(shard_entry.crc32c) + " (corrupt)");
  }

  // Reads every token (and loss-mask value) of the shard as training reads
  // them, checking the ids against vocab_size and the mask's values (0 or 1)
  // when `check_range`.
  void read_whole_shard(size_t s, const OpenedShard& shard, bool check_range) {
    std::vector<int32_t> piece;
    std::vector<uint8_t> mask_piece;
    for (uint64_t begin = 0; begin < entry(s).num_tokens; begin += kScanPieceTokens) {
      const size_t count = static_cast<size_t>(std::min(kScanPieceTokens, entry(s).num_tokens - begin));
      piece.resize(count);
      if (check_range) {
        read_shard_tokens(s, shard, begin, std::span<int32_t>(piece));
      } else {
        hdf5::Lock lock;
        if (index.token_dtype == TokenDtype::kUint16)
          read_stored(s, shard, H5T_NATIVE_UINT16, scratch16, begin, count);
        else
          read_stored(s, shard, H5T_NATIVE_UINT32, scratch32, begin, count);
      }
      if (index.has_loss_mask) {
        mask_piece.resize(count);
        read_shard_loss_mask(s, shard, begin, mask_piece, check_range);
      }
    }
  }

  // The loss mask of tokens [begin, begin + out.size()) local to one shard,
  // refusing values other than 0 and 1 when `check_values`.
  void read_shard_loss_mask(size_t s, const OpenedShard& shard, uint64_t begin, std::span<uint8_t> out,
                            bool check_values) const {
    {
      hdf5::Lock lock;
      read_slice(shard.loss_mask.get(), H5T_NATIVE_UINT8, begin, out.size(), out.data(), path_of(s), "loss_mask");
    }
    if (!check_values) return;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i] > 1)
        throw BadInput(path_of(s) + ": /loss_mask[" + std::to_string(begin + i) + "] = " + std::to_string(out[i]) +
                       " is not 0 or 1 (token " + std::to_string(first_tokens[s] + begin + i) + " of the dataset)");
    }
  }

  // Tokens [begin, begin + count) of one shard as stored, into `scratch`;
  // the caller holds the HDF5 lock.
  template <typename Stored>
  void read_stored(size_t s, const OpenedShard& shard, hid_t memory_type, std::vector<Stored>& scratch, uint64_t begin,
                   size_t count) const {
    scratch.resize(count);
    read_slice(shard.tokens.get(), memory_type, begin, count, scratch.data(), path_of(s), "tokens");
  }

  std::vector<uint64_t> read_doc_offsets(size_t s, const OpenedShard& shard) const {
    std::vector<uint64_t> offsets(entry(s).num_documents + 1);
    hdf5::Lock lock;
    read_slice(shard.doc_offsets.get(), H5T_NATIVE_UINT64, 0, offsets.size(), offsets.data(), path_of(s),
               "doc_offsets");
    return offsets;
  }

  void check_doc_offsets(size_t shard_index, const std::vector<uint64_t>& offsets) const {
    const std::string path = path_of(shard_index);
    const uint64_t num_tokens = entry(shard_index).num_tokens;
    if (offsets.front() != 0)
      throw BadInput(path + ": /doc_offsets[0] is " + std::to_string(offsets.front()) + ", expected 0");
    for (size_t i = 1; i < offsets.size(); ++i) {
      if (offsets[i] < offsets[i - 1])
        throw BadInput(path + ": /doc_offsets[" + std::to_string(i) + "] = " + std::to_string(offsets[i]) +
                       " is below /doc_offsets[" + std::to_string(i - 1) + "] = " + std::to_string(offsets[i - 1]) +
                       " (offsets must not decrease)");
    }
    if (offsets.back() != num_tokens)
      throw BadInput(path + ": last /doc_offsets entry is " + std::to_string(offsets.back()) +
                     ", expected the shard's token count " + std::to_string(num_tokens));
  }

  // Copies tokens [begin, begin + out.size()) local to one shard into `out`,
  // refusing ids >= vocab_size.
  template <typename Out>
  void read_shard_tokens(size_t s, const OpenedShard& shard, uint64_t begin, std::span<Out> out) {
    if (index.token_dtype == TokenDtype::kUint16)
      read_shard_tokens_as(s, shard, H5T_NATIVE_UINT16, scratch16, begin, out);
    else
      read_shard_tokens_as(s, shard, H5T_NATIVE_UINT32, scratch32, begin, out);
  }

  template <typename Stored, typename Out>
  void read_shard_tokens_as(size_t s, const OpenedShard& shard, hid_t memory_type, std::vector<Stored>& scratch,
                            uint64_t begin, std::span<Out> out) const {
    hdf5::Lock lock;
    read_stored(s, shard, memory_type, scratch, begin, out.size());
    const auto vocab_size = static_cast<uint64_t>(index.vocab_size);
    for (size_t i = 0; i < out.size(); ++i) {
      const Stored id = scratch[i];
      if (id >= vocab_size)
        throw BadInput(path_of(s) + ": /tokens[" + std::to_string(begin + i) + "] = " + std::to_string(id) +
                       " is not below vocab_size " + std::to_string(vocab_size) + " (token " +
                       std::to_string(first_tokens[s] + begin + i) + " of the dataset)");
      out[i] = static_cast<Out>(id);
    }
  }

  // The shard holding token `offset` (< num_tokens): the last whose first
  // token is <= offset (empty shards share their first token with the next).
  size_t shard_at(uint64_t offset) const {
    const auto it = std::upper_bound(first_tokens.begin(), first_tokens.end(), offset);
    return static_cast<size_t>(it - first_tokens.begin()) - 1;
  }

  template <typename Out>
  void read_tokens(uint64_t begin, std::span<Out> out) {
    for_each_shard_piece(begin, out.size(), "tokens", [&](size_t s, uint64_t local, size_t done, size_t count) {
      read_shard_tokens(s, acquire(s), local, out.subspan(done, count));
    });
  }

  void read_loss_mask(uint64_t begin, std::span<uint8_t> out) {
    for_each_shard_piece(begin, out.size(), "loss mask", [&](size_t s, uint64_t local, size_t done, size_t count) {
      read_shard_loss_mask(s, acquire(s), local, out.subspan(done, count), /*check_values=*/true);
    });
  }

  // std::out_of_range when tokens [begin, begin + size) end past the dataset.
  void check_range(uint64_t begin, size_t size, const char* what) const {
    if (begin > index.num_tokens || size > index.num_tokens - begin)
      throw std::out_of_range(dir + ": " + what + " [" + std::to_string(begin) + ", " + std::to_string(begin + size) +
                              ") reach past the end of the dataset (" + std::to_string(index.num_tokens) + " tokens)");
  }

  // Calls read(shard, offset in the shard, offset in the output, count) for
  // each shard's piece of tokens [begin, begin + size), in order, holding
  // `mutex`; std::out_of_range when the range ends past the dataset.
  template <typename Read>
  void for_each_shard_piece(uint64_t begin, size_t size, const char* what, const Read& read) {
    check_range(begin, size, what);
    if (size == 0) return;
    std::lock_guard guard(mutex);
    size_t shard_index = shard_at(begin);
    size_t done = 0;
    while (done < size) {
      const uint64_t local = begin + done - first_tokens[shard_index];
      const uint64_t available = entry(shard_index).num_tokens - std::min(local, entry(shard_index).num_tokens);
      const size_t count = static_cast<size_t>(std::min<uint64_t>(available, size - done));
      if (count > 0) read(shard_index, local, done, count);
      done += count;
      ++shard_index;
    }
  }
};

Dataset::Dataset(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Dataset::Dataset(Dataset&&) noexcept = default;
Dataset& Dataset::operator=(Dataset&&) noexcept = default;
Dataset::~Dataset() = default;

// Note [Reading shards in a probe process]: a shard file whose CRC-32C
// matches index.json can still be malformed, when it was crafted or written
// by a faulty tool and shipped with an index that matches it. libhdf5 trusts
// the structures it finds (docs/fuzzing.md: fuzz_hdf5_bytes found reads past
// its buffers, segfaults, loops and 16 GiB allocations inside the library on
// such files), and no check of loom's can stand between it and those bytes.
// So where the files are checked, a child process (util/isolated.h) does
// everything this process's libhdf5 is about to do with a shard, first: it
// checks the file's CRC-32C, opens it with the same checks, reads every token
// and doc offset, and runs the scan and checksum that the options ask for.
// The same library on the same bytes does the same thing twice, so once the
// child has come through, this process opens the shard itself and skips the
// reads the child has done (training's later reads go through the same
// chunks the child read). A child that dies, runs out of its address-space
// allowance or does not finish in time makes the dataset BadInput naming the
// shard it was reading (a child that times out is tried once more first: it
// can hang on a lock that another thread held at fork(), util/isolated.h).
// Shards are probed when first needed (Note [Lazy
// shard checks]), several in one child where the caller knows them ahead
// (the loader: the shards of the next step), so a rank probes only the
// shards it reads; the cost is one fork per batch and each shard's metadata
// read twice (datasets past check_shard_files' auto limit skip all of this).
void Dataset::Impl::probe_in_child(const std::vector<size_t>& shards) const {
  uint64_t shard_bytes = 0;
  for (const size_t s : shards) shard_bytes += entry(s).bytes;
  DatasetOpenOptions child_options = options;
  child_options.probe_in_child = false;
  child_options.check_shard_files = ShardFileCheck::kAlways;
  IsolatedOptions isolation;
  // Generous: the child reads every byte, possibly from a network file system.
  isolation.timeout = std::chrono::seconds(options.probe_timeout_seconds > 0
                                               ? uint64_t{options.probe_timeout_seconds}
                                               : 120 + shard_bytes / (uint64_t{8} << 20));
  // The prefetch thread forks while the training thread runs: a second child
  // where the first hangs on a lock it inherited (util/isolated.h, attempts).
  isolation.attempts = 2;
  isolation.prepare = hdf5::lock_for_fork;
  isolation.in_parent = hdf5::unlock_after_fork;
  isolation.in_child = hdf5::renew_lock_in_child;
  const IsolatedResult result = run_isolated(
      [&](IsolatedChannel& channel) {
        Impl child(dir, index, child_options);
        child.read_every_token = true;
        for (const size_t s : shards) child.check_in_this_process(s, &channel);
      },
      isolation);
  const std::string where = result.last_progress.empty() ? dir : result.last_progress;
  switch (result.outcome) {
    case IsolatedOutcome::kFinished:
      return;
    case IsolatedOutcome::kBadInput:
      throw BadInput(result.message);
    case IsolatedOutcome::kThrew:
      throw std::runtime_error(result.message);
    case IsolatedOutcome::kCrashed:
      throw BadInput(where + ": libhdf5 failed reading this file in a probe process (" + result.how +
                     "): its HDF5 structures are malformed in a way that its checksum does not show (a crafted "
                     "file, or one written by a faulty tool); this process did not open it");
    case IsolatedOutcome::kTimedOut:
      throw BadInput(where + ": libhdf5 did not finish reading this file in a probe process (" + result.how +
                     "); a malformed file can make it loop; this process did not open it");
  }
}

Dataset Dataset::open(const std::string& dir, const DatasetOpenOptions& options) {
  const std::string index_path = (fs::path(dir) / kDatasetIndexFile).string();
  std::error_code error;
  if (!fs::is_directory(dir, error)) throw BadInput(dir + ": not a dataset folder (no such directory)");
  if (!fs::exists(index_path, error))
    throw BadInput(index_path + ": missing; " + dir +
                   " is not a finished loom dataset (an interrupted `loom prepare` leaves no index.json)");
  DatasetIndex index = DatasetIndex::parse(read_file(index_path), index_path);
  return Dataset(std::make_unique<Impl>(dir, std::move(index), options));
}

const std::string& Dataset::dir() const { return impl_->dir; }
const DatasetIndex& Dataset::index() const { return impl_->index; }

void Dataset::read_tokens(uint64_t begin, std::span<int32_t> out) const { impl_->read_tokens(begin, out); }
void Dataset::read_tokens(uint64_t begin, std::span<int64_t> out) const { impl_->read_tokens(begin, out); }

void Dataset::read_loss_mask(uint64_t begin, std::span<uint8_t> out) const {
  if (has_loss_mask()) {
    impl_->read_loss_mask(begin, out);
    return;
  }
  impl_->check_range(begin, out.size(), "loss mask");
  std::fill(out.begin(), out.end(), uint8_t{1});
}

std::vector<uint64_t> Dataset::read_doc_offsets(size_t shard) const {
  if (shard >= num_shards()) throw std::out_of_range(impl_->dir + ": no shard " + std::to_string(shard));
  std::lock_guard guard(impl_->mutex);
  return impl_->read_doc_offsets(shard, impl_->acquire(shard));
}

void Dataset::read_doc_offsets(size_t shard, uint64_t first, std::span<uint64_t> out) const {
  if (shard >= num_shards()) throw std::out_of_range(impl_->dir + ": no shard " + std::to_string(shard));
  const uint64_t entries = impl_->entry(shard).num_documents + 1;
  if (first > entries || out.size() > entries - first)
    throw std::out_of_range(impl_->path_of(shard) + ": /doc_offsets entries [" + std::to_string(first) + ", " +
                            std::to_string(first + out.size()) + ") past its " + std::to_string(entries));
  if (out.empty()) return;
  std::lock_guard guard(impl_->mutex);
  const auto& opened = impl_->acquire(shard);
  hdf5::Lock lock;
  read_slice(opened.doc_offsets.get(), H5T_NATIVE_UINT64, first, out.size(), out.data(), impl_->path_of(shard),
             "doc_offsets");
}

uint64_t Dataset::shard_first_token(size_t shard) const {
  if (shard >= num_shards()) throw std::out_of_range(impl_->dir + ": no shard " + std::to_string(shard));
  return impl_->first_tokens[shard];
}

std::vector<size_t> Dataset::shards_of(uint64_t begin, uint64_t count) const {
  std::vector<size_t> shards;
  if (count == 0 || begin >= num_tokens()) return shards;
  const uint64_t end = begin + std::min(count, num_tokens() - begin);
  for (size_t s = impl_->shard_at(begin); s < num_shards() && impl_->first_tokens[s] < end; ++s)
    if (impl_->entry(s).num_tokens > 0) shards.push_back(s);
  return shards;
}

void Dataset::check_shards(const std::vector<size_t>& shards) const {
  for (const size_t s : shards)
    if (s >= num_shards()) throw std::out_of_range(impl_->dir + ": no shard " + std::to_string(s));
  std::lock_guard guard(impl_->mutex);
  impl_->check_first_use(shards);
}

bool Dataset::checks_in_probe() const { return impl_->check_files && impl_->options.probe_in_child; }

void Dataset::check_all_shards() const {
  std::vector<size_t> all(num_shards());
  for (size_t s = 0; s < all.size(); ++s) all[s] = s;
  check_shards(all);
}

void Dataset::check_shard_sizes(size_t first, size_t stride) const {
  for (size_t s = first; s < num_shards(); s += std::max<size_t>(stride, 1)) impl_->check_size(s);
}

void Dataset::scan_token_range() const {
  std::vector<int32_t> piece;
  std::vector<uint8_t> mask_piece;
  for (uint64_t begin = 0; begin < num_tokens(); begin += kScanPieceTokens) {
    piece.resize(static_cast<size_t>(std::min(kScanPieceTokens, num_tokens() - begin)));
    read_tokens(begin, piece);
    if (has_loss_mask()) {
      mask_piece.resize(piece.size());
      read_loss_mask(begin, mask_piece);
    }
  }
}

void Dataset::verify_checksums() const {
  std::lock_guard guard(impl_->mutex);
  for (size_t s = 0; s < num_shards(); ++s) impl_->verify_shard(s, impl_->acquire(s));
}

ShardCacheStats Dataset::shard_cache_stats() const {
  std::lock_guard guard(impl_->mutex);
  ShardCacheStats stats;
  stats.shards = num_shards();
  stats.distinct_opened = impl_->distinct_opened;
  stats.checked = static_cast<size_t>(std::count(impl_->checked.begin(), impl_->checked.end(), 1));
  stats.open_now = impl_->cache.size();
  stats.peak_open = impl_->cache.peak();
  stats.max_open = impl_->cache.capacity();
  return stats;
}

}  // namespace loom
