// The checkpoint manifest parser (checkpoints/checkpoint_manifest.h), without
// libtorch: what it accepts from a manifest loom wrote, and how it refuses
// damaged ones. Opening whole checkpoint folders is tested in test_hub.
#include "checkpoints/checkpoint_manifest.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/unit/bad_input.h"
#include "util/file_io.h"

namespace loom {
namespace {

using nlohmann::json;

#define EXPECT_BAD_INPUT(statement, ...) test_support::expect_bad_input([&] { statement; }, {__VA_ARGS__})

const std::string kCorpus = LOOM_SOURCE_DIR "/fuzz/corpus/fuzz_checkpoint_manifest/";

// A manifest written by `loom train` (a 2-layer model at step 12), kept as a
// fuzz seed.
json training_manifest() { return json::parse(read_file(kCorpus + "training-step12.json")); }

CheckpointManifest parse(const json& manifest) { return parse_checkpoint_manifest(manifest.dump(), "ckpt/manifest.json"); }

TEST(CheckpointManifest, ReadsAManifestLoomWrote) {
  const CheckpointManifest m = parse(training_manifest());
  EXPECT_EQ(m.step, 12);
  EXPECT_EQ(m.model.hidden_size, 64);
  EXPECT_EQ(m.model.num_layers, 2);
  ASSERT_EQ(m.files.size(), 3u);
  EXPECT_EQ(m.files[0].name, "model-rank00000.safetensors");
  EXPECT_EQ(m.files[0].bytes, 560488u);
  EXPECT_EQ(m.files[0].crc32c, "6ff56241");
  EXPECT_TRUE(m.files[0].is_model);
  EXPECT_FALSE(m.files[1].is_model);  // optimizer state
  EXPECT_FALSE(m.files[2].is_model);  // trainer state
  EXPECT_EQ(m.tensors.size(), training_manifest().at("tensors").size());
  for (const auto& t : m.tensors) {
    if (t.name == "lm_head.weight") EXPECT_EQ(t.shape, (std::vector<int64_t>{512, 64}));
  }
}

TEST(CheckpointManifest, ReadsFileKindsLayoutAndTheRunThatSavedIt) {
  json manifest = training_manifest();
  CheckpointManifest m = parse(manifest);
  EXPECT_EQ(m.files[0].kind, "model");
  EXPECT_EQ(m.files[1].kind, "optimizer");
  EXPECT_EQ(m.files[2].kind, "trainer_state");
  EXPECT_EQ(m.layout.dp * m.layout.tp * m.layout.pp * m.layout.world, 1);
  EXPECT_FALSE(m.saved_by.has_value());  // written before saved_by existed

  manifest["saved_by"] = {{"dp", 2}, {"tp", 3}, {"pp", 4}, {"world", 24}, {"zero_stage", 1}};
  manifest["files"]["model-rank00000.safetensors"].erase("kind");
  m = parse(manifest);
  ASSERT_TRUE(m.saved_by.has_value());
  EXPECT_EQ(m.saved_by->dp, 2);
  EXPECT_EQ(m.saved_by->tp, 3);
  EXPECT_EQ(m.saved_by->pp, 4);
  EXPECT_EQ(m.saved_by->world, 24);
  EXPECT_EQ(m.saved_by->zero_stage, 1);
  EXPECT_EQ(m.files[0].kind, "model");  // the default
  EXPECT_TRUE(m.files[0].is_model);
}

TEST(CheckpointManifest, RefusesWhatItCannotRead) {
  const json original = training_manifest();
  const auto refused = [&](const std::function<void(json&)>& edit, const std::vector<std::string>& fragments) {
    json m = original;
    edit(m);
    test_support::expect_bad_input([&] { parse(m); }, fragments);
  };
  refused([](json& m) { m["format"] = "other"; }, {"ckpt/manifest.json", "'format'"});
  refused([](json& m) { m["version"] = 2; }, {"format version 2"});
  refused([](json& m) { m.erase("step"); }, {"'step' is missing"});
  refused([](json& m) { m["step"] = "12"; }, {"'step' has the wrong type"});
  refused([](json& m) { m["model_config"]["hidden_size"] = -1; }, {"model_config"});
  refused([](json& m) { m["files"]["model-rank00000.safetensors"].erase("crc32c"); },
          {"files['model-rank00000.safetensors']", "'crc32c' is missing"});
  refused([](json& m) { m["files"]["model-rank00000.safetensors"]["bytes"] = -1; }, {"'bytes' has the wrong type"});
  refused([](json& m) { m["files"]["model-rank00000.safetensors"]["kind"] = 7; },
          {"files['model-rank00000.safetensors']", "'kind' has the wrong type"});
  refused([](json& m) { m["layout"] = "1x1x1"; }, {"layout", "expected an object"});
  refused([](json& m) { m["layout"]["tp"] = 0; }, {"layout", "'tp' is 0"});
  refused([](json& m) { m["saved_by"] = {{"dp", "2"}}; }, {"saved_by", "'dp'", "expected an integer"});
  refused([](json& m) { m["saved_by"] = {{"zero_stage", 3}}; }, {"saved_by", "'zero_stage' is 3"});
  refused([](json& m) { m["tensors"]["lm_head.weight"]["slice"][0][1] = 256; },
          {"tensors['lm_head.weight']", "slice of the tensor"});
  // Names that would reach outside the folder, or be the folder itself.
  for (const std::string name : {"../x", "a/b", "..", ".", ""}) {
    refused([&](json& m) { m["files"][name] = {{"bytes", 1}, {"crc32c", "00000000"}}; },
            {"file name '" + name + "' is not in the folder"});
  }
}

// A shape element that is not an integer was nlohmann's type_error from
// get<std::vector<int64_t>>(), an internal error instead of BadInput.
TEST(CheckpointManifest, ShapeElementsMustBeIntegers) {
  json m = training_manifest();
  m["tensors"]["lm_head.weight"]["shape"][0] = "512";
  EXPECT_BAD_INPUT(parse(m), "tensors['lm_head.weight']: shape[0]", "expected an integer");
  m["tensors"]["lm_head.weight"]["shape"][0] = 18446744073709551615u;
  EXPECT_BAD_INPUT(parse(m), "tensors['lm_head.weight']: shape[0]", "too large");
}

// Found by fuzz/fuzz_checkpoint_manifest (docs/fuzzing.md): a number too
// large for a double (1e605) is nlohmann's out_of_range, not parse_error, and
// escaped the reader as an internal error (exit 1) instead of BadInput.
TEST(CheckpointManifest, NumberTooLargeForADoubleIsBadInput) {
  EXPECT_BAD_INPUT(parse_checkpoint_manifest(read_file(kCorpus + "number-overflow.json"), "ckpt/manifest.json"),
                   "ckpt/manifest.json", "not valid JSON", "1e605");
}

}  // namespace
}  // namespace loom
