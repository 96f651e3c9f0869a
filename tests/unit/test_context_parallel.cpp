// Context parallelism (parallel/context_parallel.h) against one rank: the
// ring attention core against causal scaled-dot-product attention over the
// whole sequence (outputs and the gradients of q, k and v), and a whole
// model through ContextParallelLayerFactory against the single-device model
// (logits at the true rotary positions, loss, every parameter's gradient).
// Every rank computes the whole sequence itself from a fixed seed and checks
// its zig-zag share of the result. And the ring's order over a deliberately
// slow process group: each next block's transfer is posted before the
// current block's attention, which runs while the transfer is in flight.
//
// Runs under mpirun with the world as the cp group (CTest
// context_parallel_np2/np4); every rank runs every test in the same order
// (tests/unit/mpi_test_main.h).
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "model/document_mask.h"
#include "model/llama.h"
#include "parallel/context_parallel.h"
#include "parallel/mpi_process_group.h"
#include "parallel/topology.h"
#include "tests/unit/mpi_test_main.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& cp() { return *g_world; }

using test_support::expect_close;
using test_support::seeded_randn;

at::Tensor share_of(const at::Tensor& x_bhtd) {
  return x_bhtd.index_select(2, zigzag_positions(x_bhtd.size(2), cp().rank(), cp().size()));
}

TEST(ZigzagSplit, EachRankHoldsChunkRankAndItsMirror) {
  // 2N chunks of 2 tokens: rank r holds chunks r and 2N - 1 - r.
  const int64_t n = cp().size(), seq = 4 * n;
  const at::Tensor positions = zigzag_positions(seq, cp().rank(), n);
  const int64_t r = cp().rank();
  const std::vector<int64_t> expected = {2 * r, 2 * r + 1, 2 * (2 * n - 1 - r), 2 * (2 * n - 1 - r) + 1};
  ASSERT_EQ(positions.numel(), 4);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(positions[i].item<int64_t>(), expected[static_cast<size_t>(i)]);
  // Every position is some rank's, once.
  at::Tensor all = at::empty({n * 4}, at::kLong);
  cp().all_gather(all, positions)->wait();
  EXPECT_TRUE(at::equal(std::get<0>(all.sort()), at::arange(seq, at::kLong)));
  const at::Tensor x = at::arange(seq, at::kLong).view({1, seq});
  EXPECT_TRUE(at::equal(zigzag_tokens(x, r, n), positions.view({1, 4})));
}

// Rank order tp, cp, pp, dp (parallel/topology.h): on 4 ranks as dp 1 x cp 2
// x tp 2 the tp groups are [0 1] [2 3], the cp rings [0 2] [1 3]; the dp
// group (Note [cp replicas]) holds the cp ranks, as cp is the only other axis.
TEST(ContextParallelGrid, Cp2Tp2PutsTpOnConsecutiveRanksAndCpNext) {
  if (cp().size() != 4) GTEST_SKIP() << "needs 4 ranks";
  ParallelDims dims;
  dims.world = 4;
  dims.cp = 2;
  dims.tp = 2;
  const GridGroups grid = split_grid(*g_world, dims);
  const int me = cp().rank();
  EXPECT_EQ(grid.tp->world_ranks(), (std::vector<int>{me / 2 * 2, me / 2 * 2 + 1}));
  EXPECT_EQ(grid.cp->world_ranks(), (std::vector<int>{me % 2, me % 2 + 2}));
  EXPECT_EQ(grid.dp->world_ranks(), grid.cp->world_ranks());
  EXPECT_EQ(grid.pp->world_ranks(), std::vector<int>{me});
  EXPECT_EQ(grid.cp->rank(), me / 2);
  EXPECT_EQ(dims.coords_of(me).cp, me / 2);
  EXPECT_EQ(dims.coords_of(me).tp, me % 2);
  EXPECT_EQ(dims.describe(), "world 4 = dp 1 x cp 2 x pp 1 x tp 2\n  dp0: pp0 cp0 [0 1] cp1 [2 3]");
}

