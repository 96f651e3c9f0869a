#include "launch/launcher.h"

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <string_view>

#include "util/error.h"

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

// Note [binding]
// Open MPI binds each rank to one core when it starts 2 ranks or fewer, and
// to a package (or NUMA domain) above that. A GPU rank is not one thread:
// torch's CPU threads, the data loader, NCCL's proxy thread and the CUDA
// driver's threads all run beside the step, and pinned to one core they
// queue behind each other and the GPU idles. --bind-to none leaves placement
// to the kernel. Not numa: Open MPI's rank-to-NUMA mapping follows slot
// order, not which NUMA domain each rank's GPU hangs off, so on a node whose
// GPU order and NUMA order differ it would pin ranks to the far memory; a
// cluster where they agree can say `--bind-to numa` in launch.mpirun_args
// (then loom adds no binding). CPU ranks keep Open MPI's default unless they
// run several threads each: at 2 ranks or fewer that default pins a rank's
// threads to one core.
bool binds(const std::vector<std::string>& mpirun_args) {
  return has_argument(mpirun_args, {"--bind-to", "-bind-to"});
}

}  // namespace

std::vector<std::string> forwarded_env_names(const std::vector<std::string>& environment) {
  std::vector<std::string> names;
  for (const std::string& entry : environment) {
    const std::string name = entry.substr(0, entry.find('='));
    for (const char* prefix : {"NCCL_", "UCX_", "CUDA_"}) {
      if (name.rfind(prefix, 0) == 0 && name.size() > std::string_view(prefix).size()) names.push_back(name);
    }
    // The job's end time (trainer/job_end.h) holds for the ranks on every node.
    if (name == "LOOM_JOB_END_TIME") names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

bool is_gpu_run(const Config& config) {
  return config.run.device.rfind("cuda", 0) == 0 || (config.run.device == "auto" && config.launch.gpus_per_node > 0);
}

int64_t threads_per_rank(const Config& config, const LaunchHost& host) {
  const auto set = config.launch.env.find("OMP_NUM_THREADS");
  const std::string& text = set != config.launch.env.end() ? set->second : host.omp_threads_in_environment;
  if (!text.empty()) return std::max<int64_t>(1, std::atoll(text.c_str()));
  return std::max<int64_t>(1, host.cores / std::max<int64_t>(1, ranks_per_node(config.launch)));
}

int64_t slurm_cpus_per_task(const Config& config, const LaunchHost& host) {
  if (config.launch.slurm.cpus_per_task > 0) return config.launch.slurm.cpus_per_task;
  return std::max<int64_t>(1, host.cores / std::max<int64_t>(1, ranks_per_node(config.launch)));
}

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
  if (launch.env.count("OMP_NUM_THREADS") == 0 && host.omp_threads_in_environment.empty()) {
    const int64_t threads = std::max<int64_t>(1, host.cores / std::max<int64_t>(1, per_node));
    command.argv.insert(command.argv.end(), {"-x", "OMP_NUM_THREADS=" + std::to_string(threads)});
    command.notes.push_back("OMP_NUM_THREADS=" + std::to_string(threads) + ": this host's cores / ranks per node" +
                            " (launch.env.OMP_NUM_THREADS sets it)");
  }
  // mpirun passes its own environment only to the ranks on this node: the
  // network and device settings the caller exported (NCCL_SOCKET_IFNAME,
  // NCCL_IB_HCA, ...) must reach the other nodes too. `-x NAME` forwards
  // the current value; launch.env's -x NAME=VALUE below wins.
  std::string forwarded;
  for (const std::string& name : host.forwarded_env) {
    if (launch.env.count(name) != 0) continue;
    command.argv.insert(command.argv.end(), {"-x", name});
    forwarded += (forwarded.empty() ? "" : ", ") + name;
  }
  if (!forwarded.empty())
    command.notes.push_back("-x " + forwarded + ": from this environment, for the ranks on every node" +
                            " (launch.env overrides)");
  for (const auto& [name, value] : launch.env) command.argv.insert(command.argv.end(), {"-x", name + "=" + value});
  // Note [binding].
  if (!binds(launch.mpirun_args)) {
    if (is_gpu_run(config)) {
      command.argv.insert(command.argv.end(), {"--bind-to", "none"});
      command.notes.push_back("--bind-to none: a GPU run (run.device " + config.run.device +
                              "); each rank's CPU threads (torch, data, NCCL) must not share one core; "
                              "launch.mpirun_args [--bind-to, numa] binds instead");
    } else if (const int64_t threads = threads_per_rank(config, host); threads > 1) {
      command.argv.insert(command.argv.end(), {"--bind-to", "none"});
      command.notes.push_back("--bind-to none: " + std::to_string(threads) +
                              " threads per rank, which Open MPI's default binding may pin to one core");
    }
  }
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
    // The batch script's OMP_NUM_THREADS and LOOM_JOB_END_TIME, and the
    // caller's NCCL_*, UCX_* and CUDA_* (sbatch hands its environment to
    // the script), must reach the other nodes' ranks too.
    argv = {"mpirun"};
    if (host.as_root) argv.push_back("--allow-run-as-root");
    argv.insert(argv.end(), {"-np", std::to_string(launch.ranks), "--npernode", per_node});
    for (const std::string& name : {std::string("OMP_NUM_THREADS"), std::string("LOOM_JOB_END_TIME")})
      argv.insert(argv.end(), {"-x", name});
    for (const std::string& name : host.forwarded_env) {
      if (launch.env.count(name) == 0 && name != "LOOM_JOB_END_TIME") argv.insert(argv.end(), {"-x", name});
    }
    for (const auto& [name, value] : launch.env) {
      if (name != "OMP_NUM_THREADS") argv.insert(argv.end(), {"-x", name});
    }
    // Note [binding]: each rank has --cpus-per-task CPUs to spread its threads over.
    if (!binds(launch.mpirun_args)) argv.insert(argv.end(), {"--bind-to", "none"});
    argv.insert(argv.end(), launch.mpirun_args.begin(), launch.mpirun_args.end());
  } else {
    // --kill-on-bad-exit: a rank that dies outside loom's own error handling
    // (which aborts the whole job) must not leave the others waiting.
    argv = {"srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--nodes=" + std::to_string(launch.nodes),
            "--ntasks=" + std::to_string(launch.ranks), "--ntasks-per-node=" + per_node,
            // Slurm 23.11 and later no longer pass sbatch's --cpus-per-task
            // on to srun (SRUN_CPUS_PER_TASK): each rank would get one CPU.
            "--cpus-per-task=" + std::to_string(slurm_cpus_per_task(config, host))};
  }
  const std::vector<std::string> train = train_argv(host);
  argv.insert(argv.end(), train.begin(), train.end());
  return shell_join(argv);
}

