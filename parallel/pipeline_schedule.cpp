#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <cstdio>
#include <deque>
#include <map>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "util/error.h"

namespace loom {

namespace {

// A schedule's compute actions for one rank, in order, before the messages
// around them are added.
struct Compute {
  bool forward;
  int64_t micro_batch;
  int64_t chunk;
};

std::vector<Compute> afab(int64_t m) {
  std::vector<Compute> out;
  for (int64_t mb = 0; mb < m; ++mb) out.push_back({true, mb, 0});
  for (int64_t mb = 0; mb < m; ++mb) out.push_back({false, mb, 0});
  return out;
}

// One forward, one backward after `warmup` forwards, over `total` virtual
// micro-batches whose (micro-batch, chunk) the two functions give.
template <typename F, typename B>
std::vector<Compute> one_forward_one_backward(int64_t total, int64_t warmup, F forward_of, B backward_of) {
  std::vector<Compute> out;
  warmup = std::min(warmup, total);
  for (int64_t k = 0; k < warmup; ++k) out.push_back(forward_of(k));
  for (int64_t k = 0; k + warmup < total; ++k) {
    out.push_back(forward_of(warmup + k));
    out.push_back(backward_of(k));
  }
  for (int64_t k = total - warmup; k < total; ++k) out.push_back(backward_of(k));
  return out;
}

std::string refusal(std::string_view kind, int64_t p, int64_t m, int64_t v, const std::string& why) {
  return "parallel.pp_schedule " + std::string(kind) + " with parallel.pp " + std::to_string(p) +
         ", parallel.virtual_stages " + std::to_string(v) + " and " + std::to_string(m) +
         " micro-batches per step: " + why;
}

}  // namespace

PipeSchedule make_pipe_schedule(std::string_view kind, int64_t p, int64_t m, int64_t v) {
  if (p < 1 || m < 1 || v < 1) throw BadInput(refusal(kind, p, m, v, "every count must be at least 1"));
  if (kind != "afab" && kind != "1f1b" && kind != "interleaved") {
    throw BadInput(refusal(kind, p, m, v, "unknown schedule (expected afab, 1f1b or interleaved)"));
  }
  if (kind != "interleaved" && v != 1) {
    throw BadInput(refusal(kind, p, m, v, "only interleaved runs several chunks per rank (set virtual_stages 1)"));
  }
  if (kind == "interleaved") {
    if (v < 2) throw BadInput(refusal(kind, p, m, v, "interleaved needs virtual_stages >= 2 (or use 1f1b)"));
    if (m % p != 0) {
      throw BadInput(refusal(kind, p, m, v,
                             "interleaved needs the micro-batch count (global_batch / (micro_batch * dp)) to be a "
                             "multiple of pp, e.g. " + std::to_string((m / p + 1) * p) + " (or use 1f1b)"));
    }
  }
  PipeSchedule schedule;
  schedule.kind = std::string(kind);
  schedule.stages = p;
  schedule.micro_batches = m;
  schedule.virtual_stages = v;
  const int64_t last_stage = p * v - 1;
  for (int64_t r = 0; r < p; ++r) {
    std::vector<Compute> compute;
    if (kind == "afab") {
      compute = afab(m);
    } else if (kind == "1f1b") {
      compute = one_forward_one_backward(
          m, p - r - 1, [](int64_t k) { return Compute{true, k, 0}; }, [](int64_t k) { return Compute{false, k, 0}; });
    } else {
      // Megatron's order: virtual micro-batch k is micro-batch
      // (k / (p v)) p + k mod p of chunk (k / p) mod v, chunks in reverse
      // for the backwards.
      auto mb_of = [=](int64_t k) { return (k / (p * v)) * p + k % p; };
      compute = one_forward_one_backward(
          m * v, (p - r - 1) * 2 + (v - 1) * p, [=](int64_t k) { return Compute{true, mb_of(k), (k / p) % v}; },
          [=](int64_t k) { return Compute{false, mb_of(k), v - 1 - (k / p) % v}; });
    }
    std::vector<PipeAction> actions;
    for (const Compute& c : compute) {
      const int64_t stage = schedule.model_stage(r, c.chunk);
      if (c.forward) {
        if (stage > 0) actions.push_back({PipeOp::kRecvForward, c.micro_batch, c.chunk});
        actions.push_back({PipeOp::kForward, c.micro_batch, c.chunk});
        if (stage < last_stage) actions.push_back({PipeOp::kSendForward, c.micro_batch, c.chunk});
      } else {
        if (stage < last_stage) actions.push_back({PipeOp::kRecvBackward, c.micro_batch, c.chunk});
        actions.push_back({PipeOp::kBackward, c.micro_batch, c.chunk});
        if (stage > 0) actions.push_back({PipeOp::kSendBackward, c.micro_batch, c.chunk});
      }
    }
    schedule.ranks.push_back(std::move(actions));
  }
  return schedule;
}

std::string to_string(const PipeAction& a, int64_t virtual_stages) {
  static constexpr const char* kNames[] = {"rf", "F", "sf", "rb", "B", "sb"};
  std::string out = kNames[static_cast<int>(a.op)] + std::to_string(a.micro_batch);
  if (virtual_stages > 1) out += "." + std::to_string(a.chunk);
  return out;
}

PipeSimulation simulate_pipe_schedule(const PipeSchedule& s, double forward_time, double backward_time) {
  const auto stages = static_cast<size_t>(s.stages * s.virtual_stages);
  return simulate_pipe_schedule(s, PipeStageTimes{std::vector<double>(stages, forward_time),
                                                  std::vector<double>(stages, backward_time), 0.0});
}

PipeSimulation simulate_pipe_schedule(const PipeSchedule& s, const PipeStageTimes& times) {
  const int64_t p = s.stages, last_stage = p * s.virtual_stages - 1;
  if (static_cast<int64_t>(times.forward.size()) != last_stage + 1 ||
      static_cast<int64_t>(times.backward.size()) != last_stage + 1) {
    throw std::invalid_argument("simulate_pipe_schedule: " + std::to_string(times.forward.size()) + " forward and " +
                                std::to_string(times.backward.size()) + " backward times for " +
                                std::to_string(last_stage + 1) + " model stages");
  }
  PipeSimulation sim;
  sim.idle_fraction.assign(p, 0.0);
  sim.peak_live.assign(p, 0);
  sim.start_times.resize(p);
  std::vector<size_t> next(p, 0);
  std::vector<double> clock(p, 0.0), busy(p, 0.0);
  std::vector<int64_t> live(p, 0);
  // Messages in flight: (source rank, destination rank) -> queue of
  // (forward?, micro-batch, destination model stage, time sent), in send
  // order: one channel for both directions, as NCCL pairs them (Note
  // [pipeline messages without tags]).
  std::map<std::pair<int64_t, int64_t>, std::deque<std::tuple<bool, int64_t, int64_t, double>>> channels;
  auto rank_of_stage = [&](int64_t stage) { return stage % p; };
  bool progress = true;
  while (progress) {
    progress = false;
    for (int64_t r = 0; r < p; ++r) {
      while (next[r] < s.ranks[r].size()) {
        const PipeAction& a = s.ranks[r][next[r]];
        const int64_t stage = s.model_stage(r, a.chunk);
        if (a.op == PipeOp::kRecvForward || a.op == PipeOp::kRecvBackward) {
          const bool forward = a.op == PipeOp::kRecvForward;
          const int64_t source = rank_of_stage(forward ? stage - 1 : stage + 1);
          auto& queue = channels[{source, r}];
          if (queue.empty()) break;  // waits for the message
          const auto [message_forward, mb, to_stage, sent] = queue.front();
          if (message_forward != forward || mb != a.micro_batch || to_stage != stage) {
            sim.deadlocked = true;
            sim.problem = "rank " + std::to_string(r) + " expects " + to_string(a, s.virtual_stages) + " from rank " +
                          std::to_string(source) + " but the next message on that channel is the " +
                          (message_forward ? "activation" : "gradient") + " of micro-batch " + std::to_string(mb) +
                          " for model stage " + std::to_string(to_stage);
            return sim;
          }
          queue.pop_front();
          clock[r] = std::max(clock[r], sent + times.transfer);
        } else if (a.op == PipeOp::kSendForward || a.op == PipeOp::kSendBackward) {
          const bool forward = a.op == PipeOp::kSendForward;
          const int64_t to_stage = forward ? stage + 1 : stage - 1;
          if (to_stage < 0 || to_stage > last_stage) {
            sim.deadlocked = true;
            sim.problem = "rank " + std::to_string(r) + " sends past the pipeline's ends";
            return sim;
          }
          channels[{r, rank_of_stage(to_stage)}].emplace_back(forward, a.micro_batch, to_stage, clock[r]);
        } else {
          const double duration = a.op == PipeOp::kForward ? times.forward[stage] : times.backward[stage];
          sim.start_times[r].emplace_back(clock[r], a);
          clock[r] += duration;
          busy[r] += duration;
          live[r] += a.op == PipeOp::kForward ? 1 : -1;
          sim.peak_live[r] = std::max(sim.peak_live[r], live[r]);
        }
        ++next[r];
        progress = true;
      }
    }
  }
  for (int64_t r = 0; r < p; ++r) {
    if (next[r] < s.ranks[r].size()) {
      sim.deadlocked = true;
      sim.problem = "rank " + std::to_string(r) + " waits forever at " +
                    to_string(s.ranks[r][next[r]], s.virtual_stages) + " (action " + std::to_string(next[r]) + ")";
      return sim;
    }
  }
  for (const auto& [channel, queue] : channels) {
    if (!queue.empty()) {
      sim.deadlocked = true;
      sim.problem = "a message from rank " + std::to_string(std::get<0>(channel)) + " to rank " +
                    std::to_string(std::get<1>(channel)) + " is never received";
      return sim;
    }
  }
  sim.makespan = *std::max_element(clock.begin(), clock.end());
  for (int64_t r = 0; r < p; ++r) sim.idle_fraction[r] = sim.makespan > 0 ? 1.0 - busy[r] / sim.makespan : 0.0;
  return sim;
}

std::string draw_pipe_schedule(const PipeSchedule& s) {
  const PipeSimulation sim = simulate_pipe_schedule(s, 1.0, 2.0);
  std::ostringstream os;
  os << s.kind << ": pp " << s.stages << ", " << s.micro_batches << " micro-batches";
  if (s.virtual_stages > 1) os << ", " << s.virtual_stages << " chunks per rank";
  os << " (F = forward of micro-batch N, B = its backward, one column per forward's time)\n";
  if (sim.deadlocked) return os.str() + "deadlock: " + sim.problem + "\n";
  size_t width = 2;
  for (const auto& rank : sim.start_times) {
    for (const auto& [t, a] : rank) width = std::max(width, to_string(a, s.virtual_stages).size());
  }
  const auto columns = static_cast<size_t>(sim.makespan);
  for (int64_t r = 0; r < s.stages; ++r) {
    std::vector<std::string> cells(columns, std::string(width, '.'));
    for (const auto& [t, a] : sim.start_times[r]) {
      const int64_t length = a.op == PipeOp::kForward ? 1 : 2;
      std::string label = to_string(a, s.virtual_stages);
      label.resize(width, ' ');
      for (int64_t k = 0; k < length; ++k) cells[static_cast<size_t>(t) + k] = label;
    }
    os << "pp" << r << " |";
    for (const auto& cell : cells) os << " " << cell;
    char idle[64];
    std::snprintf(idle, sizeof idle, " | idle %.1f%%", 100.0 * sim.idle_fraction[r]);
    os << idle << "\n";
  }
  const double p = static_cast<double>(s.stages), m = static_cast<double>(s.micro_batches);
  const double v = static_cast<double>(s.virtual_stages);
  char formula[160];
  if (s.virtual_stages > 1) {
    std::snprintf(formula, sizeof formula, "bubble (p-1)/(v m + p-1) = %.1f%% (1f1b's (p-1)/(m+p-1) = %.1f%%)\n",
                  100.0 * (p - 1) / (v * m + p - 1), 100.0 * (p - 1) / (m + p - 1));
  } else {
    std::snprintf(formula, sizeof formula, "bubble (p-1)/(m+p-1) = %.1f%%\n", 100.0 * (p - 1) / (m + p - 1));
  }
  os << formula;
  return os.str();
}

}  // namespace loom