// dp 2 x cp 2: the cp rings [0 1] [2 3]; the dp group is all four ranks,
// numbered dp * cp + cp, which is how the gradient reducer sees them.
TEST(ContextParallelGrid, Dp2Cp2MakesTheDpGroupOfEveryCpRankOfEveryReplica) {
  if (cp().size() != 4) GTEST_SKIP() << "needs 4 ranks";
  ParallelDims dims;
  dims.world = 4;
  dims.dp = 2;
  dims.cp = 2;
  const GridGroups grid = split_grid(*g_world, dims);
  const int me = cp().rank();
  EXPECT_EQ(grid.cp->world_ranks(), (std::vector<int>{me / 2 * 2, me / 2 * 2 + 1}));
  EXPECT_EQ(grid.dp->world_ranks(), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(grid.dp->rank(), me);
  EXPECT_EQ(dims.coords_of(me).dp, me / 2);
  EXPECT_EQ(dims.coords_of(me).cp, me % 2);
}

// Causal attention of the whole sequence, kv heads repeated for GQA.
at::Tensor reference_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t group = q.size(1) / k.size(1);
  return at::scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), {}, 0.0,
                                          /*is_causal=*/true);
}

TEST(RingAttention, MatchesCausalAttentionOverTheWholeSequenceForwardAndBackward) {
  const int64_t batch = 2, heads = 4, kv_heads = 2, seq = 8 * cp().size(), head_dim = 8;
  const at::Tensor q = seeded_randn({batch, heads, seq, head_dim}, 1).requires_grad_(true);
  const at::Tensor k = seeded_randn({batch, kv_heads, seq, head_dim}, 2).requires_grad_(true);
  const at::Tensor v = seeded_randn({batch, kv_heads, seq, head_dim}, 3).requires_grad_(true);
  const at::Tensor weight = seeded_randn({batch, heads, seq, head_dim}, 4);
  const at::Tensor expected = reference_attention(q, k, v);
  (expected * weight).sum().backward();

  const at::Tensor q_local = share_of(q.detach()).requires_grad_(true);
  const at::Tensor k_local = share_of(k.detach()).requires_grad_(true);
  const at::Tensor v_local = share_of(v.detach()).requires_grad_(true);
  RingAttentionCore core(cp(), seq, {});
  const at::Tensor out = core.forward(q_local, k_local, v_local, nullptr, nullptr);
  expect_close(out, share_of(expected), 1e-5, "output");
  (out * share_of(weight)).sum().backward();
  expect_close(q_local.grad(), share_of(q.grad()), 1e-5, "dq");
  expect_close(k_local.grad(), share_of(k.grad()), 1e-5, "dk");
  expect_close(v_local.grad(), share_of(v.grad()), 1e-5, "dv");
}

// Packed documents: row 0 starts mid-document (its first segment has no
// start) and holds documents across chunk boundaries; row 1 is one document
// from the start and a second one late, which few earlier chunks see.
at::Tensor packed_positions(int64_t seq) {
  at::Tensor positions = at::empty({2, seq}, at::kLong);
  const std::vector<std::vector<int64_t>> starts = {{3, seq / 3, seq / 3 + 1, seq - 5}, {0, seq - seq / 4}};
  for (int64_t row = 0; row < 2; ++row) {
    int64_t position = row == 0 ? 7 : 0;  // row 0 continues a document begun earlier
    for (int64_t t = 0; t < seq; ++t) {
      for (int64_t start : starts[static_cast<size_t>(row)]) {
        if (t == start) position = 0;
      }
      positions[row][t] = position++;
    }
  }
  return positions;
}

