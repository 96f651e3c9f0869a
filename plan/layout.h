// What `loom plan` chooses between: a parallel layout of one training config
// (dp x cp x pp x tp, pipeline schedule and virtual stages, ZeRO stage 0-3,
// micro-batch size, recomputation none, selective or full, sequence
// parallelism), and the fixed problem it is
// chosen for (the model, the batch, the cluster). See docs/plan.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace loom::plan {

// The parts of a config and of the cluster that do not change between layouts.
struct Problem {
  ModelConfig model;
  int64_t seq_len = 0;       // tokens per sequence (data.seq_len, else model.max_seq_len)
  int64_t global_batch = 0;  // sequences per optimizer step (batch.global_batch_size)
  bool bf16 = false;         // precision.compute bf16
  // precision.params bf16: bf16 weights and gradients on the device, fp32
  // master weights and AdamW moments in the optimizer, and with
  // precision.grad_accum fp32 an fp32 gradient sum beside each master
  // instead of the bf16 gradient (optim/fp32_gradients.h).
  bool params_bf16 = false;
  bool grad_accum_fp32 = true;
  double bucket_mb = 25.0;   // parallel.bucket_mb
  int64_t gpus = 1;          // ranks in all
  int64_t gpus_per_node = 1;
  double gpu_memory_bytes = 0;  // per rank; 0 = no limit
  bool host_is_device = false;     // run.device cpu: the training tensors are the host's
  bool checkpoint_async = false;   // checkpoint.async: host buffers for the saves, kept for the run
  double disk_write_bytes_per_s = 0;  // one node's disk rate (--disk-gbps), over the profile's storage rates; 0 = none

  // From a loaded config: model, seq_len, global batch (batch.global_batch_size,
  // or micro_batch_size x dp when it is 0), precision, bucket size, device
  // and checkpoint.async.
  static Problem from_config(const Config& config);
};

// model.recompute: none keeps every activation; selective recomputes the
// attention core (softmax(QK^T)V) in backward; full recomputes the whole
// decoder layer.
enum class Recompute { kNone, kSelective, kFull };
// "none", "selective", "full" (model.recompute's values).
const char* recompute_name(Recompute recompute);

struct Layout {
  int64_t dp = 1, tp = 1, pp = 1;
  std::string schedule = "1f1b";  // afab | 1f1b | interleaved (used when pp > 1)
  int64_t virtual_stages = 1;
  // 0 | 1 (optimizer state sharded) | 2 (gradients too) | 3 (parameters too)
  int64_t zero_stage = 0;
  int64_t micro_batch = 1;
  Recompute recompute = Recompute::kNone;
  bool sequence_parallel = false;
  // Context parallelism (parallel/context_parallel.h): each sequence split
  // over cp ranks that are replicas of one another's parameters. Last, so
  // that a layout written {dp, tp, pp, ...} keeps cp 1.
  int64_t cp = 1;
  // Expert parallelism (parallel.ep, parallel/expert_parallel.h): each sparse
  // layer's experts split over blocks of ep dp ranks; ep divides dp and is
  // no axis of the world.
  int64_t ep = 1;

  int64_t world() const { return dp * cp * tp * pp; }
  // Tokens of one sequence a rank holds: seq_len / cp (Note [zig-zag chunks]).
  int64_t rank_seq_len(const Problem& problem) const { return problem.seq_len / cp; }
  // Micro-batches per replica and step: global_batch / (dp * micro_batch).
  int64_t micro_batches(const Problem& problem) const { return problem.global_batch / (dp * micro_batch); }
  // "dp 2 tp 1 pp 2 1f1b mb 2 zero1 recompute" (the parts that apply;
  // "selective" for selective recomputation; "cp 4" and "ep 2" after dp when above 1).
  std::string describe() const;
  // The config lines that select this layout, for a YAML file ("parallel.dp: 2")
  // or, with `set_flags`, as `--set parallel.dp=2` arguments.
  std::vector<std::string> config_lines(bool set_flags = false) const;
  // The config (model.recompute, parallel.*, batch.micro_batch_size) with this layout applied.
  void apply_to(Config& config) const;
  // The layout a config trains with (apply_to's inverse); `dp` resolves
  // parallel.dp: auto (ParallelDims::from_config).
  static Layout of(const Config& config, int64_t dp);
  bool operator==(const Layout&) const = default;
};

// "dp=2,cp=1,ep=1,tp=1,pp=2,schedule=1f1b,v=1,zero=0,mb=2,recompute=0,sp=0" (every key
// optional; the rest keep Layout's defaults; zero 0-3; recompute 0/none,
// 1/full or selective). BadInput naming `flag` otherwise.
Layout parse_layout(const std::string& text, const std::string& flag);

// Why `layout` cannot train `problem` on its cluster ("" when it can), in
// the terms loom itself would refuse it: dp x cp x tp x pp against --gpus, tp
// against the heads, kv heads, vocabulary and intermediate size, pp x v
// against the layers, the batch against dp x micro-batch, the schedule
// against the micro-batch count, ZeRO without dp, sequence parallelism
// without tp or with a sequence tp does not divide, tp across nodes; cp with
// a sequence 2 x cp does not divide, or with ZeRO, sliding windows or
// soft-capping (which the trainer runs and the plan does not model yet); ep
// without experts, with ZeRO stage 3, or not dividing dp and the experts.
std::string layout_problem(const Problem& problem, const Layout& layout);

// Every layout that layout_problem accepts: tp over the divisors of
// gpus_per_node, pp over the divisors of the rest, each schedule (and
// interleaved with 2 and 4 virtual stages), ZeRO stages 0 to 3 (1 to 3 only
// with dp > 1), power-of-two micro-batches, recomputation none, selective and
// full, sequence parallelism on and off; cp over the divisors of the world
// whose 2 x cp divides the sequence (cp 1 only for a model cp cannot run);
// for a mixture of experts ep over the divisors of dp that divide the experts.
std::vector<Layout> enumerate_layouts(const Problem& problem);

}  // namespace loom::plan
