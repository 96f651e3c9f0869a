// DatasetWriter: documents in, shard-NNNNN.h5 files and index.json out.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

#include "data/dataset.h"
#include "data/hdf5_handle.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void fail_hdf5(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what + hdf5::take_error_detail());
}

// A dataset creation property list without modification times in the
// object header (HDF5 stores them by default): the same documents then give
// the same file bytes, and the same file_crc32c, on every run.
hdf5::PlistId untimed_dataset_creation(const std::string& path, const char* dataset) {
  hdf5::PlistId create(H5Pcreate(H5P_DATASET_CREATE));
  if (!create.valid() || H5Pset_obj_track_times(create.get(), false) < 0)
    fail_hdf5(path, std::string("cannot set up dataset '/") + dataset + "'");
  return create;
}

// Appends `value` as `width` little-endian bytes (the stored byte order, and
// what the checksum covers).
void append_little_endian(std::vector<std::byte>& out, uint64_t value, size_t width) {
  for (size_t i = 0; i < width; ++i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xff));
}

void write_int_attribute(hid_t file, const char* name, int64_t value, const std::string& path) {
  hdf5::SpaceId space(H5Screate(H5S_SCALAR));
  hdf5::AttrId attr(H5Acreate2(file, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!attr.valid() || H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) < 0)
    fail_hdf5(path, std::string("cannot write root attribute '") + name + "'");
}

// A variable-length UTF-8 string: h5py reads it back as `str`.
void write_string_attribute(hid_t file, const char* name, const std::string& value, const std::string& path) {
  hdf5::TypeId type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  hdf5::SpaceId space(H5Screate(H5S_SCALAR));
  hdf5::AttrId attr(H5Acreate2(file, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
  const char* text = value.c_str();
  if (!attr.valid() || H5Awrite(attr.get(), type.get(), &text) < 0)
    fail_hdf5(path, std::string("cannot write root attribute '") + name + "'");
}

// /loss_mask: uint8, chunked as /tokens (a sample's read touches one or two
// chunks of each). The caller holds the HDF5 lock.
void write_loss_mask(hid_t file, const std::vector<std::byte>& values, const std::string& path) {
  // Extendible, as /tokens: HDF5 refuses a chunk larger than a fixed-size
  // dataset, and a shard of empty documents has an empty mask.
  const hsize_t size[1] = {values.size()};
  const hsize_t maximum[1] = {H5S_UNLIMITED};
  const hsize_t chunk[1] = {std::clamp<hsize_t>(values.size(), 1, kTokenChunkElements)};
  hdf5::SpaceId space(H5Screate_simple(1, size, maximum));
  hdf5::PlistId create = untimed_dataset_creation(path, "loss_mask");
  if (!space.valid() || H5Pset_chunk(create.get(), 1, chunk) < 0) fail_hdf5(path, "cannot set up dataset '/loss_mask'");
  hdf5::DatasetId mask(H5Dcreate2(file, "loss_mask", H5T_STD_U8LE, space.get(), H5P_DEFAULT, create.get(), H5P_DEFAULT));
  if (!mask.valid() || (!values.empty() && H5Dwrite(mask.get(), H5T_STD_U8LE, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                                                     values.data()) < 0))
    fail_hdf5(path, "cannot write '/loss_mask'");
  if (!mask.close()) fail_hdf5(path, "cannot close '/loss_mask'");
}

// shard-NNNNN.h5 or shard-NNNNN.h5.tmp: what an interrupted writer leaves.
bool is_writer_leftover(const std::string& name) {
  std::string stem = name;
  if (stem.ends_with(".tmp")) stem.resize(stem.size() - 4);
  if (!stem.starts_with("shard-") || !stem.ends_with(".h5")) return false;
  const std::string digits = stem.substr(6, stem.size() - 9);
  return digits.size() >= 5 && digits.find_first_not_of("0123456789") == std::string::npos;
}

void fsync_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid() || ::fsync(fd.get()) != 0)
    throw std::runtime_error("cannot fsync '" + path + "': " + std::strerror(errno));
}

}  // namespace

