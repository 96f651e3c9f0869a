// Pipeline schedules as data: for each pipeline rank, the list of actions it
// runs in order, computed from (p stages, m micro-batches, v chunks per rank)
// alone. One executor runs any of them; `loom inspect CONFIG` prints them;
// tests check them without a model (tests/unit/test_pipeline_schedule.cpp).
//
// Note [pipeline stages and chunks]
// The model's layers are cut into p * v model stages. Pipeline rank r holds
// the chunks c = 0 .. v-1, chunk c being model stage c * p + r (Megatron's
// interleaved assignment; with v = 1 rank r holds model stage r). Model
// stage 0 owns the embedding, model stage p v - 1 the final norm, the head
// and the loss.
//
// Actions (mb = micro-batch, c = this rank's chunk):
//   kRecvForward  mb c   receive the activations of mb from model stage s - 1
//   kForward      mb c   run chunk c forward on mb
//   kSendForward  mb c   send its output to model stage s + 1
//   kRecvBackward mb c   receive the gradient of that output from stage s + 1
//   kBackward     mb c   run chunk c backward on mb
//   kSendBackward mb c   send the gradient of its input to stage s - 1
// Sends and receives appear only where the neighbouring stage exists. Sends
// may complete later (non-blocking); a receive waits for its message. Between
// two ranks, every message is received in the order it was sent, activations
// and gradients alike (Note [pipeline messages without tags]).
//
// Note [pipeline messages without tags]
// MPI pairs a send with a receive by (peer, tag); NCCL has no tags and pairs
// the sends and receives between two ranks in the order they are issued,
// whatever they carry. With interleaving, or with two stages (rank 0's next
// and previous neighbour are both rank 1), activations and gradients travel
// on the same pair of ranks, so a schedule runs on NCCL only if each rank
// receives from a neighbour in exactly the order that neighbour sends to it,
// across both kinds. The simulator keys its channels by (sender, receiver)
// alone and fails on a message taken out of that order; every schedule
// make_pipe_schedule returns passes (tests/unit/test_pipeline_schedule.cpp
// sweeps p <= 8, m <= 20, v <= 5), and the executor sends both kinds with one
// tag, so the MPI runs pair them the same way.
// What NCCL adds beyond order: a send holds its stream until the receiver
// posts the matching receive. On one stream per group, a rank whose send
// waits could not post the receive its peer waits for first (1f1b with two
// stages already does this: rank 0 sends F1 while rank 1 sends B0's
// gradient), so the sends cannot be left in flight on the stream the
// receives use, as they are on MPI. Megatron batches each send with the
// next receive instead, which needs the schedule's actions regrouped; loom
// gives each direction between two neighbours a group (and stream) of its
// own (Note [pipeline links] in parallel/pipeline.h), so a waiting send
// holds up only the sends after it on that link, which go to the same
// receiver in the order it takes them: MPI's behaviour, which the simulator
// models.
//
// Schedules (parallel.pp_schedule):
//   afab         all forwards, then all backwards (GPipe): m activations live
//   1f1b         p - r - 1 warm-up forwards, then one forward one backward,
//                then the remaining backwards: at most p - r live (PipeDream-Flush)
//   interleaved  1f1b over the v chunks of each rank (Narayanan et al. 2021):
//                the bubble shrinks v-fold; needs m a multiple of p
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

enum class PipeOp { kRecvForward, kForward, kSendForward, kRecvBackward, kBackward, kSendBackward };

struct PipeAction {
  PipeOp op;
  int64_t micro_batch;
  int64_t chunk;
  bool operator==(const PipeAction&) const = default;
};

struct PipeSchedule {
  std::string kind;  // afab | 1f1b | interleaved
  int64_t stages = 1;          // p
  int64_t micro_batches = 1;   // m
  int64_t virtual_stages = 1;  // v
  std::vector<std::vector<PipeAction>> ranks;  // [p] actions in order

  int64_t model_stage(int64_t rank, int64_t chunk) const { return chunk * stages + rank; }
};

// The schedule `kind` for p stages, m micro-batches and v chunks per rank.
// Throws BadInput (naming parallel.pp_schedule, parallel.pp,
// parallel.virtual_stages and the micro-batch count, and what would work) for
// a combination the schedule cannot run: p, m, v < 1; v > 1 with a schedule
// other than interleaved; interleaved with v < 2 or m not a multiple of p.
PipeSchedule make_pipe_schedule(std::string_view kind, int64_t stages, int64_t micro_batches, int64_t virtual_stages);

// "F3", "B0", "F2.1" (micro-batch 2 of chunk 1 when v > 1); sends and
// receives as "sf3", "rf3", "sb0", "rb0".
std::string to_string(const PipeAction& action, int64_t virtual_stages);

// The schedule drawn as a timeline, one line per rank, with every forward
// taking one time unit and every backward two, a rank starting an action as
// soon as its messages have arrived ("." = idle):
//   pp0 | F0 F1 F2 F3 .. .. B0 B0 ...
// followed by each rank's idle fraction and the formula's bubble.
std::string draw_pipe_schedule(const PipeSchedule& schedule);

// The result of running a schedule with forwards taking `forward_time` and
// backwards `backward_time` (communication free, sends non-blocking,
// receives waiting for their message).
struct PipeSimulation {
  bool deadlocked = false;
  std::string problem;                  // why, when deadlocked or inconsistent
  double makespan = 0;                  // time until the last rank finishes
  std::vector<double> idle_fraction;    // per rank: 1 - busy / makespan
  std::vector<int64_t> peak_live;       // per rank: most micro-batch activations held at once
  std::vector<std::vector<std::pair<double, PipeAction>>> start_times;  // per rank: compute actions and their start
};
PipeSimulation simulate_pipe_schedule(const PipeSchedule& schedule, double forward_time = 1.0,
                                      double backward_time = 2.0);

// The same with each model stage's own forward and backward time (a stage
// with the head, or with one layer more, takes longer) and a message arriving
// `transfer` after it is sent. `loom plan` predicts a pipelined step with it.
struct PipeStageTimes {
  std::vector<double> forward, backward;  // per model stage, p * v entries
  double transfer = 0;
};
PipeSimulation simulate_pipe_schedule(const PipeSchedule& schedule, const PipeStageTimes& times);

}  // namespace loom
