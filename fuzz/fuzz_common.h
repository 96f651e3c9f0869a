// Shared by the fuzz targets: what counts as a finding.
//
// A reader given any bytes must either accept them or throw loom::BadInput
// (which loom turns into a message and exit code 2). Anything else is a
// finding: a sanitizer report, a crash, a hang or timeout (libFuzzer's
// -timeout), and also any other exception escaping the reader, since loom
// would report that as an internal error (exit 1) instead of naming the bad
// input.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <new>
#include <string>
#include <system_error>
#include <utility>

#include "util/error.h"

namespace loom::fuzz {

template <typename Fn>
void expect_accept_or_bad_input(const char* reader, Fn&& fn) {
  try {
    fn();
  } catch (const BadInput&) {
    // The expected way to refuse a file.
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: an exception other than BadInput escaped: %s\n", reader, e.what());
    std::abort();
  }
}

// A folder of this process for the files a target writes (HDF5 reads files,
// not memory): in /dev/shm when there is one, so the disk is not worn.
// Made on the first call and removed when the process exits normally (a
// crash leaves it behind); `name` tells the targets' folders apart.
inline const std::filesystem::path& scratch_dir(const std::string& name) {
  namespace fs = std::filesystem;
  struct Folder {
    explicit Folder(fs::path where) : path(std::move(where)) { fs::create_directories(path); }
    Folder(const Folder&) = delete;
    Folder& operator=(const Folder&) = delete;
    ~Folder() {
      std::error_code error;
      fs::remove_all(path, error);
    }
    fs::path path;
  };
  static const Folder folder((fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path()) /
                             ("loom-fuzz-" + name + "-" + std::to_string(::getpid())));
  return folder.path;
}

}  // namespace loom::fuzz
