// Private to config/config*.cpp: how a config file becomes the YAML
// documents the loader applies, in order.
//
// Composition: a config's top-level `base:` names one file (or a list of
// files), relative to the config's own folder, whose keys it starts from;
// bases may have bases of their own. The loader applies the documents deepest
// base first, so each file overrides what it builds on, and --set overrides
// come last. A file that is its own base, directly or through others, is
// refused, as is a base that cannot be read.
//
// Interpolation: `${NAME}` and `${NAME:-default}` in a scalar value (not in a
// key) are replaced by the environment variable NAME; the default is used when
// NAME is unset or empty, as in a POSIX shell. `$${` writes a literal `${`.
// The result is read as the key's type reads its text, so
// `lr: ${LR:-3e-4}` is a number. NAME unset with no default is an error.
#pragma once

#include <yaml-cpp/yaml.h>

#include <string>
#include <vector>

#include "config/config_schema.h"

namespace loom::config_compose {

struct Document {
  std::string source;  // the file as messages name it (the base's path joined to its includer's folder)
  YAML::Node root;     // a map of sections; its top-level `base` key is not a config key
};

// The file at `path` and its base chain, deepest base first and the file
// itself last. Throws BadInput naming the file, line and `base` key for a
// base that cannot be read and for a cycle.
std::vector<Document> load_chain(const std::string& path);

// The same for YAML text named `source_name` (bases resolve against
// source_name's folder, or the working directory when it has none).
std::vector<Document> chain_from_text(const std::string& yaml_text, const std::string& source_name);

// The text of a config file; BadInput "cannot read config file '<path>': <reason>".
std::string read_config_file(const std::string& path);

// The file's one YAML document (Null when it is empty); BadInput naming
// file:line:col for a syntax error or a second document.
YAML::Node load_single_document(const std::string& text, const std::string& source);

// `text` with ${NAME} and ${NAME:-default} replaced (see the top of this
// file). `key` and `where` name the value in the error of an undefined or
// malformed reference.
std::string interpolate(const std::string& text, const std::string& key, const std::string& where);

// Interpolates every scalar under `value` (not map keys) in place; `origin`
// names each scalar's position in messages.
void interpolate_node(YAML::Node value, const std::string& key, const config_schema::Origin& origin);

}  // namespace loom::config_compose
