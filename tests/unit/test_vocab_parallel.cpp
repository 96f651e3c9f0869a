// The vocab-parallel embedding, LM head and cross-entropy
// (parallel/vocab_parallel.h) checked against the single-rank computation:
// every rank builds the same full tensors from a fixed seed, runs the sharded
// computation over the world as its tp group, and compares its result with
// the unsharded one it computes alone.
//
// Runs under mpirun (CTest tensor_parallel_vocab_np2/np4); every rank runs
// every test in the same order, as the contract of process_group.h requires.
// The custom main at the bottom makes the run fail on every rank when any
// rank failed (as in test_tensor_parallel.cpp).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/nn/functional/loss.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "parallel/mpi_process_group.h"
#include "tests/unit/mpi_test_main.h"
#include "parallel/vocab_parallel.h"
#include "util/error.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;

// The tp group of these tests: all ranks.
ProcessGroup& tp() { return *g_world; }
int64_t tp_rank() { return tp().rank(); }
int64_t tp_size() { return tp().size(); }

using test_support::expect_close;
at::Tensor random(at::IntArrayRef shape, uint64_t seed) { return test_support::seeded_randn(shape, seed); }

// Ids [n] in [0, vocab) that include 0, vocab - 1 and an id of every rank's
// shard, then random ones (with repeats, so gradients accumulate).
at::Tensor ids_covering_every_shard(int64_t vocab, int64_t n, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor ids = at::randint(vocab, {n}, gen, at::kLong);
  ids.narrow(0, 0, vocab).copy_(at::arange(vocab, at::kLong).flip(0));  // every id, last first
  return ids;
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

at::Tensor my_chunk(const at::Tensor& t, int64_t dim) {
  const int64_t n = t.size(dim) / tp_size();
  return t.narrow(dim, tp_rank() * n, n);
}

// Every rank's `t` concatenated along `dim` (outside autograd: for gradients).
at::Tensor gather_dim(const at::Tensor& t, int64_t dim) {
  at::Tensor front = t.detach().movedim(dim, 0).contiguous();
  std::vector<int64_t> shape = front.sizes().vec();
  shape[0] *= tp_size();
  at::Tensor out = at::empty(shape, front.options());
  tp().all_gather(out, front)->wait();
  return out.movedim(0, dim).contiguous();
}

constexpr double kFp32Tol = 1e-6;   // fp32, sums in another order
constexpr double kModelTol = 1e-5;  // a small model: fp32 matmuls summed in another order
constexpr double kBf16Tol = 1e-2;   // a bfloat16 gradient: 8 bits of mantissa, rounded once

at::Tensor full_cross_entropy(const at::Tensor& logits, const at::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits, targets);
}

// Expects `fn` to throw BadInput whose message contains every fragment.
void expect_bad_input(const std::function<void()>& fn, const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "accepted";
  } catch (const BadInput& e) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << "'" << fragment << "' not in: " << e.what();
    }
  }
}

// --- embedding ------------------------------------------------------------

TEST(VocabParallelEmbedding, HoldsThisRanksRowsAsWeight) {
  VocabParallelEmbedding embedding(tp(), 4 * tp_size(), 6);
  auto params = embedding.named_parameters();
  ASSERT_EQ(params.size(), 1u);
  EXPECT_EQ(params["weight"].sizes(), at::IntArrayRef({4, 6}));
  EXPECT_TRUE(embedding.weight().is_same(params["weight"]));
  EXPECT_EQ(embedding.vocab_start(), 4 * tp_rank());
  EXPECT_EQ(embedding.vocab_local(), 4);
}

TEST(VocabParallelEmbedding, ForwardEqualsTheFullTableAndTheGatheredWeightGradEqualsTheFullOne) {
  const int64_t vocab = 4 * tp_size();
  const int64_t hidden = 6;
  const at::Tensor table = random({vocab, hidden}, 1);
  const at::Tensor ids = ids_covering_every_shard(vocab, 3 * vocab, 2).reshape({3, vocab});
  const at::Tensor upstream = random({3, vocab, hidden}, 3);

  at::Tensor table_ref = leaf(table);
  at::Tensor y_ref = at::embedding(table_ref, ids);
  (y_ref * upstream).sum().backward();

  VocabParallelEmbedding embedding(tp(), vocab, hidden);
  {
    torch::NoGradGuard no_grad;
    embedding.weight().copy_(shard_vocab_rows(table, tp_rank(), tp_size()));
  }
  at::Tensor y = embedding.forward(ids);
  (y * upstream).sum().backward();

  expect_close(y, y_ref, 0, "forward");
  expect_close(gather_dim(embedding.weight().grad(), 0), table_ref.grad(), kFp32Tol, "weight grad, gathered");
}