struct DatasetWriter::OpenShard {
  std::string final_path;
  std::string temp_path;
  // Declared before `tokens` so that it is closed after it.
  hdf5::FileId file;
  hdf5::DatasetId tokens;
  uint64_t tokens_in_file = 0;       // already written to /tokens
  std::vector<std::byte> pending;    // little-endian token bytes not yet written
  // The whole shard's loss mask (with_loss_mask): written at completion,
  // after /doc_offsets, which the checksum covers before it. One byte per
  // token, half the size of the smallest token width.
  std::vector<std::byte> loss_mask;
  std::vector<uint64_t> doc_offsets{0};
  uint32_t crc = 0;                  // of the /tokens bytes written so far

  uint64_t num_tokens() const { return doc_offsets.back(); }
};

DatasetWriter::DatasetWriter(std::string dir, int64_t vocab_size, int64_t eos_id, std::string tokenizer_hash,
                             uint64_t shard_tokens, bool with_loss_mask)
    : dir_(std::move(dir)), shard_tokens_(shard_tokens) {
  if (vocab_size < 1 || vocab_size > kMaxVocabSize)
    throw BadInput(dir_ + ": vocab_size " + std::to_string(vocab_size) + " is outside [1, 2^31]");
  if (eos_id < 0 || eos_id >= vocab_size)
    throw BadInput(dir_ + ": eos_id " + std::to_string(eos_id) + " is outside the vocabulary [0, " +
                   std::to_string(vocab_size) + ")");
  if (shard_tokens == 0) throw BadInput(dir_ + ": shard size must be at least one token");
  index_.vocab_size = vocab_size;
  index_.eos_id = eos_id;
  index_.tokenizer_hash = std::move(tokenizer_hash);
  index_.token_dtype = token_dtype_for_vocab(vocab_size);
  index_.has_loss_mask = with_loss_mask;

  std::error_code error;
  fs::create_directories(dir_, error);
  if (error || !fs::is_directory(dir_))
    throw BadInput(dir_ + ": cannot create the dataset folder" + (error ? ": " + error.message() : std::string()));
  if (fs::exists(fs::path(dir_) / kDatasetIndexFile))
    throw BadInput(dir_ + ": already holds a dataset (index.json exists); refusing to overwrite it");
  for (const auto& item : fs::directory_iterator(dir_)) {
    if (is_writer_leftover(item.path().filename().string())) fs::remove(item.path());
  }
}

DatasetWriter::~DatasetWriter() {
  if (!finished_) remove_written_files();
}

uint64_t DatasetWriter::num_tokens() const { return index_.num_tokens + (shard_ ? shard_->num_tokens() : 0); }

uint64_t DatasetWriter::num_documents() const {
  return index_.num_documents + (shard_ ? shard_->doc_offsets.size() - 1 : 0);
}

void DatasetWriter::add_document(std::span<const int32_t> ids) {
  if (index_.has_loss_mask) throw std::logic_error(dir_ + ": add_document without a loss mask to a dataset with one");
  add_checked_document(ids, {});
}

void DatasetWriter::add_document(std::span<const int32_t> ids, std::span<const uint8_t> loss_mask) {
  if (!index_.has_loss_mask) throw std::logic_error(dir_ + ": add_document with a loss mask to a dataset without one");
  if (loss_mask.size() != ids.size())
    throw std::logic_error(dir_ + ": document " + std::to_string(num_documents()) + " has " +
                           std::to_string(ids.size()) + " tokens and " + std::to_string(loss_mask.size()) +
                           " loss-mask values");
  for (size_t i = 0; i < loss_mask.size(); ++i) {
    if (loss_mask[i] > 1)
      throw BadInput(dir_ + ": document " + std::to_string(num_documents()) + ": loss-mask value " +
                     std::to_string(loss_mask[i]) + " at position " + std::to_string(i) + " is not 0 or 1");
  }
  add_checked_document(ids, loss_mask);
}

