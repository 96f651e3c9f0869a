// `loom train CONFIG [--set KEY=VALUE ...]`: one rank's training run.
#include <unistd.h>

#include <iostream>

#include "launch/cli.h"
#include "launch/commands.h"
#include "trainer/config.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom {

int command_train(const std::vector<std::string>& argv) {
  Args args("train", argv, {{"set", true, true, "override a config key, e.g. --set schedule.train_steps=100"}});
  args.expect_positional(1, "one CONFIG");
  Config config = load_config(args.positional()[0], args.all("set"));
  TrainOptions options;
  options.log = &std::cout;
  options.progress_bar = ::isatty(STDOUT_FILENO) == 1;
  train(config, options);
  return kExitOk;
}

}  // namespace loom
