// Error types shared by every loom library.
//
// loom reports problems as exceptions carrying enough context to act on
// (file, key or offset, value, what was expected). `main` catches them, prints
// one line and maps the type to an exit code:
//   BadInput      -> 2  (config, data, checkpoint or argument is wrong)
//   anything else -> 1  (a bug or an environment failure in loom itself)
#pragma once

#include <stdexcept>
#include <string>

namespace loom {

inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitBadInput = 2;

// The user gave loom something it cannot use. The message names the input
// (file, key, tensor, offset), the value found and what was expected.
class BadInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace loom
