// `loom sweep CONFIG --grid KEY=V1,V2 [--grid ...] [--set KEY=VALUE ...] [--slurm] [--dry-run]`:
// every combination of the grid's values, each a run of its own.
//
// Members are the cartesian product of the --grid lists (the first --grid
// varies slowest). Member i runs CONFIG with the --set overrides, then its
// grid values, then run.name=<run.name>-<key><value>... (the last part of
// each grid key, e.g. tiny-lr0.001-tp2), so its folder says what it varied.
// Every member's config and layout is checked before anything runs: a grid
// that cannot work is refused whole (exit 2).
//
// Without --slurm the members run one after another, each by `loom launch`
// (mpirun, docs/launching.md); a member that fails does not stop the others,
// and the end lists every member with its exit code. A stop signal to the
// sweep is passed to the member running (which checkpoints and exits 75)
// and the members not yet started are left out.
//
// With --slurm, <output_dir>/<run.name>-sweep/job.sbatch is one Slurm job
// array, task i running member i with the rank line `loom launch --slurm`
// would use; all members must then ask for the same nodes and ranks.
//
// Exit code: 0 when every member finished; 75 when a member stopped early
// (a stop signal) or the sweep was stopped before all ran; 1 when any
// member failed; 2 for a bad grid.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "launch/launcher.h"
#include "config/config.h"
#include "trainer/training.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct GridAxis {
  std::string key;                  // dotted, as given
  std::vector<std::string> values;  // YAML text of each value
};

struct Member {
  std::string name;
  std::vector<std::string> overrides;  // --set arguments, the sweep's own last
  Config config;
};

// "KEY=V1,V2,...": commas inside [...], {...} or quotes belong to the value,
// so that --grid optimizer.betas=[0.9,0.95],[0.9,0.99] has two values.
GridAxis parse_grid(const std::string& argument) {
  const size_t equals = argument.find('=');
  if (equals == std::string::npos || equals == 0 || equals + 1 == argument.size())
    throw BadInput("loom sweep: --grid '" + argument + "': expected KEY=V1,V2,... (e.g. --grid optimizer.lr=1e-3,3e-4)");
  GridAxis axis{argument.substr(0, equals), {}};
  std::string current;
  int depth = 0;
  char quote = 0;
  for (const char ch : argument.substr(equals + 1)) {
    if (quote != 0) {
      if (ch == quote) quote = 0;
    } else if (ch == '"' || ch == '\'') {
      quote = ch;
    } else if (ch == '[' || ch == '{') {
      ++depth;
    } else if (ch == ']' || ch == '}') {
      --depth;
    } else if (ch == ',' && depth == 0) {
      axis.values.push_back(current);
      current.clear();
      continue;
    }
    current += ch;
  }
  axis.values.push_back(current);
  for (const std::string& value : axis.values) {
    if (value.empty()) throw BadInput("loom sweep: --grid '" + argument + "': an empty value");
  }
  return axis;
}

// The part of a run name that says `key` had `value`: "lr0.001", "tp2".
std::string name_part(const std::string& key, const std::string& value) {
  const size_t dot = key.rfind('.');
  std::string part = key.substr(dot == std::string::npos ? 0 : dot + 1) + value;
  for (char& ch : part) {
    const bool plain = std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == '+' || ch == '_';
    if (!plain) ch = '_';
  }
  return part;
}

std::vector<Member> expand(const std::string& config_path, const std::vector<std::string>& sets,
                           const std::vector<GridAxis>& grid) {
  const Config base = load_config(config_path, sets);
  bool grid_names_runs = false;
  for (const GridAxis& axis : grid) grid_names_runs = grid_names_runs || axis.key == "run.name";
  std::vector<Member> members(1);
  members[0].overrides = sets;
  members[0].name = base.run.name;
  for (const GridAxis& axis : grid) {
    std::vector<Member> next;
    for (const Member& member : members) {
      for (const std::string& value : axis.values) {
        Member more = member;
        more.overrides.push_back(axis.key + "=" + value);
        if (!grid_names_runs) more.name += "-" + name_part(axis.key, value);
        next.push_back(std::move(more));
      }
    }
    members = std::move(next);
  }
  std::set<std::string> names;
  for (size_t i = 0; i < members.size(); ++i) {
    Member& member = members[i];
    if (!grid_names_runs) member.overrides.push_back("run.name=" + member.name);
    try {
      member.config = load_config(config_path, member.overrides);
      check_training_layout(member.config, member.config.launch.ranks);
    } catch (const BadInput& e) {
      throw BadInput("loom sweep: member " + std::to_string(i + 1) + " (" + member.name + "): " + e.what());
    }
    member.name = member.config.run.name;
    if (!names.insert(member.name).second)
      throw BadInput("loom sweep: two members are both named '" + member.name +
                     "' (give each grid value a distinct text, or leave run.name out of --grid)");
  }
  return members;
}

