// The counter-based initialization (model/init_rng.h, model/init.h): Philox
// against its published answers and torch's engine, and that any box of a
// tensor holds exactly the whole tensor's values there, with the
// distribution and independence an initializer needs.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/utils.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "model/init.h"
#include "model/init_rng.h"
#include "model/llama.h"

namespace loom {
namespace {

constexpr uint64_t kSeed = 1234;
constexpr double kStd = 0.02;

at::Tensor whole(const std::string& name, std::vector<int64_t> shape, uint64_t seed = kSeed, double std = kStd) {
  at::Tensor t = at::empty(shape);
  init_parameter(name, t, std, seed);
  return t;
}

at::Tensor box(const std::string& name, std::vector<int64_t> global, std::vector<int64_t> start,
               std::vector<int64_t> size) {
  at::Tensor t = at::empty(size);
  init_parameter_box(name, t, global, start, kStd, kSeed);
  return t;
}

// The known-answer vectors of Random123 (kat_vectors, philox4x32 with 10
// rounds): counter, key, expected output.
TEST(Philox, MatchesTheKnownAnswersOfRandom123) {
  struct Kat {
    PhiloxCounter counter;
    PhiloxKey key;
    PhiloxCounter expected;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& kat : kats) EXPECT_EQ(philox4x32_10(kat.counter, kat.key), kat.expected);
}

// Block b of a name's stream is torch's Philox engine keyed by the seed, on
// the subsequence of the name's hash, at offset b.
TEST(Philox, BlockOfANamesStreamIsTorchsEngineAtThatOffset) {
  const uint64_t hash = fnv1a_64("model.layers.0.mlp.up_proj.weight");
  for (const uint64_t block : {uint64_t{0}, uint64_t{1}, uint64_t{77}, (uint64_t{1} << 32) + 5}) {
    at::Philox4_32 engine(kSeed, hash, block);
    const PhiloxCounter ours = philox4x32_10(
        {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(hash),
         static_cast<uint32_t>(hash >> 32)},
        {static_cast<uint32_t>(kSeed), static_cast<uint32_t>(kSeed >> 32)});
    for (int word = 0; word < 4; ++word) EXPECT_EQ(ours[word], engine()) << "block " << block << " word " << word;
  }
}

TEST(Fnv1a, MatchesTheReferenceHashes) {
  EXPECT_EQ(fnv1a_64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a_64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a_64("foobar"), 0x85944171f73967e8ull);
}

TEST(NormalInitStream, AnyRunOfElementsHoldsEachElementsOwnValue) {
  const NormalInitStream stream(kSeed, "w", kStd);
  for (const uint64_t first : {0, 1, 2, 3, 4, 5, 13}) {
    for (const int64_t count : {1, 2, 3, 4, 5, 9, 31}) {
      std::vector<float> out(count);
      stream.fill(out.data(), first, count);
      for (int64_t k = 0; k < count; ++k) {
        EXPECT_EQ(out[k], stream.at(first + k)) << "first " << first << " count " << count << " k " << k;
      }
    }
  }
}

TEST(InitParameterBox, ABoxAlongDim0HoldsTheWholeTensorsValues) {
  const std::string name = "model.layers.1.self_attn.q_proj.weight";
  const at::Tensor full = whole(name, {12, 10});
  for (int64_t rank = 0; rank < 4; ++rank) {  // tp 4's column shards
    EXPECT_TRUE(at::equal(box(name, {12, 10}, {3 * rank, 0}, {3, 10}), full.narrow(0, 3 * rank, 3))) << rank;
  }
  EXPECT_TRUE(at::equal(box(name, {12, 10}, {5, 0}, {1, 10}), full.narrow(0, 5, 1)));  // an odd start
}

TEST(InitParameterBox, ABoxAlongDim1HoldsTheWholeTensorsValues) {
  const std::string name = "model.layers.1.self_attn.o_proj.weight";
  const at::Tensor full = whole(name, {9, 14});
  for (int64_t rank = 0; rank < 2; ++rank) {  // tp 2's row shards
    EXPECT_TRUE(at::equal(box(name, {9, 14}, {0, 7 * rank}, {9, 7}), full.narrow(1, 7 * rank, 7))) << rank;
  }
  // Both dims cut, and starts that are not multiples of Philox's four values.
  EXPECT_TRUE(at::equal(box(name, {9, 14}, {2, 3}, {5, 9}), full.narrow(0, 2, 5).narrow(1, 3, 9)));
}

TEST(InitParameterBox, BoxesOfOneAndThreeDimsHoldTheWholeTensorsValues) {
  const at::Tensor full1 = whole("v", {37});
  EXPECT_TRUE(at::equal(box("v", {37}, {11}, {19}), full1.narrow(0, 11, 19)));
  const at::Tensor full3 = whole("t", {4, 6, 10});
  EXPECT_TRUE(at::equal(box("t", {4, 6, 10}, {1, 2, 0}, {2, 3, 10}), full3.slice(0, 1, 3).slice(1, 2, 5)));
  EXPECT_TRUE(at::equal(box("t", {4, 6, 10}, {1, 0, 0}, {3, 6, 10}), full3.slice(0, 1, 4)));
  EXPECT_TRUE(at::equal(box("t", {4, 6, 10}, {0, 0, 4}, {4, 6, 5}), full3.slice(2, 4, 9)));
}

TEST(InitParameterBox, ValuesDoNotDependOnTheNumberOfThreads) {
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const at::Tensor one = whole("model.embed_tokens.weight", {300, 700});
  at::set_num_threads(4);
  const at::Tensor four = whole("model.embed_tokens.weight", {300, 700});
  const at::Tensor four_box = box("model.embed_tokens.weight", {300, 700}, {0, 350}, {300, 350});
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, four));
  EXPECT_TRUE(at::equal(four_box, one.narrow(1, 350, 350)));
}

