#include "plan/machine_profile.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <sstream>

#include "util/error.h"
#include "util/file_io.h"

namespace loom::plan {

namespace fs = std::filesystem;

namespace {

// The number at `key` of `node`, > 0 (or >= 0 with `zero_ok`); BadInput naming file and key.
double number_at(const YAML::Node& node, const std::string& key, const std::string& where, bool zero_ok = false,
                 bool optional = false) {
  const YAML::Node value = node[key];
  if (!value) {
    if (optional) return 0;
    throw BadInput(where + "." + key + ": missing (expected a number)");
  }
  double out = 0;
  try {
    out = value.as<double>();
  } catch (const YAML::Exception&) {
    throw BadInput(where + "." + key + ": '" + YAML::Dump(value) + "' is not a number");
  }
  if (!(out > 0) && !(zero_ok && out == 0)) {
    throw BadInput(where + "." + key + ": " + std::to_string(out) + " (expected a number > 0)");
  }
  return out;
}

YAML::Node section(const YAML::Node& root, const std::string& key, const std::string& where) {
  const YAML::Node node = root[key];
  if (!node || !node.IsMap()) throw BadInput(where + ": missing section '" + key + "' (a mapping)");
  return node;
}

LinkProfile link_at(const YAML::Node& links, const std::string& key, const std::string& where) {
  const YAML::Node node = section(links, key, where);
  return {number_at(node, "bytes_per_s", where + "." + key), number_at(node, "latency_s", where + "." + key, true)};
}

}  // namespace

MachineProfile load_machine_profile(const std::string& path) {
  if (!fs::is_regular_file(path)) throw BadInput("machine profile '" + path + "' does not exist");
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    throw BadInput(path + ": not valid YAML (" + e.msg + ")");
  }
  if (!root.IsMap()) throw BadInput(path + ": expected a mapping with name, source, compute and links");
  MachineProfile profile;
  profile.name = root["name"] ? root["name"].as<std::string>() : fs::path(path).stem().string();
  profile.source = root["source"] ? root["source"].as<std::string>() : "";
  if (profile.source != "measured" && profile.source != "specification") {
    throw BadInput(path + ": source: '" + profile.source + "' (expected measured or specification)");
  }
  profile.device = root["device"] ? root["device"].as<std::string>() : "";
  profile.notes = root["notes"] ? root["notes"].as<std::string>() : "";
  const std::string where = path + ": compute";
  const YAML::Node compute = section(root, "compute", path);
  const YAML::Node peak = section(compute, "peak_flops", where);
  const YAML::Node matmul = section(compute, "matmul_flops", where);
  const YAML::Node attention = section(compute, "attention_flops", where);
  profile.peak_flops_fp32 = number_at(peak, "fp32", where + ".peak_flops");
  profile.peak_flops_bf16 = number_at(peak, "bf16", where + ".peak_flops", true, true);
  profile.matmul_flops_fp32 = number_at(matmul, "fp32", where + ".matmul_flops");
  profile.matmul_flops_bf16 = number_at(matmul, "bf16", where + ".matmul_flops", true, true);
  profile.attention_flops_fp32 = number_at(attention, "fp32", where + ".attention_flops");
  profile.attention_flops_bf16 = number_at(attention, "bf16", where + ".attention_flops", true, true);
  profile.memory_bytes_per_s = number_at(compute, "memory_bytes_per_s", where);
  profile.stream_bytes_per_s = compute["stream_bytes_per_s"] ? number_at(compute, "stream_bytes_per_s", where)
                                                             : profile.memory_bytes_per_s;
  profile.op_overhead_s = number_at(compute, "op_overhead_s", where, true);
  profile.dp_overlap = compute["dp_overlap"] ? number_at(compute, "dp_overlap", where, true) : 1.0;
  const YAML::Node links = section(root, "links", path);
  profile.intra_node = link_at(links, "intra_node", path + ": links");
  profile.inter_node = link_at(links, "inter_node", path + ": links");
  if (root["storage"]) {
    const YAML::Node storage = section(root, "storage", path);
    profile.storage_write_bytes_per_s = number_at(storage, "write_bytes_per_s", path + ": storage");
    profile.storage_read_bytes_per_s = number_at(storage, "read_bytes_per_s", path + ": storage");
  }
  return profile;
}