TEST(RingAttention, MasksPackedDocumentsAsTheSingleRankDoesForwardAndBackward) {
  const int64_t batch = 2, heads = 4, kv_heads = 2, seq = 8 * cp().size(), head_dim = 8;
  const at::Tensor q = seeded_randn({batch, heads, seq, head_dim}, 21).requires_grad_(true);
  const at::Tensor k = seeded_randn({batch, kv_heads, seq, head_dim}, 22).requires_grad_(true);
  const at::Tensor v = seeded_randn({batch, kv_heads, seq, head_dim}, 23).requires_grad_(true);
  const at::Tensor weight = seeded_randn({batch, heads, seq, head_dim}, 24);
  const DocumentMask documents(packed_positions(seq), at::kCPU);
  ASSERT_FALSE(documents.one_segment_per_row());
  const at::Tensor expected = at::scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               documents.allowed_b1tt());
  (expected * weight).sum().backward();

  const at::Tensor q_local = share_of(q.detach()).requires_grad_(true);
  const at::Tensor k_local = share_of(k.detach()).requires_grad_(true);
  const at::Tensor v_local = share_of(v.detach()).requires_grad_(true);
  RingAttentionCore core(cp(), seq, {});
  const at::Tensor out = core.forward_documents(q_local, k_local, v_local, documents);
  expect_close(out, share_of(expected), 1e-5, "output");
  (out * share_of(weight)).sum().backward();
  expect_close(q_local.grad(), share_of(q.grad()), 1e-5, "dq");
  expect_close(k_local.grad(), share_of(k.grad()), 1e-5, "dk");
  expect_close(v_local.grad(), share_of(v.grad()), 1e-5, "dv");
}

// Sliding windows and Gemma-2's soft-capping against the one-device core
// (LayerFactory's, which the single-rank model runs), chunks of 4 tokens:
// a window shorter than a chunk (its edge inside the diagonal pair and the
// pair before; pairs further back skipped), one of 2.5 chunks, soft-capping
// alone and with a window, and a window over packed documents. Outputs and
// the gradients of q, k and v.
TEST(RingAttention, MasksSlidingWindowsAndSoftCapsAsTheOneDeviceCoreForwardAndBackward) {
  const int64_t batch = 2, heads = 4, kv_heads = 2, seq = 8 * cp().size(), head_dim = 8;
  struct Case {
    const char* name;
    int64_t window;
    double softcap;
    bool documents;
  };
  const std::vector<Case> cases = {{"window 3", 3, 0.0, false},
                                   {"window 10", 10, 0.0, false},
                                   {"softcap 2", 0, 2.0, false},
                                   {"window 6, softcap 2", 6, 2.0, false},
                                   {"window 5, documents", 5, 0.0, true}};
  // Scores of several units, so that the cap bites.
  const at::Tensor q0 = seeded_randn({batch, heads, seq, head_dim}, 31) * 3;
  const at::Tensor k0 = seeded_randn({batch, kv_heads, seq, head_dim}, 32);
  const at::Tensor v0 = seeded_randn({batch, kv_heads, seq, head_dim}, 33);
  const at::Tensor weight = seeded_randn({batch, heads, seq, head_dim}, 34);
  const DocumentMask documents(packed_positions(seq), at::kCPU);
  const at::Tensor plain_causal = reference_attention(q0, k0, v0);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    ModelConfig model;
    model.sliding_window = c.window;
    model.attn_logit_softcapping = c.softcap;
    const std::shared_ptr<AttentionCore> one_device = LocalLayerFactory().attention_core(model, 0);
    ASSERT_EQ(one_device->options().window, c.window);
    const at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true);
    const at::Tensor v = v0.clone().requires_grad_(true);
    const at::Tensor expected = c.documents ? one_device->forward_documents(q, k, v, documents)
                                            : one_device->forward(q, k, v, nullptr, nullptr);
    (expected * weight).sum().backward();
    if (!c.documents) {  // the window or cap changes the result: a ring without it fails
      EXPECT_GT((expected - plain_causal).abs().max().item<double>(), 1e-2);
    }

    const at::Tensor q_local = share_of(q0).requires_grad_(true);
    const at::Tensor k_local = share_of(k0).requires_grad_(true);
    const at::Tensor v_local = share_of(v0).requires_grad_(true);
    RingAttentionCore core(cp(), seq, one_device->options());
    const at::Tensor out = c.documents ? core.forward_documents(q_local, k_local, v_local, documents)
                                       : core.forward(q_local, k_local, v_local, nullptr, nullptr);
    expect_close(out, share_of(expected), 1e-5, "output");
    (out * share_of(weight)).sum().backward();
    expect_close(q_local.grad(), share_of(q.grad()), 1e-5, "dq");
    expect_close(k_local.grad(), share_of(k.grad()), 1e-5, "dk");
    expect_close(v_local.grad(), share_of(v.grad()), 1e-5, "dv");
  }
}

