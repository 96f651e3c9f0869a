// The checkpoint manifest parser (checkpoints/checkpoint_manifest.h), without
// libtorch: what it accepts from a manifest loom wrote, and how it refuses
// damaged ones. Opening whole checkpoint folders is tested in test_hub.
#include "checkpoints/checkpoint_manifest.h"

#include <gtest/gtest.h>

#include <functional>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/unit/bad_input.h"
#include "tests/unit/source_dir.h"
#include "util/file_io.h"

namespace loom {
namespace {

using nlohmann::json;

#define EXPECT_BAD_INPUT(statement, ...) test_support::expect_bad_input([&] { statement; }, {__VA_ARGS__})

const std::string kCorpus = loom_source_dir() + "/fuzz/corpus/fuzz_checkpoint_manifest/";

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
    if (t.name == "lm_head.weight") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{512, 64}));
    }
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
  refused([](json& m) { m["version"] = 3; }, {"format version 3"});
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
  refused([](json& m) { m["saved_by"] = {{"zero_stage", 4}}; }, {"saved_by", "'zero_stage' is 4"});
  refused([](json& m) { m["tensors"]["lm_head.weight"]["slice"][0][1] = 256; },
          {"tensors['lm_head.weight']", "whole tensors only"});
  // Names that would reach outside the folder, or be the folder itself.
  for (const std::string name : {"../x", "a/b", "..", ".", ""}) {
    refused([&](json& m) { m["files"][name] = {{"bytes", 1}, {"crc32c", "00000000"}}; },
            {"file name '" + name + "' is not in the folder"});
  }
}

// A version 2 manifest as a tp 2 run writes it: a [4, 6] weight cut along
// dim 1 into two ranks' files, and its AdamW state cut by ZeRO-1 into flat
// ranges of those slices.
json sharded_manifest() {
  json m = training_manifest();
  m["version"] = 2;
  m["files"] = {{"model-rank00000.safetensors", {{"bytes", 100}, {"crc32c", "00000001"}, {"kind", "model"}}},
                {"model-rank00001.safetensors", {{"bytes", 100}, {"crc32c", "00000002"}, {"kind", "model"}}},
                {"optimizer-rank00001.safetensors", {{"bytes", 100}, {"crc32c", "00000003"}, {"kind", "optimizer"}}}};
  const auto piece = [](const char* file, json box, int64_t bytes) {
    json crcs = json::array();
    for (int64_t at = 0; at < bytes; at += kCrcChunkBytes) crcs.push_back("0000abcd");
    return json{{"file", file}, {"key", "w"}, {"box", box}, {"crc32c", crcs}};
  };
  m["tensors"] = json::object();
  m["tensors"]["w"] = {{"dtype", "F32"}, {"shape", {4, 6}},
                       {"pieces", {piece("model-rank00000.safetensors", {{0, 4}, {0, 3}}, 48),
                                   piece("model-rank00001.safetensors", {{0, 4}, {3, 6}}, 48)}}};
  json flat_a = piece("optimizer-rank00001.safetensors", {{0, 4}, {0, 6}}, 40);
  flat_a["key"] = "optimizer.exp_avg.w";
  flat_a["flat"] = {0, 10};
  json flat_b = flat_a;
  flat_b["flat"] = {10, 24};
  flat_b["crc32c"] = {"00000000"};
  m["tensors"]["optimizer.exp_avg.w"] = {{"dtype", "F32"}, {"shape", {4, 6}}, {"pieces", {flat_a, flat_b}}};
  return m;
}

TEST(CheckpointManifest, ReadsPiecesOfASharedCheckpoint) {
  const CheckpointManifest m = parse(sharded_manifest());
  EXPECT_EQ(m.version, 2);
  ASSERT_EQ(m.tensors.size(), 2u);
  const auto named = [&](const std::string& name) -> const ManifestTensor& {
    for (const ManifestTensor& t : m.tensors) {
      if (t.name == name) return t;
    }
    throw std::out_of_range(name);
  };
  const ManifestTensor& w = named("w");
  EXPECT_EQ(w.dtype, "F32");
  EXPECT_TRUE(w.is_model);
  ASSERT_EQ(w.pieces.size(), 2u);
  EXPECT_EQ(w.pieces[1].file, "model-rank00001.safetensors");
  EXPECT_EQ(w.pieces[1].region.box, (std::vector<Range>{{0, 4}, {3, 6}}));
  EXPECT_EQ(w.pieces[1].chunk_crc32c, (std::vector<uint32_t>{0xabcd}));
  const ManifestTensor& state = named("optimizer.exp_avg.w");
  EXPECT_FALSE(state.is_model);
  EXPECT_EQ(state.pieces[1].region.flat, (Range{10, 24}));
}

TEST(CheckpointManifest, RefusesPiecesThatDoNotHoldTheTensorOnce) {
  const json original = sharded_manifest();
  const auto refused = [&](const std::function<void(json&)>& edit, const std::vector<std::string>& fragments) {
    json m = original;
    edit(m);
    test_support::expect_bad_input([&] { parse(m); }, fragments);
  };
  refused([](json& m) { m["tensors"]["w"]["pieces"].erase(1); }, {"tensors['w']", "hold 12", "has 24"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][1]["box"][1] = {3, 7}; }, {"pieces[1]: box[1]", "outside"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][1]["box"] = {{0, 4}}; }, {"pieces[1]", "another rank"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][0]["file"] = "other.safetensors"; },
          {"pieces[0]", "'other.safetensors' is not in 'files'"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][0]["crc32c"] = json::array(); }, {"pieces[0]", "0 checksums"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][0]["crc32c"] = {"xyz"}; }, {"pieces[0]", "hex"});
  refused([](json& m) { m["tensors"]["optimizer.exp_avg.w"]["pieces"][1]["flat"] = {10, 25}; },
          {"pieces[1]", "'flat' outside the box"});
  refused([](json& m) { m["tensors"]["w"]["pieces"][1]["file"] = "optimizer-rank00001.safetensors"; },
          {"pieces[1]", "another kind"});
  refused([](json& m) { m["tensors"]["w"]["dtype"] = "U8"; }, {"tensors['w']", "dtype 'U8'"});
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
