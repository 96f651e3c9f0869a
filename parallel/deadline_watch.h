// Deadlines for operations the caller must not block on: an NCCL collective
// queued on a GPU stream, a communicator joining its peers. The watch holds
// each operation with its deadline and a "done?" and an "error?" callback;
// poll() drops the finished ones and reports the first that failed (past its
// deadline, or with an error its backend reported), in a message naming the
// operation, its group and the ranks it waited for.
//
//   DeadlineWatch watch;                              // or DeadlineWatch(fake_clock) in tests
//   watch.add({.what = where, .waiting_for = hint, .timeout = 10min,
//              .done = [event] { return query(event); }});
//   if (auto failure = watch.poll()) end_the_job(failure->message);
//
// Torch- and CUDA-free, with an injectable clock, so that the rules are
// tested without a GPU (tests/unit/test_deadline_watch.cpp). The NCCL backend
// runs one per group on its watchdog thread, and one per blocking step
// (joining, a call that returned ncclInProgress) on the calling thread
// (Note [NCCL watchdog] in parallel/nccl_process_group.h).
//
// Thread safety: every member may be called from any thread. The callbacks
// run inside poll(), under the watch's lock, so they must not call the watch;
// a dropped operation's callbacks (and what they hold: tensors, events) are
// destroyed after the lock is released.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

class DeadlineWatch {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  using Clock = std::function<TimePoint()>;

  struct Op {
    // The start of every message about it, from ProcessGroup::start_op:
    // "rank 3 (group 'tp' rank 1 of 2, world ranks [2 3]): all_reduce #7 of ...".
    std::string what;
    // What this rank waits for: "waiting for world ranks [2] (the other
    // members of group 'tp'); ..." (ProcessGroup::collective_hint,
    // peers_never_joined).
    std::string waiting_for;
    std::chrono::milliseconds timeout{0};
    // True once the operation has finished on this rank. Never blocks;
    // called by poll() until it returns true, then the watch drops the op.
    std::function<bool()> done;
    // The error the backend reported for the operation, or "" while it
    // reported none (an NCCL communicator's asynchronous error). Optional.
    std::function<std::string()> error;
  };

  struct Failure {
    enum class Kind { kExpired, kError };
    Kind kind = Kind::kExpired;
    uint64_t id = 0;  // as add returned it
    // When it failed: the deadline for kExpired, the poll that saw the
    // error for kError. The failure with the earliest `at` is reported.
    TimePoint at;
    std::string message;  // one line, for MpiSession::abort
  };

  explicit DeadlineWatch(Clock clock = [] { return std::chrono::steady_clock::now(); });
  DeadlineWatch(const DeadlineWatch&) = delete;
  DeadlineWatch& operator=(const DeadlineWatch&) = delete;

  // Watches `op` from now (the clock's): its deadline is now + op.timeout.
  // Returns the id that names it in restart and watching.
  uint64_t add(Op op);

  // Moves the deadline of operation `id` to now + `timeout` (a
  // Work::wait(timeout) that names its own). False when `id` is no longer
  // watched (it was seen done).
  bool restart(uint64_t id, std::chrono::milliseconds timeout);

  // One round over every operation, oldest first: asks each whether it is
  // done (and drops it if so), then whether it failed. Returns the failure
  // that happened first when any did; ties go to the older operation. The
  // failure sticks: every later poll returns it again without calling any
  // callback (the job is ending; a second report would only blur the first).
  std::optional<Failure> poll();

  bool watching(uint64_t id) const;
  size_t size() const;  // operations not yet seen done
  std::optional<Failure> failure() const;
  bool failed() const;  // failure().has_value(), without the copy

 private:
  struct Entry {
    Op op;
    TimePoint deadline;
  };

  Clock clock_;
  mutable std::mutex mutex_;
  std::map<uint64_t, Entry> entries_;  // by id, so iteration is oldest first
  uint64_t next_id_ = 1;
  std::optional<Failure> failure_;
};

// The waiting_for of a communicator that must be joined by every rank of
// its group: "world ranks [1 3] (the other members of group 'tp') never
// joined; ..." with what to check. `rank` is this rank's index in
// `world_ranks` (its group rank).
std::string peers_never_joined(std::string_view group, const std::vector<int>& world_ranks, int rank,
                               std::string_view call);

// "2 s", "0.5 s", "600 s": a duration for messages.
std::string seconds_text(std::chrono::milliseconds duration);

}  // namespace loom
