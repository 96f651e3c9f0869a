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
  bool omp_threads_in_environment = false;  // OMP_NUM_THREADS already set by the caller
};

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
// caller's environment sets it, and -x NAME=VALUE for every launch.env entry.
LaunchCommand mpirun_command(const Config& config, const LaunchHost& host,
                             const std::vector<std::string>& train_flags = {});

// The line of the batch script that starts the ranks: srun --mpi=pmix ...
// (launch.slurm.launcher srun) or mpirun ... (launcher mpirun).
std::string slurm_rank_line(const Config& config, const LaunchHost& host);

// The whole sbatch script for `loom launch --slurm` (see docs/launching.md):
// #SBATCH lines for nodes, tasks per node, GPUs, time, partition and account
// when given, USR1 launch.slurm.signal_lead seconds before the time limit,
// --requeue, output files in <run_dir>/slurm/; the rank line; and a requeue
// of the job when the ranks exit with kExitRequeue.
std::string sbatch_script(const Config& config, const LaunchHost& host, const std::string& run_dir);

// The #SBATCH lines after the job's name (and array) that say where and how
// long the ranks run and how they stop: nodes, tasks per node, GPUs, time,
// partition, account, the USR1 lead, --requeue, the appended output and
// error files LOG_STEM.out and LOG_STEM.err, then launch.slurm.extra_args.
// Shared by `loom launch --slurm` and `loom sweep --slurm`.
void write_sbatch_resources(std::ostream& s, const LaunchConfig& launch, const std::string& log_stem);

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
