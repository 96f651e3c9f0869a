// Fuzz target: the YAML config loader (config/config.cpp with
// config_schema.cpp and config_compose.cpp), the path of `loom train CONFIG`.
// The input is the config file's text; `base:` files resolve against an empty
// scratch folder, so a relative base is refused as missing.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "fuzz/fuzz_common.h"
#include "config/config.h"

namespace {

const std::string& source_name() {
  static const std::string name = [] {
    const auto dir = std::filesystem::temp_directory_path() / "loom-fuzz-config";
    std::filesystem::create_directories(dir);
    return (dir / "fuzz.yaml").string();
  }();
  return name;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  loom::fuzz::expect_accept_or_bad_input("parse_config", [&] {
    const loom::Config config = loom::parse_config(text, source_name());
    // What `loom inspect` and every run folder's config.yaml print.
    (void)loom::config_to_yaml(config);
  });
  return 0;
}
