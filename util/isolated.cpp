#include "util/isolated.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <system_error>

#include "util/error.h"

// Where a sanitizer runtime is linked in (the ASan tests, the fuzz targets),
// it calls this callback before it ends the process with its report; libFuzzer
// sets one that saves the input as a crash. A child's report is the parent's
// answer, not a crash of the process under test, so the child clears it.
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

namespace loom {

namespace {

// Records on the pipe: a tag byte, a 4-byte length, the text. Every child
// that ends by itself sends one of the last three: a child that sends none
// did not finish, whatever its exit status says.
constexpr char kProgress = 'P';
constexpr char kBadInput = 'B';
constexpr char kThrew = 'E';
constexpr char kDone = 'D';

void write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the parent has gone: nothing to tell
    data += n;
    size -= static_cast<size_t>(n);
  }
}

void write_record(int fd, char tag, const std::string& text) {
  const uint32_t size = static_cast<uint32_t>(std::min<size_t>(text.size(), 64 * 1024));
  char header[5] = {tag};
  std::memcpy(header + 1, &size, sizeof size);
  write_all(fd, header, sizeof header);
  write_all(fd, text.data(), size);
}

uint64_t mapped_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t pages = 0;
  statm >> pages;
  return pages * static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

[[noreturn]] void run_child(int fd, pid_t parent, const std::function<void(IsolatedChannel&)>& work,
                            const IsolatedOptions& options) {
  if (options.in_child) options.in_child();
  // Die with the parent (a rank killed while it waits must not leave a
  // reader behind), and by the crash signals themselves rather than through
  // handlers the parent installed.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  for (int signal : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2})
    ::signal(signal, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
  if (__sanitizer_set_death_callback != nullptr) __sanitizer_set_death_callback(nullptr);
  if (options.address_space_headroom > 0) {
    const rlim_t limit = mapped_bytes() + options.address_space_headroom;
    const rlimit address_space{limit, limit};
    ::setrlimit(RLIMIT_AS, &address_space);
  }
  IsolatedChannel channel(fd);
  try {
    work(channel);
    write_record(fd, kDone, "");
  } catch (const BadInput& error) {
    write_record(fd, kBadInput, error.what());
  } catch (const std::exception& error) {
    write_record(fd, kThrew, error.what());
  } catch (...) {
    write_record(fd, kThrew, "an exception that is not a std::exception");
  }
  ::_exit(0);
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) {
    const char* name = sigabbrev_np(WTERMSIG(status));
    return std::string("killed by ") + (name != nullptr ? std::string("SIG") + name : "signal " + std::to_string(WTERMSIG(status)));
  }
  return "exit status " + std::to_string(WEXITSTATUS(status));
}

// Fills `result` from the child's records; returns whether it answered.
bool parse_records(const std::string& bytes, IsolatedResult& result) {
  bool answered = false;
  size_t at = 0;
  while (at + 5 <= bytes.size()) {
    const char tag = bytes[at];
    uint32_t size = 0;
    std::memcpy(&size, bytes.data() + at + 1, sizeof size);
    if (at + 5 + size > bytes.size()) break;  // cut off by a crash mid-write
    std::string text = bytes.substr(at + 5, size);
    at += 5 + size;
    if (tag == kProgress) {
      result.last_progress = std::move(text);
    } else if (tag == kBadInput || tag == kThrew) {
      result.outcome = tag == kBadInput ? IsolatedOutcome::kBadInput : IsolatedOutcome::kThrew;
      result.message = std::move(text);
      answered = true;
    } else if (tag == kDone) {
      answered = true;
    }
  }
  return answered;
}

}  // namespace

void IsolatedChannel::progress(const std::string& what) { write_record(fd_, kProgress, what); }

namespace {

IsolatedResult run_once(const std::function<void(IsolatedChannel&)>& work, const IsolatedOptions& options) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::system_error(errno, std::generic_category(), "pipe2");
  const pid_t parent = ::getpid();
  if (options.prepare) options.prepare();
  const pid_t child = ::fork();
  const int fork_error = errno;
  if (child == 0) {
    ::close(fds[0]);
    run_child(fds[1], parent, work, options);
  }
  if (options.in_parent) options.in_parent();
  ::close(fds[1]);
  if (child < 0) {
    ::close(fds[0]);
    throw std::system_error(fork_error, std::generic_category(), "fork");
  }

  // Read the child's records until it exits or the deadline passes. The
  // child's exit is checked between short polls as well as by end-of-file:
  // a fork() on another thread of this process could hold the pipe's write
  // end open after the child has gone.
  const auto deadline = std::chrono::steady_clock::now() + options.timeout;
  std::string bytes;
  IsolatedResult result;
  int status = 0;
  bool exited = false;
  bool status_known = true;
  bool eof = false;
  char buffer[4096];
  while (!exited) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      ::kill(child, SIGKILL);
      while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
      }
      ::close(fds[0]);
      parse_records(bytes, result);
      result.outcome = IsolatedOutcome::kTimedOut;
      const auto ms = options.timeout.count();
      result.how = "no answer in " + (ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms");
      return result;
    }
    if (!eof) {
      pollfd readable{fds[0], POLLIN, 0};
      const int wait_ms =
          static_cast<int>(std::min<int64_t>(50, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1));
      if (::poll(&readable, 1, wait_ms) > 0) {
        const ssize_t n = ::read(fds[0], buffer, sizeof buffer);
        if (n > 0 && bytes.size() < (size_t{1} << 20)) bytes.append(buffer, static_cast<size_t>(n));
        if (n == 0) eof = true;
      }
    } else {
      ::usleep(10'000);
    }
    const pid_t done = ::waitpid(child, &status, WNOHANG);
    if (done == child) exited = true;
    // Reaped already: this process ignores SIGCHLD. The records still say
    // whether the child answered.
    if (done < 0 && errno == ECHILD) exited = eof, status_known = false;
  }
  // Whatever the child wrote before it exited is in the pipe.
  ::fcntl(fds[0], F_SETFL, O_NONBLOCK);
  for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;)
    if (bytes.size() < (size_t{1} << 20)) bytes.append(buffer, static_cast<size_t>(n));
  ::close(fds[0]);

  const bool answered = parse_records(bytes, result);
  if (answered && (!status_known || (WIFEXITED(status) && WEXITSTATUS(status) == 0)))
    return result;  // kFinished, kBadInput or kThrew
  result.outcome = IsolatedOutcome::kCrashed;
  result.how = !status_known ? "ended without an answer"
               : WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "exit status 0 without an answer"
                                                               : describe_status(status);
  return result;
}

}  // namespace

IsolatedResult run_isolated(const std::function<void(IsolatedChannel&)>& work, const IsolatedOptions& options) {
  IsolatedResult result = run_once(work, options);
  for (int attempt = 1; attempt < options.attempts && result.outcome == IsolatedOutcome::kTimedOut; ++attempt)
    result = run_once(work, options);
  if (result.outcome == IsolatedOutcome::kTimedOut && options.attempts > 1)
    result.how += ", each of " + std::to_string(options.attempts) + " children";
  return result;
}

}  // namespace loom