// --- cross-entropy --------------------------------------------------------

struct CrossEntropyCase {
  at::Tensor logits;   // full [N, vocab]
  at::Tensor targets;  // [N]
  double grad_scale;   // the loss is multiplied by this before backward
};

// Checks the loss and the gathered logits gradient against the full
// cross-entropy computed in fp32 on the full logits (cast from logits' dtype).
void check_cross_entropy(const CrossEntropyCase& c, double loss_tol, double grad_tol) {
  at::Tensor logits_ref = leaf(c.logits.to(at::kFloat));
  at::Tensor loss_ref = full_cross_entropy(logits_ref, c.targets);
  (loss_ref * c.grad_scale).backward();

  at::Tensor logits_local = leaf(my_chunk(c.logits, 1));
  at::Tensor loss = vocab_parallel_cross_entropy(tp(), logits_local, c.targets);
  (loss * c.grad_scale).backward();

  EXPECT_EQ(loss.scalar_type(), at::kFloat);
  EXPECT_EQ(loss.dim(), 0);
  EXPECT_TRUE(std::isfinite(loss.item<double>()));
  expect_close(loss, loss_ref, loss_tol, "loss");
  ASSERT_TRUE(logits_local.grad().defined());
  EXPECT_EQ(logits_local.grad().scalar_type(), c.logits.scalar_type()) << "the gradient keeps the input's dtype";
  expect_close(gather_dim(logits_local.grad(), 1), logits_ref.grad(), grad_tol, "logits grad, gathered");
}

TEST(VocabParallelCrossEntropy, Fp32MatchesTheFullCrossEntropyAndItsGradient) {
  const int64_t vocab = 8 * tp_size();
  const int64_t n = 2 * vocab;
  check_cross_entropy({random({n, vocab}, 10) * 3, ids_covering_every_shard(vocab, n, 11), 2.5}, kFp32Tol, kFp32Tol);
}

TEST(VocabParallelCrossEntropy, LargeLogitsStayFiniteAndMatchTheFullCrossEntropy) {
  // exp(1e4) overflows fp32: only the max-subtracted form is finite.
  const int64_t vocab = 8 * tp_size();
  const int64_t n = 2 * vocab;
  check_cross_entropy({random({n, vocab}, 12) * 1e3 + 1e4, ids_covering_every_shard(vocab, n, 13), 1.0}, kFp32Tol,
                      kFp32Tol);
  // The largest logit on one rank only, far above the others: the other
  // ranks' exp() terms all underflow to 0.
  at::Tensor peaked = random({n, vocab}, 14);
  peaked.select(1, vocab - 1).add_(200);
  check_cross_entropy({peaked, ids_covering_every_shard(vocab, n, 15), 1.0}, kFp32Tol, kFp32Tol);
}

TEST(VocabParallelCrossEntropy, Bf16LogitsAreComputedInFp32AndTheGradientIsBf16) {
  const int64_t vocab = 8 * tp_size();
  const int64_t n = 2 * vocab;
  // The loss is computed in fp32 from the same bf16 values as the reference:
  // only the gradient is rounded (once, to bf16).
  check_cross_entropy({(random({n, vocab}, 16) * 3).to(at::kBFloat16), ids_covering_every_shard(vocab, n, 17), 1.0},
                      kFp32Tol, kBf16Tol);
}

