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
// Made on the first call; `name` tells the targets' folders apart.
inline const std::filesystem::path& scratch_dir(const std::string& name) {
  static const std::filesystem::path dir = [&] {
    namespace fs = std::filesystem;
    const fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    const fs::path d = base / ("loom-fuzz-" + name + "-" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

}  // namespace loom::fuzz