std::atomic<int> g_sweep_signal{0};
extern "C" void on_sweep_signal(int signal) { g_sweep_signal.store(signal); }

// Runs `argv` (loom itself) and returns its exit code (128 + signal when a
// signal ended it). A stop signal to the sweep goes on to the child once.
int run_member(const std::vector<std::string>& argv) {
  const pid_t child = ::fork();
  if (child < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (child == 0) {
    std::vector<char*> args;
    for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::cerr << "loom sweep: error: cannot run " << argv[0] << ": " << std::strerror(errno) << std::endl;
    ::_exit(kExitBadInput);
  }
  bool forwarded = false;
  int status = 0;
  for (;;) {
    const pid_t done = ::waitpid(child, &status, 0);
    if (done == child) break;
    if (done < 0 && errno != EINTR) throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
    // loom launch passes it on to the ranks, which checkpoint and exit 75.
    // Not SIGINT: Ctrl-C in a terminal reaches loom launch itself (it is in
    // the sweep's process group), and a second signal would end its job at once.
    if (g_sweep_signal.load() != 0 && g_sweep_signal.load() != SIGINT && !forwarded) {
      ::kill(child, SIGTERM);
      forwarded = true;
    }
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : kExitInternal;
}

std::string status_word(int code) {
  if (code == kExitOk) return "finished";
  if (code == kExitRequeue) return "stopped";
  return "failed";
}

// The sweep's folder: <output_dir>/<base run.name>-sweep.
fs::path sweep_dir_of(const std::string& config_path, const std::vector<std::string>& sets) {
  const Config base = load_config(config_path, sets);
  return fs::path(base.run.output_dir) / (base.run.name + "-sweep");
}

void write_sweep_record(const fs::path& dir, const std::string& config_path, const std::vector<Member>& members,
                        const std::vector<int>& codes, const std::string& slurm_job) {
  json list = json::array();
  for (size_t i = 0; i < members.size(); ++i) {
    json entry = {{"name", members[i].name},
                  {"run_dir", (fs::path(members[i].config.run.output_dir) / members[i].name).string()},
                  {"overrides", members[i].overrides}};
    if (i < codes.size()) entry["exit_code"] = codes[i], entry["status"] = status_word(codes[i]);
    list.push_back(entry);
  }
  json record = {{"config", config_path}, {"members", list}};
  if (!slurm_job.empty()) record["slurm_job_id"] = slurm_job;
  fs::create_directories(dir);
  write_file_atomic((dir / "sweep.json").string(), record.dump(2) + "\n");
}

int sweep_mpirun(const std::string& config_path, const std::vector<Member>& members, const fs::path& dir,
                 bool dry_run) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::vector<std::string>> commands;
  for (const Member& member : members) {
    std::vector<std::string> argv = {self, "launch", config_path};
    for (const std::string& set : member.overrides) argv.insert(argv.end(), {"--set", set});
    commands.push_back(argv);
  }
  if (dry_run) {
    for (size_t i = 0; i < members.size(); ++i) {
      std::cout << "# " << (i + 1) << "/" << members.size() << " " << members[i].name << "\n"
                << shell_join(commands[i]) << "\n";
    }
    std::cout.flush();
    return kExitOk;
  }
  struct sigaction action {};
  action.sa_handler = on_sweep_signal;
  sigemptyset(&action.sa_mask);
  for (const int signal : {SIGTERM, SIGINT, SIGUSR1}) ::sigaction(signal, &action, nullptr);

  std::vector<int> codes;
  for (size_t i = 0; i < members.size() && g_sweep_signal.load() == 0; ++i) {
    std::cout << "loom sweep: " << (i + 1) << "/" << members.size() << " " << members[i].name << ": "
              << shell_join(commands[i]) << std::endl;
    codes.push_back(run_member(commands[i]));
    write_sweep_record(dir, config_path, members, codes, "");
  }
  write_sweep_record(dir, config_path, members, codes, "");

  int failed = 0;
  std::cout << "loom sweep: " << members.size() << " runs (" << (dir / "sweep.json").string() << ")\n";
  for (size_t i = 0; i < members.size(); ++i) {
    const std::string status = i < codes.size() ? status_word(codes[i]) + " (exit " + std::to_string(codes[i]) + ")"
                                                : "not run";
    failed += i < codes.size() && codes[i] != kExitOk && codes[i] != kExitRequeue;
    std::cout << "  " << members[i].name << ": " << status << "\n";
  }
  std::cout.flush();
  if (failed > 0) {
    std::cerr << "loom sweep: " << failed << " of " << members.size() << " runs failed (listed above)" << std::endl;
    return kExitInternal;
  }
  const bool stopped = std::find(codes.begin(), codes.end(), kExitRequeue) != codes.end();
  return stopped || codes.size() < members.size() ? kExitRequeue : kExitOk;
}

// One job array: task i runs member i (see the top of this file).
std::string array_script(const std::string& config_path, const std::vector<Member>& members, const fs::path& dir) {
  const LaunchConfig& launch = members[0].config.launch;
  for (const Member& member : members) {
    const LaunchConfig& l = member.config.launch;
    if (l.nodes != launch.nodes || l.ranks != launch.ranks || l.gpus_per_node != launch.gpus_per_node)
      throw BadInput("loom sweep --slurm: member " + member.name + " asks for " + std::to_string(l.ranks) +
                     " ranks on " + std::to_string(l.nodes) + " nodes, member " + members[0].name + " for " +
                     std::to_string(launch.ranks) + " on " + std::to_string(launch.nodes) +
                     " (expected the same launch.ranks, launch.nodes and launch.gpus_per_node for every member "
                     "of one job array; vary the layout with parallel.*)");
  }
  const std::string abs_dir = fs::absolute(dir).lexically_normal().string();
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by `loom sweep --slurm` for " << fs::absolute(config_path).lexically_normal().string() << ": "
    << members.size() << " runs, task i of the array runs member i.\n"
    << "# Submit it again with: sbatch " << shell_quote(abs_dir + "/job.sbatch") << "\n"
    << "#SBATCH --job-name=" << members[0].config.run.name << "\n"
    << "#SBATCH --array=0-" << members.size() - 1 << "\n";
  write_sbatch_resources(s, launch, abs_dir + "/job-%A_%a");
  s << "#\n# Stopping and requeueing as in `loom launch --slurm` (docs/launching.md): the ranks of a task\n"
    << "# checkpoint on SIGUSR1 and exit " << kExitRequeue << ", and the task requeues itself.\n\n"
    << "cd " << shell_quote(fs::current_path().string()) << " || exit 2\n"
    << "echo \"loom: sweep task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID (job $SLURM_JOB_ID), start "
       "${SLURM_RESTART_COUNT:-0}\"\n\n"
    << "ranks_pid=\n"
    << "signals=0\n"
    << "on_usr1() { signals=$((signals + 1)); [ -n \"$ranks_pid\" ] && kill -USR1 \"$ranks_pid\"; }\n"
    << "trap on_usr1 USR1\n"
    << "trap 'signals=$((signals + 1))' TERM\n\n"
    << "case \"$SLURM_ARRAY_TASK_ID\" in\n";
  for (size_t i = 0; i < members.size(); ++i) {
    const Member& member = members[i];
    s << "  " << i << ")  # " << member.name << "\n";
    for (const auto& [name, value] : member.config.launch.env)
      s << "    export " << name << "=" << shell_quote(value) << "\n";
    s << "    " << slurm_rank_line(member.config, this_launch_host(config_path, member.overrides)) << " &\n"
      << "    ;;\n";
  }
  s << "  *) echo \"loom: no sweep member $SLURM_ARRAY_TASK_ID\"; exit 2 ;;\n"
    << "esac\n"
    << "ranks_pid=$!\n"
    << "while :; do\n"
    << "  seen=$signals\n"
    << "  wait \"$ranks_pid\"\n"
    << "  status=$?\n"
    << "  [ \"$signals\" -eq \"$seen\" ] && break\n"
    << "done\n"
    << "if [ \"$status\" -eq " << kExitRequeue << " ]; then\n"
    << "  scontrol requeue \"$SLURM_JOB_ID\"\n"
    << "fi\n"
    << "exit \"$status\"\n";
  return s.str();
}

int sweep_slurm(const std::string& config_path, const std::vector<Member>& members, const fs::path& dir,
                bool dry_run) {
  const std::string script = array_script(config_path, members, dir);
  const fs::path script_path = dir / "job.sbatch";
  if (dry_run) {
    std::cout << "# " << script_path.string() << "\n" << script << std::flush;
    return kExitOk;
  }
  const std::string sbatch = find_on_path("sbatch");
  if (sbatch.empty()) throw BadInput("sbatch not found on PATH: Slurm's client commands are not installed here");
  fs::create_directories(dir);
  write_file_atomic(script_path.string(), script);
  fs::permissions(script_path, fs::perms::owner_exec | fs::perms::group_exec, fs::perm_options::add);
  const auto [code, output] = capture_output({sbatch, "--parsable", script_path.string()});
  if (code != 0)
    throw BadInput("sbatch " + script_path.string() + " failed (exit " + std::to_string(code) +
                   "): Slurm not reachable or the request was refused (its message is above)");
  const std::string job_id = output.substr(0, output.find_first_of(";\n"));
  write_sweep_record(dir, config_path, members, {}, job_id);
  std::cout << "submitted job array " << job_id << " (" << members.size() << " runs): " << script_path.string()
            << "\n";
  for (size_t i = 0; i < members.size(); ++i) std::cout << "  " << job_id << "_" << i << " " << members[i].name << "\n";
  std::cout << job_id << std::endl;
  return kExitOk;
}

}  // namespace