TEST(VocabParallelCrossEntropy, IgnoredTargetsLeaveTheMeanAndGetNoGradientAsTorchIgnoreIndex) {
  const int64_t vocab = 8 * tp_size();
  const int64_t n = 2 * vocab;
  const at::Tensor logits = random({n, vocab}, 18) * 3;
  at::Tensor targets = ids_covering_every_shard(vocab, n, 19);
  // Every third row ignored, so the mean is over about two thirds of the rows.
  for (int64_t i = 0; i < n; i += 3) targets[i] = kIgnoredTarget;

  at::Tensor logits_ref = leaf(logits);
  at::Tensor loss_ref = full_cross_entropy(logits_ref, targets);  // torch's ignore_index is -100
  (loss_ref * 1.5).backward();
  at::Tensor logits_local = leaf(my_chunk(logits, 1));
  at::Tensor loss = vocab_parallel_cross_entropy(tp(), logits_local, targets, /*may_ignore=*/true);
  (loss * 1.5).backward();
  expect_close(loss, loss_ref, kFp32Tol, "loss");
  const at::Tensor grad = gather_dim(logits_local.grad(), 1);
  expect_close(grad, logits_ref.grad(), kFp32Tol, "logits grad, gathered");
  EXPECT_EQ(grad.select(0, 0).abs().max().item<float>(), 0.0f) << "an ignored row gets no gradient";

  // Without may_ignore every row counts: the result differs.
  const at::Tensor unmasked = vocab_parallel_cross_entropy(tp(), my_chunk(logits, 1), targets.clamp_min(0));
  EXPECT_GT((unmasked - loss).abs().item<double>(), 1e-3);
}

TEST(VocabParallelCrossEntropy, NoCountedTargetGivesZeroAndZeroGradient) {
  const int64_t vocab = 4 * tp_size();
  at::Tensor logits_local = leaf(my_chunk(random({6, vocab}, 20), 1));
  const at::Tensor targets = at::full({6}, kIgnoredTarget, at::kLong);
  at::Tensor loss = vocab_parallel_cross_entropy(tp(), logits_local, targets, /*may_ignore=*/true);
  loss.backward();
  EXPECT_EQ(loss.item<double>(), 0.0);
  EXPECT_EQ(logits_local.grad().abs().max().item<float>(), 0.0f);
}

TEST(VocabParallelCrossEntropy, ShapesThatDoNotFitAreRefused) {
  const at::Tensor logits = at::zeros({4, 3});
  for (const at::Tensor& targets :
       {at::zeros({3}, at::kLong), at::zeros({4}, at::kInt), at::zeros({4, 1}, at::kLong)}) {
    EXPECT_THROW(vocab_parallel_cross_entropy(tp(), logits, targets), std::invalid_argument) << targets.sizes();
  }
  EXPECT_THROW(vocab_parallel_cross_entropy(tp(), at::zeros({4}), at::zeros({4}, at::kLong)), std::invalid_argument);
}

// --- embedding + LM head + cross-entropy ----------------------------------

// ids [b, s] -> embedding -> tanh -> LM head -> cross-entropy against the
// next ids, once unsharded and once vocab-parallel, tied or untied. A vocab
// tp does not divide is padded (Note [vocab padding]): the gathered weight
// gradients hold the unsharded ones, then zeros for the padding rows.
void check_model_matches_unsharded(bool tied, int64_t vocab) {
  SCOPED_TRACE("vocab " + std::to_string(vocab) + (tied ? ", tied" : ", untied"));
  const int64_t hidden = 6;
  const int64_t rows = vocab_rows_per_rank(vocab, tp_size());
  const at::Tensor table = random({vocab, hidden}, 20);
  const at::Tensor head = random({vocab, hidden}, 21);
  const at::Tensor ids = ids_covering_every_shard(vocab, 3 * vocab, 22).reshape({3, vocab});
  const at::Tensor targets = ids_covering_every_shard(vocab, 3 * vocab, 23);

  at::Tensor table_ref = leaf(table);
  at::Tensor head_ref = leaf(head);
  at::Tensor logits_ref = at::linear(at::tanh(at::embedding(table_ref, ids)), tied ? table_ref : head_ref);
  at::Tensor loss_ref = full_cross_entropy(logits_ref.reshape({-1, vocab}), targets);
  loss_ref.backward();

  auto embedding = std::make_shared<VocabParallelEmbedding>(tp(), vocab, hidden);
  VocabParallelLmHead lm_head(tp(), hidden, vocab, tied ? embedding : nullptr);
  {
    torch::NoGradGuard no_grad;
    embedding->weight().copy_(shard_vocab_rows(table, tp_rank(), tp_size()));
    if (!tied) lm_head.named_parameters()["weight"].copy_(shard_vocab_rows(head, tp_rank(), tp_size()));
  }
  EXPECT_EQ(lm_head.named_parameters().size(), tied ? 0u : 1u) << "a tied head owns no parameter";
  at::Tensor logits_local = lm_head.forward(at::tanh(embedding->forward(ids)));
  EXPECT_EQ(logits_local.sizes(), at::IntArrayRef({3, vocab, rows})) << "logits stay split along the vocabulary";
  at::Tensor loss =
      vocab_parallel_cross_entropy(tp(), logits_local.reshape({-1, logits_local.size(-1)}), targets, false, vocab);
  loss.backward();

  expect_close(loss, loss_ref, kModelTol, "loss");
  const at::Tensor embedding_grad = gather_dim(embedding->weight().grad(), 0);
  expect_close(embedding_grad.narrow(0, 0, vocab), table_ref.grad(), kModelTol, "embedding weight grad, gathered");
  EXPECT_EQ(embedding_grad.narrow(0, vocab, rows * tp_size() - vocab).abs().sum().item<double>(), 0.0)
      << "padding rows get no gradient";
  if (!tied) {
    const at::Tensor head_grad = gather_dim(lm_head.named_parameters()["weight"].grad(), 0);
    expect_close(head_grad.narrow(0, 0, vocab), head_ref.grad(), kModelTol, "head weight grad, gathered");
    EXPECT_EQ(head_grad.narrow(0, vocab, rows * tp_size() - vocab).abs().sum().item<double>(), 0.0)
        << "padding rows get no gradient";
  }
}

