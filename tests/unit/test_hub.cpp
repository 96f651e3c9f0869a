// Hub export/import and loom checkpoints, from C++: round trips are exact,
// sharding splits by size, and broken folders are refused naming the file and
// tensor. The Python clients' view of the same files is in tests/interop.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "checkpoints/hf_config.h"
#include "checkpoints/hub.h"
#include "checkpoints/init_from.h"
#include "checkpoints/loom_checkpoint.h"
#include "checkpoints/regions.h"
#include "checkpoints/torch_tensors.h"
#include "tests/unit/bad_input.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using test_support::expect_bad_input;

class HubTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("loom_test_hub_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    config_.hidden_size = 32;
    config_.intermediate_size = 40;
    config_.num_layers = 2;
    config_.num_heads = 4;
    config_.num_kv_heads = 2;
    config_.vocab_size = 50;
    config_.max_seq_len = 32;
    config_.eos_token_id = 3;
    torch::manual_seed(11);
    model_ = std::make_shared<LlamaForCausalLM>(config_, factory_);
    model_->init_weights(11);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static void expect_same_parameters(const LlamaForCausalLM& a, const LlamaForCausalLM& b) {
    auto pb = b.named_parameters();
    ASSERT_EQ(a.named_parameters().size(), pb.size());
    for (const auto& p : a.named_parameters()) {
      ASSERT_TRUE(pb.contains(p.key())) << p.key();
      EXPECT_TRUE(at::equal(p.value(), pb[p.key()])) << p.key();
    }
  }

  fs::path dir_;
  ModelConfig config_;
  LocalLayerFactory factory_;
  std::shared_ptr<LlamaForCausalLM> model_;
};

TEST_F(HubTest, ExportThenLoadGivesTheSameParameters) {
  export_hub(*model_, path("hf"), {});
  EXPECT_TRUE(fs::exists(path("hf/model.safetensors")));
  EXPECT_FALSE(fs::exists(path("hf/model.safetensors.index.json")));
  for (const char* f : {"config.json", "generation_config.json", "README.md"}) EXPECT_TRUE(fs::exists(dir_ / "hf" / f)) << f;
  auto files = ModelFiles::open(path("hf"));
  EXPECT_EQ(files.kind(), ModelFiles::Kind::kHub);
  EXPECT_EQ(files.model_config().eos_token_id, 3);
  expect_same_parameters(*model_, *load_model(files));
  const std::string card = read_file(path("hf/README.md"));
  EXPECT_EQ(card.rfind("---\nlibrary_name: transformers\n", 0), 0u) << card;
}

