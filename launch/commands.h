// The `loom` subcommands. Each takes its own arguments (after the command
// name) and returns an exit code; errors are thrown (see util/error.h) and
// turned into exit codes by run_cli.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom {

struct CommandSpec;  // launch/cli.h

// Each command comes with its spec: its usage, arguments and options, which
// its parser reads and `loom COMMAND --help` prints (launch/cli.h).
int command_version(const std::vector<std::string>& args);
const CommandSpec& version_spec();
int command_inspect(const std::vector<std::string>& args);
const CommandSpec& inspect_spec();
int command_import(const std::vector<std::string>& args);
const CommandSpec& import_spec();
int command_init(const std::vector<std::string>& args);
const CommandSpec& init_spec();
int command_export(const std::vector<std::string>& args);
const CommandSpec& export_spec();
int command_generate(const std::vector<std::string>& args);
const CommandSpec& generate_spec();
int command_forward(const std::vector<std::string>& args);
const CommandSpec& forward_spec();
int command_prepare(const std::vector<std::string>& args);  // launch/data_commands.cpp
const CommandSpec& prepare_spec();
int command_tokenizer(const std::vector<std::string>& args);  // launch/data_commands.cpp
const CommandSpec& tokenizer_train_spec();
int command_train(const std::vector<std::string>& args);  // launch/train_command.cpp
const CommandSpec& train_spec();
int command_launch(const std::vector<std::string>& args);  // launch/launch_command.cpp
const CommandSpec& launch_spec();
int command_plot(const std::vector<std::string>& args);  // launch/plot_command.cpp
const CommandSpec& plot_spec();
int command_sweep(const std::vector<std::string>& args);  // launch/sweep_command.cpp
const CommandSpec& sweep_spec();
int command_runs(const std::vector<std::string>& args);  // launch/runs_command.cpp
const CommandSpec& runs_spec();
int command_plan(const std::vector<std::string>& args);  // launch/plan_command.cpp
const CommandSpec& plan_spec();
int command_health(const std::vector<std::string>& args);  // launch/health_command.cpp
const CommandSpec& health_spec();

// Whether an MPI launcher started this process (Open MPI's mpirun, or srun
// and other PMIx/PMI launchers): then MPI is initialized and the job may span
// several ranks (launch/train_command.cpp).
bool launched_by_mpi();
// The number of ranks the MPI launcher started (before MPI_Init), or 0 when
// no launcher says.
int launcher_world_size();

// Runs `argv` as a child in its own process group and returns its exit code
// (128 + signal when a signal ended it); SIGTERM, SIGINT or SIGUSR1 to this
// process goes on to it once as SIGUSR1, then as SIGTERM
// (launch/launch_command.cpp).
int run_forwarding_signals(const std::vector<std::string>& argv, int* signals_forwarded = nullptr);

// Runs `loom COMMAND ARGV...` again as `ranks` ranks under this host's
// mpirun (saying so on stderr) and returns its exit code: for commands that
// measure with several ranks when started without a launcher (`loom plan
// --calibrate`, `loom health`) (launch/launch_command.cpp).
int rerun_under_mpirun(const std::string& command, const std::vector<std::string>& argv, int64_t ranks);

// `loom plan --calibrate` (launch/plan_calibrate.cpp).
int plan_calibrate(const std::vector<std::string>& args);
const CommandSpec& plan_calibrate_spec();

// Datasets (launch/data_commands.cpp).
bool is_dataset_folder(const std::string& path);
int inspect_dataset(const std::string& path, bool verify, const std::string& tokenizer_path);

// Dispatches argv[1] to a command; prints one clear line and returns 2 for
// bad input, 1 for internal errors. `loom COMMAND --help` prints the
// command's usage and returns 0; `loom help` lists the commands.
int run_cli(int argc, char** argv);

}  // namespace loom
