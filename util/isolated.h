// Runs a piece of work in a forked child process, so that a crash, a hang or
// a runaway allocation inside it costs the child, not the caller.
//
// loom uses it where a C library it cannot check reads untrusted bytes:
// libhdf5 trusts the structures it finds in a file, and a crafted shard can
// make it read out of bounds or loop (Note [Reading shards in a probe
// process], data/dataset.cpp). The child does the same reads the caller is
// about to do; if it survives, the caller does them itself.
//
//   IsolatedResult result = run_isolated([&](IsolatedChannel& channel) {
//     channel.progress("shard-00003.h5");
//     read_everything();
//   }, options);
//   if (result.outcome == IsolatedOutcome::kCrashed) ...
//
// The child runs only `work` and then _exit()s: no atexit handlers, no stdio
// flush, no destructors of the parent's objects. It must not use anything
// another thread of the parent could have held locked at fork() (only the
// forking thread is copied): `options.prepare` takes such a lock in the
// parent just before fork(), `options.in_parent` releases it there, and
// `options.in_child` makes it usable again in the child.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

namespace loom {

class IsolatedChannel {
 public:
  explicit IsolatedChannel(int fd) : fd_(fd) {}
  // Tells the parent what the child is working on now; after a crash the
  // last one names where it happened.
  void progress(const std::string& what);

 private:
  int fd_;
};

enum class IsolatedOutcome {
  kFinished,   // work returned
  kBadInput,   // work threw BadInput; message holds its text
  kThrew,      // work threw another exception; message holds what()
  kCrashed,    // the child ended without answering: a signal, a sanitizer's report, an exit()
  kTimedOut,   // the child ran past options.timeout and was killed
};

struct IsolatedResult {
  IsolatedOutcome outcome = IsolatedOutcome::kFinished;
  std::string message;        // the exception's text (kBadInput, kThrew)
  std::string last_progress;  // the child's last progress() before it ended
  std::string how;            // "killed by SIGSEGV", "exit status 1", "no answer in 60 s"
};

struct IsolatedOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  // The child may map at most this much address space beyond what it
  // inherited (RLIMIT_AS): a crafted length field that makes a library
  // allocate gigabytes fails there instead of swapping the node. 0: no limit.
  uint64_t address_space_headroom = uint64_t{4} << 30;
  // How many children to try before a timeout is the answer. A child can
  // hang through no fault of the work: fork() copies only the calling
  // thread, and a lock that another thread held inside a runtime without
  // fork handlers stays held in the child forever (GCC 12's ASan allocator:
  // a child that allocates while another thread allocates hung in 1 of 2000
  // forks here; glibc's malloc takes its locks around fork() and never did).
  // A fresh child meets the other threads at another moment; work that
  // loops by itself times out every time.
  int attempts = 1;
  std::function<void()> prepare;    // in the parent, just before fork()
  std::function<void()> in_parent;  // in the parent, just after fork()
  std::function<void()> in_child;   // in the child, first thing
};

// Forks, runs `work` in the child and waits for it (at most options.timeout,
// options.attempts times while it times out). Throws std::system_error when the child cannot be started.
IsolatedResult run_isolated(const std::function<void(IsolatedChannel&)>& work, const IsolatedOptions& options);

}  // namespace loom
