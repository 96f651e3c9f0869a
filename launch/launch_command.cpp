// `loom launch CONFIG [--set KEY=VALUE ...] [--slurm] [--dry-run] [--check]`:
// turns the config's `launch` section into processes.
//
// Without --slurm it runs `mpirun ... loom train CONFIG --set ...` on this
// host (and the hosts launch.mpirun_args name), prints the command first and
// returns mpirun's exit code: 0 done, 75 (kExitRequeue) stopped early with a
// checkpoint, anything else a failure. SIGTERM, SIGINT or SIGUSR1 to
// `loom launch` is passed to mpirun once as SIGUSR1, which Open MPI forwards
// to every rank (SIGTERM would make mpirun kill the ranks a few seconds later,
// possibly mid-checkpoint); a second signal is passed on as SIGTERM, which
// ends the job at once.
//
// --max-restarts N supervises the mpirun job: when it dies from a crash (a
// rank killed by a signal, an internal error, mpirun failing) rather than
// from bad input (exit 2) or a requested stop (75), the same command is run
// again, resuming from the run's last valid checkpoint (checkpoint.resume
// auto passes over damaged ones), at most N times. Each restart is printed
// with its cause and appended to runs/<name>/logs/restarts.jsonl. With
// --slurm the batch script does the same by requeueing the job, counting in
// runs/<name>/slurm/restarts (launch/launcher.h, sbatch_script).
//
// With --slurm it writes runs/<name>/slurm/job.sbatch and submits it with
// sbatch (launch/launcher.h says what the script does). --dry-run prints the
// command or the script and runs nothing. --check runs only the ranks'
// preflight (launch/preflight.h) under mpirun.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "launch/cli.h"
#include "launch/commands.h"
#include "launch/launcher.h"
#include "config/config.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom {

namespace fs = std::filesystem;

// `name` on PATH, or "" when it is not there.
std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return "";
  std::string dirs(path);
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t colon = dirs.find(':', start);
    if (colon == std::string::npos) colon = dirs.size();
    const fs::path candidate = fs::path(dirs.substr(start, colon - start).empty() ? "." : dirs.substr(start, colon - start)) / name;
    if (::access(candidate.c_str(), X_OK) == 0 && fs::is_regular_file(candidate)) return candidate.string();
    start = colon + 1;
  }
  return "";
}

LaunchHost this_launch_host(const std::string& config_path, const std::vector<std::string>& overrides) {
  LaunchHost host;
  host.loom_binary = fs::read_symlink("/proc/self/exe").string();
  host.config_path = fs::absolute(config_path).lexically_normal().string();
  host.overrides = overrides;
  host.working_dir = fs::current_path().string();
  host.as_root = ::geteuid() == 0;
  host.cores = std::max(1u, std::thread::hardware_concurrency());
  const char* omp_threads = std::getenv("OMP_NUM_THREADS");
  host.omp_threads_in_environment = omp_threads != nullptr ? omp_threads : "";
  std::vector<std::string> environment;
  for (char** entry = environ; *entry != nullptr; ++entry) environment.emplace_back(*entry);
  host.forwarded_env = forwarded_env_names(environment);
  return host;
}

namespace {

void print_command(const LaunchCommand& command) {
  for (const std::string& note : command.notes) std::cout << "# " << note << "\n";
  std::cout << shell_join(command.argv) << std::endl;
}

}  // namespace

