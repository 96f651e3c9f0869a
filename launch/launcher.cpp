#include "launch/launcher.h"

#include <algorithm>
#include <sstream>

namespace loom {

namespace {

int64_t ranks_per_node(const LaunchConfig& launch) {
  return launch.procs_per_node > 0 ? launch.procs_per_node : launch.ranks / launch.nodes;
}

bool has_argument(const std::vector<std::string>& args, std::initializer_list<const char*> names) {
  for (const std::string& arg : args) {
    for (const char* name : names) {
      if (arg == name || arg.rfind(std::string(name) + "=", 0) == 0) return true;
    }
  }
  return false;
}

}  // namespace

std::string shell_quote(const std::string& text) {
  const bool plain = !text.empty() && std::all_of(text.begin(), text.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || std::string_view("@%+=:,./_-").find(ch) != std::string_view::npos;
  });
  if (plain) return text;
  std::string out = "'";
  for (char ch : text) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& arg : argv) out += (out.empty() ? "" : " ") + shell_quote(arg);
  return out;
}

std::vector<std::string> train_argv(const LaunchHost& host, const std::vector<std::string>& train_flags) {
  std::vector<std::string> argv = {host.loom_binary, "train", host.config_path};
  argv.insert(argv.end(), train_flags.begin(), train_flags.end());
  for (const std::string& o : host.overrides) {
    argv.push_back("--set");
    argv.push_back(o);
  }
  return argv;
}

LaunchCommand mpirun_command(const Config& config, const LaunchHost& host,
                             const std::vector<std::string>& train_flags) {
  const LaunchConfig& launch = config.launch;
  const int64_t per_node = ranks_per_node(launch);
  LaunchCommand command;
  command.argv = {"mpirun"};
  command.notes.push_back(std::to_string(launch.ranks) + " rank" + (launch.ranks == 1 ? "" : "s") + " on " +
                          std::to_string(launch.nodes) + " node" + (launch.nodes == 1 ? "" : "s") + ", " +
                          std::to_string(per_node) + " per node; this host has " + std::to_string(host.cores) +
                          " core" + (host.cores == 1 ? "" : "s"));
  if (host.as_root && !has_argument(launch.mpirun_args, {"--allow-run-as-root"})) {
    command.argv.push_back("--allow-run-as-root");
    command.notes.push_back("--allow-run-as-root: running as root, which Open MPI refuses otherwise");
  }
  // Open MPI counts one slot per core and refuses more ranks than slots. Only
  // this host's cores are known here: on several nodes the hostfile says.
  if (launch.nodes == 1 && per_node > host.cores &&
      !has_argument(launch.mpirun_args, {"--oversubscribe", "--map-by"})) {
    command.argv.push_back("--oversubscribe");
    command.notes.push_back("--oversubscribe: " + std::to_string(per_node) + " ranks > " +
                            std::to_string(host.cores) + " cores on this host");
  }
  command.argv.insert(command.argv.end(), {"-np", std::to_string(launch.ranks)});
  if (launch.nodes > 1) command.argv.insert(command.argv.end(), {"--npernode", std::to_string(per_node)});
  // Each rank's torch would start a thread per core: ranks * cores threads
  // fight over the cores (several times slower). Give each rank its share.
  if (launch.env.count("OMP_NUM_THREADS") == 0 && !host.omp_threads_in_environment) {
    const int64_t threads = std::max<int64_t>(1, host.cores / std::max<int64_t>(1, per_node));
    command.argv.insert(command.argv.end(), {"-x", "OMP_NUM_THREADS=" + std::to_string(threads)});
    command.notes.push_back("OMP_NUM_THREADS=" + std::to_string(threads) + ": this host's cores / ranks per node" +
                            " (launch.env.OMP_NUM_THREADS sets it)");
  }
  for (const auto& [name, value] : launch.env) command.argv.insert(command.argv.end(), {"-x", name + "=" + value});
  command.argv.insert(command.argv.end(), launch.mpirun_args.begin(), launch.mpirun_args.end());
  const std::vector<std::string> train = train_argv(host, train_flags);
  command.argv.insert(command.argv.end(), train.begin(), train.end());
  return command;
}