const CommandSpec& sweep_spec() {
  static const CommandSpec spec{
      .name = "sweep",
      .synopsis = "CONFIG --grid KEY=V1,V2 [--grid ...] [OPTIONS]",
      .summary = "one run per grid combination, in turn under mpirun or as a Slurm job array (docs/experiments.md)",
      .arguments = {{"CONFIG", "the training config (.yaml) every run starts from"}},
      .flags = {{"grid", "KEY=V1,V2,...", "one axis of the grid (at least one)", kRepeatable},
                {"set", "KEY=VALUE", "override a config key for every run", kRepeatable},
                {"slurm", "", "submit the runs as one Slurm job array"},
                {"dry-run", "", "print the runs' commands (or the batch script) and run nothing"}},
      .examples = {"loom sweep configs/tiny.yaml --grid optimizer.lr=1e-3,3e-4 --grid parallel.tp=1,2 --dry-run"},
  };
  return spec;
}

int command_sweep(const std::vector<std::string>& argv) {
  Args args(sweep_spec(), argv);
  args.expect_positional(1, "one CONFIG");
  if (args.all("grid").empty()) throw BadInput("loom sweep: give at least one --grid KEY=V1,V2,...");
  const std::string config_path = args.positional()[0];
  std::vector<GridAxis> grid;
  for (const std::string& argument : args.all("grid")) grid.push_back(parse_grid(argument));
  const std::vector<std::string>& sets = args.all("set");
  const std::vector<Member> members = expand(config_path, sets, grid);
  const fs::path dir = sweep_dir_of(config_path, sets);
  if (args.has("slurm")) return sweep_slurm(config_path, members, dir, args.has("dry-run"));
  return sweep_mpirun(config_path, members, dir, args.has("dry-run"));
}

}  // namespace loom
