// safetensors reader and writer, independent of libtorch.
//
// Format (see shared REFERENCE): 8-byte little-endian header length N, N bytes
// of UTF-8 JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end]},
// "__metadata__": {string: string}}), then the data buffer. Offsets are
// relative to the buffer; tensors tile it exactly (no holes, no overlaps).
//
// The reader maps the file read-only and validates the whole header before
// handing out any view; every failure is loom::BadInput naming the file and,
// where there is one, the tensor. The writer pads the header with spaces to a
// multiple of 8 and writes through a temporary file that is fsynced and
// renamed, so a crash never leaves a half-written file under the final name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace loom::safetensors {

enum class Dtype { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

// "F32" <-> Dtype::F32. parse_dtype throws BadInput for unknown names.
std::string dtype_name(Dtype dtype);
Dtype parse_dtype(const std::string& name, const std::string& context);
size_t dtype_size(Dtype dtype);

// Largest header the reference implementation accepts.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data buffer
  uint64_t end = 0;
  int64_t numel() const;
};

// A read-only view of one tensor's bytes inside a mapped file. Valid while the
// File that produced it lives.
struct TensorView {
  const TensorInfo* info;
  std::span<const std::byte> bytes;
};

class File {
 public:
  // Maps and validates `path`. Throws BadInput on any format error.
  static File open(const std::string& path);

  File(File&&) noexcept;
  File& operator=(File&&) noexcept;
  ~File();

  const std::string& path() const { return path_; }
  // File offset of the data buffer: a tensor's bytes are at data_offset() +
  // info.begin, for readers that stream them with pread instead of the map.
  uint64_t data_offset() const { return data_offset_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  // Throws BadInput naming the file and tensor when absent.
  TensorView tensor(const std::string& name) const;

 private:
  File() = default;
  struct Mapping;
  std::string path_;
  std::unique_ptr<Mapping> mapping_;
  const std::byte* data_ = nullptr;  // start of the data buffer
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Validates a whole file image already in memory (used by File::open and by
// the fuzz target). Returns the tensors in offset order; fills `metadata`.
std::vector<TensorInfo> parse_header(std::span<const std::byte> file_bytes, const std::string& path,
                                     std::map<std::string, std::string>* metadata,
                                     uint64_t* data_start);

// One tensor to write. `bytes` must hold exactly numel * dtype_size bytes.
struct TensorToWrite {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
  std::span<const std::byte> bytes;
};

// A tensor's entry in a header, before its bytes exist.
struct TensorHeader {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
};

// Writes a file whose tensors arrive a piece at a time, so that a file
// larger than memory can be written from a stream: the header is planned
// from the names, dtypes and shapes, then append() takes the data buffer in
// order, in pieces of any size. Crash-safe like write_file: the bytes go to
// a temporary, and commit() checks that every promised byte came, fsyncs and
// renames. Throws BadInput for a bad header (as write_file does) and
// std::logic_error for more or fewer bytes than the header promised.
class StreamWriter {
 public:
  StreamWriter(const std::string& path, const std::vector<TensorHeader>& tensors,
               const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
  StreamWriter(StreamWriter&&) noexcept;
  StreamWriter& operator=(StreamWriter&&) = delete;
  ~StreamWriter();

  void append(std::span<const std::byte> bytes);
  void commit();

  // Data bytes still expected, and the CRC-32C of every byte written so far
  // (length prefix and header included): after commit(), the whole file's.
  uint64_t remaining() const { return remaining_; }
  uint32_t crc32c() const { return crc_; }
  uint64_t file_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint64_t remaining_ = 0;
  uint32_t crc_ = 0;
};

// Writes `tensors` in the given order, atomically (temp + fsync + rename),
// and returns the CRC-32C of the whole file, taken while writing.
// `metadata` defaults to {"format": "pt"}, which transformers requires.
// Throws BadInput for duplicate names or size mismatches, std::runtime_error
// for I/O failures.
uint32_t write_file(const std::string& path, const std::vector<TensorToWrite>& tensors,
                const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Bytes the file for `tensors` will occupy (header included), for sharding.
uint64_t file_size_for(const std::vector<TensorHeader>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});
uint64_t file_size_for(const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace loom::safetensors