std::string slurm_rank_line(const Config& config, const LaunchHost& host) {
  const LaunchConfig& launch = config.launch;
  const std::string per_node = std::to_string(ranks_per_node(launch));
  std::vector<std::string> argv;
  if (launch.slurm.launcher == "mpirun") {
    // mpirun reads the allocation (nodes, slots) from Slurm's environment.
    argv = {"mpirun"};
    if (host.as_root) argv.push_back("--allow-run-as-root");
    argv.insert(argv.end(), {"-np", std::to_string(launch.ranks), "--npernode", per_node});
    argv.insert(argv.end(), launch.mpirun_args.begin(), launch.mpirun_args.end());
  } else {
    // --kill-on-bad-exit: a rank that dies outside loom's own error handling
    // (which aborts the whole job) must not leave the others waiting.
    argv = {"srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--nodes=" + std::to_string(launch.nodes),
            "--ntasks=" + std::to_string(launch.ranks), "--ntasks-per-node=" + per_node};
  }
  const std::vector<std::string> train = train_argv(host);
  argv.insert(argv.end(), train.begin(), train.end());
  return shell_join(argv);
}

void write_sbatch_resources(std::ostream& s, const LaunchConfig& launch, const std::string& log_stem) {
  const SlurmConfig& slurm = launch.slurm;
  s << "#SBATCH --nodes=" << launch.nodes << "\n"
    << "#SBATCH --ntasks-per-node=" << ranks_per_node(launch) << "\n";
  if (launch.gpus_per_node > 0) s << "#SBATCH --gpus-per-node=" << launch.gpus_per_node << "\n";
  if (!slurm.time.empty()) s << "#SBATCH --time=" << slurm.time << "\n";
  if (!slurm.partition.empty()) s << "#SBATCH --partition=" << slurm.partition << "\n";
  if (!slurm.account.empty()) s << "#SBATCH --account=" << slurm.account << "\n";
  if (slurm.signal_lead > 0) s << "#SBATCH --signal=B:USR1@" << slurm.signal_lead << "\n";
  s << "#SBATCH --requeue\n"
    << "#SBATCH --open-mode=append\n"
    << "#SBATCH --output=" << log_stem << ".out\n"
    << "#SBATCH --error=" << log_stem << ".err\n";
  for (const std::string& arg : slurm.extra_args) s << "#SBATCH " << arg << "\n";
}

std::string sbatch_script(const Config& config, const LaunchHost& host, const std::string& run_dir) {
  const LaunchConfig& launch = config.launch;
  const SlurmConfig& slurm = launch.slurm;
  const std::string slurm_dir = run_dir + "/slurm";
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by `loom launch --slurm` for " << host.config_path << ".\n"
    << "# Submit it again with: sbatch " << shell_quote(slurm_dir + "/job.sbatch") << "\n"
    << "#SBATCH --job-name=" << config.run.name << "\n";
  write_sbatch_resources(s, launch, slurm_dir + "/job-%j");
  s << "#\n"
    << "# Stopping: SIGUSR1 (sent to this shell " << slurm.signal_lead
    << " s before the time limit, launch.slurm.signal_lead) is passed\n"
    << "# on to the ranks once; `scancel --signal=USR1 JOB` and SIGTERM (preemption) reach the ranks\n"
    << "# directly. The ranks finish the step, write a checkpoint and exit " << kExitRequeue
    << "; the job then requeues\n"
    << "# itself and the next run resumes from checkpoints/latest.\n\n"
    << "cd " << shell_quote(host.working_dir) << " || exit 2\n";
  for (const auto& [name, value] : launch.env) s << "export " << name << "=" << shell_quote(value) << "\n";
  s << "echo \"loom: job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST\"\n\n"
    << "ranks_pid=\n"
    << "signals=0\n"
    << "on_usr1() { signals=$((signals + 1)); echo \"loom: SIGUSR1: the ranks checkpoint and stop\";"
    << " [ -n \"$ranks_pid\" ] && kill -USR1 \"$ranks_pid\"; }\n"
    << "trap on_usr1 USR1\n"
    << "# Slurm signals the ranks itself on SIGTERM: only keep waiting for their exit code.\n"
    << "trap 'signals=$((signals + 1)); echo \"loom: SIGTERM\"' TERM\n\n"
    << slurm_rank_line(config, host) << " &\n"
    << "ranks_pid=$!\n"
    << "# A trapped signal ends `wait` early: wait again until the ranks have ended.\n"
    << "while :; do\n"
    << "  seen=$signals\n"
    << "  wait \"$ranks_pid\"\n"
    << "  status=$?\n"
    << "  [ \"$signals\" -eq \"$seen\" ] && break\n"
    << "done\n"
    << "if [ \"$status\" -eq " << kExitRequeue << " ]; then\n"
    << "  echo \"loom: stopped with a checkpoint (exit " << kExitRequeue
    << "): requeueing job $SLURM_JOB_ID\"\n"
    << "  scontrol requeue \"$SLURM_JOB_ID\"\n"
    << "fi\n"
    << "exit \"$status\"\n";
  return s.str();
}

}  // namespace loom