// Runs `argv` as a child in its own process group (so a terminal's Ctrl-C
// reaches only loom launch, which passes it on once) and returns its exit
// code (128 + signal when a signal ended it). Stop signals to this process
// are forwarded as described at the top of this file.
int run_forwarding_signals(const std::vector<std::string>& argv, int* signals_forwarded) {
  sigset_t stop_signals, previous;
  sigemptyset(&stop_signals);
  for (const int signal : {SIGTERM, SIGINT, SIGUSR1}) sigaddset(&stop_signals, signal);
  // Blocked before the fork, so none is lost between fork and the wait loop;
  // taken with sigtimedwait below.
  ::sigprocmask(SIG_BLOCK, &stop_signals, &previous);
  const pid_t child = ::fork();
  if (child < 0) {
    ::sigprocmask(SIG_SETMASK, &previous, nullptr);
    throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  }
  if (child == 0) {
    ::setpgid(0, 0);
    ::sigprocmask(SIG_SETMASK, &previous, nullptr);
    std::vector<char*> args;
    for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::cerr << "loom launch: error: cannot run " << argv[0] << ": " << std::strerror(errno) << std::endl;
    ::_exit(kExitBadInput);
  }
  int forwarded = 0;
  int status = 0;
  while (true) {
    const pid_t done = ::waitpid(child, &status, WNOHANG);
    if (done == child) break;
    if (done < 0 && errno != EINTR) throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
    const timespec poll{0, 100 * 1000 * 1000};
    const int signal = ::sigtimedwait(&stop_signals, nullptr, &poll);
    if (signal <= 0) continue;
    // The first stop: SIGUSR1, the graceful stop every rank understands and
    // mpirun forwards without a kill timer. Any later one: SIGTERM, mpirun
    // ends the job.
    const int to_send = forwarded == 0 ? SIGUSR1 : SIGTERM;
    std::cerr << "loom launch: " << ::strsignal(signal) << ": "
              << (forwarded == 0 ? "asking every rank to checkpoint and stop (again to end at once)"
                                 : "ending the job now")
              << std::endl;
    ::kill(child, to_send);
    ++forwarded;
  }
  ::sigprocmask(SIG_SETMASK, &previous, nullptr);
  if (signals_forwarded != nullptr) *signals_forwarded = forwarded;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return kExitInternal;
}

int rerun_under_mpirun(const std::string& command, const std::vector<std::string>& argv, int64_t ranks) {
  std::vector<std::string> mpirun = {"mpirun", "-np", std::to_string(ranks)};
  if (::geteuid() == 0) mpirun.push_back("--allow-run-as-root");
  mpirun.push_back("--oversubscribe");
  mpirun.push_back(fs::read_symlink("/proc/self/exe").string());
  mpirun.push_back(command);
  mpirun.insert(mpirun.end(), argv.begin(), argv.end());
  std::cerr << "loom " << command << ": measuring on " << ranks << " ranks:";
  for (const std::string& arg : mpirun) std::cerr << " " << arg;
  std::cerr << std::endl;
  return run_forwarding_signals(mpirun);
}

