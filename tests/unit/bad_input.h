// Helpers for tests of refused input: loom reports it as loom::BadInput whose
// message names the file, key or tensor, and tests check those names.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "util/error.h"

namespace loom::test_support {

// The message of the BadInput `fn` throws, or a marker saying what happened
// instead, so a failed expectation prints something useful.
inline std::string bad_input_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const BadInput& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not BadInput) ") + e.what();
  }
  return "(no exception)";
}

// Expects `fn` to throw BadInput whose message contains every fragment.
inline void expect_bad_input(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  const std::string message = bad_input_message(fn);
  EXPECT_FALSE(message.starts_with("(no exception)") || message.starts_with("(not BadInput)")) << message;
  for (const auto& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
  }
}

}  // namespace loom::test_support
