// Which GPU a rank takes, and the checks on every rank's device (Note
// [choosing a GPU] in trainer/device.h), for each way a launcher can show a
// rank its GPUs. No GPU is needed: the choice is a function of the counts.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "tests/unit/bad_input.h"
#include "trainer/device.h"
#include "util/error.h"

namespace loom {
namespace {

using test_support::expect_bad_input;

TEST(ChooseGpu, OneVisibleGpuIsTheRanksOwnWhateverItsLocalRank) {
  // srun --gpus-per-task=1, --gpu-bind, or CUDA_VISIBLE_DEVICES per rank.
  for (int64_t local = 0; local < 8; ++local) EXPECT_EQ(choose_gpu(1, {local, 8}), 0);
}

TEST(ChooseGpu, AtLeastOneGpuPerRankOfTheNodeGivesTheLocalRanksGpu) {
  for (int64_t local = 0; local < 4; ++local) {
    EXPECT_EQ(choose_gpu(4, {local, 4}), local);
    EXPECT_EQ(choose_gpu(8, {local, 4}), local);  // 4 ranks on an 8-GPU node use the first 4
  }
  EXPECT_EQ(choose_gpu(8, {0, 1}), 0);  // a single process takes GPU 0
}

TEST(ChooseGpu, FewerGpusThanRanksIsRefusedNamingTheCounts) {
  expect_bad_input([] { choose_gpu(2, {3, 4}); },
                   {"local rank 3 of the 4 ranks on this node sees 2 GPUs", "start at most 2 ranks per node"});
  // Even the ranks that would find a GPU refuse: the layout is wrong.
  expect_bad_input([] { choose_gpu(2, {0, 4}); }, {"sees 2 GPUs"});
}

// A fake environment for launcher_node_place.
struct Env {
  std::map<std::string, std::string> values;
  const char* operator()(const char* name) const {
    const auto it = values.find(name);
    return it == values.end() ? nullptr : it->second.c_str();
  }
};

std::optional<NodePlace> place_in(std::map<std::string, std::string> values) {
  const Env env{std::move(values)};
  return launcher_node_place(env);
}

TEST(LauncherNodePlace, ReadsEachLaunchersVariables) {
  const auto expect = [](const std::optional<NodePlace>& place, int64_t rank, int64_t size) {
    ASSERT_TRUE(place.has_value());
    EXPECT_EQ(place->local_rank, rank);
    EXPECT_EQ(place->ranks_on_node, size);
  };
  expect(place_in({{"OMPI_COMM_WORLD_LOCAL_RANK", "3"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}), 3, 4);
  expect(place_in({{"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "2"}}), 1, 2);
  expect(place_in({{"PMI_LOCAL_RANK", "0"}, {"PMI_LOCAL_SIZE", "8"}}), 0, 8);
  expect(place_in({{"LOCAL_RANK", "5"}, {"LOCAL_WORLD_SIZE", "8"}}), 5, 8);
  // Slurm: the node's count from SLURM_TASKS_PER_NODE by SLURM_NODEID.
  expect(place_in({{"SLURM_LOCALID", "1"}, {"SLURM_NODEID", "2"}, {"SLURM_TASKS_PER_NODE", "2(x3),1"}}), 1, 2);
  expect(place_in({{"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "3"}, {"SLURM_TASKS_PER_NODE", "2(x3),1"}}), 0, 1);
  expect(place_in({{"SLURM_LOCALID", "2"}, {"SLURM_NODEID", "1"}, {"SLURM_TASKS_PER_NODE", "4,3"}}), 2, 3);
  // srun's own step count wins over the allocation's.
  expect(place_in({{"SLURM_LOCALID", "0"},
                   {"SLURM_NODEID", "0"},
                   {"SLURM_TASKS_PER_NODE", "8"},
                   {"SLURM_STEP_TASKS_PER_NODE", "2"}}),
         0, 2);
  // Open MPI's variables win over Slurm's (mpirun inside an allocation).
  expect(place_in({{"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                   {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                   {"SLURM_LOCALID", "0"},
                   {"SLURM_NODEID", "0"},
                   {"SLURM_TASKS_PER_NODE", "1"}}),
         1, 2);
}

TEST(LauncherNodePlace, NothingWhenUnsetOrUnreadable) {
  EXPECT_FALSE(place_in({}).has_value());
  EXPECT_FALSE(place_in({{"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}).has_value());  // no size
  EXPECT_FALSE(place_in({{"OMPI_COMM_WORLD_LOCAL_RANK", "x"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}}).has_value());
  EXPECT_FALSE(place_in({{"OMPI_COMM_WORLD_LOCAL_RANK", "2"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}}).has_value());
  EXPECT_FALSE(place_in({{"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "4"}, {"SLURM_TASKS_PER_NODE", "2(x3),1"}})
                   .has_value());  // no such node
  EXPECT_FALSE(place_in({{"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "0"}, {"SLURM_TASKS_PER_NODE", "2(x"}}).has_value());
}

TEST(CheckRankDevices, RanksThatDisagreeOnTheDeviceTypeAreRefusedNamingThem) {
  expect_bad_input([] { check_rank_devices({{"a", "cuda", "0000:1B:00.0"}, {"b", "cpu", ""}, {"b", "cpu", ""}}); },
                   {"do not agree on a device type", "cpu on world ranks [1 2]", "cuda on world ranks [0]"});
}

TEST(CheckRankDevices, TwoRanksOfOneHostOnTheSameGpuAreRefused) {
  expect_bad_input(
      [] {
        check_rank_devices({{"a", "cuda", "0000:1B:00.0"}, {"a", "cuda", "0000:2C:00.0"}, {"a", "cuda", "0000:1B:00.0"}});
      },
      {"world ranks [0 2] on a all hold the GPU at PCI 0000:1B:00.0"});
  // The same bus id on two hosts is two GPUs.
  check_rank_devices({{"a", "cuda", "0000:1B:00.0"}, {"b", "cuda", "0000:1B:00.0"}});
  // A backend that stages tensors through MPI may share one GPU on purpose.
  check_rank_devices({{"a", "cuda", "0000:1B:00.0"}, {"a", "cuda", "0000:1B:00.0"}}, /*shared_gpu_ok=*/true);
  check_rank_devices({{"a", "cpu", ""}, {"a", "cpu", ""}});
}

TEST(CheckRankDevices, ARankDeviceSurvivesItsTextForm) {
  const RankDevice device{"node-7", "cuda", "0000:1B:00.0"};
  const RankDevice back = rank_device_from_string(to_string(device));
  EXPECT_EQ(back.host, device.host);
  EXPECT_EQ(back.type, device.type);
  EXPECT_EQ(back.bus_id, device.bus_id);
  const RankDevice cpu = rank_device(c10::Device(c10::kCPU), "h");
  EXPECT_EQ(cpu.type, "cpu");
  EXPECT_EQ(cpu.bus_id, "");
}

}  // namespace
}  // namespace loom