TEST(RingAttention, TakesTheModelsScale) {
  const int64_t seq = 4 * cp().size(), head_dim = 4;
  const at::Tensor q = seeded_randn({1, 2, seq, head_dim}, 5), k = seeded_randn({1, 2, seq, head_dim}, 6);
  const at::Tensor v = seeded_randn({1, 2, seq, head_dim}, 7);
  const at::Tensor expected = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, /*scale=*/0.3);
  AttentionOptions options;
  options.scale = 0.3;
  RingAttentionCore core(cp(), seq, options);
  expect_close(core.forward(share_of(q), share_of(k), share_of(v), nullptr, nullptr), share_of(expected), 1e-5,
               "output at scale 0.3");
}

// What the ring did, in order: "post recv", "post send", "matmul" (an
// attention block's, seen through ATen's RecordFunction), "wait"; with
// whether, at a matmul, the last posted transfer was still in flight.
struct RingEvent {
  std::string what;
  bool in_flight = false;
};
std::vector<RingEvent>* g_events = nullptr;
std::chrono::steady_clock::time_point g_last_post_done;

constexpr auto kSlowTransfer = std::chrono::milliseconds(300);

// A send or receive of the inner group that completes no sooner than
// kSlowTransfer after it was posted: a slow link.
class SlowWork : public Work {
 public:
  explicit SlowWork(std::unique_ptr<Work> inner)
      : Work(inner->default_timeout()), inner_(std::move(inner)),
        done_(std::chrono::steady_clock::now() + kSlowTransfer) {}
  bool is_completed() override { return std::chrono::steady_clock::now() >= done_ && inner_->is_completed(); }
  void wait(std::chrono::milliseconds timeout) override {
    g_events->push_back({"wait"});
    std::this_thread::sleep_until(done_);
    inner_->wait(timeout);
  }

 private:
  std::unique_ptr<Work> inner_;
  std::chrono::steady_clock::time_point done_;
};

// The world group with slow, recorded send and recv (the ring uses no other operation).
class SlowRingGroup : public ProcessGroup {
 public:
  explicit SlowRingGroup(ProcessGroup& inner)
      : ProcessGroup("slow_cp", inner.rank(), inner.world_ranks(), inner.timeout()), inner_(inner) {}
  std::string_view backend() const override { return inner_.backend(); }
  std::unique_ptr<Work> all_reduce(const at::Tensor& t, const AllReduceOptions& o) override { return inner_.all_reduce(t, o); }
  std::unique_ptr<Work> all_gather(const at::Tensor& out, const at::Tensor& in, const AllGatherOptions& o) override {
    return inner_.all_gather(out, in, o);
  }
  std::unique_ptr<Work> reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                       const ReduceScatterOptions& o) override {
    return inner_.reduce_scatter(out, in, o);
  }
  std::unique_ptr<Work> broadcast(const at::Tensor& t, const BroadcastOptions& o) override { return inner_.broadcast(t, o); }
  std::unique_ptr<Work> barrier(const BarrierOptions& o) override { return inner_.barrier(o); }
  std::unique_ptr<Work> send(const at::Tensor& t, const SendOptions& o) override { return posted("post send", inner_.send(t, o)); }
  std::unique_ptr<Work> recv(const at::Tensor& t, const RecvOptions& o) override { return posted("post recv", inner_.recv(t, o)); }

 private:
  std::unique_ptr<Work> posted(const char* what, std::unique_ptr<Work> work) {
    g_events->push_back({what});
    g_last_post_done = std::chrono::steady_clock::now() + kSlowTransfer;
    return std::make_unique<SlowWork>(std::move(work));
  }
  ProcessGroup& inner_;
};

