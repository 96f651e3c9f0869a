// Packed documents in the model (data.document_mask, Note [document mask] in
// model/document_mask.h): the segments found from positions, rotary by
// position, attention within each document, and that positions counting
// 0, 1, 2, ... change nothing. Agreement with transformers running each
// document alone is tests/interop/test_document_mask.py; the GPU's
// variable-length flash path against the masked one is at the end (skipped
// without CUDA).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/utils.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/document_mask.h"
#include "model/layers.h"
#include "model/llama.h"
#include "model/rotary.h"
#include "parallel/cuda_runtime.h"

namespace loom {
namespace {

ModelConfig small_config(const std::string& recompute = "none") {
  ModelConfig m;
  m.hidden_size = 48;
  m.intermediate_size = 64;
  m.num_layers = 3;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 61;
  m.max_seq_len = 64;
  m.init_std = 0.2;
  m.recompute = recompute;
  return m;
}

std::shared_ptr<LlamaForCausalLM> make_model(const ModelConfig& m, uint64_t seed = 7) {
  torch::manual_seed(seed);
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(m, factory);
  model->init_weights(seed);
  model->eval();
  return model;
}

torch::Tensor positions_of(const std::vector<std::vector<int64_t>>& rows) {
  std::vector<torch::Tensor> tensors;
  for (const auto& row : rows) tensors.push_back(torch::tensor(row, torch::kLong));
  return torch::stack(tensors);
}

// Position 0, 1, ... for each document of the given lengths, back to back.
std::vector<int64_t> packed_positions(const std::vector<int64_t>& lengths) {
  std::vector<int64_t> out;
  for (int64_t length : lengths)
    for (int64_t t = 0; t < length; ++t) out.push_back(t);
  return out;
}

TEST(DocumentMask, SegmentsStartAtEachZeroAndTheTokensBeforeTheFirstAreOne) {
  // Row 0: the end of an earlier document (positions 7, 8), then documents
  // of 3 and 1 tokens. Row 1: one document from its start.
  const DocumentMask mask(positions_of({{7, 8, 0, 1, 2, 0}, {0, 1, 2, 3, 4, 5}}), torch::kCPU);
  EXPECT_FALSE(mask.one_segment_per_row());
  EXPECT_TRUE(torch::equal(mask.cu_seqlens(), torch::tensor({0, 2, 5, 6, 12}, torch::kInt)));
  EXPECT_EQ(mask.max_segment_tokens(), 6);
  int64_t first = -1;
  EXPECT_FALSE(mask.rows_count_from(&first));

  const auto allowed = mask.allowed_b1tt();
  ASSERT_EQ(allowed.sizes(), (std::vector<int64_t>{2, 1, 6, 6}));
  // Query t may attend key s: same segment and s <= t.
  const std::vector<int64_t> segment_row0{0, 0, 1, 1, 1, 2};
  for (int64_t t = 0; t < 6; ++t) {
    for (int64_t s = 0; s < 6; ++s) {
      EXPECT_EQ(allowed[0][0][t][s].item<bool>(), s <= t && segment_row0[s] == segment_row0[t]) << t << "," << s;
      EXPECT_EQ(allowed[1][0][t][s].item<bool>(), s <= t) << t << "," << s;
    }
  }
}

TEST(DocumentMask, RowsCountingUpFromOneStartAreOneSegmentEach) {
  const DocumentMask from_zero(positions_of({{0, 1, 2, 3}, {0, 1, 2, 3}}), torch::kCPU);
  int64_t first = -1;
  EXPECT_TRUE(from_zero.one_segment_per_row());
  EXPECT_TRUE(from_zero.rows_count_from(&first));
  EXPECT_EQ(first, 0);
  const DocumentMask mid_document(positions_of({{5, 6, 7}}), torch::kCPU);
  EXPECT_TRUE(mid_document.one_segment_per_row());
  EXPECT_TRUE(mid_document.rows_count_from(&first));
  EXPECT_EQ(first, 5);
  // One segment per row, but rows that start at different positions.
  const DocumentMask different(positions_of({{0, 1, 2}, {4, 5, 6}}), torch::kCPU);
  EXPECT_TRUE(different.one_segment_per_row());
  EXPECT_FALSE(different.rows_count_from(&first));
}

TEST(Rotary, PerTokenTablesOfCountingPositionsAreTheTableBitForBit) {
  ModelConfig m = small_config();
  m.rope_theta = 500000.0;
  const RotaryEmbedding rope(m);
  const auto [cos_td, sin_td] = rope.cos_sin(3, 9, torch::kCPU);
  const auto [cos_b1td, sin_b1td] = rope.cos_sin_at(torch::arange(3, 12).unsqueeze(0).expand({2, 9}), torch::kCPU);
  ASSERT_EQ(cos_b1td.sizes(), (std::vector<int64_t>{2, 1, 9, m.head_size()}));
  EXPECT_TRUE(torch::equal(cos_b1td[1][0], cos_td));
  EXPECT_TRUE(torch::equal(sin_b1td[0][0], sin_td));
}

TEST(Model, PositionsCountingFromZeroGiveTheForwardWithoutThemBitForBit) {
  auto model = make_model(small_config());
  torch::manual_seed(3);
  const auto ids = torch::randint(0, 61, {2, 10}, torch::kLong);
  const auto positions = torch::arange(10).unsqueeze(0).expand({2, 10});
  const auto plain = model->forward(ids);
  const auto with_positions = model->forward(ids, positions);
  EXPECT_TRUE(torch::equal(plain, with_positions));
  // Undefined positions: the forward without them.
  EXPECT_TRUE(torch::equal(plain, model->forward(ids, torch::Tensor())));
}

TEST(Model, PackedDocumentsGetTheLogitsOfEachDocumentAlone) {
  for (const char* recompute : {"none", "full"}) {
    auto model = make_model(small_config(recompute));
    torch::NoGradGuard no_grad;
    const std::vector<int64_t> lengths{3, 5, 1, 4};
    torch::manual_seed(5);
    const auto ids = torch::randint(0, 61, {1, 13}, torch::kLong);
    const auto packed = model->forward(ids, positions_of({packed_positions(lengths)}));
    int64_t start = 0;
    for (int64_t length : lengths) {
      const auto alone = model->forward(ids.narrow(1, start, length));
      EXPECT_TRUE(at::allclose(packed.narrow(1, start, length), alone, 1e-5, 1e-5))
          << recompute << ": document at " << start << " differs by "
          << (packed.narrow(1, start, length) - alone).abs().max().item<double>();
      start += length;
    }
    // Without the mask the later documents see the earlier ones.
    const auto unmasked = model->forward(ids);
    EXPECT_GT((unmasked.narrow(1, 3, 10) - packed.narrow(1, 3, 10)).abs().max().item<double>(), 1e-3);
  }
}

TEST(Model, ARowThatStartsInADocumentContinuesItsPositions) {
  auto model = make_model(small_config());
  torch::NoGradGuard no_grad;
  torch::manual_seed(9);
  const auto ids = torch::randint(0, 61, {2, 8}, torch::kLong);
  // Row 0: tokens 5..7 of a document, then a document of 5 tokens. Row 1:
  // documents of 6 and 2 tokens.
  const auto packed = model->forward(ids, positions_of({{5, 6, 7, 0, 1, 2, 3, 4}, {0, 1, 2, 3, 4, 5, 0, 1}}));
  // The first segment as decoding would see it from position 5 on, without
  // the document's start: rotary from 5, attention within the segment.
  const auto tail = model->forward(ids.narrow(0, 0, 1).narrow(1, 0, 3), nullptr, 5);
  EXPECT_TRUE(at::allclose(packed[0].narrow(0, 0, 3), tail[0], 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(packed[0].narrow(0, 3, 5), model->forward(ids.narrow(0, 0, 1).narrow(1, 3, 5))[0], 1e-5,
                           1e-5));
  EXPECT_TRUE(at::allclose(packed[1].narrow(0, 0, 6), model->forward(ids.narrow(0, 1, 1).narrow(1, 0, 6))[0], 1e-5,
                           1e-5));
  EXPECT_TRUE(at::allclose(packed[1].narrow(0, 6, 2), model->forward(ids.narrow(0, 1, 1).narrow(1, 6, 2))[0], 1e-5,
                           1e-5));
}

TEST(Model, ADocumentsGradientsComeFromItsOwnTokensOnly) {
  // The loss of the second document, differentiated with respect to the
  // packed input's embeddings: nothing flows to the first document's tokens,
  // and recomputation in backward sees the same documents.
  for (const char* recompute : {"none", "full"}) {
    ModelConfig m = small_config(recompute);
    torch::manual_seed(7);
    LocalLayerFactory factory;
    LlamaForCausalLM stage(m, factory, StageSpec{0, 3, /*has_embedding=*/false, /*has_head=*/true});
    stage.init_weights(7);
    torch::manual_seed(2);
    const auto hidden = torch::randn({1, 9, m.hidden_size}).requires_grad_(true);
    const auto logits = stage.forward(hidden, positions_of({packed_positions({4, 5})}));
    logits.narrow(1, 4, 5).pow(2).sum().backward();
    const auto grad = hidden.grad();
    EXPECT_EQ(grad.narrow(1, 0, 4).abs().max().item<double>(), 0.0) << recompute;
    EXPECT_GT(grad.narrow(1, 4, 5).abs().min().item<double>(), 0.0) << recompute;
  }
}

TEST(Model, PositionsOfAnotherShapeAreRefused) {
  auto model = make_model(small_config());
  const auto ids = torch::randint(0, 61, {2, 6}, torch::kLong);
  EXPECT_THROW(model->forward(ids, torch::zeros({2, 5}, torch::kLong)), c10::Error);
  EXPECT_THROW(model->forward(ids, torch::zeros({6}, torch::kLong)), c10::Error);
  EXPECT_THROW(model->forward(ids, torch::zeros({2, 6}, torch::kFloat)), c10::Error);
}

// The GPU's path (Note [document mask]): flash attention's variable-length
// kernel against the masked SDPA the CPU runs, in bf16, forward and backward.
TEST(Model, PackedDocumentsTakeTheSlidingWindowWithinEachDocument) {
  ModelConfig m = small_config();
  m.architecture = "qwen2";
  m.sliding_window = 3;
  m.layer_types = {"sliding_attention", "full_attention", "sliding_attention"};
  auto model = make_model(m);
  torch::NoGradGuard no_grad;
  const std::vector<int64_t> lengths{6, 2, 9};  // two documents longer than the window
  torch::manual_seed(6);
  const auto ids = torch::randint(0, 61, {1, 17}, torch::kLong);
  const auto packed = model->forward(ids, positions_of({packed_positions(lengths)}));
  int64_t start = 0;
  for (int64_t length : lengths) {
    const auto alone = model->forward(ids.narrow(1, start, length));
    EXPECT_TRUE(at::allclose(packed.narrow(1, start, length), alone, 1e-5, 1e-5))
        << "document at " << start << " differs by " << (packed.narrow(1, start, length) - alone).abs().max().item<double>();
    start += length;
  }
}

TEST(DocumentMaskCuda, VariableLengthFlashAttentionMatchesTheMaskedAttention) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(1);
  const int64_t batch = 2, heads = 8, kv_heads = 2, tokens = 96, dim = 64;
  const auto options = torch::TensorOptions().dtype(torch::kBFloat16).device(cuda);
  const auto q = torch::randn({batch, heads, tokens, dim}, options).requires_grad_(true);
  const auto k = torch::randn({batch, kv_heads, tokens, dim}, options).requires_grad_(true);
  const auto v = torch::randn({batch, kv_heads, tokens, dim}, options).requires_grad_(true);
  std::vector<int64_t> row0 = packed_positions({30, 41, 1, 24});
  std::vector<int64_t> row1;
  for (int64_t t = 0; t < 50; ++t) row1.push_back(100 + t);  // the end of an earlier document
  for (int64_t t = 0; t < 46; ++t) row1.push_back(t);
  const DocumentMask documents(positions_of({row0, row1}), cuda);
  ASSERT_TRUE(takes_varlen_flash(q, k));

  const auto flash = varlen_flash_attention(q, k, v, documents);
  const auto upstream = torch::randn_like(flash);
  const auto flash_grads = torch::autograd::grad({flash}, {q, k, v}, {upstream});
  // The masked path in fp32, as the reference.
  const auto q32 = q.detach().to(torch::kFloat).requires_grad_(true);
  const auto k32 = k.detach().to(torch::kFloat).requires_grad_(true);
  const auto v32 = v.detach().to(torch::kFloat).requires_grad_(true);
  LocalLayerFactory factory;
  const auto core = factory.attention_core(small_config(), 0);
  const auto masked = core->AttentionCore::forward_documents(q32, k32, v32, documents);
  const auto masked_grads = torch::autograd::grad({masked}, {q32, k32, v32}, {upstream.to(torch::kFloat)});

  const auto max_error = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a.to(torch::kFloat) - b).abs().max().item<double>();
  };
  EXPECT_LT(max_error(flash, masked), 2e-2);
  for (int i = 0; i < 3; ++i) EXPECT_LT(max_error(flash_grads[i], masked_grads[i]), 5e-2) << "gradient " << i;
  // And the model-level choice: the default core takes the flash path.
  EXPECT_LT(max_error(core->forward_documents(q, k, v, documents), masked), 2e-2);

