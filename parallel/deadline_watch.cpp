#include "parallel/deadline_watch.h"

#include <sstream>
#include <utility>

namespace loom {

DeadlineWatch::DeadlineWatch(Clock clock) : clock_(std::move(clock)) {}

uint64_t DeadlineWatch::add(Op op) {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t id = next_id_++;
  const TimePoint deadline = clock_() + op.timeout;
  entries_.emplace(id, Entry{std::move(op), deadline});
  return id;
}

bool DeadlineWatch::restart(uint64_t id, std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return false;
  it->second.op.timeout = timeout;
  it->second.deadline = clock_() + timeout;
  return true;
}

std::optional<DeadlineWatch::Failure> DeadlineWatch::poll() {
  // Declared before the lock so that the dropped operations' callbacks (and
  // the tensors and events they hold) are destroyed after it is released.
  std::vector<Entry> finished;
  std::lock_guard<std::mutex> lock(mutex_);
  if (failure_) return failure_;
  const TimePoint now = clock_();
  std::optional<Failure> first;
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& entry = it->second;
    // Done wins over late: an operation that finished after its deadline
    // but before this poll did finish, and nothing waits for it any more.
    if (entry.op.done()) {
      finished.push_back(std::move(entry));
      it = entries_.erase(it);
      continue;
    }
    std::optional<Failure> failed;
    const std::string error = entry.op.error ? entry.op.error() : std::string();
    if (!error.empty()) {
      failed = Failure{Failure::Kind::kError, it->first, now, entry.op.what + ": " + error + ". Ending the job."};
    } else if (now >= entry.deadline) {
      failed = Failure{Failure::Kind::kExpired, it->first, entry.deadline,
                       entry.op.what + " did not complete within " + seconds_text(entry.op.timeout) + "; " +
                           entry.op.waiting_for + ". Ending the job."};
    }
    // Strictly earlier: at equal times the older operation (seen first) wins.
    if (failed && (!first || failed->at < first->at)) first = std::move(failed);
    ++it;
  }
  failure_ = first;
  return failure_;
}

bool DeadlineWatch::watching(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.count(id) > 0;
}

size_t DeadlineWatch::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

std::optional<DeadlineWatch::Failure> DeadlineWatch::failure() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_;
}

bool DeadlineWatch::failed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return failure_.has_value();
}

std::string peers_never_joined(std::string_view group, const std::vector<int>& world_ranks, int rank,
                               std::string_view call) {
  std::ostringstream os;
  os << "world ranks [";
  bool first = true;
  for (size_t i = 0; i < world_ranks.size(); ++i) {
    if (static_cast<int>(i) == rank) continue;
    os << (first ? "" : " ") << world_ranks[i];
    first = false;
  }
  os << "] (the other members of group '" << group << "') never all joined: each must reach " << call
     << " (one that did not may have failed, be stuck before it or not have started), and every rank must reach "
        "every other over the network NCCL picked (check NCCL_SOCKET_IFNAME and NCCL_IB_HCA; NCCL_DEBUG=INFO lists "
        "the connections it tries)";
  return os.str();
}

std::string seconds_text(std::chrono::milliseconds duration) {
  std::ostringstream os;
  os << std::chrono::duration<double>(duration).count() << " s";
  return os.str();
}

}  // namespace loom