std::unique_ptr<at::ObserverContext> record_matmul(const at::RecordFunction& fn) {
  if (g_events != nullptr && std::string(fn.name()) == "aten::matmul") {
    g_events->push_back({"matmul", std::chrono::steady_clock::now() < g_last_post_done});
  }
  return nullptr;
}

// The events with each run of matmuls as one "matmul", in flight when the first was.
std::vector<std::string> collapsed(const std::vector<RingEvent>& events) {
  std::vector<std::string> out;
  for (const RingEvent& e : events) {
    if (e.what == "matmul" && !out.empty() && out.back().rfind("matmul", 0) == 0) continue;
    out.push_back(e.what == "matmul" ? (e.in_flight ? "matmul (in flight)" : "matmul (after)") : e.what);
  }
  return out;
}

TEST(RingAttention, PostsTheNextBlocksTransferBeforeTheCurrentBlocksAttention) {
  const int64_t n = cp().size(), seq = 4 * n;
  SlowRingGroup slow(cp());
  std::vector<RingEvent> events;
  g_events = &events;
  const auto handle = at::addThreadLocalCallback(at::RecordFunctionCallback(record_matmul));
  const at::Tensor q = share_of(seeded_randn({1, 2, seq, 4}, 8)).requires_grad_(true);
  const at::Tensor k = share_of(seeded_randn({1, 2, seq, 4}, 9)).requires_grad_(true);
  const at::Tensor v = share_of(seeded_randn({1, 2, seq, 4}, 10)).requires_grad_(true);
  RingAttentionCore core(slow, seq, {});
  const at::Tensor out = core.forward(q, k, v, nullptr, nullptr);
  const std::vector<std::string> forward = collapsed(events);
  events.clear();
  out.sum().backward();
  const std::vector<std::string> backward = collapsed(events);
  at::removeCallback(handle);
  g_events = nullptr;

  // Forward: at each step but the last, the next block's send and receive
  // are posted (even ranks send first, odd ranks receive first), this
  // block's attention runs while they are in flight, then they are waited
  // on; the last step only computes.
  const bool even = cp().rank() % 2 == 0;
  const char* first = even ? "post send" : "post recv";
  const char* second = even ? "post recv" : "post send";
  std::vector<std::string> expected;
  for (int64_t step = 0; step + 1 < n; ++step) {
    for (const char* e : {first, second, "matmul (in flight)", "wait", "wait"}) expected.push_back(e);
  }
  expected.push_back("matmul (after)");
  EXPECT_EQ(forward, expected);
  // Backward: the same, and after each step the block's gradient
  // accumulator goes to the next rank (home after the last step).
  expected.clear();
  for (int64_t step = 0; step < n; ++step) {
    if (step + 1 < n) {
      for (const char* e : {first, second, "matmul (in flight)", "wait", "wait"}) expected.push_back(e);
    } else {
      expected.push_back("matmul (after)");
    }
    for (const char* e : {first, second, "wait", "wait"}) expected.push_back(e);
  }
  EXPECT_EQ(backward, expected);
}

ModelConfig tiny_model() {
  ModelConfig m;
  m.hidden_size = 32;
  m.intermediate_size = 48;
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 64;
  m.max_seq_len = 64;
  m.init_std = 0.05;
  return m;
}

