// `loom train CONFIG [--set KEY=VALUE ...]`: one rank's training run.
//
// SIGTERM (what Slurm and most schedulers send before killing a job),
// SIGINT (Ctrl-C) and SIGUSR1 (Slurm's --signal) stop the run gracefully:
// the step in progress is finished, a checkpoint is written at that step
// boundary, and loom exits with 128 + the signal's number, so running the
// same command again resumes exactly. A second signal ends the process at
// once (the handler resets itself).
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <iostream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "trainer/config.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom {

namespace {

std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free store");

extern "C" void on_stop_signal(int signal) { g_stop_signal.store(signal); }

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESETHAND;  // the second signal takes the default action: end now
  for (const int signal : {SIGTERM, SIGINT, SIGUSR1}) ::sigaction(signal, &action, nullptr);
}

}  // namespace

int command_train(const std::vector<std::string>& argv) {
  Args args("train", argv, {{"set", true, true, "override a config key, e.g. --set schedule.train_steps=100"}});
  args.expect_positional(1, "one CONFIG");
  Config config = load_config(args.positional()[0], args.all("set"));
  TrainOptions options;
  options.log = &std::cout;
  options.progress_bar = ::isatty(STDOUT_FILENO) == 1;
  options.stop_signal = &g_stop_signal;
  install_stop_handlers();
  const TrainResult result = train(config, options);
  if (result.stopped_by_signal != 0) {
    std::cout << "stopped by signal " << result.stopped_by_signal << " after step " << result.final_step
              << (result.last_checkpoint.empty() ? std::string(" (no checkpoint: checkpoint.enabled is false)")
                                                 : "; checkpoint " + result.last_checkpoint +
                                                       ", run the same command to resume")
              << std::endl;
    return 128 + result.stopped_by_signal;
  }
  return kExitOk;
}

}  // namespace loom
