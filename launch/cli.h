// Command-line parsing for the `loom` subcommands: positional arguments and
// `--flag value` / `--flag=value` options, each command declaring what it takes
// in a CommandSpec, so that a misspelt flag is refused (exit 2) rather than
// ignored, and `loom COMMAND --help` prints the same declaration as its usage.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace loom {

struct FlagSpec {
  std::string name;   // without the dashes, e.g. "output"
  std::string value;  // what it takes, named for the usage ("DIR", "N"); empty for a switch
  std::string help;   // one line
  bool repeatable = false;  // e.g. --set a=b --set c=d
};
constexpr bool kRepeatable = true;  // FlagSpec::repeatable, named where a flag is declared

// A positional argument, for the usage: its name ("CONFIG") and one line.
struct ArgumentSpec {
  std::string name;
  std::string help;
};

// What a subcommand does and takes: the one place its arguments and options
// are described. Args parses against it; `loom NAME --help` prints it
// (usage()); `loom help` lists every command's summary.
// Written with designated initializers; a field left out is empty.
struct CommandSpec {
  std::string name{};      // as typed after `loom`: "prepare", "tokenizer train"
  std::string synopsis{};  // what follows the name on the usage line: "CONFIG [OPTIONS]"
  std::string summary{};   // what it does, one line
  std::vector<ArgumentSpec> arguments{};
  std::vector<FlagSpec> flags{};
  std::vector<std::string> examples{};  // whole command lines, "loom ..." included
  std::string notes{};  // more about it, if any: a paragraph, printed after the options
};

// The usage of `spec`: the command line, the summary, one line per argument
// and option, the notes and the examples.
std::string usage(const CommandSpec& spec);

// Thrown by Args when the command line asks for help (--help or -h where an
// option may stand): run_cli prints `usage` on stdout and exits 0, so the
// command does no work. Not a std::exception, so that no error handler takes
// it for a failure.
struct HelpRequested {
  std::string usage;
};

// "--help" or "-h".
bool is_help_flag(const std::string& arg);

class Args {
 public:
  // Parses `argv` (the command's own arguments, after the command's name).
  // Throws BadInput for unknown flags, missing values, or repeated flags, and
  // HelpRequested for --help or -h.
  Args(const CommandSpec& spec, const std::vector<std::string>& argv);

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