void write_sbatch_resources(std::ostream& s, const LaunchConfig& launch, const std::string& log_stem,
                            int64_t cpus_per_task) {
  const SlurmConfig& slurm = launch.slurm;
  s << "#SBATCH --nodes=" << launch.nodes << "\n"
    << "#SBATCH --ntasks-per-node=" << ranks_per_node(launch) << "\n";
  if (cpus_per_task > 0) s << "#SBATCH --cpus-per-task=" << cpus_per_task << "\n";
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

std::string sbatch_script(const Config& config, const LaunchHost& host, const std::string& run_dir,
                          int64_t max_restarts) {
  const LaunchConfig& launch = config.launch;
  const SlurmConfig& slurm = launch.slurm;
  const std::string slurm_dir = run_dir + "/slurm";
  const int64_t cpus_per_task = slurm_cpus_per_task(config, host);
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by `loom launch --slurm` for " << host.config_path << ".\n"
    << "# Submit it again with: sbatch " << shell_quote(slurm_dir + "/job.sbatch") << "\n"
    << "#SBATCH --job-name=" << config.run.name << "\n";
  write_sbatch_resources(s, launch, slurm_dir + "/job-%j", cpus_per_task);
  s << "#\n"
    << "# --cpus-per-task=" << cpus_per_task
    << (slurm.cpus_per_task > 0 ? std::string(": launch.slurm.cpus_per_task")
                                : ": the submitting host's " + std::to_string(host.cores) + " cores / " +
                                      std::to_string(ranks_per_node(launch)) +
                                      " ranks per node (launch.slurm.cpus_per_task sets it)")
    << "; Slurm's default is one CPU per rank.\n"
    << "# Stopping: the ranks read the job's end time (LOOM_JOB_END_TIME, below) and checkpoint and stop\n"
    << "# while one more step and a save still fit (launch.job_end_margin). SIGUSR1 (sent to this shell "
    << slurm.signal_lead << " s\n"
    << "# before the time limit, launch.slurm.signal_lead) is the backstop: it is passed on to the ranks once;\n"
    << "# `scancel --signal=USR1 JOB` and SIGTERM (preemption) reach the ranks directly. The ranks finish\n"
    << "# the step, write a checkpoint and exit " << kExitRequeue
    << "; the job then requeues itself and the next run resumes\n"
    << "# from checkpoints/latest.";
  if (max_restarts > 0)
    s << " After a crash (any exit but 0, 2 = bad input and " << kExitRequeue << ") the job requeues\n"
      << "# itself too, at most " << max_restarts << " times (loom launch --max-restarts), counted in "
      << shell_quote(slurm_dir + "/restarts") << ".";
  s << "\n\n"
    << "cd " << shell_quote(host.working_dir) << " || exit 2\n";
  if (launch.env.count("OMP_NUM_THREADS") == 0) s << "export OMP_NUM_THREADS=" << cpus_per_task << "\n";
  for (const auto& [name, value] : launch.env) s << "export " << name << "=" << shell_quote(value) << "\n";
  s << "echo \"loom: job $SLURM_JOB_ID, start ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST\"\n"
    << "# The job's end time in Unix seconds, read once per start (a requeued job has a new one).\n"
    << "end_time=${SLURM_JOB_END_TIME:-}\n"
    << "if [ -z \"$end_time\" ]; then\n"
    << "  end=$(SLURM_TIME_FORMAT=standard squeue -h -o %e -j \"$SLURM_JOB_ID\" 2>/dev/null)\n"
    << "  case \"$end\" in [0-9]*) end_time=$(date -d \"$end\" +%s 2>/dev/null) ;; esac\n"
    << "fi\n"
    << "export LOOM_JOB_END_TIME=$end_time\n"
    << "echo \"loom: the job ends at ${end_time:-an unknown time (no end-time stop; the signal only)}\"\n\n"
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
    << "  scontrol requeue \"$SLURM_JOB_ID\"\n";
  if (max_restarts > 0) {
    const std::string restarts_file = shell_quote(slurm_dir + "/restarts");
    s << "elif [ \"$status\" -ne 0 ] && [ \"$status\" -ne " << kExitBadInput << " ]; then\n"
      << "  restarts=$(cat " << restarts_file << " 2>/dev/null || echo 0)\n"
      << "  if [ \"$restarts\" -lt " << max_restarts << " ]; then\n"
      << "    echo $((restarts + 1)) > " << restarts_file << "\n"
      << "    echo \"loom: the ranks crashed (exit $status): restart $((restarts + 1)) of " << max_restarts
      << ", requeueing job $SLURM_JOB_ID to resume from checkpoints/latest\"\n"
      << "    scontrol requeue \"$SLURM_JOB_ID\"\n"
      << "  else\n"
      << "    echo \"loom: the ranks crashed (exit $status) after " << max_restarts
      << " restarts (loom launch --max-restarts): not requeueing\"\n"
      << "  fi\n";
  }
  s << "fi\n"
    << "exit \"$status\"\n";
  return s.str();
}

}  // namespace loom
