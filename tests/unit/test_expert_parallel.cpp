// Expert parallelism (parallel/expert_parallel.h) against one rank holding
// every expert: the all-to-all of uneven splits on the MPI and staged
// backends, the expert and expert-data-parallel groups of the grid, and a
// whole mixture-of-experts model whose sparse layers exchange their tokens
// over the world against the same model with every expert at home (logits,
// and every gradient: an expert's is the sum of what every rank's tokens
// gave it). Runs under mpirun (CTest expert_parallel_np2/np4); every rank
// runs every test in the same order (tests/unit/mpi_test_main.h).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/llama.h"
#include "model/moe.h"
#include "parallel/expert_parallel.h"
#include "parallel/mpi_process_group.h"
#include "parallel/staged_process_group.h"
#include "parallel/topology.h"
#include "tests/unit/mpi_test_main.h"

namespace loom {
namespace {

MpiProcessGroup* g_world = nullptr;
ProcessGroup& world() { return *g_world; }

using test_support::expect_close;

// Rows rank `from` sends rank `to` in the uneven exchange: 0 to 4, some zero.
int64_t rows_between(int64_t from, int64_t to) { return (3 * from + 2 * to + 1) % 5; }

// Row k from `from` to `to`: [from, to, k].
at::Tensor rows_for(int64_t from, int64_t to) {
  const int64_t n = rows_between(from, to);
  at::Tensor rows = at::empty({n, 3}, at::kFloat);
  for (int64_t k = 0; k < n; ++k) {
    rows[k][0] = static_cast<float>(from);
    rows[k][1] = static_cast<float>(to);
    rows[k][2] = static_cast<float>(k);
  }
  return rows;
}

void check_uneven_all_to_all(ProcessGroup& group) {
  const int64_t me = group.rank(), n = group.size();
  std::vector<at::Tensor> sending, expected;
  AllToAllOptions splits;
  for (int64_t r = 0; r < n; ++r) {
    sending.push_back(rows_for(me, r));
    expected.push_back(rows_for(r, me));
    splits.input_splits.push_back(rows_between(me, r));
    splits.output_splits.push_back(rows_between(r, me));
  }
  const at::Tensor input = at::cat(sending), want = at::cat(expected);
  at::Tensor output = at::full(want.sizes(), -1.0f);
  group.all_to_all(output, input, splits)->wait();
  EXPECT_TRUE(at::equal(output, want)) << group.backend() << " rank " << me << ": got\n" << output << "\nwant\n" << want;
}

TEST(AllToAll, UnevenSplitsDeliverEachRanksRowsInRankOrder) {
  check_uneven_all_to_all(world());
  StagedProcessGroup staged(*g_world);
  check_uneven_all_to_all(staged);
}

TEST(AllToAll, EqualSharesWithoutSplits) {
  const int64_t n = world().size();
  const at::Tensor input = at::arange(2 * n, at::kLong) + 100 * world().rank();  // rows 2r, 2r+1 go to rank r
  at::Tensor output = at::empty({2 * n}, at::kLong);
  world().all_to_all(output, input)->wait();
  for (int64_t r = 0; r < n; ++r) {
    EXPECT_EQ(output[2 * r].item<int64_t>(), 100 * r + 2 * world().rank());
    EXPECT_EQ(output[2 * r + 1].item<int64_t>(), 100 * r + 2 * world().rank() + 1);
  }
}

TEST(AllToAll, SplitsThatDoNotFitTheTensorsAreRefusedBeforeAnythingIsSent) {
  // The same refusal on every rank, so no rank is left waiting.
  const int64_t n = world().size();
  const at::Tensor input = at::zeros({n, 2});
  at::Tensor output = at::zeros({n, 2});
  std::vector<int64_t> too_many(static_cast<size_t>(n), 2);
  try {
    world().all_to_all(output, input, {too_many, {}});
    FAIL() << "splits of " << 2 * n << " rows for a tensor of " << n << " were taken";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("input splits add up to " + std::to_string(2 * n) + " rows"),
              std::string::npos)
        << e.what();
  }
  at::Tensor other_rows = at::zeros({n, 3});
  EXPECT_THROW(world().all_to_all(other_rows, input), std::invalid_argument);
}

// Note [expert groups]: dp 4 with ep 2 (or dp 2 x tp 2 on four ranks).
TEST(ExpertGroups, EpRanksAreConsecutiveDpRanksAndEdpTheirCopies) {
  if (world().size() != 4) GTEST_SKIP() << "needs 4 ranks";
  const int me = world().rank();
  {
    ParallelDims dims;
    dims.world = 4;
    dims.dp = 4;
    dims.ep = 2;
    const GridGroups grid = split_grid(*g_world, dims);
    EXPECT_EQ(grid.ep->world_ranks(), (std::vector<int>{me / 2 * 2, me / 2 * 2 + 1}));
    EXPECT_EQ(grid.edp->world_ranks(), (std::vector<int>{me % 2, me % 2 + 2}));
    EXPECT_EQ(grid.ep->rank(), me % 2);
    EXPECT_EQ(grid.edp->rank(), me / 2);
  }
  {
    ParallelDims dims;
    dims.world = 4;
    dims.dp = 2;
    dims.tp = 2;
    dims.ep = 2;
    const GridGroups grid = split_grid(*g_world, dims);
    // rank = dp * 2 + tp: the ep group joins the two dp ranks of one tp rank.
    EXPECT_EQ(grid.ep->world_ranks(), (std::vector<int>{me % 2, me % 2 + 2}));
    EXPECT_EQ(grid.edp->world_ranks(), std::vector<int>{me});
  }
}

ModelConfig moe_config(const std::string& architecture, int64_t experts) {
  ModelConfig m;
  m.architecture = architecture;
  m.hidden_size = 32;
  m.intermediate_size = 48;
  m.num_layers = 2;
  m.num_heads = 4;
  m.num_kv_heads = 2;
  m.vocab_size = 64;
  m.max_seq_len = 16;
  m.init_std = 0.3;
  m.num_experts = experts;
  m.num_experts_per_tok = 2;
  if (architecture != "mixtral") m.moe_intermediate_size = 24;
  if (architecture == "qwen2_moe") m.shared_expert_intermediate_size = 40;
  return m;
}

class ExpertParallelModel : public testing::TestWithParam<std::string> {};

// Each rank's own tokens through the model whose experts are spread over the
// world, against the same tokens through the model with every expert.
TEST_P(ExpertParallelModel, MatchesEveryExpertAtHomeForwardAndBackward) {
  const int64_t n = world().size();
  const ModelConfig config = moe_config(GetParam(), 2 * n);  // two experts a rank
  LocalLayerFactory local;
  LlamaForCausalLM whole(config, local);
  whole.init_weights(21);
  LocalLayerFactory spread;
  spread.use_expert_exchange(std::make_shared<ExpertParallelExchange>(world(), world()));
  LlamaForCausalLM model(config, spread);
  model.init_weights(21);

  // Each rank holds experts 2r and 2r + 1 of every sparse layer.
  const auto params = model.named_parameters();
  const std::string block = "model.layers.0." + std::string(config.feed_forward_name()) + ".experts.";
  const std::string up = GetParam() == "mixtral" ? ".w3.weight" : ".up_proj.weight";
  EXPECT_TRUE(params.contains(block + std::to_string(2 * world().rank()) + up));
  EXPECT_TRUE(params.contains(block + std::to_string(2 * world().rank() + 1) + up));
  EXPECT_EQ(params.size(), whole.named_parameters().size() - static_cast<size_t>(config.num_layers * 3 * (2 * n - 2)));

  const at::Tensor inputs = at::randint(config.vocab_size, {2, 12},
                                        at::make_generator<at::CPUGeneratorImpl>(30 + world().rank()), at::kLong);
  const at::Tensor expected = whole.forward(inputs);
  (expected * expected).mean().backward();
  const at::Tensor logits = model.forward(inputs);
  expect_close(logits, expected, 1e-5, "logits");
  (logits * logits).mean().backward();
  // Every rank's tokens sent their rows through the experts' ranks: an
  // expert's gradient is the sum of the whole model's over the ranks (summed
  // here for every expert, in the same order on every rank).
  const auto reference = whole.named_parameters();
  std::map<std::string, at::Tensor> summed;
  for (const auto& named : reference) {
    if (!is_expert_parameter(named.key())) continue;
    at::Tensor sum = named.value().grad().clone();
    world().all_reduce(sum)->wait();
    summed.emplace(named.key(), sum);
  }
  for (const auto& named : params) {
    const at::Tensor want = is_expert_parameter(named.key()) ? summed.at(named.key()) : reference[named.key()].grad();
    expect_close(named.value().grad(), want, 1e-5, "gradient of " + named.key());
  }

  // The export's gathering: every expert, under its global name and value.
  const NamedTensors gathered = gather_experts(world(), to_named_tensors(params));
  EXPECT_EQ(gathered.size(), reference.size());
  for (const auto& [name, tensor] : gathered) {
    ASSERT_TRUE(reference.contains(name)) << name;
    EXPECT_TRUE(at::equal(tensor, reference[name])) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, ExpertParallelModel, testing::Values("mixtral", "qwen2_moe"),
                         [](const testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return loom::test_support::run_tests_on_every_rank(session, &loom::g_world, "test_expert_parallel");
}