  // A sliding window (flash's own against the banded mask), forward and backward.
  ModelConfig windowed = small_config();
  windowed.architecture = "mistral";
  windowed.sliding_window = 16;
  const auto window_core = factory.attention_core(windowed, 0);
  const auto flash_window = window_core->forward_documents(q, k, v, documents);
  const auto flash_window_grads = torch::autograd::grad({flash_window}, {q, k, v}, {upstream});
  const auto masked_window = window_core->AttentionCore::forward_documents(q32, k32, v32, documents);
  const auto masked_window_grads =
      torch::autograd::grad({masked_window}, {q32, k32, v32}, {upstream.to(torch::kFloat)});
  EXPECT_LT(max_error(flash_window, masked_window), 2e-2);
  EXPECT_GT((masked_window - masked).abs().max().item<double>(), 1e-2);  // the window matters
  for (int i = 0; i < 3; ++i) {
    EXPECT_LT(max_error(flash_window_grads[i], masked_window_grads[i]), 5e-2) << "windowed gradient " << i;
  }
  // And SDPA with the banded mask (no documents) on the GPU.
  const auto plain = window_core->forward(q, k, v, nullptr, nullptr);
  const auto plain32 = window_core->forward(q32, k32, v32, nullptr, nullptr);
  EXPECT_LT(max_error(plain, plain32), 2e-2);
}

}  // namespace
}  // namespace loom
