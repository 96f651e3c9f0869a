// `loom train CONFIG [--set KEY=VALUE ...]`: one rank's part of a training run.
//
// Started by an MPI launcher (mpirun, srun), every rank runs this with the
// same arguments: MPI is initialized, the layout is checked against the world
// size (a layout that does not fit is refused by every rank, before any
// work, with exit code 2 and one message from rank 0), the grid's groups are
// made and train() runs on all ranks. Any later error on any rank ends the
// whole job (MPI_Abort) with a message naming the rank. Started alone, loom
// trains on one rank without MPI.
//
// SIGTERM (what Slurm and most schedulers send before killing a job),
// SIGINT (Ctrl-C) and SIGUSR1 (Slurm's --signal) stop the run gracefully:
// the step in progress is finished, a checkpoint is written at that step
// boundary, and loom exits with kExitRequeue (75, "preempted, checkpoint
// saved, requeue me"), so running the same command again resumes exactly. A
// second signal ends the process at once (the handler resets itself).
// launch.max_wall_time stops the run the same way when its time is up, and
// so does the job's end time when LOOM_JOB_END_TIME (or SLURM_JOB_END_TIME)
// gives it: the run stops while one more step and a checkpoint still fit
// (Note [stopping before the job ends] in trainer/job_end.h).
//
// Under MPI, a preflight (launch/preflight.h) runs before step 1; with
// --check, only the preflight runs.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "launch/cli.h"
#include "launch/commands.h"
#include "launch/launcher.h"
#include "launch/preflight.h"
#include "launch/run_record.h"
#include "parallel/cuda_runtime.h"
#include "parallel/device_groups.h"
#include "parallel/mpi_process_group.h"
#include "parallel/topology.h"
#include "config/config.h"
#include "trainer/device.h"
#include "trainer/job_end.h"
#include "trainer/loss_spike.h"
#include "trainer/training.h"
#include "util/error.h"
#include "util/host_memory.h"

namespace loom {

namespace {

std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free store");

extern "C" void on_stop_signal(int signal) { g_stop_signal.store(signal); }

// What g_stop_signal holds when launch.max_wall_time ran out. No handler is
// installed for SIGALRM, so a real one never lands there.
constexpr int kWallTimeStop = SIGALRM;

// launch.max_wall_time: a thread that asks for a graceful stop (as a signal
// would) once the budget is spent. The ranks start within moments of each
// other and agree on the stop at the next step boundary (the first rank whose
// budget ends decides), so they checkpoint the same step.
class WallClockBudget {
 public:
  WallClockBudget(double seconds, bool announce) {
    if (seconds <= 0) return;
    thread_ = std::thread([this, seconds, announce] {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto budget = std::chrono::duration<double>(seconds);
      if (done_changed_.wait_for(lock, budget, [this] { return done_; })) return;
      int expected = 0;
      if (g_stop_signal.compare_exchange_strong(expected, kWallTimeStop) && announce)
        std::cout << "launch.max_wall_time (" << seconds << " s) reached: stopping at the next step boundary"
                  << std::endl;
    });
  }
  ~WallClockBudget() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    done_changed_.notify_all();
    thread_.join();
  }
  WallClockBudget(const WallClockBudget&) = delete;
  WallClockBudget& operator=(const WallClockBudget&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable done_changed_;
  bool done_ = false;
  std::thread thread_;
};

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESETHAND;  // the second signal takes the default action: end now
  for (const int signal : {SIGTERM, SIGINT, SIGUSR1}) ::sigaction(signal, &action, nullptr);
}

// This process's rank as the MPI launcher numbered it (before MPI_Init), or 0.
int launcher_rank() {
  for (const char* variable : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"}) {
    if (const char* value = std::getenv(variable)) return std::atoi(value);
  }
  return 0;
}

std::chrono::milliseconds to_milliseconds(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(seconds * 1000.0)));
}

