// Shared by the fuzz targets: what counts as a finding.
//
// A reader given any bytes must either accept them or throw loom::BadInput
// (which loom turns into a message and exit code 2). Anything else is a
// finding: a sanitizer report, a crash, a hang or timeout (libFuzzer's
// -timeout), and also any other exception escaping the reader, since loom
// would report that as an internal error (exit 1) instead of naming the bad
// input.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>

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

}  // namespace loom::fuzz