TEST_F(HubTest, ShardedExportSplitsBySizeAndIndexesEveryTensor) {
  ExportOptions options;
  options.max_shard_bytes = 20'000;
  export_hub(*model_, path("hf"), options);
  auto index = nlohmann::json::parse(read_file(path("hf/model.safetensors.index.json")));
  const auto& weight_map = index.at("weight_map");
  EXPECT_EQ(weight_map.size(), model_->named_parameters().size());
  std::set<std::string> shards;
  for (const auto& [name, file] : weight_map.items()) shards.insert(file.get<std::string>());
  EXPECT_GT(shards.size(), 2u);
  uint64_t total = 0;
  for (const auto& p : model_->parameters()) total += p.nbytes();
  EXPECT_EQ(index.at("metadata").at("total_size").get<uint64_t>(), total);
  const std::string n = std::to_string(shards.size());
  EXPECT_TRUE(shards.count("model-00001-of-" + std::string(5 - n.size(), '0') + n + ".safetensors"));
  for (const auto& shard : shards) {
    // A shard exceeds the limit only when it holds a single larger tensor.
    auto file = safetensors::File::open(path("hf/" + shard));
    if (file.tensors().size() > 1) {
      EXPECT_LE(fs::file_size(path("hf/" + shard)), 20'000u + 4096u) << shard;
    }
  }
  expect_same_parameters(*model_, *load_model(ModelFiles::open(path("hf"))));
}

TEST_F(HubTest, Bfloat16ExportStoresRoundedWeights) {
  ExportOptions options;
  options.dtype = torch::kBFloat16;
  export_hub(*model_, path("hf"), options);
  auto files = ModelFiles::open(path("hf"));
  EXPECT_EQ(files.info("model.norm.weight").dtype, safetensors::Dtype::BF16);
  auto config = nlohmann::json::parse(read_file(path("hf/config.json")));
  EXPECT_EQ(config.at("torch_dtype"), "bfloat16");
  EXPECT_EQ(config.at("dtype"), "bfloat16");
  auto stored = files.read("model.layers.1.mlp.down_proj.weight");
  auto expected = model_->named_parameters()["model.layers.1.mlp.down_proj.weight"].to(torch::kBFloat16);
  EXPECT_TRUE(at::equal(stored, expected));
}

// loom export streams from the files in pieces; the result must be the
// in-memory export's, byte for byte, sharded or not, in any dtype.
TEST_F(HubTest, StreamingExportFromACheckpointEqualsTheInMemoryExport) {
  write_loom_checkpoint(*model_, path("ckpt"), {});
  const ModelFiles files = ModelFiles::open(path("ckpt"));
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const uint64_t shard_bytes : {uint64_t{5} << 30, uint64_t{20'000}}) {
      ExportOptions options;
      options.dtype = dtype;
      options.max_shard_bytes = shard_bytes;
      const std::string tag = std::string(dtype == torch::kFloat ? "f32" : "bf16") + std::to_string(shard_bytes);
      export_hub(*model_, path("memory-" + tag), options);
      const uint64_t largest = export_hub_streaming(files, path("stream-" + tag), options);
      EXPECT_EQ(largest, uint64_t{50} * 32 * 4);  // the [vocab, hidden] fp32 embedding
      std::set<std::string> names;
      for (const auto& entry : fs::directory_iterator(path("memory-" + tag))) names.insert(entry.path().filename());
      ASSERT_GT(names.size(), 3u);
      for (const auto& name : names) {
        EXPECT_EQ(read_file(path("stream-" + tag + "/" + name)), read_file(path("memory-" + tag + "/" + name)))
            << tag << " " << name;
      }
    }
  }
}

// loom init writes, a tensor at a time, what a run starts from.
TEST_F(HubTest, InitializedCheckpointHoldsTheSeededInitialization) {
  write_initialized_checkpoint(config_, 11, torch::kFloat, path("init"));
  expect_same_parameters(*model_, *load_model(ModelFiles::open(path("init"))));  // model_: seed 11, init_weights
  write_initialized_checkpoint(config_, 12, torch::kFloat, path("other-seed"));
  const auto other = load_model(ModelFiles::open(path("other-seed")));
  EXPECT_FALSE(at::equal(other->named_parameters()["model.embed_tokens.weight"],
                         model_->named_parameters()["model.embed_tokens.weight"]));
}

TEST_F(HubTest, ExportRefusesAnExistingFolderAndLeavesNoTemporaryBehind) {
  fs::create_directories(path("hf"));
  expect_bad_input([&] { export_hub(*model_, path("hf"), {}); }, {"hf", "already exists"});
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
  }
}

TEST_F(HubTest, LoomCheckpointRoundTripsAndRecordsChecksums) {
  CheckpointWriteOptions options;
  options.step = 42;
  write_loom_checkpoint(*model_, path("ckpt"), options);
  auto files = ModelFiles::open(path("ckpt"));
  EXPECT_EQ(files.kind(), ModelFiles::Kind::kLoomCheckpoint);
  EXPECT_EQ(files.step(), 42);
  expect_same_parameters(*model_, *load_model(files));
  auto manifest = nlohmann::json::parse(read_file(path("ckpt/manifest.json")));
  EXPECT_EQ(manifest.at("tensors").size(), model_->named_parameters().size());
  EXPECT_EQ(manifest.at("files").begin().value().at("crc32c").get<std::string>().size(), 8u);
}