void DatasetWriter::add_checked_document(std::span<const int32_t> ids, std::span<const uint8_t> loss_mask) {
  if (finished_) throw std::logic_error(dir_ + ": add_document after finish()");
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= index_.vocab_size)
      throw BadInput(dir_ + ": document " + std::to_string(num_documents()) + ": token id " + std::to_string(ids[i]) +
                     " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                     std::to_string(index_.vocab_size) + ")");
  }
  // Documents are never split: a document that does not fit closes the shard.
  if (shard_ && shard_->doc_offsets.size() > 1 && shard_->num_tokens() + ids.size() > shard_tokens_) complete_shard();
  if (!shard_) start_shard();

  const size_t width = token_dtype_bytes(index_.token_dtype);
  for (const int32_t id : ids) append_little_endian(shard_->pending, static_cast<uint64_t>(id), width);
  for (const uint8_t value : loss_mask) shard_->loss_mask.push_back(static_cast<std::byte>(value));
  shard_->doc_offsets.push_back(shard_->num_tokens() + ids.size());
  if (shard_->pending.size() >= kTokenChunkElements * width) flush_pending();
}

void DatasetWriter::start_shard() {
  shard_ = std::make_unique<OpenShard>();
  shard_->final_path = (fs::path(dir_) / shard_file_name(completed_paths_.size())).string();
  shard_->temp_path = shard_->final_path + ".tmp";
  const std::string& path = shard_->temp_path;

  hdf5::Lock lock;
  // No modification time in the root group's header either (as
  // untimed_dataset_creation).
  hdf5::PlistId file_create(H5Pcreate(H5P_FILE_CREATE));
  if (!file_create.valid() || H5Pset_obj_track_times(file_create.get(), false) < 0)
    fail_hdf5(path, "cannot set up HDF5 file");
  shard_->file = hdf5::FileId(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, file_create.get(), H5P_DEFAULT));
  if (!shard_->file.valid()) fail_hdf5(path, "cannot create HDF5 file");
  const hid_t file = shard_->file.get();
  write_int_attribute(file, "format_version", index_.format_version(), path);
  write_int_attribute(file, "vocab_size", index_.vocab_size, path);
  write_int_attribute(file, "eos_id", index_.eos_id, path);
  write_string_attribute(file, "tokenizer_hash", index_.tokenizer_hash, path);

  // Extendible and chunked, so that tokens stream to the file instead of
  // collecting a whole shard in memory. Tiny shards (tests) get tiny chunks:
  // HDF5 stores a partial chunk at full size.
  const hsize_t initial[1] = {0};
  const hsize_t maximum[1] = {H5S_UNLIMITED};
  const hsize_t chunk[1] = {std::min<hsize_t>(kTokenChunkElements, shard_tokens_)};
  hdf5::SpaceId space(H5Screate_simple(1, initial, maximum));
  hdf5::PlistId create = untimed_dataset_creation(path, "tokens");
  if (!space.valid() || H5Pset_chunk(create.get(), 1, chunk) < 0) fail_hdf5(path, "cannot set up dataset '/tokens'");
  const hid_t stored_type = index_.token_dtype == TokenDtype::kUint16 ? H5T_STD_U16LE : H5T_STD_U32LE;
  shard_->tokens =
      hdf5::DatasetId(H5Dcreate2(file, "tokens", stored_type, space.get(), H5P_DEFAULT, create.get(), H5P_DEFAULT));
  if (!shard_->tokens.valid()) fail_hdf5(path, "cannot create dataset '/tokens'");
}

void DatasetWriter::flush_pending() {
  OpenShard& shard = *shard_;
  if (shard.pending.empty()) return;
  const size_t width = token_dtype_bytes(index_.token_dtype);
  const hsize_t start[1] = {shard.tokens_in_file};
  const hsize_t count[1] = {shard.pending.size() / width};
  const hsize_t new_size[1] = {shard.tokens_in_file + count[0]};
  const hid_t memory_type = width == 2 ? H5T_STD_U16LE : H5T_STD_U32LE;

  hdf5::Lock lock;
  if (H5Dset_extent(shard.tokens.get(), new_size) < 0) fail_hdf5(shard.temp_path, "cannot extend '/tokens'");
  hdf5::SpaceId file_space(H5Dget_space(shard.tokens.get()));
  hdf5::SpaceId memory_space(H5Screate_simple(1, count, nullptr));
  if (!file_space.valid() || !memory_space.valid() ||
      H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr) < 0 ||
      H5Dwrite(shard.tokens.get(), memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT,
               shard.pending.data()) < 0) {
    fail_hdf5(shard.temp_path, "cannot write '/tokens'");
  }
  shard.crc = crc32c(shard.pending, shard.crc);
  shard.tokens_in_file += count[0];
  shard.pending.clear();
}

