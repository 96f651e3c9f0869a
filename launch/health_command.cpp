// `loom health CONFIG`: the first run on a new cluster (docs/launching.md,
// "A first multi-GPU run"). Every rank measures at once, on the device and
// in the layout CONFIG trains with:
//   matmul      measure_matmul_peak_flops (bf16 on a GPU, fp32 on the CPU)
//   send        bytes to the next rank of the world ring while receiving
//               from the previous one (the pipeline's point-to-point path)
//   all-reduce  the bus bandwidth of each world, tp, cp, pp and dp group, every
//               group of a kind at once, as in training (NCCL on GPUs)
// then world rank 0 prints a table per rank and per group and names the
// slow ranks, nodes and groups (Note [slow against the median] in
// launch/health.h). Exit 0 when none is slow, 1 when some are.
//
// Under mpirun or srun it is what every rank runs; started alone it starts
// itself under mpirun with launch.ranks ranks.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <vector>

#include <ATen/ATen.h>

#include "config/config.h"
#include "launch/cli.h"
#include "launch/commands.h"
#include "launch/health.h"
#include "launch/run_record.h"
#include "parallel/mpi_process_group.h"
#include "parallel/device_groups.h"
#include "trainer/device.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom {

namespace {

using Clock = std::chrono::steady_clock;

// The median of 5 timings of `work` after one untimed run, seconds; the
// device's queue is drained around each.
template <typename Work>
double median_seconds(c10::Device device, Work&& work) {
  work();
  synchronize(device);
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    work();
    synchronize(device);
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  return std::max(median_of(times), 1e-9);
}

// Bytes each message carries: enough to reach a link's bandwidth.
int64_t message_floats(c10::Device device) { return device.is_cuda() ? int64_t{64} << 20 : int64_t{4} << 20; }

// All-reduce bus bandwidth of `group` (the convention of nccl-tests: the
// bytes each rank sends and receives, 2 (n - 1) / n of the message).
double all_reduce_bus_bandwidth(ProcessGroup& group, c10::Device device) {
  at::Tensor t = at::ones({message_floats(device)}, at::TensorOptions().device(device));
  const double n = static_cast<double>(group.size());
  const double seconds = median_seconds(device, [&] { group.all_reduce(t)->wait(); });
  return 2 * (n - 1) / n * static_cast<double>(t.numel() * 4) / seconds;
}

// This rank's send bandwidth to the next rank of `world`'s ring, receiving
// from the previous one: even ranks send first, odd ranks receive first, so
// the ring never waits on itself.
double ring_send_bandwidth(ProcessGroup& world, c10::Device device) {
  const int n = world.size();
  const int next = (world.rank() + 1) % n, previous = (world.rank() + n - 1) % n;
  const auto options = at::TensorOptions().device(device);
  at::Tensor out = at::ones({message_floats(device)}, options), in = at::empty({message_floats(device)}, options);
  const double seconds = median_seconds(device, [&] {
    if (world.rank() % 2 == 0) {
      world.send(out, {.peer = next, .tag = 1})->wait();
      world.recv(in, {.peer = previous, .tag = 1})->wait();
    } else {
      world.recv(in, {.peer = previous, .tag = 1})->wait();
      world.send(out, {.peer = next, .tag = 1})->wait();
    }
  });
  // A send and a receive, one after the other: each took about half.
  return static_cast<double>(out.numel() * 4) / (seconds / 2);
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, separator)) parts.push_back(part);
  return parts;
}

}  // namespace

const CommandSpec& health_spec() {
  static const CommandSpec spec{
      .name = "health",
      .synopsis = "CONFIG [OPTIONS]",
      .summary = "measure every rank's matmul rate and each group's bandwidth; name the slow ones "
                 "(docs/launching.md)",
      .arguments = {{"CONFIG", "the training config: its device, layout (parallel.*) and launch.ranks"}},
      .flags = {{"set", "KEY=VALUE", "override a config key", kRepeatable},
                {"slow-below", "FRACTION", "slow: below this fraction of the median (default 0.8)"}},
      .examples = {"loom health configs/tiny.yaml --set launch.ranks=4 --set parallel.tp=2",
                   "srun --ntasks-per-node=8 --gpus-per-node=8 loom health configs/llama3-8b.yaml"},
      .notes = "Exit 0 when no rank, node or group is slow, 1 when some are. Under mpirun or srun every rank runs "
               "it; alone, it starts itself under mpirun with launch.ranks ranks.",
  };
  return spec;
}