TEST_F(HubTest, CorruptCheckpointFileIsNamedByItsChecksum) {
  write_loom_checkpoint(*model_, path("ckpt"), {});
  const std::string file = path("ckpt/model-rank00000.safetensors");
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(file) - 10));
    f.put('\x7f');
  }
  // Opening checks sizes and headers; the bytes are checked as they are read
  // (chunk by chunk), or all at once by verify_checkpoint_files.
  const ModelFiles files = ModelFiles::open(path("ckpt"));
  expect_bad_input([&] { load_model(files); }, {"model-rank00000.safetensors", "CRC32C", "corrupt"});
  const std::vector<std::string> failures = verify_checkpoint_files(path("ckpt"));
  ASSERT_EQ(failures.size(), 1u);
  EXPECT_NE(failures[0].find("model-rank00000.safetensors: CRC32C"), std::string::npos) << failures[0];
}

// Version 1 (every tensor whole in model-rank00000.safetensors, the manifest
// naming a slice per tensor and verifying whole files) still loads.
TEST_F(HubTest, VersionOneCheckpointsStillLoad) {
  CheckpointWriteOptions options;
  options.step = 3;
  write_loom_checkpoint(*model_, path("ckpt"), options);
  auto manifest = nlohmann::json::parse(read_file(path("ckpt/manifest.json")));
  nlohmann::json tensors = nlohmann::json::object();
  for (const auto& [name, tensor] : manifest.at("tensors").items()) {
    nlohmann::json slice = nlohmann::json::array();
    for (const auto& d : tensor.at("shape")) slice.push_back({0, d});
    tensors[name] = {{"dtype", tensor.at("dtype")}, {"shape", tensor.at("shape")},
                     {"file", "model-rank00000.safetensors"}, {"slice", slice}};
  }
  manifest["version"] = 1;
  manifest["tensors"] = tensors;
  manifest.erase("crc_chunk_bytes");
  write_file_atomic(path("ckpt/manifest.json"), manifest.dump(2));
  const ModelFiles files = ModelFiles::open(path("ckpt"));
  EXPECT_EQ(files.manifest()->version, 1);
  expect_same_parameters(*model_, *load_model(files));
  // Version 1 files are checked whole when opened.
  const std::string file = path("ckpt/model-rank00000.safetensors");
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(file) - 10));
    f.put('\x7f');
  }
  expect_bad_input([&] { ModelFiles::open(path("ckpt")); }, {"model-rank00000.safetensors", "CRC32C"});
}

// Pieces written by "ranks" of one layout read back on others: a [12, 8]
// tensor cut along dim 1 by two ranks, and along dim 0 by three ranks into
// flat ranges (ZeRO-style), read as whole tensors, tp slices along either
// dim, and flat ranges.
TEST_F(HubTest, PiecesOfOneLayoutReadBackOnAnother) {
  const torch::Tensor w = torch::arange(96, torch::kFloat).reshape({12, 8});
  const torch::Tensor v = torch::arange(96, torch::kFloat).reshape({12, 8}).mul(-1);
  const std::vector<int64_t> shape = {12, 8};
  const std::string tmp = path("pieces.tmp");
  fs::create_directories(tmp);
  std::vector<std::string> written;
  for (int64_t rank = 0; rank < 3; ++rank) {
    std::vector<PieceToWrite> model, optimizer;
    if (rank < 2) {
      const Region region = Region::chunk(shape, 1, rank, 2);
      model.push_back({"w", torch::kFloat, shape, region, [=] { return w.narrow(1, rank * 4, 4).contiguous(); }});
    }
    Region flat = Region::whole(shape);
    flat.flat = Range{rank * 32, rank * 32 + 32};
    optimizer.push_back({"v", torch::kFloat, shape, flat, [=] { return v.reshape({-1}).narrow(0, rank * 32, 32).clone(); }});
    written.push_back(write_rank_files(tmp, rank, model, optimizer));
  }
  ModelConfig config = model_->config();
  commit_checkpoint_folder(config, written, tmp, path("pieces"), {});
  const ModelFiles files = ModelFiles::open(path("pieces"));
  for (const auto& [name, full] : {std::pair{"w", w}, std::pair{"v", v}}) {
    EXPECT_TRUE(torch::equal(files.read(name), full)) << name;
    for (int64_t dim : {0, 1}) {
      for (int64_t part = 0; part < 4; ++part) {
        torch::Tensor out = torch::empty({dim == 0 ? 3 : 12, dim == 0 ? 8 : 2});
        files.read_region(name, Region::chunk(shape, dim, part, 4), out);
        EXPECT_TRUE(torch::equal(out, full.narrow(dim, part * (dim == 0 ? 3 : 2), dim == 0 ? 3 : 2))) << name;
      }
    }
    Region flat = Region::chunk(shape, 1, 1, 2);  // a ZeRO range of a tp slice
    flat.flat = Range{5, 29};
    torch::Tensor out = torch::empty({24}, torch::kBFloat16);  // converted on the way
    files.read_region(name, flat, out);
    EXPECT_TRUE(torch::equal(out, full.narrow(1, 4, 4).reshape({-1}).narrow(0, 5, 24).to(torch::kBFloat16))) << name;
  }
}

