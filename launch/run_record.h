// runs/<name>/run.json: what produced a run, so that its folder alone says
// how to make it again (docs/experiments.md).
//
// Written by `loom train` beside the resolved config.yaml (which is what
// `loom train runs/<name>/config.yaml` re-reads): the command line, loom's
// version and git commit, the host of every rank, the layout, the library
// versions, the start time; then, when the run ends, the end time, the exit
// code and a status:
//   running   started, not ended (or ended by SIGKILL, a crash of the node,
//             a second stop signal: nothing could write the end)
//   finished  exit 0, schedule.train_steps reached
//   stopped   exit 75: a stop signal or launch.max_wall_time, checkpoint
//             written, `loom train` again resumes
//   failed    exit 2 (bad input) or 1 (internal error), with the message
// Each `loom train` of the run (a resume, a requeue) is one entry of
// "attempts"; the top-level fields describe the latest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/topology.h"
#include "config/config.h"

namespace loom {

class ProcessGroup;

// loom's version and the git commit it was built from ("unknown" when the
// build had no git checkout; "-dirty" appended for uncommitted changes).
std::string loom_version();
std::string loom_git_commit();

// The host name of every rank of `world`, in rank order (collective over
// `world`); this host alone when `world` is null.
std::vector<std::string> host_names(ProcessGroup* world);

class RunRecord {
 public:
  // `argv`: the command line of this process, from "loom" on.
  RunRecord(const Config& config, const ParallelDims& dims, std::vector<std::string> argv,
            std::vector<std::string> hosts);

  // Writes run.json with the start of this attempt (keeping the earlier
  // attempts of a resumed run). Creates the run folder.
  void start();
  // Writes the end of this attempt (any rank may: the file is re-read, and
  // written atomically). Never throws: it runs on error paths.
  void finish(int exit_code, int64_t final_step, const std::string& error = "") noexcept;

  std::string path() const;

 private:
  std::string document_with_attempt(bool starting) const;

  std::string run_dir_;
  std::string record_;  // this attempt, as JSON text (json kept out of the header)
};

}  // namespace loom