// The model through ContextParallelLayerFactory against the single-device
// model: logits at the true rotary positions, the loss, every gradient.
void expect_model_matches_the_single_rank_model(const ModelConfig& config) {
  const int64_t seq = 8 * cp().size(), batch = 2;
  LocalLayerFactory local;
  LlamaForCausalLM whole(config, local);
  whole.init_weights(11);
  ContextParallelLayerFactory factory(local, cp(), seq);
  LlamaForCausalLM model(config, factory);
  model.init_weights(11);

  const at::Tensor tokens = at::randint(config.vocab_size, {batch, seq + 1},
                                        at::make_generator<at::CPUGeneratorImpl>(12), at::kLong);
  const at::Tensor inputs = tokens.slice(1, 0, seq), targets = tokens.slice(1, 1, seq + 1);
  const at::Tensor logits = whole.forward(inputs);
  const at::Tensor loss = at::cross_entropy_loss(logits.reshape({-1, config.vocab_size}), targets.reshape({-1}));
  loss.backward();

  const int64_t rank = cp().rank(), n = cp().size();
  const at::Tensor local_logits = model.forward(zigzag_tokens(inputs, rank, n));
  expect_close(local_logits, zigzag_tokens(logits, rank, n), 1e-5, "logits");
  // Each rank's mean over its share of the tokens, averaged over cp: the
  // whole sequence's mean (Note [cp replicas] in parallel/process_group.h).
  at::Tensor local_loss = at::cross_entropy_loss(local_logits.reshape({-1, config.vocab_size}),
                                                 zigzag_tokens(targets, rank, n).reshape({-1}));
  local_loss.backward();
  at::Tensor mean_loss = local_loss.detach().clone();
  cp().all_reduce(mean_loss, {ReduceOp::kAvg})->wait();
  expect_close(mean_loss, loss.detach(), 1e-6, "loss");
  const auto expected = whole.named_parameters();
  for (const auto& named : model.named_parameters()) {
    at::Tensor grad = named.value().grad().clone();
    cp().all_reduce(grad, {ReduceOp::kAvg})->wait();
    expect_close(grad, expected[named.key()].grad(), 1e-5, "gradient of " + named.key());
  }
}

TEST(ContextParallelModel, MatchesTheSingleRankModelsLogitsLossAndGradients) {
  expect_model_matches_the_single_rank_model(tiny_model());
}

// Mistral's window (shorter than the sequence, 5 tokens over chunks of 4)
// on the first layer, full attention on the second (layer_types), and
// Gemma-2's soft-capping on both.
TEST(ContextParallelModel, MatchesTheSingleRankModelWithASlidingWindowAndSoftCapping) {
  ModelConfig config = tiny_model();
  config.sliding_window = 5;
  config.layer_types = {"sliding_attention", "full_attention"};
  config.attn_logit_softcapping = 3.0;
  expect_model_matches_the_single_rank_model(config);
}

TEST(ContextParallelModel, MatchesTheSingleRankModelOverPackedDocuments) {
  const ModelConfig config = tiny_model();
  const int64_t seq = 8 * cp().size(), batch = 2;
  LocalLayerFactory local;
  LlamaForCausalLM whole(config, local);
  whole.init_weights(13);
  ContextParallelLayerFactory factory(local, cp(), seq);
  LlamaForCausalLM model(config, factory);
  model.init_weights(13);
  const at::Tensor inputs = at::randint(config.vocab_size, {batch, seq},
                                        at::make_generator<at::CPUGeneratorImpl>(14), at::kLong);
  const at::Tensor positions = packed_positions(seq);
  const at::Tensor logits = whole.forward(inputs, positions);
  (logits * logits).mean().backward();

  const int64_t rank = cp().rank(), n = cp().size();
  // The whole rows' positions: rotary takes this rank's, the ring all of them.
  const at::Tensor local_logits = model.forward(zigzag_tokens(inputs, rank, n), positions);
  expect_close(local_logits, zigzag_tokens(logits, rank, n), 1e-5, "logits");
  (local_logits * local_logits).mean().backward();
  const auto expected = whole.named_parameters();
  for (const auto& named : model.named_parameters()) {
    at::Tensor grad = named.value().grad().clone();
    cp().all_reduce(grad, {ReduceOp::kAvg})->wait();
    expect_close(grad, expected[named.key()].grad(), 1e-5, "gradient of " + named.key());
  }
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_context_parallel");
}