TEST_F(HubTest, TruncatedCheckpointFileIsNamedBySize) {
  write_loom_checkpoint(*model_, path("ckpt"), {});
  const std::string file = path("ckpt/model-rank00000.safetensors");
  fs::resize_file(file, fs::file_size(file) - 100);
  expect_bad_input([&] { ModelFiles::open(path("ckpt")); }, {"model-rank00000.safetensors", "truncated"});
}

TEST_F(HubTest, MissingTensorIsNamed) {
  export_hub(*model_, path("hf"), {});
  // Rewrite the weights without one tensor.
  auto files = ModelFiles::open(path("hf"));
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorToWrite> tensors;
  for (const auto& name : files.tensor_names()) {
    if (name == "model.layers.1.self_attn.v_proj.weight") continue;
    keep.push_back(files.read(name));
    tensors.push_back(tensor_to_write(name, keep.back()));
  }
  safetensors::write_file(path("hf/model.safetensors"), tensors);
  expect_bad_input([&] { load_model(ModelFiles::open(path("hf"))); },
                   {"model.layers.1.self_attn.v_proj.weight", "missing"});
}

TEST_F(HubTest, WrongShapeForTheConfigIsNamed) {
  export_hub(*model_, path("hf"), {});
  auto config = nlohmann::json::parse(read_file(path("hf/config.json")));
  config["intermediate_size"] = 48;
  write_file_atomic(path("hf/config.json"), config.dump());
  expect_bad_input([&] { load_model(ModelFiles::open(path("hf"))); },
                   {"model.safetensors", "mlp.gate_proj.weight", "[40, 32]", "[48, 32]"});
}

TEST_F(HubTest, UnexpectedTensorIsNamed) {
  export_hub(*model_, path("hf"), {});
  auto files = ModelFiles::open(path("hf"));
  std::vector<torch::Tensor> keep;
  std::vector<safetensors::TensorToWrite> tensors;
  for (const auto& name : files.tensor_names()) {
    keep.push_back(files.read(name));
    tensors.push_back(tensor_to_write(name, keep.back()));
  }
  auto extra = torch::zeros({3});
  tensors.push_back(tensor_to_write("model.layers.9.mlp.up_proj.weight", extra));
  safetensors::write_file(path("hf/model.safetensors"), tensors);
  expect_bad_input([&] { load_model(ModelFiles::open(path("hf"))); }, {"model.layers.9.mlp.up_proj.weight"});
}

TEST_F(HubTest, Phi3ProjectionsAreFusedInTheHubFilesAndSplitInTheModel) {
  ModelConfig phi3 = config_;
  phi3.architecture = "phi3";
  LlamaForCausalLM model(phi3, factory_);
  model.init_weights(5);
  export_hub(model, path("hf"), {});
  const auto file = safetensors::File::open(path("hf/model.safetensors"));
  std::set<std::string> stored;
  for (const auto& info : file.tensors()) stored.insert(info.name);
  EXPECT_TRUE(stored.count("model.layers.1.self_attn.qkv_proj.weight"));
  EXPECT_TRUE(stored.count("model.layers.1.mlp.gate_up_proj.weight"));
  EXPECT_FALSE(stored.count("model.layers.1.self_attn.k_proj.weight"));
  EXPECT_FALSE(stored.count("model.layers.1.mlp.up_proj.weight"));
  // q rows, then k, then v: the fused tensor read back whole.
  const auto files = ModelFiles::open(path("hf"));
  expect_same_parameters(model, *load_model(files));
  // A fused tensor of another shape is named.
  const auto config = nlohmann::json::parse(read_file(path("hf/config.json")));
  auto wrong = config;
  wrong["num_key_value_heads"] = 4;
  write_file_atomic(path("hf/config.json"), wrong.dump());
  expect_bad_input([&] { ModelFiles::open(path("hf")); }, {"qkv_proj.weight", "[64, 32]", "[96, 32]"});
}