// run.output_dir/run.name must be a folder or creatable as one: a regular
// file on the way would fail at the first write as a filesystem error (exit
// 1), when it is the user's input that is wrong.
void check_run_folder_path(const Config& config) {
  namespace fs = std::filesystem;
  const fs::path run_dir = fs::path(config.run.output_dir) / config.run.name;
  for (fs::path path = run_dir; !path.empty(); path = path.parent_path()) {
    std::error_code error;
    const fs::file_status status = fs::status(path, error);
    if (fs::exists(status) && !fs::is_directory(status)) {
      throw BadInput("run.output_dir / run.name: " + path.string() + " is not a folder, so the run folder " +
                     run_dir.string() + " cannot be made there (expected a folder, or a path that does not exist)");
    }
    if (path == path.parent_path()) break;
  }
}

int report_stop(const TrainResult& result) {
  std::cout << (result.stopped_by_signal == kWallTimeStop ? std::string("stopped at launch.max_wall_time")
                : result.stopped_by_signal == kJobEndStop
                    ? std::string("stopped before the job's end time")
                    : "stopped by signal " + std::to_string(result.stopped_by_signal))
            << " after step " << result.final_step
            << (result.last_checkpoint.empty() ? std::string(" (no checkpoint: checkpoint.enabled is false)")
                                               : "; checkpoint " + result.last_checkpoint +
                                                     ", run the same command to resume")
            << " (exit " << kExitRequeue << ")" << std::endl;
  return kExitRequeue;
}