// Runs `argv`, returns (exit code, stdout); stderr passes through.
std::pair<int, std::string> capture_output(const std::vector<std::string>& argv) {
  std::array<int, 2> pipe_fds{};
  if (::pipe(pipe_fds.data()) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  const pid_t child = ::fork();
  if (child == 0) {
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    std::vector<char*> args;
    for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  ::close(pipe_fds[1]);
  std::string out;
  char buffer[4096];
  for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof buffer)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    out.append(buffer, static_cast<size_t>(n));
  }
  ::close(pipe_fds[0]);
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

namespace {

// Why a job that exited with `code` died, or "" when a restart cannot help:
// it finished (0), stopped on request with a checkpoint (75), or refused its
// input (2: config, data, checkpoint; the same input fails again).
std::string crash_cause(int code) {
  if (code == kExitOk || code == kExitRequeue || code == kExitBadInput) return "";
  if (code == kExitInternal) return "exit 1: a rank failed with an internal error (its message is above)";
  // Open MPI's mpirun exits 128 + N when a rank was ended by signal N, as a
  // shell reports a signalled child; so does run_forwarding_signals when
  // mpirun itself was.
  if (code > 128 && code < 128 + 65) {
    const char* name = ::sigabbrev_np(code - 128);
    return "exit " + std::to_string(code) + ": a process was ended by signal " + std::to_string(code - 128) +
           (name != nullptr ? std::string(" (SIG") + name + ")" : std::string());
  }
  return "exit " + std::to_string(code) + " from mpirun or a rank";
}

// The checkpoint a restart of `config`'s run resumes from ("" when none is
// there yet: it starts where the first attempt started).
std::string latest_checkpoint(const Config& config) {
  const fs::path latest = fs::path(config.run.output_dir) / config.run.name / "checkpoints" / "latest";
  std::ifstream in(latest);
  std::string name;
  std::getline(in, name);
  return name;
}

void log_restart(const Config& config, int restart, int max_restarts, int code, const std::string& cause,
                 const std::string& resume_from) {
  std::cerr << "loom launch: restart " << restart << " of " << max_restarts << " after " << cause << "; "
            << (resume_from.empty() ? std::string("no checkpoint yet, starting over")
                                    : "resuming from checkpoints/" + resume_from + " (or an older one if it is damaged)")
            << std::endl;
  const fs::path logs = fs::path(config.run.output_dir) / config.run.name / "logs";
  std::error_code error;
  fs::create_directories(logs, error);
  std::ofstream out(logs / "restarts.jsonl", std::ios::app);
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char time[32];
  std::strftime(time, sizeof time, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  // A plain line of JSON: every field is a number or a string without quotes or backslashes.
  out << "{\"restart\": " << restart << ", \"time\": \"" << time << "\", \"exit_code\": " << code
      << ", \"cause\": \"" << cause << "\", \"resume_from\": \"" << resume_from << "\"}\n";
}

int launch_mpirun(const Config& config, const LaunchHost& host, bool dry_run, bool check, int max_restarts) {
  LaunchCommand command = mpirun_command(config, host, check ? std::vector<std::string>{"--check"}
                                                             : std::vector<std::string>{});
  if (dry_run) {
    print_command(command);
    return kExitOk;
  }
  const std::string mpirun = find_on_path("mpirun");
  if (mpirun.empty())
    throw BadInput("mpirun not found on PATH (install Open MPI: apt-get install openmpi-bin; "
                   "or run `loom train CONFIG` for one rank)");
  print_command(command);
  command.argv[0] = mpirun;
  int signals = 0;
  int code = run_forwarding_signals(command.argv, &signals);
  for (int restart = 1; restart <= max_restarts && !check && signals == 0; ++restart) {
    const std::string cause = crash_cause(code);
    if (cause.empty()) break;
    const std::string resume_from = latest_checkpoint(config);
    log_restart(config, restart, max_restarts, code, cause, resume_from);
    // A restart continues this run: from its own checkpoints once it has
    // one, whatever checkpoint.resume said for the first start.
    LaunchHost again = host;
    if (!resume_from.empty()) again.overrides.push_back("checkpoint.resume=auto");
    LaunchCommand next = mpirun_command(config, again);
    next.argv[0] = mpirun;
    code = run_forwarding_signals(next.argv, &signals);
  }
  if (code == kExitRequeue)
    std::cout << "loom launch: stopped early with a checkpoint (exit " << kExitRequeue
              << "): run the same command to resume" << std::endl;
  else if (code != kExitOk && code != kExitBadInput)
    std::cerr << "loom launch: mpirun exited with " << code << std::endl;
  return code;
}

int launch_slurm(const Config& config, const LaunchHost& host, bool dry_run, int max_restarts) {
  const fs::path run_dir = fs::absolute(fs::path(config.run.output_dir) / config.run.name).lexically_normal();
  const fs::path script_path = run_dir / "slurm" / "job.sbatch";
  const std::string script = sbatch_script(config, host, run_dir.string(), max_restarts);
  if (dry_run) {
    std::cout << "# " << script_path.string() << "\n" << script << "\n# rank line\n"
              << slurm_rank_line(config, host) << "\n# submit\nsbatch --parsable " << shell_quote(script_path.string())
              << std::endl;
    return kExitOk;
  }
  const std::string sbatch = find_on_path("sbatch");
  if (sbatch.empty()) throw BadInput("sbatch not found on PATH: Slurm's client commands are not installed here");
  fs::create_directories(script_path.parent_path());
  {
    std::ofstream out(script_path, std::ios::trunc);
    out << script;
    if (!out) throw BadInput("cannot write " + script_path.string());
  }
  fs::permissions(script_path, fs::perms::owner_exec | fs::perms::group_exec, fs::perm_options::add);
  // --max-restarts counts the restarts of this submission: a new one starts from none.
  std::error_code error;
  fs::remove(script_path.parent_path() / "restarts", error);
  const auto [code, output] = capture_output({sbatch, "--parsable", script_path.string()});
  if (code != 0)
    throw BadInput("sbatch " + script_path.string() + " failed (exit " + std::to_string(code) +
                   "): Slurm not reachable or the request was refused (its message is above)");
  const std::string job_id = output.substr(0, output.find_first_of(";\n"));
  std::cout << "submitted job " << job_id << ": " << script_path.string() << "\n"
            << "logs: " << (run_dir / "slurm" / ("job-" + job_id + ".out")).string() << "\n"
            << job_id << std::endl;
  return kExitOk;
}

}  // namespace

const CommandSpec& launch_spec() {
  static const CommandSpec spec{
      .name = "launch",
      .synopsis = "CONFIG [OPTIONS]",
      .summary = "start the config's launch.ranks ranks with mpirun, or a Slurm job (docs/launching.md)",
      .arguments = {{"CONFIG", "the training config (.yaml)"}},
      .flags = {{"set", "KEY=VALUE", "override a config key, e.g. --set launch.ranks=4", kRepeatable},
                {"slurm", "", "write runs/<name>/slurm/job.sbatch and submit it with sbatch"},
                {"dry-run", "", "print the command (or the batch script) and run nothing"},
                {"check", "", "run only the preflight on every rank"},
                {"max-restarts", "N",
                 "after a crash, run again from the last valid checkpoint, at most N times (default 0)"}},
      .examples = {"loom launch configs/tiny.yaml --set launch.ranks=2",
                   "loom launch configs/slurm-example.yaml --slurm --dry-run"},
      .notes = "--max-restarts leaves a job that ended on bad input (exit 2) or a requested stop (exit 75) alone; "
               "with --slurm the batch script requeues the job after a crash, counting in runs/<name>/slurm/restarts. "
               "NCCL_*, UCX_* and CUDA_* variables of this environment reach every rank.",
  };
  return spec;
}

int command_launch(const std::vector<std::string>& argv) {
  Args args(launch_spec(), argv);
  args.expect_positional(1, "one CONFIG");
  const std::string config_path = args.positional()[0];
  const std::vector<std::string> overrides = args.all("set");
  const Config config = load_config(config_path, overrides);
  const int64_t max_restarts = args.get_int("max-restarts", 0);
  if (max_restarts < 0) throw BadInput("loom launch: --max-restarts " + std::to_string(max_restarts) + " (expected >= 0)");
  // The layout against launch.ranks, here, before any process starts: the
  // same check (and message) each rank would make.
  check_training_layout(config, config.launch.ranks);
  const LaunchHost host = this_launch_host(config_path, overrides);
  // The command the user typed, for each rank's run record (run.json): the
  // ranks inherit it from mpirun, and a Slurm job from sbatch's environment.
  std::vector<std::string> typed = {"loom", "launch"};
  typed.insert(typed.end(), argv.begin(), argv.end());
  ::setenv("LOOM_LAUNCH_COMMAND", shell_join(typed).c_str(), 1);
  if (args.has("slurm")) {
    if (args.has("check")) throw BadInput("loom launch: --check runs under mpirun; leave out --slurm");
    return launch_slurm(config, host, args.has("dry-run"), static_cast<int>(max_restarts));
  }
  return launch_mpirun(config, host, args.has("dry-run"), args.has("check"), static_cast<int>(max_restarts));
}

}  // namespace loom
