#include "util/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

#include "util/error.h"

namespace loom {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

[[noreturn]] void throw_io(const std::string& what, const std::string& path, int err) {
  throw std::runtime_error(what + " '" + path + "': " + errno_text(err));
}

std::string parent_directory(const std::string& path) {
  const std::string parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

}  // namespace

// --- UniqueFd ------------------------------------------------------------------

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  // close(2) errors are not retried: on Linux the descriptor is released even
  // when close reports EINTR, and retrying could close someone else's fd.
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

// --- reading -------------------------------------------------------------------

std::string read_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) throw BadInput("cannot read '" + path + "': " + errno_text(errno));
  std::string content;
  struct stat st {};
  if (::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode)) content.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd.get(), buffer, sizeof buffer);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EISDIR) throw BadInput("cannot read '" + path + "': " + errno_text(errno));
      throw_io("error reading", path, errno);
    }
    if (got == 0) break;
    content.append(buffer, static_cast<size_t>(got));
  }
  return content;
}

// --- writing -------------------------------------------------------------------

void fsync_directory(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) throw_io("cannot open directory", dir, errno);
  // Some file systems (certain FUSE and network mounts) do not support fsync
  // on directories and say EINVAL; there is nothing more we can do there.
  if (::fsync(fd.get()) != 0 && errno != EINVAL) throw_io("cannot fsync directory", dir, errno);
}

AtomicFile::AtomicFile(std::string path)
    : path_(std::move(path)), temp_path_(path_ + ".tmp." + std::to_string(::getpid())) {
  fd_.reset(::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd_.valid()) throw_io("cannot create", temp_path_, errno);
}

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : path_(std::move(other.path_)),
      temp_path_(std::move(other.temp_path_)),
      fd_(std::move(other.fd_)),
      bytes_written_(other.bytes_written_),
      committed_(other.committed_) {
  other.committed_ = true;  // the moved-from object owns no temporary any more
}

AtomicFile::~AtomicFile() {
  if (!committed_) abort();
}

void AtomicFile::abort() noexcept {
  fd_.reset();
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
  committed_ = true;  // nothing left to clean up
}

void AtomicFile::write(std::span<const std::byte> data) {
  if (committed_ || !fd_.valid()) throw std::logic_error("AtomicFile::write after commit: " + path_);
  const auto* p = reinterpret_cast<const char*>(data.data());
  size_t left = data.size();
  while (left > 0) {
    // Linux writes at most ~2 GiB per call; the loop also covers short writes
    // to pipes and network file systems.
    const ssize_t wrote = ::write(fd_.get(), p, left);
    if (wrote < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      throw_io("error writing", temp_path_, err);
    }
    p += wrote;
    left -= static_cast<size_t>(wrote);
    bytes_written_ += static_cast<uint64_t>(wrote);
  }
}

void AtomicFile::write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }

void AtomicFile::commit() {
  if (committed_ || !fd_.valid()) throw std::logic_error("AtomicFile::commit called twice: " + path_);
  // Without this fsync the rename could reach the disk before the data, and a
  // crash would leave a complete-looking file full of zeros under `path`.
  if (::fsync(fd_.get()) != 0) {
    const int err = errno;
    abort();
    throw_io("cannot fsync", temp_path_, err);
  }
  if (::close(fd_.release()) != 0) {
    const int err = errno;
    abort();
    throw_io("error closing", temp_path_, err);
  }
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    abort();
    throw std::runtime_error("cannot rename '" + temp_path_ + "' to '" + path_ + "': " + errno_text(err));
  }
  committed_ = true;
  // The data is in place; this makes the new directory entry durable too.
  fsync_directory(parent_directory(path_));
}

void write_file_atomic(const std::string& path, std::string_view content) {
  AtomicFile file(path);
  file.write(content);
  file.commit();
}

// --- memory maps ---------------------------------------------------------------

MappedFile MappedFile::open(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) throw BadInput("cannot read '" + path + "': " + errno_text(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_io("cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) throw BadInput("cannot read '" + path + "': not a regular file");

  MappedFile mapped;
  mapped.path_ = path;
  if (st.st_size == 0) return mapped;  // mmap of length 0 is EINVAL
  const auto size = static_cast<size_t>(st.st_size);
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (data == MAP_FAILED) throw_io("cannot map", path, errno);
  mapped.data_ = static_cast<const std::byte*>(data);
  mapped.size_ = size;
  // The mapping holds its own reference to the file, so the descriptor is
  // closed here (by `fd`): loading hundreds of shards must not use up fds.
  return mapped;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)), data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() { unmap(); }

void MappedFile::unmap() noexcept {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace loom
