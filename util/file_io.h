// Whole-file reads, crash-safe writes and read-only memory maps.
//
// Crash safety: a file written here is first written to `<path>.tmp.<pid>` in
// the same directory, fsynced, renamed over `path`, and then the directory is
// fsynced. rename(2) within one file system is atomic, so a reader (or a
// restart after a crash) sees either the old file or the complete new one,
// never a prefix. The directory fsync makes the rename itself durable.
// One process must not write the same path from two threads at once: both
// would use the same temporary name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace loom {

// Owns a POSIX file descriptor; closes it on destruction. Move-only.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// The whole file as bytes. Throws BadInput "cannot read '<path>': <reason>"
// when it cannot be opened (missing, permissions, a directory), and
// std::runtime_error when reading fails midway.
std::string read_file(const std::string& path);

// Replaces `path` with `content` atomically (see the note at the top).
// Throws std::runtime_error naming the path on failure; no temporary is left.
void write_file_atomic(const std::string& path, std::string_view content);

// fsync(2) on a directory, so that renames and creations inside it survive a
// crash. Throws std::runtime_error naming the directory.
void fsync_directory(const std::string& dir);

// Streams a large file to `<path>.tmp.<pid>`; commit() fsyncs it and renames
// it over `path`. Destroying an uncommitted AtomicFile removes the temporary,
// so an exception while writing never leaves a partial file under either name.
class AtomicFile {
 public:
  // Creates (truncates) the temporary. Throws std::runtime_error naming it.
  explicit AtomicFile(std::string path);
  AtomicFile(AtomicFile&& other) noexcept;
  AtomicFile& operator=(AtomicFile&&) = delete;
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  // Writes all of `data` (retries partial writes and EINTR).
  void write(std::span<const std::byte> data);
  void write(std::string_view text);
  // fsync, close, rename over path(), fsync the directory. On failure the
  // temporary is removed and std::runtime_error is thrown. Call at most once.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }
  uint64_t bytes_written() const { return bytes_written_; }

 private:
  void abort() noexcept;  // close and unlink the temporary

  std::string path_;
  std::string temp_path_;
  UniqueFd fd_;
  uint64_t bytes_written_ = 0;
  bool committed_ = false;
};

// A read-only, private memory map of a whole file. Empty files map to an
// empty span (mmap refuses length 0). The bytes stay valid while the object
// lives; the file must not be truncated meanwhile (that raises SIGBUS), which
// is why loom only maps files it never rewrites in place.
class MappedFile {
 public:
  // Throws BadInput when the file cannot be opened or is not a regular file,
  // std::runtime_error when mapping fails.
  static MappedFile open(const std::string& path);

  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  void unmap() noexcept;

  std::string path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace loom