// train() on every rank of an MPI job (only the preflight with check_only).
// `command` is this process's command line, for the run record.
int train_ranks(Config& config, TrainOptions options, bool check_only, const std::vector<std::string>& command) {
  // The GPU is made current before MPI_Init, where the launcher says this
  // rank's place on its node: a CUDA-aware MPI (UCX) sets up on the current
  // device. MPI's own count decides below; a refusal is reported there.
  if (config.run.device != "cpu" && !check_only) {
    if (const std::optional<NodePlace> place = launcher_node_place(std::getenv)) {
      try {
        make_current(resolve_device(config.run.device, *place));
      } catch (const BadInput&) {
      }
    }
  }
  MpiSession session;
  // The hang watchdog (Note [process group contract]): every collective and
  // send/recv ends the job when it waits longer than the group's timeout,
  // parallel.comm_timeout_first_step until this process's first step is
  // done (start-up, a checkpoint to load), parallel.comm_timeout after.
  std::unique_ptr<MpiProcessGroup> world =
      session.world(to_milliseconds(config.parallel.comm_timeout_first_step));
  const bool rank0 = world->rank() == 0;
  try {
    check_training_layout(config, world->size());
  } catch (const BadInput& e) {
    // Every rank sees the same config and world size, so every rank refuses:
    // each returns 2 (MPI is finalized cleanly), one says why.
    if (rank0) std::cerr << "loom train: error: " << e.what() << std::endl;
    return kExitBadInput;
  }
  // runs/<name>/run.json (launch/run_record.h): rank 0 writes it; the end
  // of a failed run is written by the rank that failed.
  std::optional<RunRecord> record;
  try {
    const ParallelDims dims = ParallelDims::from_config(config, world->size());
    const GridGroups grid = split_grid(*world, dims);
    const std::vector<std::string> hosts = host_names(world.get());
    OpenedDatasets datasets;
    if (!run_preflight(config, world.get(), &grid, std::cout, std::cerr, &datasets)) return kExitBadInput;
    if (rank0) log_memory_forecast(config, dims.dp, std::cout);
    if (check_only) return kExitOk;
    // One GPU per rank, by its place on its node (Note [choosing a GPU]);
    // on CUDA the NCCL twins of the dp and tp groups carry the model's
    // tensors (Note [host and device groups]).
    const MpiProcessGroup::NodeRanks node = world->node_ranks();
    options.node = NodePlace{node.local_rank, node.size};
    const c10::Device device = resolve_device(config.run.device, options.node);
    make_current(device);
    std::vector<RankDevice> devices;
    for (const std::string& text : all_gather_strings(*world, to_string(rank_device(device, hosts[world->rank()])))) {
      devices.push_back(rank_device_from_string(text));
    }
    try {
      check_rank_devices(devices, /*shared_gpu_ok=*/config.parallel.device_backend == kStagedBackend);
    } catch (const BadInput& e) {
      // Every rank sees the same devices and refuses alike; one says why.
      if (rank0) std::cerr << "loom train: error: " << e.what() << std::endl;
      return kExitBadInput;
    }
    std::optional<GridGroups> device_grid;
    if (has_device_groups(device, config.parallel.device_backend) && world->size() > 1) {
      if (!cuda_built() && config.parallel.device_backend == "nccl") {
        throw BadInput("run.device: " + config.run.device + " on " + std::to_string(world->size()) +
                       " ranks needs NCCL, and this loom was built without the CUDA toolkit; use run.device cpu");
      }
      device_grid = loom::device_grid(grid, device, config.parallel.device_backend);
      options.device_grid = &*device_grid;
    }
    if (config.parallel.device_backend == kStagedBackend) {
      // Each rank says where it runs: the test backend's runs check it.
      std::cout << "train: world rank " + std::to_string(world->rank()) + ": " + device.str() + " on " +
                       hosts[world->rank()] + ", device tensors through mpi_staged (test only)\n"
                << std::flush;
    }
    record.emplace(config, dims, command, hosts);
    if (rank0) record->start();
    options.world = world.get();
    options.grid = &grid;
    options.datasets = &datasets;
    // Open MPI gives every rank a pseudo-terminal whether or not mpirun has a
    // real one, so a multi-rank run logs plain lines.
    options.progress_bar = false;
    options.on_step_done = [&, steady = false](int64_t) mutable {
      if (steady) return;
      const auto timeout = to_milliseconds(config.parallel.comm_timeout);
      for (ProcessGroup* group : {static_cast<ProcessGroup*>(world.get()), grid.dp.get(), grid.pp.get(), grid.tp.get(),
                                  device_grid ? device_grid->dp.get() : nullptr,
                                  device_grid ? device_grid->tp.get() : nullptr}) {
        if (group != nullptr) group->set_timeout(timeout);
      }
      steady = true;
    };
    const WallClockBudget budget(config.launch.max_wall_time, rank0);
    const TrainResult result = train_with_rollbacks(config, options);
    if (result.stopped_by_signal != 0) {
      // No rank leaves before every rank has returned from train() (rank 0
      // last, after it named the checkpoint in `latest`): mpirun and srun
      // end the job when the first rank exits with a non-zero code.
      world->barrier()->wait();
      if (!rank0) return kExitRequeue;
      record->finish(kExitRequeue, result.final_step);
      return report_stop(result);
    }
    if (rank0) record->finish(kExitOk, result.final_step);
    return kExitOk;
  } catch (const BadInput& e) {
    if (record) record->finish(kExitBadInput, -1, "rank " + std::to_string(world->rank()) + ": " + e.what());
    MpiSession::abort("train: rank " + std::to_string(world->rank()) + ": error: " + e.what(), kExitBadInput);
  } catch (const std::exception& e) {
    if (record) record->finish(kExitInternal, -1, "rank " + std::to_string(world->rank()) + ": " + e.what());
    MpiSession::abort("train: rank " + std::to_string(world->rank()) + ": internal error: " + e.what(), kExitInternal);
  }
}

}  // namespace

bool launched_by_mpi() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  return false;
}

int launcher_world_size() {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"}) {
    if (const char* value = std::getenv(variable)) return std::atoi(value);
  }
  return 0;
}