int command_health(const std::vector<std::string>& argv) {
  Args args(health_spec(), argv);
  args.expect_positional(1, "one CONFIG");
  const double threshold = args.get_double("slow-below", 0.8);
  if (!(threshold > 0 && threshold <= 1)) throw BadInput("loom health: --slow-below must be in (0, 1]");
  std::vector<std::string> overrides = args.all("set");
  if (const int world = launcher_world_size(); world > 0) overrides.push_back("launch.ranks=" + std::to_string(world));
  const Config config = load_config(args.positional()[0], overrides);
  if (!launched_by_mpi()) {
    return rerun_under_mpirun("health", argv, config.launch.ranks);
  }

  MpiSession session;
  std::unique_ptr<MpiProcessGroup> world = session.world(
      std::chrono::milliseconds(static_cast<int64_t>(config.parallel.comm_timeout_first_step * 1000)));
  const bool rank0 = world->rank() == 0;
  try {
    const ParallelDims dims = check_training_layout(config, world->size());
    const GridGroups grid = split_grid(*world, dims);
    const std::vector<std::string> hosts = host_names(world.get());
    const MpiProcessGroup::NodeRanks node = world->node_ranks();
    const c10::Device device = resolve_device(config.run.device, NodePlace{node.local_rank, node.size});
    make_current(device);
    std::vector<RankDevice> devices;
    for (const std::string& text : all_gather_strings(*world, to_string(rank_device(device, hosts[world->rank()])))) {
      devices.push_back(rank_device_from_string(text));
    }
    check_rank_devices(devices, /*shared_gpu_ok=*/config.parallel.device_backend == kStagedBackend);

    // The groups to measure, each with the group it moves device tensors on.
    struct Measured {
      std::string kind;
      ProcessGroup* host;
      std::unique_ptr<ProcessGroup> device_twin;
    };
    std::vector<Measured> groups;
    for (auto [kind, group] : {std::pair<const char*, MpiProcessGroup*>{"world", world.get()},
                               {"tp", dynamic_cast<MpiProcessGroup*>(grid.tp.get())},
                               {"cp", dynamic_cast<MpiProcessGroup*>(grid.cp.get())},
                               {"pp", dynamic_cast<MpiProcessGroup*>(grid.pp.get())},
                               {"dp", dynamic_cast<MpiProcessGroup*>(grid.dp.get())}}) {
      if (group == nullptr || group->size() < 2) continue;
      groups.push_back({kind, group, device_twin(*group, device, config.parallel.device_backend)});
    }
    auto on_device = [&](Measured& m) -> ProcessGroup& { return m.device_twin ? *m.device_twin : *m.host; };

    const at::ScalarType dtype = device.is_cuda() ? at::kBFloat16 : at::kFloat;
    world->barrier()->wait();
    const double matmul = measure_matmul_peak_flops(device, dtype);
    double send = 0;
    if (!groups.empty() && groups.front().kind == "world") {
      world->barrier()->wait();
      send = ring_send_bandwidth(on_device(groups.front()), device);
    }
    std::string my_groups;  // the groups this rank is rank 0 of: "kind ranks... bandwidth;"
    for (Measured& m : groups) {
      world->barrier()->wait();
      const double bandwidth = all_reduce_bus_bandwidth(on_device(m), device);
      if (m.host->rank() != 0) continue;
      std::ostringstream line;
      line << m.kind << " " << std::setprecision(17) << bandwidth;
      for (const int r : m.host->world_ranks()) line << " " << r;
      my_groups += line.str() + ";";
    }
    std::ostringstream mine;
    mine << std::setprecision(17) << matmul << " " << send << "|" << my_groups;
    const std::vector<std::string> reports = all_gather_strings(*world, mine.str());

    std::vector<RankHealth> ranks;
    std::vector<GroupHealth> group_health;
    for (size_t r = 0; r < reports.size(); ++r) {
      const size_t bar = reports[r].find('|');
      RankHealth h;
      h.rank = static_cast<int>(r);
      h.host = hosts[r];
      std::istringstream(reports[r].substr(0, bar)) >> h.matmul_flops >> h.send_bytes_per_s;
      ranks.push_back(h);
      for (const std::string& entry : split(reports[r].substr(bar + 1), ';')) {
        if (entry.empty()) continue;
        std::istringstream in(entry);
        GroupHealth g;
        in >> g.kind >> g.bus_bytes_per_s;
        for (int member; in >> member;) g.ranks.push_back(member);
        group_health.push_back(g);
      }
    }
    // Shown by kind in the grid's order, then by their ranks.
    auto kind_order = [](const std::string& kind) {
      return kind == "world" ? 0 : kind == "tp" ? 1 : kind == "cp" ? 2 : kind == "pp" ? 3 : 4;
    };
    std::sort(group_health.begin(), group_health.end(), [&](const GroupHealth& a, const GroupHealth& b) {
      return std::pair(kind_order(a.kind), a.ranks) < std::pair(kind_order(b.kind), b.ranks);
    });
    const HealthVerdict verdict = judge_health(ranks, group_health, threshold);
    if (rank0) {
      std::ostream& out = std::cout;
      out << "loom health: " << world->size() << " ranks, world = dp " << dims.dp << " x cp " << dims.cp << " x pp "
          << dims.pp << " x tp " << dims.tp << ", " << device_name(device) << ", matmul in " << (device.is_cuda() ? "bf16" : "fp32")
          << ", messages of " << message_floats(device) * 4 / (1 << 20) << " MiB\n";
      out << std::left << std::setw(6) << "rank" << std::setw(24) << "host" << std::setw(14) << "device"
          << std::right << std::setw(16) << "matmul TFLOP/s" << std::setw(12) << "send GB/s" << "\n";
      for (size_t r = 0; r < ranks.size(); ++r) {
        const std::string where = devices[r].type + (devices[r].bus_id.empty() ? "" : " " + devices[r].bus_id);
        out << std::left << std::setw(6) << r << std::setw(24) << ranks[r].host << std::setw(14) << where
            << std::right << std::fixed << std::setprecision(3) << std::setw(16) << ranks[r].matmul_flops / 1e12
            << std::setw(12) << ranks[r].send_bytes_per_s / 1e9 << "\n";
      }
      for (const GroupHealth& g : group_health) {
        out << std::left << std::setw(6) << g.kind << std::setw(38) << rank_list(g.ranks) << std::right
            << "all-reduce " << std::setprecision(3) << g.bus_bytes_per_s / 1e9 << " GB/s (bus)\n";
      }
      out.unsetf(std::ios::floatfield);
      for (const std::string& line : verdict.slow_ranks) out << "slow rank: " << line << "\n";
      for (const std::string& line : verdict.slow_nodes) out << "slow node: " << line << "\n";
      for (const std::string& line : verdict.slow_groups) out << "slow group: " << line << "\n";
      out << "loom health: "
          << (verdict.healthy() ? "no rank or group below " + std::to_string(threshold).substr(0, 4) +
                                      " of the median"
                                : std::to_string(verdict.slow_ranks.size()) + " slow rank(s), " +
                                      std::to_string(verdict.slow_groups.size()) + " slow group(s)")
          << std::endl;
    }
    world->barrier()->wait();
    return verdict.healthy() ? kExitOk : 1;
  } catch (const BadInput& e) {
    MpiSession::abort("health: rank " + std::to_string(world->rank()) + ": error: " + e.what(), kExitBadInput);
  } catch (const std::exception& e) {
    MpiSession::abort("health: rank " + std::to_string(world->rank()) + ": internal error: " + e.what(),
                      kExitInternal);
  }
}

}  // namespace loom