void save_machine_profile(const MachineProfile& p, const std::string& path) {
  YAML::Emitter out;
  out.SetDoublePrecision(6);
  out << YAML::BeginMap;
  out << YAML::Key << "name" << YAML::Value << p.name;
  out << YAML::Key << "source" << YAML::Value << p.source;
  out << YAML::Key << "device" << YAML::Value << p.device;
  if (!p.notes.empty()) out << YAML::Key << "notes" << YAML::Value << p.notes;
  auto pair = [&](const char* key, double fp32, double bf16) {
    out << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key << "fp32" << YAML::Value
        << fp32 << YAML::Key << "bf16" << YAML::Value << bf16 << YAML::EndMap;
  };
  out << YAML::Key << "compute" << YAML::Value << YAML::BeginMap;
  pair("peak_flops", p.peak_flops_fp32, p.peak_flops_bf16);
  pair("matmul_flops", p.matmul_flops_fp32, p.matmul_flops_bf16);
  pair("attention_flops", p.attention_flops_fp32, p.attention_flops_bf16);
  out << YAML::Key << "memory_bytes_per_s" << YAML::Value << p.memory_bytes_per_s;
  out << YAML::Key << "stream_bytes_per_s" << YAML::Value << p.stream_bytes_per_s;
  out << YAML::Key << "op_overhead_s" << YAML::Value << p.op_overhead_s;
  out << YAML::Key << "dp_overlap" << YAML::Value << p.dp_overlap;
  out << YAML::EndMap;
  auto link = [&](const char* key, const LinkProfile& l) {
    out << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key << "bytes_per_s"
        << YAML::Value << l.bytes_per_s << YAML::Key << "latency_s" << YAML::Value << l.latency_s << YAML::EndMap;
  };
  out << YAML::Key << "links" << YAML::Value << YAML::BeginMap;
  link("intra_node", p.intra_node);
  link("inter_node", p.inter_node);
  out << YAML::EndMap;
  if (p.storage_write_bytes_per_s > 0 && p.storage_read_bytes_per_s > 0) {
    out << YAML::Key << "storage" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key << "write_bytes_per_s"
        << YAML::Value << p.storage_write_bytes_per_s << YAML::Key << "read_bytes_per_s" << YAML::Value
        << p.storage_read_bytes_per_s << YAML::EndMap;
  }
  out << YAML::EndMap;
  write_file_atomic(path, std::string(out.c_str()) + "\n");
}

std::string resolve_machine_profile(const std::string& name_or_path) {
  if (name_or_path.find('/') != std::string::npos || name_or_path.ends_with(".yaml") ||
      name_or_path.ends_with(".yml")) {
    if (!fs::is_regular_file(name_or_path)) throw BadInput("--machine: '" + name_or_path + "' does not exist");
    return name_or_path;
  }
  std::vector<fs::path> tried = {fs::path("configs") / "machines" / (name_or_path + ".yaml")};
  std::error_code error;
  const fs::path self = fs::read_symlink("/proc/self/exe", error);
  if (!error) tried.push_back(self.parent_path().parent_path() / "configs" / "machines" / (name_or_path + ".yaml"));
  std::string looked;
  for (const fs::path& path : tried) {
    if (fs::is_regular_file(path)) return path.string();
    looked += (looked.empty() ? "" : ", ") + path.string();
  }
  throw BadInput("--machine: no profile named '" + name_or_path + "' (looked for " + looked +
                 "); give a path to a profile, or write one with loom plan --calibrate");
}

}  // namespace loom::plan
