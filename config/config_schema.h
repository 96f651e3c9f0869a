// Private to config/config*.cpp: the table of config keys, and how each key
// reads its struct field from a YAML node, prints it and writes it back.
//
// One KeySpec per dotted key. The loader (config.cpp) walks the YAML and looks
// every key up here, so a key missing from the table is an unknown key; the
// table is also what config_keys() returns and what docs/configuration.md
// documents.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "config/config.h"

namespace loom::config_schema {

// How to reach a key's field in a Config. monostate marks a nested section
// that has its own keys (model.rope_scaling).
using Field = std::variant<std::monostate,                                    //
                           int64_t& (*)(Config&),                             //
                           uint64_t& (*)(Config&),                            //
                           double& (*)(Config&),                              //
                           bool& (*)(Config&),                                //
                           std::string& (*)(Config&),                         //
                           std::vector<double>& (*)(Config&),                 //
                           std::vector<int64_t>& (*)(Config&),                //
                           std::vector<std::string>& (*)(Config&),            //
                           std::map<std::string, std::string>& (*)(Config&),  //
                           std::vector<DataSource>& (*)(Config&)>;

// Range of a numeric key (each element of a list of numbers), checked after
// loading so that overrides can fix a file's value before it is judged.
struct Bounds {
  double lo = -std::numeric_limits<double>::infinity();
  bool lo_open = false;  // true: value > lo; false: value >= lo
  double hi = std::numeric_limits<double>::infinity();
  bool hi_open = false;

  bool contains(double v) const { return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi); }
  std::string describe() const;  // "> 0", ">= 1", "in [0, 1)"
};

struct KeySpec {
  std::string key;  // dotted, e.g. "model.num_heads"
  Field field;
  std::string default_text;  // "" -> printed from a default Config; "required" for required keys
  std::string unit;
  std::string doc;
  Bounds bounds = {};
  std::vector<std::string> choices = {};  // allowed values (printed form), empty = any
  bool accepts_auto = false;              // the YAML string `auto` is stored as 0 (parallel.dp)

  bool required() const { return default_text == "required"; }
  bool is_section() const { return std::holds_alternative<std::monostate>(field); }
};

const std::vector<KeySpec>& key_specs();

// The spec of a dotted key (aliases resolved), or nullptr.
const KeySpec* find_key(std::string_view key);
// Hugging Face spellings accepted as aliases: "model.rope_scaling.rope_type" -> "...type".
std::string_view canonical_key(std::string_view key);
// True for "run", "model", ..., "launch.slurm", "model.rope_scaling".
bool is_section(std::string_view key);
// " (did you mean model.num_heads?)", or the known keys of the section, for an unknown key.
std::string suggest_for_unknown(std::string_view key);

// Names where YAML nodes came from in messages: "file:line:col" (1-based) for
// nodes of a file, or the whole "--set key=value" argument for an override.
struct Origin {
  std::string source;        // file path or parse_config's source_name
  std::string override_arg;  // "--set a.b=value" when the nodes come from an override

  // Where `node` is; a null value (`key:` with nothing after it) has no useful
  // position of its own, so `fallback` (its key) is named instead.
  std::string of(const YAML::Node& node, const YAML::Node& fallback = YAML::Node()) const;
};

// Formats one message line: `<where>: <key>: <what> (got <got>; expected <expected>)`.
std::string message(std::string_view where, std::string_view key, std::string_view what, std::string_view got = {},
                    std::string_view expected = {});
[[noreturn]] void fail(std::string_view where, std::string_view key, std::string_view what, std::string_view got = {},
                       std::string_view expected = {});
// How a YAML value reads in a message: its text, or "a list" / "a map" / "nothing".
std::string describe_node(const YAML::Node& node);

// Type-checks `value` and stores it in the key's field; `where` names the value
// in messages, `origin` names the elements of lists and maps. Ranges and
// choices are checked later, by validation, so that overrides can fix a value.
void set_field(Config& config, const KeySpec& spec, const YAML::Node& value, const std::string& where,
               const Origin& origin);

// The field's value as text for messages and documentation ("auto", "[0.9, 0.95]").
std::string format_value(const Config& config, const KeySpec& spec);
// The field's numeric values (one per list element) for range checks; empty for non-numbers.
std::vector<double> numeric_values(const Config& config, const KeySpec& spec);
// Writes the field's value to an emitter so that set_field reads it back equal.
void emit_value(YAML::Emitter& out, const Config& config, const KeySpec& spec);

// Shortest text that reads back as the same double ("0.1", "3e-4" -> "0.0003").
std::string format_number(double value);

}  // namespace loom::config_schema