TEST_F(HubTest, UnsupportedArchitectureIsRefusedNamingTheField) {
  export_hub(*model_, path("hf"), {});
  auto config = nlohmann::json::parse(read_file(path("hf/config.json")));
  config["model_type"] = "gpt2";
  write_file_atomic(path("hf/config.json"), config.dump());
  expect_bad_input([&] { ModelFiles::open(path("hf")); }, {"config.json", "model_type", "gpt2"});
}

TEST_F(HubTest, InitFromLoadsTheFolderAndRefusesADisagreeingShape) {
  export_hub(*model_, path("hf"), {});
  Config config;
  config.model.init_from = path("hf");
  auto loaded = build_initial_model(config, factory_);
  expect_same_parameters(*model_, *loaded);
  EXPECT_EQ(config.model.hidden_size, 32);

  Config wrong;
  wrong.model.init_from = path("hf");
  wrong.model.hidden_size = 64;
  expect_bad_input([&] { build_initial_model(wrong, factory_); }, {"model.hidden_size", "64", "32"});
}

// A small config.json of `model_type` with `extra` merged in.
nlohmann::json hf_config(const std::string& model_type, const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json hf = {{"model_type", model_type}, {"hidden_size", 32},       {"intermediate_size", 48},
                       {"num_hidden_layers", 4},   {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                       {"vocab_size", 64}};
  hf.update(extra);
  return hf;
}

TEST(HfConfig, EachFamilysOptionsRoundTripThroughConfigJson) {
  const std::vector<nlohmann::json> configs = {
      hf_config("qwen3", {{"head_dim", 24}, {"attention_bias", true}}),
      hf_config("olmo2"),
      hf_config("smollm3", {{"no_rope_layers", {1, 0, 1, 0}}, {"mlp_bias", true}}),
      hf_config("mistral", {{"sliding_window", 16}}),
      hf_config("qwen2", {{"use_sliding_window", true}, {"sliding_window", 8}, {"max_window_layers", 2}}),
      hf_config("qwen3", {{"use_sliding_window", true}, {"sliding_window", 8},
                          {"layer_types", {"sliding_attention", "full_attention", "sliding_attention", "full_attention"}}}),
      hf_config("gemma", {{"hidden_act", "gelu"}}),
      hf_config("gemma2", {{"sliding_window", 16}, {"attn_logit_softcapping", 50.0}, {"final_logit_softcapping", 30.0},
                           {"query_pre_attn_scalar", 12}}),
      hf_config("gemma3_text",
                {{"sliding_window", 16},
                 {"rope_parameters", {{"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1e6}}},
                                      {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 1e4}}}}}}),
  };
  for (const auto& hf : configs) {
    const ModelConfig m = model_config_from_hf(hf, "config.json");
    const ModelConfig back = model_config_from_hf(nlohmann::json::parse(model_config_to_hf(m, "float32").dump()), "x");
    EXPECT_EQ(back.architecture, m.architecture) << hf.dump();
    EXPECT_EQ(back.head_size(), m.head_size()) << hf.dump();
    EXPECT_EQ(back.attention_bias, m.attention_bias) << hf.dump();
    EXPECT_EQ(back.mlp_bias, m.mlp_bias) << hf.dump();
    EXPECT_EQ(back.nope_layers, m.nope_layers) << hf.dump();
    EXPECT_EQ(back.sliding_window, m.sliding_window) << hf.dump();
    for (int64_t layer = 0; layer < m.num_layers; ++layer) EXPECT_EQ(back.window_of(layer), m.window_of(layer));
    EXPECT_EQ(back.activation(), m.activation()) << hf.dump();
    EXPECT_EQ(back.tie_embeddings, m.tie_embeddings) << hf.dump();
    EXPECT_EQ(back.attn_logit_softcapping, m.attn_logit_softcapping) << hf.dump();
    EXPECT_EQ(back.final_logit_softcapping, m.final_logit_softcapping) << hf.dump();
    EXPECT_EQ(back.query_pre_attn_scalar, m.query_pre_attn_scalar) << hf.dump();
    EXPECT_EQ(back.rope_local_theta, m.rope_local_theta) << hf.dump();
    EXPECT_EQ(back.rope_theta, m.rope_theta) << hf.dump();
    EXPECT_EQ(back.rope_scaling.type, m.rope_scaling.type) << hf.dump();
  }
  // Gemma: tied and GeGLU unless said otherwise; Gemma 2 alternates windows
  // from layer 0, Gemma 3 keeps every sixth layer global and its global
  // rope scaled.
  const ModelConfig gemma = model_config_from_hf(hf_config("gemma"), "c");
  EXPECT_TRUE(gemma.tie_embeddings);
  EXPECT_EQ(gemma.activation(), "gelu_pytorch_tanh");
  const ModelConfig gemma2 = model_config_from_hf(configs[7], "c");
  EXPECT_EQ(std::vector<int64_t>({gemma2.window_of(0), gemma2.window_of(1), gemma2.window_of(2)}),
            (std::vector<int64_t>{16, 0, 16}));
  const ModelConfig gemma3 = model_config_from_hf(configs[8], "c");
  EXPECT_EQ(gemma3.rope_local_theta, 1e4);
  EXPECT_EQ(gemma3.rope_scaling.type, "linear");
  EXPECT_TRUE(gemma3.uses_local_rotary(0));
  EXPECT_EQ(gemma3.qk_norm(), QkNorm::kPerHead);
  EXPECT_EQ(model_config_to_hf(gemma3, "float32")["architectures"][0], "Gemma3ForCausalLM");
  EXPECT_EQ(model_config_from_hf(configs[2], "c").nope_layers, (std::vector<int64_t>{1, 3}));
  // SmolLM3 without the list: every 4th layer, as transformers fills it in.
  EXPECT_EQ(model_config_from_hf(hf_config("smollm3"), "c").nope_layers, (std::vector<int64_t>{3}));
  const ModelConfig qwen2 = model_config_from_hf(configs[4], "c");  // layers from max_window_layers on
  EXPECT_EQ(std::vector<int64_t>({qwen2.window_of(0), qwen2.window_of(1), qwen2.window_of(2), qwen2.window_of(3)}),
            (std::vector<int64_t>{0, 0, 8, 8}));
  const ModelConfig mistral = model_config_from_hf(configs[3], "c");
  EXPECT_EQ(mistral.window_of(3), 16);
  EXPECT_EQ(model_config_to_hf(mistral, "float32")["architectures"][0], "MistralForCausalLM");
  // Without a window Mistral is Llama, as before.
  EXPECT_EQ(model_config_from_hf(hf_config("mistral", {{"sliding_window", nullptr}}), "c").architecture, "llama");
  // Qwen2's window is off unless use_sliding_window says so.
  EXPECT_EQ(model_config_from_hf(hf_config("qwen2", {{"sliding_window", 8}}), "c").sliding_window, 0);
  // RoPE scalings keep their parameters through the export.
  const ModelConfig yarn = model_config_from_hf(
      hf_config("llama", {{"max_position_embeddings", 64},
                          {"rope_scaling", {{"rope_type", "yarn"}, {"original_max_position_embeddings", 16},
                                            {"beta_fast", 8.0}, {"mscale", 0.7}, {"mscale_all_dim", 0.9}}}}),
      "c");
  EXPECT_EQ(yarn.rope_scaling.factor, 4.0);  // absent: max_position_embeddings / the original context
  const ModelConfig yarn_back = model_config_from_hf(nlohmann::json::parse(model_config_to_hf(yarn, "float32").dump()), "x");
  EXPECT_EQ(yarn_back.rope_scaling.beta_fast, 8.0);
  EXPECT_EQ(yarn_back.rope_scaling.beta_slow, 1.0);
  EXPECT_EQ(yarn_back.rope_scaling.mscale_all_dim, 0.9);
  EXPECT_EQ(yarn_back.rope_scaling.original_max_position_embeddings, 16);
  const ModelConfig su = model_config_from_hf(
      hf_config("llama", {{"original_max_position_embeddings", 8},
                          {"rope_scaling", {{"type", "su"}, {"short_factor", {1, 1, 1, 1}}, {"long_factor", {1, 2, 3, 4}}}}}),
      "c");
  EXPECT_EQ(su.rope_scaling.type, "longrope");
  EXPECT_EQ(su.rope_scaling.original_max_position_embeddings, 8);  // Phi-3 keeps it at the top level
  EXPECT_EQ(su.rope_scaling.long_factor, (std::vector<double>{1, 2, 3, 4}));
}

