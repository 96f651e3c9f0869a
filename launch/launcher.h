// What `loom launch` runs: the mpirun command line and the Slurm batch script
// built from a config's `launch` section. Pure functions of the config and
// of the machine facts in LaunchHost, so a dry run prints exactly what a real
// launch runs, and tests check it without MPI or Slurm.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"

namespace loom {

// The exit code of `loom train` (and so of mpirun, srun and `loom launch`)
// when a run stopped early on purpose — a stop signal (SIGTERM, SIGINT,
// SIGUSR1) or launch.max_wall_time — after writing a checkpoint: "preempted,
// checkpoint saved, requeue me". Running the same command again resumes from
// `latest`. 75 is EX_TEMPFAIL of <sysexits.h>: a temporary failure, retry.
inline constexpr int kExitRequeue = 75;

// Facts about the machine and the invocation that shape the command.
struct LaunchHost {
  std::string loom_binary;                // absolute path of the loom executable
  std::string config_path;                // absolute path of CONFIG
  std::vector<std::string> overrides;     // the --set KEY=VALUE arguments, in order
  std::string working_dir;                // absolute; ranks resolve relative paths from here
  bool as_root = false;                   // Open MPI refuses root without --allow-run-as-root
  int64_t cores = 1;                      // cores of this host (std::thread::hardware_concurrency)
  std::string omp_threads_in_environment;  // the caller's OMP_NUM_THREADS ("" when not set)
  // The caller's NCCL_*, UCX_* and CUDA_* variables, by name, sorted: what
  // the ranks on other nodes must see too (forwarded_env_names).
  std::vector<std::string> forwarded_env;
};

// The names in `environment` (NAME=VALUE entries, as `environ` holds them)
// that mpirun forwards to every rank: NCCL_* (the network interface, the
// InfiniBand HCAs, debug output), UCX_* (the transport under Open MPI's UCX
// layer and NCCL's net plugins) and CUDA_* (device order, visible devices),
// sorted; and LOOM_JOB_END_TIME (trainer/job_end.h). OMPI_* are left out: they configure mpirun itself, which already
// reads them, and some (OMPI_COMM_WORLD_*) describe a running job.
std::vector<std::string> forwarded_env_names(const std::vector<std::string>& environment);

// Whether the ranks run on GPUs: run.device cuda, or auto with
// launch.gpus_per_node > 0 (what the job asks the nodes for).
bool is_gpu_run(const Config& config);

// Threads each rank's torch runs: launch.env's OMP_NUM_THREADS, else the
// caller's, else this host's cores / ranks per node (at least 1).
int64_t threads_per_rank(const Config& config, const LaunchHost& host);

// The CPUs each Slurm task (rank) asks for: launch.slurm.cpus_per_task, or
// when 0 this host's cores / ranks per node (at least 1).
int64_t slurm_cpus_per_task(const Config& config, const LaunchHost& host);

// A command line with a comment per decision it took ("--oversubscribe: 4
// ranks > 2 cores").
struct LaunchCommand {
  std::vector<std::string> argv;
  std::vector<std::string> notes;
};

// `loom train CONFIG --set ...` with absolute paths, what every rank runs.
// `train_flags` go after CONFIG (e.g. "--check").
std::vector<std::string> train_argv(const LaunchHost& host, const std::vector<std::string>& train_flags = {});

// mpirun -np <ranks> ... loom train CONFIG --set ... on this host (and the
// hosts mpirun_args name). Adds --allow-run-as-root only as root,
// --oversubscribe only when one node's ranks outnumber this host's cores,
// -x OMP_NUM_THREADS=cores/ranks (at least 1) when neither launch.env nor the
// caller's environment sets it, -x NAME for each of host.forwarded_env that
// launch.env does not set, -x NAME=VALUE for every launch.env entry, and
// --bind-to none for a GPU run or ranks of several threads (unless
// launch.mpirun_args binds): see Note [binding] in launcher.cpp.
LaunchCommand mpirun_command(const Config& config, const LaunchHost& host,
                             const std::vector<std::string>& train_flags = {});

// The line of the batch script that starts the ranks: srun --mpi=pmix ...
// (launch.slurm.launcher srun) or mpirun ... (launcher mpirun).
std::string slurm_rank_line(const Config& config, const LaunchHost& host);

// The whole sbatch script for `loom launch --slurm` (see docs/launching.md):
// #SBATCH lines for nodes, tasks per node, CPUs per task, GPUs, time,
// partition and account when given, USR1 launch.slurm.signal_lead seconds
// before the time limit, --requeue, output files in <run_dir>/slurm/;
// OMP_NUM_THREADS = CPUs per task unless launch.env sets it;
// LOOM_JOB_END_TIME, the job's end time (Note [stopping before the job
// ends] in trainer/job_end.h); the rank line; a requeue of the job when the
// ranks exit with kExitRequeue; and, with `max_restarts` > 0, a requeue after
// a crash (any exit but 0, 2 and 75) at most that many times, counted in
// <run_dir>/slurm/restarts.
std::string sbatch_script(const Config& config, const LaunchHost& host, const std::string& run_dir,
                          int64_t max_restarts = 0);

// The #SBATCH lines after the job's name (and array) that say where and how
// long the ranks run and how they stop: nodes, tasks per node, GPUs, time,
// partition, account, the USR1 lead, --requeue, the appended output and
// error files LOG_STEM.out and LOG_STEM.err, then launch.slurm.extra_args;
// --cpus-per-task when `cpus_per_task` > 0. Shared by `loom launch --slurm`
// and `loom sweep --slurm`.
void write_sbatch_resources(std::ostream& s, const LaunchConfig& launch, const std::string& log_stem,
                            int64_t cpus_per_task = 0);

// The facts of this host and invocation (launch_command.cpp): loom's own
// path, CONFIG made absolute, the working directory, root or not, cores.
LaunchHost this_launch_host(const std::string& config_path, const std::vector<std::string>& overrides);

// `name` on PATH, or "" when it is not there (launch_command.cpp).
std::string find_on_path(const std::string& name);

// Runs `argv` and returns (exit code, its stdout); stderr passes through
// (launch_command.cpp).
std::pair<int, std::string> capture_output(const std::vector<std::string>& argv);

// `text` quoted for a POSIX shell when it needs quoting (else unchanged).
std::string shell_quote(const std::string& text);
std::string shell_join(const std::vector<std::string>& argv);

}  // namespace loom
