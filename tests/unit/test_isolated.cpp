// run_isolated (util/isolated.h): work in a forked child whose crash, hang,
// exception or runaway allocation comes back to the caller as a result.
#include "util/isolated.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>

#include "util/error.h"

namespace loom {
namespace {

using std::chrono::milliseconds;

TEST(IsolatedTest, FinishedWorkReportsItsLastProgress) {
  const IsolatedResult result = run_isolated(
      [](IsolatedChannel& channel) {
        channel.progress("first");
        channel.progress("second");
      },
      {});
  EXPECT_EQ(result.outcome, IsolatedOutcome::kFinished);
  EXPECT_EQ(result.last_progress, "second");
  EXPECT_TRUE(result.message.empty());
}

TEST(IsolatedTest, ExceptionsComeBackWithTheirText) {
  IsolatedResult result = run_isolated([](IsolatedChannel&) { throw BadInput("shard-00002.h5: bad attribute"); }, {});
  EXPECT_EQ(result.outcome, IsolatedOutcome::kBadInput);
  EXPECT_EQ(result.message, "shard-00002.h5: bad attribute");

  result = run_isolated([](IsolatedChannel&) { throw std::out_of_range("index 9"); }, {});
  EXPECT_EQ(result.outcome, IsolatedOutcome::kThrew);
  EXPECT_EQ(result.message, "index 9");
}

TEST(IsolatedTest, ACrashInTheChildIsReportedWithTheSignalAndWhereItWas) {
  // Whatever handler this process has for SIGSEGV, the child dies by it.
  const IsolatedResult result = run_isolated(
      [](IsolatedChannel& channel) {
        channel.progress("shard-00007.h5");
        ::raise(SIGSEGV);
      },
      {});
  EXPECT_EQ(result.outcome, IsolatedOutcome::kCrashed);
  EXPECT_EQ(result.how, "killed by SIGSEGV");
  EXPECT_EQ(result.last_progress, "shard-00007.h5");

  const IsolatedResult exited = run_isolated([](IsolatedChannel&) { std::_Exit(5); }, {});
  EXPECT_EQ(exited.outcome, IsolatedOutcome::kCrashed);
  EXPECT_EQ(exited.how, "exit status 5");

  // Leaving early with status 0 (a library calling exit(0)) is not finishing.
  const IsolatedResult quit = run_isolated([](IsolatedChannel&) { ::_exit(0); }, {});
  EXPECT_EQ(quit.outcome, IsolatedOutcome::kCrashed);
  EXPECT_EQ(quit.how, "exit status 0 without an answer");
}

TEST(IsolatedTest, AnswersAreReadWhenTheProcessIgnoresSigchld) {
  // With SIGCHLD ignored the kernel reaps the child itself and waitpid has
  // nothing to report: the records decide.
  struct sigaction ignore {}, previous {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGCHLD, &ignore, &previous), 0);
  const IsolatedResult finished = run_isolated([](IsolatedChannel&) {}, {});
  const IsolatedResult crashed = run_isolated([](IsolatedChannel&) { ::raise(SIGSEGV); }, {});
  ::sigaction(SIGCHLD, &previous, nullptr);
  EXPECT_EQ(finished.outcome, IsolatedOutcome::kFinished) << finished.how;
  EXPECT_EQ(crashed.outcome, IsolatedOutcome::kCrashed);
  EXPECT_EQ(crashed.how, "ended without an answer");
}

// Work that never finishes, given `attempts` children of 300 ms each: the
// result, how long it took and how many children were forked.
struct Looped {
  IsolatedResult result;
  std::chrono::steady_clock::duration took;
  int forks = 0;
};
Looped run_looping_work(int attempts) {
  Looped looped;
  IsolatedOptions options;
  options.timeout = milliseconds(300);
  options.attempts = attempts;
  options.prepare = [&] { ++looped.forks; };
  const auto start = std::chrono::steady_clock::now();
  looped.result = run_isolated(
      [](IsolatedChannel& channel) {
        channel.progress("looping");
        for (;;) ::pause();
      },
      options);
  looped.took = std::chrono::steady_clock::now() - start;
  return looped;
}

TEST(IsolatedTest, AChildThatDoesNotFinishIsKilledAtTheDeadlineInEachAttempt) {
  for (const int attempts : {1, 2}) {
    const Looped looped = run_looping_work(attempts);
    EXPECT_EQ(looped.forks, attempts);
    EXPECT_EQ(looped.result.outcome, IsolatedOutcome::kTimedOut);
    EXPECT_EQ(looped.result.last_progress, "looping");
    EXPECT_EQ(looped.result.how, attempts == 1 ? "no answer in 300 ms" : "no answer in 300 ms, each of 2 children");
    EXPECT_GE(looped.took, attempts * milliseconds(300));
    EXPECT_LT(looped.took, std::chrono::seconds(10));
  }
}

TEST(IsolatedTest, AChildHungOnALockItInheritedIsTriedAgain) {
  // Another thread holds a mutex when the first child is forked: the child's
  // copy stays locked forever and the child hangs on it (as on an allocator's
  // lock in a runtime without fork handlers). By the second fork the thread
  // has let go, and the second child finishes.
  std::mutex mutex;
  std::mutex control;
  std::condition_variable changed;
  bool holding = false;
  bool release = false;
  std::thread holder([&] {
    std::unique_lock<std::mutex> hold(mutex);
    std::unique_lock<std::mutex> lock(control);
    holding = true;
    changed.notify_all();
    changed.wait(lock, [&] { return release; });
  });
  {
    std::unique_lock<std::mutex> lock(control);
    changed.wait(lock, [&] { return holding; });
  }
  int forks = 0;
  IsolatedOptions options;
  options.timeout = milliseconds(500);
  options.attempts = 2;
  options.prepare = [&] {
    if (++forks < 2) return;
    {
      std::lock_guard<std::mutex> lock(control);
      release = true;
    }
    changed.notify_all();
    holder.join();  // the mutex is free before the second fork
  };
  const IsolatedResult result = run_isolated(
      [&](IsolatedChannel& channel) {
        channel.progress("locking");
        std::lock_guard<std::mutex> hold(mutex);
      },
      options);
  if (holder.joinable()) {
    {
      std::lock_guard<std::mutex> lock(control);
      release = true;
    }
    changed.notify_all();
    holder.join();
  }
  EXPECT_EQ(result.outcome, IsolatedOutcome::kFinished) << result.how;
  // Two forks: the first child hung (a finished one is not tried again).
  EXPECT_EQ(forks, 2);
}

TEST(IsolatedTest, TheChildCannotMapMuchBeyondItsHeadroom) {
  IsolatedOptions options;
  options.address_space_headroom = uint64_t{256} << 20;
  const IsolatedResult result = run_isolated(
      [](IsolatedChannel&) {
        // A length field that asks for 8 GiB, as a crafted file's can.
        void* block = std::malloc(size_t{8} << 30);
        if (block != nullptr) throw std::runtime_error("8 GiB allocated past a 256 MiB headroom");
      },
      options);
  // Without a sanitizer malloc returns NULL; ASan's allocator may instead
  // report that it ran out of memory and end the child. Never kFinished.
  EXPECT_TRUE(result.outcome == IsolatedOutcome::kFinished || result.outcome == IsolatedOutcome::kCrashed)
      << result.message;

  // Small allocations within the headroom work.
  const IsolatedResult small = run_isolated(
      [](IsolatedChannel&) {
        void* block = std::malloc(size_t{16} << 20);
        if (block == nullptr) throw std::runtime_error("16 MiB refused");
        std::free(block);
      },
      options);
  EXPECT_EQ(small.outcome, IsolatedOutcome::kFinished) << small.message;
}

TEST(IsolatedTest, ALockHeldByAnotherThreadAtForkIsTakenCareOfByTheHooks) {
  // Another thread holds the mutex most of the time; the hooks take it
  // around fork() and give the child a fresh one, so the child can lock it.
  std::mutex mutex;
  std::atomic<bool> stop{false};
  std::thread holder([&] {
    while (!stop) {
      std::lock_guard<std::mutex> hold(mutex);
      std::this_thread::sleep_for(milliseconds(2));
    }
  });
  IsolatedOptions options;
  options.timeout = std::chrono::seconds(20);
  options.prepare = [&] { mutex.lock(); };
  options.in_parent = [&] { mutex.unlock(); };
  options.in_child = [&] { new (&mutex) std::mutex(); };
  for (int i = 0; i < 20; ++i) {
    const IsolatedResult result = run_isolated([&](IsolatedChannel&) { std::lock_guard<std::mutex> hold(mutex); },
                                               options);
    EXPECT_EQ(result.outcome, IsolatedOutcome::kFinished) << result.how;
  }
  stop = true;
  holder.join();
}

}  // namespace
}  // namespace loom
