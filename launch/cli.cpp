#include "launch/cli.h"

#include <algorithm>
#include <charconv>

#include "util/error.h"

namespace loom {

namespace {

// "--name VALUE", the left column of an option's line in the usage.
std::string flag_column(const FlagSpec& flag) {
  return "--" + flag.name + (flag.value.empty() ? "" : " " + flag.value);
}

}  // namespace

bool is_help_flag(const std::string& arg) { return arg == "--help" || arg == "-h"; }

std::string usage(const CommandSpec& spec) {
  const FlagSpec help{"help", "", "print this usage and exit (also -h)"};
  std::vector<FlagSpec> flags = spec.flags;
  flags.push_back(help);
  // One column for the names, as wide as the widest (up to a limit, past
  // which a long one pushes its own line's text along).
  size_t width = 0;
  for (const auto& argument : spec.arguments) width = std::max(width, argument.name.size());
  for (const auto& flag : flags) width = std::max(width, flag_column(flag).size());
  width = std::min<size_t>(width, 24);
  auto row = [width](const std::string& left, const std::string& right) {
    return "  " + left + std::string(left.size() < width ? width - left.size() : 0, ' ') + "  " + right + "\n";
  };
  std::string out = "usage: loom " + spec.name + (spec.synopsis.empty() ? "" : " " + spec.synopsis) + "\n\n" +
                    spec.summary + "\n";
  if (!spec.arguments.empty()) {
    out += "\narguments:\n";
    for (const auto& argument : spec.arguments) out += row(argument.name, argument.help);
  }
  out += "\noptions:\n";
  for (const auto& flag : flags) out += row(flag_column(flag), flag.help + (flag.repeatable ? " (repeatable)" : ""));
  if (!spec.notes.empty()) out += "\n" + spec.notes + "\n";
  if (!spec.examples.empty()) {
    out += spec.examples.size() == 1 ? "\nexample:\n" : "\nexamples:\n";
    for (const auto& example : spec.examples) out += "  " + example + "\n";
  }
  return out;
}

Args::Args(const CommandSpec& spec, const std::vector<std::string>& argv) : command_(spec.name) {
  const std::string& command = spec.name;
  const std::vector<FlagSpec>& flags = spec.flags;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    // Wherever an option may stand (not as another option's value), help
    // wins over running: nothing after it is looked at.
    if (is_help_flag(arg)) throw HelpRequested{usage(spec)};
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      if (arg.size() > 1 && arg[0] == '-' && arg != "-") {
        throw BadInput("loom " + command + ": unknown option '" + arg + "' (options are spelt --name)");
      }
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool has_inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      has_inline_value = true;
    }
    if (name == "help") throw BadInput("loom " + command + ": option '--help' takes no value");
    const FlagSpec* flag = nullptr;
    for (const auto& f : flags) {
      if (f.name == name) flag = &f;
    }
    if (flag == nullptr) {
      std::string known;
      for (const auto& f : flags) known += (known.empty() ? "--" : ", --") + f.name;
      throw BadInput("loom " + command + ": unknown option '--" + name + "'" +
                     (known.empty() ? "" : " (known: " + known + ")"));
    }
    const bool takes_value = !flag->value.empty();
    if (takes_value && !has_inline_value) {
      if (i + 1 >= argv.size()) throw BadInput("loom " + command + ": option '--" + name + "' needs a value");
      value = argv[++i];
    } else if (!takes_value && has_inline_value) {
      throw BadInput("loom " + command + ": option '--" + name + "' takes no value");
    }
    auto& slot = values_[name];
    if (!slot.empty() && !flag->repeatable) {
      throw BadInput("loom " + command + ": option '--" + name + "' given more than once");
    }
    slot.push_back(value);
  }
}

void Args::expect_positional(size_t count, const std::string& what) const {
  if (positional_.size() != count) {
    throw BadInput("loom " + command_ + ": expected " + what + " (got " + std::to_string(positional_.size()) +
                   " positional argument" + (positional_.size() == 1 ? "" : "s") + ")");
  }
}

std::optional<std::string> Args::get(const std::string& flag) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return std::nullopt;
  return it->second.back();
}

std::string Args::get_or(const std::string& flag, const std::string& fallback) const {
  return get(flag).value_or(fallback);
}

std::string Args::require(const std::string& flag) const {
  auto value = get(flag);
  if (!value) throw BadInput("loom " + command_ + ": --" + flag + " is required");
  return *value;
}

const std::vector<std::string>& Args::all(const std::string& flag) const {
  static const std::vector<std::string> kNone;
  auto it = values_.find(flag);
  return it == values_.end() ? kNone : it->second;
}

int64_t Args::get_int(const std::string& flag, int64_t fallback) const {
  auto value = get(flag);
  if (!value) return fallback;
  int64_t out = 0;
  auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), out);
  if (ec != std::errc() || end != value->data() + value->size()) {
    throw BadInput("loom " + command_ + ": --" + flag + " '" + *value + "' is not an integer");
  }
  return out;
}

double Args::get_double(const std::string& flag, double fallback) const {
  auto value = get(flag);
  if (!value) return fallback;
  size_t used = 0;
  double out = 0;
  try {
    out = std::stod(*value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value->size()) {
    throw BadInput("loom " + command_ + ": --" + flag + " '" + *value + "' is not a number");
  }
  return out;
}

std::vector<int64_t> parse_int_list(const std::string& text, const std::string& flag) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(start, comma - start);
    int64_t value = 0;
    auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), value);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size()) {
      throw BadInput(flag + ": '" + text + "' is not a comma-separated list of integers");
    }
    out.push_back(value);
    start = comma + 1;
  }
  return out;
}

}  // namespace loom