TEST(VocabParallelModel, TiedEmbeddingAndHeadMatchTheUnshardedTiedModel) {
  check_model_matches_unsharded(true, 4 * tp_size());
}

TEST(VocabParallelModel, UntiedEmbeddingAndHeadMatchTheUnshardedModel) {
  check_model_matches_unsharded(false, 4 * tp_size());
}

// Vocabularies tp does not divide: tp - 1 padding rows, one, and (at tp 4)
// a last rank of padding only (9 = 3 + 3 + 3 + 0).
std::vector<int64_t> padded_vocabularies() {
  std::vector<int64_t> out = {4 * tp_size() + 1, 4 * tp_size() - 1};
  if (tp_size() == 4) out.push_back(9);
  return out;
}

TEST(VocabParallelPadding, APaddedVocabularyMatchesTheUnshardedModelTiedAndUntied) {
  for (int64_t vocab : padded_vocabularies()) {
    check_model_matches_unsharded(true, vocab);
    check_model_matches_unsharded(false, vocab);
  }
}

TEST(VocabParallelPadding, EachRankHoldsCeilVocabOverTpRowsTheLastOnesZeroPadding) {
  const int64_t vocab = 4 * tp_size() + 1;  // rows per rank: 5
  VocabParallelEmbedding embedding(tp(), vocab, 6);
  EXPECT_EQ(embedding.weight().sizes(), at::IntArrayRef({5, 6}));
  EXPECT_EQ(embedding.vocab_local(), 5);
  EXPECT_EQ(embedding.vocab_start(), 5 * tp_rank());
  EXPECT_EQ(embedding.vocab(), vocab);
  EXPECT_EQ(embedding.unpadded_size("weight"), vocab);
  EXPECT_EQ(VocabParallelEmbedding(tp(), 4 * tp_size(), 6).unpadded_size("weight"), -1) << "no padding, none listed";
  const int64_t tokens = vocab_rows_of_rank(vocab, tp_rank(), tp_size());
  EXPECT_EQ(tokens, tp_rank() < tp_size() - 1 ? 5 : vocab - 5 * (tp_size() - 1));
  const at::Tensor table = random({vocab, 6}, 40);
  const at::Tensor shard = shard_vocab_rows(table, tp_rank(), tp_size());
  EXPECT_EQ(shard.sizes(), at::IntArrayRef({5, 6}));
  expect_close(shard.narrow(0, 0, tokens), table.narrow(0, 5 * tp_rank(), tokens), 0, "token rows");
  EXPECT_EQ(shard.narrow(0, tokens, 5 - tokens).abs().sum().item<double>(), 0.0) << "padding rows are zeros";
  EXPECT_EQ(vocab_rows_of_rank(9, 3, 4), 0);
  EXPECT_EQ(vocab_rows_of_rank(9, 2, 4), 3);
}