TEST(InitParameterBox, ValuesAreNormalWithMeanZeroAndTheInitStd) {
  const at::Tensor values = whole("model.layers.0.mlp.gate_proj.weight", {1000, 1000}).to(at::kDouble);
  const double n = 1e6;
  EXPECT_NEAR(values.mean().item<double>(), 0.0, 5 * kStd / std::sqrt(n));
  EXPECT_NEAR(values.std().item<double>(), kStd, 0.005 * kStd);
  // A normal's shape, not only its moments: 68.27% within one std, 95.45% within two.
  EXPECT_NEAR((values.abs() < kStd).to(at::kDouble).mean().item<double>(), 0.6827, 0.002);
  EXPECT_NEAR((values.abs() < 2 * kStd).to(at::kDouble).mean().item<double>(), 0.9545, 0.001);
}

TEST(InitParameterBox, OtherNamesAndOtherSeedsGiveUncorrelatedValues) {
  const std::vector<int64_t> shape{500, 200};
  const at::Tensor base = whole("model.layers.0.mlp.up_proj.weight", shape);
  const at::Tensor other_name = whole("model.layers.1.mlp.up_proj.weight", shape);
  const at::Tensor other_seed = whole("model.layers.0.mlp.up_proj.weight", shape, kSeed + 1);
  for (const at::Tensor& other : {other_name, other_seed}) {
    EXPECT_FALSE(at::equal(base, other));
    const double correlation = at::corrcoef(at::stack({base.flatten(), other.flatten()}))[0][1].item<double>();
    EXPECT_LT(std::abs(correlation), 0.01);
  }
  EXPECT_TRUE(at::equal(base, whole("model.layers.0.mlp.up_proj.weight", shape)));  // and the same, the same
  // init_std scales the same draws.
  EXPECT_TRUE(at::allclose(whole("model.layers.0.mlp.up_proj.weight", shape, kSeed, 0.5), base * 25.0, 1e-6, 0));
}

TEST(InitParameterBox, NormWeightsAreOneAndBiasesZero) {
  EXPECT_TRUE(at::equal(whole("model.layers.3.input_layernorm.weight", {16}), at::ones({16})));
  EXPECT_TRUE(at::equal(whole("model.norm.weight", {16}), at::ones({16})));
  EXPECT_TRUE(at::equal(box("model.layers.0.self_attn.q_proj.bias", {16}, {8}, {8}), at::zeros({8})));
}

TEST(InitParameterBox, OtherDtypesAndStridedBoxesGetTheFp32Values) {
  const std::string name = "lm_head.weight";
  const at::Tensor full = whole(name, {8, 6});
  at::Tensor bf16 = at::empty({8, 3}, at::kBFloat16);
  init_parameter_box(name, bf16, {8, 6}, {0, 3}, kStd, kSeed);
  EXPECT_TRUE(at::equal(bf16, full.narrow(1, 3, 3).to(at::kBFloat16)));
  at::Tensor storage = at::zeros({6, 8});
  at::Tensor transposed = storage.t();  // [8, 6], not contiguous
  init_parameter(name, transposed, kStd, kSeed);
  EXPECT_TRUE(at::equal(transposed, full));
}

TEST(InitParameterBox, ABoxOutsideItsShapeIsRefusedNamingTheTensor) {
  at::Tensor t = at::empty({4, 5});
  try {
    init_parameter_box("model.embed_tokens.weight", t, {8, 8}, {0, 4}, kStd, kSeed);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("model.embed_tokens.weight"), std::string::npos) << e.what();
  }
  EXPECT_THROW(init_parameter_box("w", t, {8}, {0}, kStd, kSeed), std::invalid_argument);  // dims differ
}

ModelConfig small_model() {
  ModelConfig m;
  m.hidden_size = 32;
  m.intermediate_size = 48;
  m.num_layers = 4;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 40;
  m.max_seq_len = 16;
  m.init_std = 0.05;
  return m;
}

// A pipeline stage draws its layers' values of the whole model, and
// initialization leaves torch's generator as it was.
TEST(InitWeights, AStageGetsTheWholeModelsValuesAndTorchsGeneratorIsUntouched) {
  const ModelConfig m = small_model();
  LocalLayerFactory factory;
  LlamaForCausalLM full(m, factory);
  torch::manual_seed(5);
  full.init_weights(kSeed);
  const at::Tensor after_init = at::randn({4});
  torch::manual_seed(5);
  EXPECT_TRUE(at::equal(after_init, at::randn({4})));

  LlamaForCausalLM stage(m, factory, StageSpec{2, 2, false, true});
  stage.init_weights(kSeed);
  const auto whole_params = full.named_parameters();
  for (const auto& named : stage.named_parameters()) {
    const at::Tensor* expected = whole_params.find(named.key());
    ASSERT_NE(expected, nullptr) << named.key();
    EXPECT_TRUE(at::equal(named.value(), *expected)) << named.key();
  }
  EXPECT_NE(stage.named_parameters().find("model.layers.3.mlp.down_proj.weight"), nullptr);
}

}  // namespace
}  // namespace loom
