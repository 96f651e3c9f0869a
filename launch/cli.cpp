#include "launch/cli.h"

#include <charconv>

#include "util/error.h"

namespace loom {

Args::Args(const std::string& command, const std::vector<std::string>& argv, const std::vector<FlagSpec>& flags)
    : command_(command) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
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
    const FlagSpec* spec = nullptr;
    for (const auto& f : flags) {
      if (f.name == name) spec = &f;
    }
    if (spec == nullptr) {
      std::string known;
      for (const auto& f : flags) known += (known.empty() ? "--" : ", --") + f.name;
      throw BadInput("loom " + command + ": unknown option '--" + name + "'" +
                     (known.empty() ? "" : " (known: " + known + ")"));
    }
    if (spec->takes_value && !has_inline_value) {
      if (i + 1 >= argv.size()) throw BadInput("loom " + command + ": option '--" + name + "' needs a value");
      value = argv[++i];
    } else if (!spec->takes_value && has_inline_value) {
      throw BadInput("loom " + command + ": option '--" + name + "' takes no value");
    }
    auto& slot = values_[name];
    if (!slot.empty() && !spec->repeatable) {
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