const CommandSpec& train_spec() {
  static const CommandSpec spec{
      .name = "train",
      .synopsis = "CONFIG [OPTIONS]",
      .summary = "train: what each rank runs (alone, one rank); outputs in runs/<run.name>/ (docs/training.md)",
      .arguments = {{"CONFIG", "the training config (.yaml)"}},
      .flags = {{"set", "KEY=VALUE", "override a config key, e.g. --set schedule.train_steps=100", kRepeatable},
                {"check", "", "run the preflight only (see loom launch --check)"}},
      .examples = {"loom train configs/tiny.yaml --set schedule.train_steps=100",
                   "mpirun -np 2 loom train configs/tiny.yaml --set parallel.tp=2"},
      .notes = "Under mpirun (or srun) the ranks form one job; loom launch starts them from the config's launch.*.",
  };
  return spec;
}

int command_train(const std::vector<std::string>& argv) {
  Args args(train_spec(), argv);
  const bool check_only = args.has("check");
  args.expect_positional(1, "one CONFIG");
  std::vector<std::string> overrides = args.all("set");
  // Under a launcher the world size is the launcher's: launch.ranks (what
  // `loom launch` would start, and what the config's checks compare dp * tp *
  // pp with) follows it unless the command line sets it.
  if (const int world = launcher_world_size(); world > 0) {
    bool set = false;
    for (const std::string& o : overrides) set = set || o.rfind("launch.ranks=", 0) == 0;
    if (!set) overrides.insert(overrides.begin(), "launch.ranks=" + std::to_string(world));
  }
  Config config;
  try {
    config = load_config(args.positional()[0], overrides);
  } catch (const BadInput&) {
    // Under an MPI launcher every rank reads the same config and fails the
    // same way: rank 0 reports it, the others only exit with the same code.
    if (launcher_rank() != 0) return kExitBadInput;
    throw;
  }
  try {
    check_run_folder_path(config);
  } catch (const BadInput&) {
    if (launcher_rank() != 0) return kExitBadInput;  // rank 0 says why, as for the config itself
    throw;
  }
  // Large tensors freed in one step are handed out again in the next with
  // their pages resident (Note [Large blocks on the CPU heap]), unless the
  // run shards its parameters or gradients to save memory: then they go back
  // to the system as they are freed.
  if (config.parallel.zero_stage >= 2) {
    release_freed_heap_memory();
  } else {
    keep_freed_heap_memory();
  }
  TrainOptions options;
  try {
    options.job_end_time = job_end_time_from_environment();
  } catch (const BadInput&) {
    if (launcher_rank() != 0) return kExitBadInput;  // rank 0 says why, as for the config itself
    throw;
  }
  if (options.job_end_time > 0 && launcher_rank() == 0)
    std::cout << "the job ends in " << static_cast<int64_t>(options.job_end_time - unix_seconds_now())
              << " s (LOOM_JOB_END_TIME): the run checkpoints and stops (exit " << kExitRequeue
              << ") while one more step, a save and launch.job_end_margin still fit" << std::endl;
  options.log = &std::cout;
  options.progress_bar = ::isatty(STDOUT_FILENO) == 1;
  options.stop_signal = &g_stop_signal;
  install_stop_handlers();
  std::vector<std::string> command = {"loom", "train"};
  command.insert(command.end(), argv.begin(), argv.end());
  if (launched_by_mpi()) return train_ranks(config, options, check_only, command);
  if (check_only) return run_preflight(config, nullptr, nullptr, std::cout, std::cerr) ? kExitOk : kExitBadInput;
  RunRecord record(config, check_training_layout(config, 1), command, host_names(nullptr));
  record.start();
  log_memory_forecast(config, 1, std::cout);
  const WallClockBudget budget(config.launch.max_wall_time, /*announce=*/true);
  TrainResult result;
  try {
    result = train_with_rollbacks(config, options);
  } catch (const BadInput& e) {
    record.finish(kExitBadInput, -1, e.what());
    throw;
  } catch (const std::exception& e) {
    record.finish(kExitInternal, -1, e.what());
    throw;
  }
  if (result.stopped_by_signal != 0) {
    record.finish(kExitRequeue, result.final_step);
    return report_stop(result);
  }
  record.finish(kExitOk, result.final_step);
  return kExitOk;
}

}  // namespace loom
