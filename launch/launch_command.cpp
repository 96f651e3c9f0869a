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
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "launch/cli.h"
#include "launch/commands.h"
#include "launch/launcher.h"
#include "trainer/config.h"
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
  host.omp_threads_in_environment = std::getenv("OMP_NUM_THREADS") != nullptr;
  return host;
}

namespace {

void print_command(const LaunchCommand& command) {
  for (const std::string& note : command.notes) std::cout << "# " << note << "\n";
  std::cout << shell_join(command.argv) << std::endl;
}

// Runs `argv` as a child in its own process group (so a terminal's Ctrl-C
// reaches only loom launch, which passes it on once) and returns its exit
// code (128 + signal when a signal ended it). Stop signals to this process
// are forwarded as described at the top of this file.
int run_forwarding_signals(const std::vector<std::string>& argv) {
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
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return kExitInternal;
}

}  // namespace

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

int launch_mpirun(const Config& config, const LaunchHost& host, bool dry_run, bool check) {
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
  const int code = run_forwarding_signals(command.argv);
  if (code == kExitRequeue)
    std::cout << "loom launch: stopped early with a checkpoint (exit " << kExitRequeue
              << "): run the same command to resume" << std::endl;
  else if (code != kExitOk && code != kExitBadInput)
    std::cerr << "loom launch: mpirun exited with " << code << std::endl;
  return code;
}

int launch_slurm(const Config& config, const LaunchHost& host, bool dry_run) {
  const fs::path run_dir = fs::absolute(fs::path(config.run.output_dir) / config.run.name).lexically_normal();
  const fs::path script_path = run_dir / "slurm" / "job.sbatch";
  const std::string script = sbatch_script(config, host, run_dir.string());
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

int command_launch(const std::vector<std::string>& argv) {
  Args args("launch", argv,
            {{"set", true, true, "override a config key, e.g. --set launch.ranks=4"},
             {"slurm", false, false, "write runs/<name>/slurm/job.sbatch and submit it with sbatch"},
             {"dry-run", false, false, "print the command (or the batch script) and run nothing"},
             {"check", false, false, "run only the preflight on every rank"}});
  args.expect_positional(1, "one CONFIG");
  const std::string config_path = args.positional()[0];
  const std::vector<std::string> overrides = args.all("set");
  const Config config = load_config(config_path, overrides);
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
    return launch_slurm(config, host, args.has("dry-run"));
  }
  return launch_mpirun(config, host, args.has("dry-run"), args.has("check"));
}

}  // namespace loom