TEST(VocabParallelPadding, PaddingLogitsLeaveTheSoftmaxHoweverLargeAndGetNoGradient) {
  for (int64_t vocab : padded_vocabularies()) {
    SCOPED_TRACE("vocab " + std::to_string(vocab));
    const int64_t rows = vocab_rows_per_rank(vocab, tp_size()), n = 2 * vocab;
    const at::Tensor logits = random({n, vocab}, 41) * 3;
    const at::Tensor targets = ids_covering_every_shard(vocab, n, 42);
    at::Tensor logits_ref = leaf(logits);
    at::Tensor loss_ref = full_cross_entropy(logits_ref, targets);
    (loss_ref * 2.0).backward();
    // The padded logits [n, tp * rows], padding columns far above any token's.
    const at::Tensor padded = at::cat({logits, at::full({n, rows * tp_size() - vocab}, 1e4)}, 1);
    at::Tensor logits_local = leaf(padded.narrow(1, tp_rank() * rows, rows));
    at::Tensor loss = vocab_parallel_cross_entropy(tp(), logits_local, targets, false, vocab);
    (loss * 2.0).backward();
    expect_close(loss, loss_ref, kFp32Tol, "loss");
    const at::Tensor grad = gather_dim(logits_local.grad(), 1);
    expect_close(grad.narrow(1, 0, vocab), logits_ref.grad(), kFp32Tol, "logits grad, gathered");
    EXPECT_EQ(grad.narrow(1, vocab, rows * tp_size() - vocab).abs().sum().item<double>(), 0.0);
    // Without `vocab` the padding counts, and dominates.
    const at::Tensor unmasked = vocab_parallel_cross_entropy(tp(), padded.narrow(1, tp_rank() * rows, rows), targets);
    EXPECT_GT(unmasked.item<double>(), loss.item<double>() + 100);
  }
}

TEST(VocabParallelPadding, AVocabThatDoesNotPadToTheLogitsWidthIsRefused) {
  const at::Tensor logits = at::zeros({4, 5});
  const at::Tensor targets = at::zeros({4}, at::kLong);
  EXPECT_THROW(vocab_parallel_cross_entropy(tp(), logits, targets, false, 5 * tp_size() + 1), std::invalid_argument);
  EXPECT_THROW(vocab_parallel_cross_entropy(tp(), logits, targets, false, 4 * tp_size() - 1 - tp_size()),
               std::invalid_argument);
  EXPECT_THROW(vocab_parallel_cross_entropy(tp(), logits, targets, false, 0), std::invalid_argument);
}

TEST(VocabParallelModel, AGroupOfOneIsTheUnshardedComputation) {
  auto solo = g_world->split(g_world->rank(), 0, "solo");
  const int64_t vocab = 5;  // any vocabulary divides over one rank
  const at::Tensor table = random({vocab, 3}, 30);
  const at::Tensor ids = ids_covering_every_shard(vocab, 2 * vocab, 31);
  at::Tensor table_ref = leaf(table);
  at::Tensor loss_ref = full_cross_entropy(at::linear(at::embedding(table_ref, ids), table_ref), ids.flip(0));
  loss_ref.backward();

  auto embedding = std::make_shared<VocabParallelEmbedding>(*solo, vocab, 3);
  VocabParallelLmHead lm_head(*solo, 3, vocab, embedding);
  {
    torch::NoGradGuard no_grad;
    embedding->weight().copy_(table);
  }
  at::Tensor loss = vocab_parallel_cross_entropy(*solo, lm_head.forward(embedding->forward(ids)), ids.flip(0));
  loss.backward();
  expect_close(loss, loss_ref, kFp32Tol, "loss");
  expect_close(embedding->weight().grad(), table_ref.grad(), kFp32Tol, "weight grad");
}

// --- refusals -------------------------------------------------------------

TEST(VocabParallelRefusals, ATiedHeadRefusesAnEmbeddingThatIsNotThisRanksShard) {
  auto embedding = std::make_shared<VocabParallelEmbedding>(tp(), 4 * tp_size(), 6);
  expect_bad_input([&] { VocabParallelLmHead(tp(), 8, 4 * tp_size(), embedding); },
                   {"VocabParallelLmHead", "tied embedding"});
  // Nor one padded for another vocabulary (5 rows a rank against 4).
  auto padded = std::make_shared<VocabParallelEmbedding>(tp(), 4 * tp_size() + 1, 6);
  expect_bad_input([&] { VocabParallelLmHead(tp(), 6, 4 * tp_size(), padded); },
                   {"VocabParallelLmHead", "tied embedding"});
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_vocab_parallel");
}
