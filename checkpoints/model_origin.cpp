#include "checkpoints/model_origin.h"

#include <cctype>
#include <filesystem>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json parse_json_object(const std::string& text, const std::string& path) {
  json parsed;
  try {
    parsed = json::parse(text);
  } catch (const json::exception& e) {
    throw BadInput(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!parsed.is_object()) throw BadInput(path + ": expected a JSON object");
  return parsed;
}

// "ORG/NAME" or "NAME": what a Hub id looks like (a local path does not).
bool looks_like_hub_id(const std::string& text) {
  if (text.empty() || text.front() == '/' || text.front() == '.' || text.front() == '~') return false;
  int slashes = 0;
  for (char c : text) {
    if (c == '/') {
      ++slashes;
    } else if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return slashes <= 1 && text.back() != '/';
}

std::string string_or_empty(const json& object, const char* key) {
  return object.contains(key) && object.at(key).is_string() ? object.at(key).get<std::string>() : "";
}

}  // namespace

std::string card_scalar(const std::string& readme, const std::string& key) {
  std::istringstream lines(readme);
  std::string line;
  if (!std::getline(lines, line) || line.rfind("---", 0) != 0) return "";
  while (std::getline(lines, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("---", 0) == 0) break;
    if (line.rfind(key + ":", 0) != 0) continue;
    std::string value = line.substr(key.size() + 1);
    const size_t first = value.find_first_not_of(" \t");
    if (first == std::string::npos) return "";  // a list or mapping follows: not a scalar
    value = value.substr(first);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.pop_back();
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front()) {
      value = value.substr(1, value.size() - 2);
    }
    return value;
  }
  return "";
}

namespace {

fs::path canonical_or_as_given(const std::string& path) {
  std::error_code ignored;
  const fs::path resolved = fs::weakly_canonical(fs::absolute(path), ignored);
  return resolved.empty() ? fs::path(path) : resolved;
}

// ORG/NAME from a Hugging Face cache folder name such as
// models--ORG--NAME (`prefix` "models--"), "" when `folder` is not one.
std::string hub_id_of_cache_name(const std::string& folder, const std::string& prefix) {
  if (folder.rfind(prefix, 0) != 0) return "";
  const std::string name = folder.substr(prefix.size());
  const size_t dashes = name.find("--");
  const std::string id = dashes == std::string::npos ? name : name.substr(0, dashes) + "/" + name.substr(dashes + 2);
  return looks_like_hub_id(id) ? id : "";
}

}  // namespace

std::string hub_id_of_folder(const std::string& path) {
  const fs::path folder = canonical_or_as_given(path);
  // The Hugging Face cache: .../models--ORG--NAME/snapshots/REVISION.
  const std::vector<fs::path> parts(folder.begin(), folder.end());
  for (size_t i = 0; i + 2 < parts.size(); ++i) {
    if (parts[i + 1] != "snapshots") continue;
    if (std::string id = hub_id_of_cache_name(parts[i].string(), "models--"); !id.empty()) return id;
  }
  const fs::path config_path = folder / "config.json";
  if (fs::exists(config_path)) {
    try {
      const std::string name = string_or_empty(json::parse(read_file(config_path.string())), "_name_or_path");
      if (looks_like_hub_id(name)) return name;
    } catch (const std::exception&) {
      // An unreadable config.json is reported by whoever reads the model.
    }
  }
  return folder.filename().string();
}

std::string hub_dataset_id_of(const std::string& path) {
  for (const fs::path& part : canonical_or_as_given(path)) {
    if (std::string id = hub_id_of_cache_name(part.string(), "datasets--"); !id.empty()) return id;
  }
  return "";
}

std::string tokenizer_dir_of_model_folder(const std::string& path) {
  const fs::path root(path);
  if (fs::exists(root / "manifest.json")) return fs::is_directory(root / "tokenizer") ? (root / "tokenizer").string() : "";
  return fs::exists(root / "tokenizer.json") || fs::exists(root / "tokenizer_config.json") ? path : "";
}

ModelOrigin origin_of_model_folder(const std::string& path) {
  const fs::path root(path);
  ModelOrigin origin;
  if (fs::exists(root / "manifest.json")) {
    // A loom checkpoint: what the run that wrote it started from, if anything.
    const fs::path origin_json = root / kOriginFolder / "origin.json";
    if (!fs::exists(origin_json)) return origin;
    const json recorded = parse_json_object(read_file(origin_json.string()), origin_json.string());
    origin.base_model = string_or_empty(recorded, "base_model");
    origin.license = string_or_empty(recorded, "license");
    origin.license_name = string_or_empty(recorded, "license_name");
    origin.license_link = string_or_empty(recorded, "license_link");
    const fs::path generation = root / kOriginFolder / "generation_config.json";
    if (fs::exists(generation)) origin.generation_config_json = read_file(generation.string());
    return origin;
  }
  origin.base_model = hub_id_of_folder(path);
  if (fs::exists(root / "README.md")) {
    const std::string readme = read_file((root / "README.md").string());
    origin.license = card_scalar(readme, "license");
    origin.license_name = card_scalar(readme, "license_name");
    origin.license_link = card_scalar(readme, "license_link");
  }
  const fs::path generation = root / "generation_config.json";
  // Carried as it is: transformers is its reader, and loom never was.
  if (fs::exists(generation)) origin.generation_config_json = read_file(generation.string());
  return origin;
}

void write_origin(const ModelOrigin& origin, const std::string& dir) {
  fs::create_directories(dir);
  nlohmann::ordered_json recorded;
  recorded["base_model"] = origin.base_model;
  recorded["license"] = origin.license;
  recorded["license_name"] = origin.license_name;
  recorded["license_link"] = origin.license_link;
  write_file_atomic((fs::path(dir) / "origin.json").string(), recorded.dump(2) + "\n");
  if (!origin.generation_config_json.empty()) {
    write_file_atomic((fs::path(dir) / "generation_config.json").string(), origin.generation_config_json);
  }
  fsync_directory(dir);
}

}  // namespace loom
