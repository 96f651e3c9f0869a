// Command-line parsing for the `loom` subcommands: positional arguments and
// `--flag value` / `--flag=value` options, each command declaring the flags it
// takes so that a misspelt flag is refused (exit 2) rather than ignored.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace loom {

struct FlagSpec {
  std::string name;       // without the dashes, e.g. "output"
  bool takes_value = true;
  bool repeatable = false;  // e.g. --set a=b --set c=d
  std::string help;
};

class Args {
 public:
  // Parses `argv` (the command's own arguments, after the subcommand name).
  // Throws BadInput for unknown flags, missing values, or repeated flags.
  Args(const std::string& command, const std::vector<std::string>& argv, const std::vector<FlagSpec>& flags);

  const std::vector<std::string>& positional() const { return positional_; }
  // Exactly `count` positional arguments, named in the error by `what`.
  void expect_positional(size_t count, const std::string& what) const;

  bool has(const std::string& flag) const { return values_.count(flag) != 0; }
  std::optional<std::string> get(const std::string& flag) const;
  std::string get_or(const std::string& flag, const std::string& fallback) const;
  std::string require(const std::string& flag) const;
  const std::vector<std::string>& all(const std::string& flag) const;
  int64_t get_int(const std::string& flag, int64_t fallback) const;
  double get_double(const std::string& flag, double fallback) const;

 private:
  std::string command_;
  std::vector<std::string> positional_;
  std::map<std::string, std::vector<std::string>> values_;
};

// Parses "1,2,3" into integers; BadInput naming `flag` on anything else.
std::vector<int64_t> parse_int_list(const std::string& text, const std::string& flag);

}  // namespace loom