TEST(HfConfig, WhatLoomCannotRunIsRefusedNamingTheKey) {
  expect_bad_input([] { model_config_from_hf(hf_config("glm"), "c.json"); }, {"c.json", "model_type", "glm"});
  expect_bad_input([] { model_config_from_hf(hf_config("phimoe"), "c.json"); }, {"model_type", "phimoe"});
  expect_bad_input([] { model_config_from_hf(hf_config("gemma3"), "c.json"); }, {"model_type", "gemma3_text"});
  expect_bad_input([] { model_config_from_hf(hf_config("phi3", {{"partial_rotary_factor", 0.75}}), "c.json"); },
                   {"partial_rotary_factor", "0.75"});
  expect_bad_input([] { model_config_from_hf(hf_config("gemma2", {{"hidden_activation", "relu"}}), "c"); },
                   {"hidden_activation", "relu"});
  expect_bad_input([] { model_config_from_hf(hf_config("gemma", {{"use_bidirectional_attention", true}}), "c"); },
                   {"use_bidirectional_attention"});
  expect_bad_input([] { model_config_from_hf(hf_config("llama", {{"hidden_act", "gelu"}}), "c.json"); },
                   {"hidden_act", "gelu"});
  expect_bad_input(
      [] { model_config_from_hf(hf_config("llama", {{"rope_scaling", {{"rope_type", "mrope"}, {"factor", 4.0}}}}), "c"); },
      {"rope_type", "mrope"});
  expect_bad_input(
      [] {
        model_config_from_hf(hf_config("llama", {{"rope_parameters", {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}}}}),
                             "c");
      },
      {"partial_rotary_factor", "0.5"});
  // head_dim 8: longrope needs 4 divisors in each list.
  expect_bad_input(
      [] {
        model_config_from_hf(hf_config("llama", {{"rope_scaling", {{"rope_type", "longrope"},
                                                                    {"short_factor", {1.0, 1.0, 1.0, 1.0}},
                                                                    {"long_factor", {1.0, 2.0}}}}}),
                             "c");
      },
      {"long_factor", "4"});
  expect_bad_input([] { model_config_from_hf(hf_config("smollm3", {{"no_rope_layers", {1, 0}}}), "c.json"); },
                   {"no_rope_layers"});
  expect_bad_input([] { model_config_from_hf(hf_config("mistral", {{"layer_types", {"full_attention"}}}), "c"); },
                   {"layer_types"});
  expect_bad_input(
      [] {
        model_config_from_hf(hf_config("qwen2", {{"use_sliding_window", true}, {"sliding_window", 8},
                                                  {"layer_types", {"sliding_attention", "chunked_attention",
                                                                   "full_attention", "full_attention"}}}),
                             "c");
      },
      {"layer_types", "chunked_attention"});
}

TEST(ByteSize, ParsesUnitsAndRefusesNonsense) {
  EXPECT_EQ(parse_byte_size("123", "x"), 123u);
  EXPECT_EQ(parse_byte_size("5GB", "x"), 5'000'000'000u);
  EXPECT_EQ(parse_byte_size("2GiB", "x"), 2ull << 30);
  EXPECT_EQ(parse_byte_size("500mb", "x"), 500'000'000u);
  EXPECT_THROW(parse_byte_size("", "x"), BadInput);
  EXPECT_THROW(parse_byte_size("GB", "x"), BadInput);
  EXPECT_THROW(parse_byte_size("12XB", "x"), BadInput);
  EXPECT_THROW(parse_byte_size("0", "x"), BadInput);
}

}  // namespace
}  // namespace loom
