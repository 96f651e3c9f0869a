// What a layout's checkpoints cost (docs/plan.md, "Checkpoints and host
// memory"), following what loom's code writes and stages:
//   - the bytes each rank writes into one sharded checkpoint
//     (docs/checkpoints.md): its share of its stage's fp32 parameters and
//     AdamW moments, shared out over the dp x tp copies by the same
//     assignment the trainer runs (assign_piece_writers, Note [who writes a
//     piece]), ZeRO's flat ranges of the moments (per unit), and the optimizer step
//     on world rank 0;
//   - the time a node takes to write (and read back) its ranks' bytes at a
//     disk bandwidth;
//   - the host memory a rank needs besides the device's: building its part
//     of the model on the CPU before moving it (trainer/model_parts.cpp),
//     one tensor's CPU copy on resume (read_into), the copy of its pieces a
//     save makes on a GPU (pieces_to_host) or keeps for the run
//     (checkpoint.async);
//   - the disk a run folder needs: checkpoint.keep_last checkpoints, one
//     more being written, and the Hub export at its dtype.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/llama.h"
#include "plan/layout.h"
#include "plan/memory_model.h"

namespace loom::plan {

// One parameter as a tp rank of a pipeline rank holds it, in the order of
// the rank's named parameters (its chunks in order, each as the model
// registers them): its name, its elements on this tp rank, and whether every
// tp rank holds it whole (norms, row-parallel biases; everything at tp 1).
struct RankParameter {
  std::string name;
  int64_t elements = 0;
  bool whole_on_every_tp_rank = true;
};
// Under expert parallelism (`ep` > 1) ep rank 0's experts.
std::vector<RankParameter> rank_parameters(const ModelConfig& model, int64_t tp, const std::vector<StageSpec>& stages,
                                           bool split_model, int64_t ep = 1);
// The model stages pipeline rank `pp_rank` of `layout` holds, in order.
std::vector<StageSpec> rank_stages(const ModelConfig& model, const Layout& layout, int64_t pp_rank);

// The bytes of the optimizer step entry, an int64 scalar world rank 0 writes.
inline constexpr int64_t kOptimizerStepBytes = 8;

struct CheckpointEstimate {
  // Per world rank (((dp * pp + pp_rank) * cp + cp_rank) * tp + tp_rank): tensor bytes it writes.
  std::vector<int64_t> rank_bytes;
  double total_bytes = 0;           // one checkpoint's tensor bytes, all ranks
  double rank_bytes_max = 0;        // the most one rank writes
  double node_bytes = 0;            // the most one node writes
  double node_read_bytes = 0;       // the most one node reads back on resume (each rank its own slices)
  double save_s = 0;                // node_bytes at the write rate (0: no rate)
  double load_s = 0;                // node_read_bytes at the read rate (0: no rate)
};
// `write_bytes_per_s` and `read_bytes_per_s`: one node's rates (0: unknown).
CheckpointEstimate estimate_checkpoint(const Problem& problem, const Layout& layout, double write_bytes_per_s,
                                       double read_bytes_per_s);

// Host (CPU) memory of one rank, bytes, for the rank with the most
// parameters. On a GPU run the tensors of training live on the device and
// the host holds what the phases below stage; on a CPU run (run.device cpu)
// host and device are one, and `training` is the memory model's peak.
struct HostMemory {
  double training = 0;  // the training tensors on the host (CPU runs only)
  double init = 0;      // GPU: its part of the model built in fp32 on the CPU, then moved
  double resume = 0;    // GPU: the largest of its tensors copied through the CPU, and 16 MiB of read chunks
  double save = 0;      // synchronous save on a GPU: its pieces copied to the host at once
  double async = 0;     // checkpoint.async: its pieces' host buffers, kept for the run
  double peak = 0;
  std::string peak_phase;  // "init", "resume", "save", "training"
};
HostMemory estimate_host_memory(const Problem& problem, const Layout& layout, const MemoryEstimate& memory,
                                const CheckpointEstimate& checkpoint);

// One checkpoint's tensor bytes, whatever the layout (each element is
// written once): fp32 parameters and AdamW's two moments, 12 bytes a
// parameter, and the optimizer step.
double checkpoint_tensor_bytes(const ModelConfig& model);

// Bytes a run folder needs on disk for its checkpoints (of
// `checkpoint_bytes` each): checkpoint.keep_last of them (every one the run
// saves, when keep_last is 0), one more being written before the oldest is
// pruned, and the Hub export at checkpoint.export_dtype when
// export_hf_at_end. The run's saves: one every checkpoint.interval steps
// and one at the end.
double run_folder_disk_bytes(const Config& config, const ModelConfig& model, double checkpoint_bytes);

}  // namespace loom::plan
