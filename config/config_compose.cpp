// Config composition (`base:` chains) and ${NAME} interpolation. See
// config_compose.h.
#include "config/config_compose.h"

#include <yaml-cpp/eventhandler.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>

#include "util/error.h"

namespace loom::config_compose {
namespace {

namespace fs = std::filesystem;
using config_schema::fail;
using config_schema::Origin;

// Records where each document starts and whether it holds anything.
class DocumentProbe : public YAML::EventHandler {
 public:
  YAML::Mark start = YAML::Mark::null_mark();
  bool has_content = false;

  void OnDocumentStart(const YAML::Mark& mark) override { start = mark; }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override { has_content = true; }
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {
    has_content = true;
  }
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {
    has_content = true;
  }
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {
    has_content = true;
  }
  void OnMapEnd() override {}
};

std::string where_in(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

bool is_name_start(char ch) { return std::isalpha(static_cast<unsigned char>(ch)) || ch == '_'; }
bool is_name_char(char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; }

// Walks a file's base: chain depth first. `stack` holds the files being
// read (canonical paths, for cycles) with the names messages use.
class ChainReader {
 public:
  std::vector<Document> read(const std::string& text, const std::string& source) {
    add(text, source);
    return std::move(documents_);
  }

 private:
  struct Open {
    fs::path canonical;
    std::string source;
  };

  void add(const std::string& text, const std::string& source) {
    YAML::Node root = load_single_document(text, source);
    const YAML::Node& const_root = root;  // a const lookup adds no key
    if (root.IsMap() && const_root["base"]) {
      const Origin origin{source, ""};
      const YAML::Node base = const_root["base"];
      std::vector<YAML::Node> names;
      if (base.IsScalar()) {
        names.push_back(base);
      } else if (base.IsSequence()) {
        for (const YAML::Node& item : base) names.push_back(item);
      }
      if (names.empty() || (!base.IsScalar() && !base.IsSequence()))
        fail(origin.of(base, base), "base", "wrong type", config_schema::describe_node(base),
             "a config file (relative to this file's folder) or a list of them");
      stack_.push_back({canonical_of(source), source});
      for (const YAML::Node& name_node : names) add_base(name_node, origin, source);
      stack_.pop_back();
    }
    documents_.push_back({source, std::move(root)});
  }

  void add_base(const YAML::Node& name_node, const Origin& origin, const std::string& includer) {
    const std::string where = origin.of(name_node);
    if (!name_node.IsScalar() || name_node.Scalar().empty())
      fail(where, "base", "wrong type", config_schema::describe_node(name_node), "a config file name");
    const std::string name = interpolate(name_node.Scalar(), "base", where);
    const fs::path folder = fs::path(includer).parent_path();
    const std::string source = (folder / name).lexically_normal().string();
    const fs::path canonical = canonical_of(source);
    for (size_t i = 0; i < stack_.size(); ++i) {
      if (stack_[i].canonical != canonical) continue;
      std::string cycle;
      for (size_t j = i; j < stack_.size(); ++j) cycle += stack_[j].source + " -> ";
      fail(where, "base", "base files form a cycle: " + cycle + source, "",
           "a chain of base files that ends (a file cannot be its own base)");
    }
    std::error_code error;
    if (!fs::is_regular_file(source, error))
      fail(where, "base", "cannot read base config '" + name + "'",
           source + (fs::exists(source, error) ? " is not a file" : " does not exist"),
           "a config file, relative to the folder of " + includer);
    add(read_config_file(source), source);
  }

  static fs::path canonical_of(const std::string& path) {
    std::error_code error;
    fs::path canonical = fs::weakly_canonical(path.empty() ? fs::path(".") : fs::path(path), error);
    return error ? fs::absolute(path).lexically_normal() : canonical;
  }

  std::vector<Open> stack_;
  std::vector<Document> documents_;
};

}  // namespace

std::string read_config_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw BadInput("cannot read config file '" + path + "': " + std::strerror(errno));
  std::string text;
  char buffer[1 << 14];
  size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof(buffer), file.get())) > 0) text.append(buffer, got);
  if (std::ferror(file.get())) throw BadInput("cannot read config file '" + path + "': " + std::strerror(errno));
  return text;
}

// Walks the documents first because yaml-cpp 0.7's LoadAll loops forever on a
// stray token it cannot place (a line starting with ',' at the top level,
// say): the parser then returns the same empty document again and again
// without moving on.
YAML::Node load_single_document(const std::string& text, const std::string& source) {
  try {
    std::istringstream stream(text);
    YAML::Parser parser(stream);
    YAML::Mark previous = YAML::Mark::null_mark();
    int documents_with_content = 0;
    for (;;) {
      DocumentProbe probe;
      if (!parser.HandleNextDocument(probe)) break;
      if (!previous.is_null() && probe.start.pos <= previous.pos)
        throw BadInput(where_in(source, probe.start) + ": YAML syntax error: unexpected text at the start of a line");
      previous = probe.start;
      if (probe.has_content && ++documents_with_content > 1)
        fail(where_in(source, probe.start), "(document)", "more than one YAML document in a config", "",
             "a single document");
    }
    return YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw BadInput(where_in(source, e.mark) + ": YAML syntax error: " + e.msg);
  }
}

std::vector<Document> load_chain(const std::string& path) { return chain_from_text(read_config_file(path), path); }

std::vector<Document> chain_from_text(const std::string& yaml_text, const std::string& source_name) {
  return ChainReader().read(yaml_text, source_name);
}

std::string interpolate(const std::string& text, const std::string& key, const std::string& where) {
  if (text.find('$') == std::string::npos) return text;
  std::string out;
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, 3, "$${") == 0) {  // escaped: a literal ${
      out += "${";
      i += 3;
      continue;
    }
    if (text.compare(i, 2, "${") != 0) {
      out += text[i++];
      continue;
    }
    const size_t close = text.find('}', i + 2);
    if (close == std::string::npos)
      fail(where, key, "unclosed ${ in value", text, "${NAME} or ${NAME:-default} (write $${ for a literal ${)");
    const std::string inner = text.substr(i + 2, close - i - 2);
    const size_t colon = inner.find(":-");
    const std::string name = inner.substr(0, colon);
    bool valid = !name.empty() && is_name_start(name[0]);
    for (char ch : name) valid = valid && is_name_char(ch);
    if (!valid)
      fail(where, key, "not an environment variable reference: ${" + inner + "}", text,
           "${NAME} or ${NAME:-default} with NAME of letters, digits and _");
    const char* value = std::getenv(name.c_str());
    if (value != nullptr && *value != '\0') {
      out += value;
    } else if (colon != std::string::npos) {
      out += inner.substr(colon + 2);
    } else {
      fail(where, key, "undefined environment variable " + name, text,
           name + " set, or a default: ${" + name + ":-value}");
    }
    i = close + 1;
  }
  return out;
}

void interpolate_node(YAML::Node value, const std::string& key, const Origin& origin) {
  if (value.IsScalar()) {
    const std::string replaced = interpolate(value.Scalar(), key, origin.of(value));
    // Assigning a string keeps the node's mark (and tag), so later messages
    // still point at the line.
    if (replaced != value.Scalar()) value = replaced;
  } else if (value.IsSequence()) {
    for (size_t i = 0; i < value.size(); ++i) interpolate_node(value[i], key + "[" + std::to_string(i) + "]", origin);
  } else if (value.IsMap()) {
    for (auto entry : value) {
      const std::string name = entry.first.IsScalar() ? entry.first.Scalar() : "?";
      interpolate_node(entry.second, key + "." + name, origin);
    }
  }
}

}  // namespace loom::config_compose