void DatasetWriter::complete_shard() {
  flush_pending();
  OpenShard& shard = *shard_;
  const std::string& path = shard.temp_path;
  std::vector<std::byte> offset_bytes;
  offset_bytes.reserve(shard.doc_offsets.size() * 8);
  for (const uint64_t offset : shard.doc_offsets) append_little_endian(offset_bytes, offset, 8);
  {
    hdf5::Lock lock;
    const hsize_t size[1] = {shard.doc_offsets.size()};
    hdf5::SpaceId space(H5Screate_simple(1, size, nullptr));
    const hdf5::PlistId create = untimed_dataset_creation(path, "doc_offsets");
    hdf5::DatasetId offsets(
        H5Dcreate2(shard.file.get(), "doc_offsets", H5T_STD_U64LE, space.get(), H5P_DEFAULT, create.get(), H5P_DEFAULT));
    if (!offsets.valid() ||
        H5Dwrite(offsets.get(), H5T_STD_U64LE, H5S_ALL, H5S_ALL, H5P_DEFAULT, offset_bytes.data()) < 0)
      fail_hdf5(path, "cannot write '/doc_offsets'");
    if (!offsets.close()) fail_hdf5(path, "cannot close '/doc_offsets'");
    if (index_.has_loss_mask) write_loss_mask(shard.file.get(), shard.loss_mask, path);
    if (!shard.tokens.close() || !shard.file.close()) fail_hdf5(path, "cannot close HDF5 file");
  }
  // The checksum covers /tokens, /doc_offsets, then /loss_mask (docs/data.md).
  uint32_t crc = crc32c(offset_bytes, shard.crc);
  if (index_.has_loss_mask) crc = crc32c(shard.loss_mask, crc);

  // fsync before the rename: otherwise a crash could leave the final name
  // pointing at a file whose data never reached the disk.
  fsync_file(path);
  std::error_code error;
  const uint64_t bytes = fs::file_size(path, error);
  if (error) throw std::runtime_error("cannot read the size of '" + path + "': " + error.message());
  fs::rename(path, shard.final_path, error);
  if (error) throw std::runtime_error("cannot rename '" + path + "' to '" + shard.final_path + "': " + error.message());
  completed_paths_.push_back(shard.final_path);
  fsync_directory(dir_);
  // Read back once (HDF5 wrote the file, not loom): Dataset::open checks it
  // before HDF5 reads the file (Note [Shard file checksum] in dataset.cpp).
  const uint32_t file_crc = crc32c_file(shard.final_path);

  ShardEntry entry;
  entry.file = fs::path(shard.final_path).filename().string();
  entry.num_tokens = shard.num_tokens();
  entry.num_documents = shard.doc_offsets.size() - 1;
  entry.crc32c = crc;
  entry.bytes = bytes;
  entry.file_crc32c = file_crc;
  index_.num_tokens += entry.num_tokens;
  index_.num_documents += entry.num_documents;
  index_.shards.push_back(std::move(entry));
  shard_.reset();
}

const DatasetIndex& DatasetWriter::finish() {
  if (finished_) throw std::logic_error(dir_ + ": finish() called twice");
  if (shard_) complete_shard();
  // Last: index.json's presence is what marks the dataset complete.
  write_file_atomic((fs::path(dir_) / kDatasetIndexFile).string(), index_.to_json());
  finished_ = true;
  return index_;
}

const DatasetIndex& DatasetWriter::finish_part() {
  if (finished_) throw std::logic_error(dir_ + ": finish() called twice");
  if (shard_) complete_shard();  // fsyncs the shard and the folder
  finished_ = true;
  return index_;
}

void DatasetWriter::remove_written_files() noexcept {
  std::error_code error;
  if (shard_) {
    shard_->tokens.reset();
    shard_->file.reset();
    fs::remove(shard_->temp_path, error);
    shard_.reset();
  }
  for (const std::string& path : completed_paths_) fs::remove(path, error);
  completed_paths_.clear();
  try {
    fsync_directory(dir_);
  } catch (const std::exception&) {
    // Best effort: the files are gone from the folder either way.
  }
}

}  // namespace loom
