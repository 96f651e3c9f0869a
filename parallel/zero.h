// ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
// Training Trillion Parameter Models"), stages 1 to 3: AdamW whose state
// (stage 1), the averaged gradients (stage 2) and the parameters themselves
// (stage 3, FSDP-style) are split over the data-parallel group, so each dp
// rank keeps 1/dp of them.
//
//   ShardedAdamW optimizer(dp, to_named_tensors(model.named_parameters()), options, zero_options);
//   ... backward on every micro-batch (no GradientReducer); stage 2 with
//       overlap: optimizer.arm() before the last one's ...
//   optimizer.reduce_gradients();                   // reduce-scatter: this rank's shard of the dp average
//   clip_grad_norm(optimizer.shard_params(), max_norm, &reduction);   // the norm of all shards
//   optimizer.step(lr);                             // AdamW on the shard, then all-gather the parameters
//
// Note [ZeRO-1 layout]
// The parameters (in the order given) are laid end to end in one flat fp32
// vector of T elements, padded with zeros to T' = dp * ceil(T / dp); dp rank
// r owns elements [r T'/dp, (r+1) T'/dp), and keeps only those: the flat
// vector is a layout, never allocated whole. Each parameter that overlaps
// the rank's range contributes one piece, a view of the rank's shard named
// after it (so weight decay follows the parameter's name), and AdamW
// (optim/optimizer.h, unchanged) steps those pieces with their own
// exp_avg and exp_avg_sq. reduce_gradients() flattens the .grad of every
// parameter and reduce-scatters it (AVG) over dp into the pieces' gradients;
// step() updates the pieces, all-gathers the flat vector unit by unit (Note
// [ZeRO units]) into a buffer of the unit and copies it into the parameters,
// so every replica ends the step with the same weights, and no rank holds
// more than two units' buffers at once.
// The arithmetic per element is AdamW's; only the gradients' reduction order
// differs from an all-reduce.
//
// Note [ZeRO units]
// ZeroOptions::units split the parameters into units (zero_units_by_layer:
// one per decoder layer, one for the embedding, one for everything else:
// the final norm and the head), and each unit is laid out
// as Note [ZeRO-1 layout] lays out the whole: its own flat vector, padded to
// a multiple of dp and split evenly, so rank r owns the r-th dp-th of every
// unit. The flat vectors lie end to end (unit order), and so do the rank's
// shards of them in its shard of the gradient. With one unit (stage 1's
// default) this is Note [ZeRO-1 layout]. Either way each rank's piece of a
// parameter is one contiguous flat range of it (piece_range), which is what
// a sharded checkpoint stores (checkpoints/regions.h), so a checkpoint
// resumes on any unit split, stage or dp.
//
// Stage 2 reduces unit by unit and keeps no whole gradient: a unit's
// gradients are flattened into a buffer of the unit's size, reduce-scattered
// (AVG) into this rank's shard, and the parameters' .grad are freed as soon
// as they are copied. While armed (the last micro-batch's backward), a hook
// on each parameter's gradient accumulator counts it ready, and a unit whose
// parameters are all ready starts its reduce-scatter while backward goes on;
// units start strictly in reverse unit order on every rank (backward
// produces the last layers' gradients first), so every rank issues the same
// collectives in the same order, as Note [gradient buckets] does. At most
// two units are in flight: a unit's buffer goes when its reduction is seen
// complete (the hooks poll), and a third unit waits for the oldest first.
// reduce_gradients() starts what has not started (every unit when not
// armed, as under a pipeline, whose interleaved backwards make a
// parameter's last gradient unknown in advance) and waits for all.
//
// Note [ZeRO-3]
// Stage 3 keeps the parameters as shards too. Each unit's parameters are
// views of one flat buffer of the unit (set_data), whose storage is
// allocated and all-gathered from the shards when the unit is needed and
// freed (zero bytes) afterwards; the parameters keep their identity, so the
// module, the optimizer's list and the tensors autograd saved for backward
// all see the gathered values again once the storage is refilled (the
// gather writes the memory directly and bumps no version counter). AdamW
// steps views of this rank's shard of every unit (shard_params_), and the
// step ends with no decoder layer gathered. ZeroLayerWrapper does the
// gathering per decoder layer (Note [layer wrapper]): before a layer's
// forward it starts the gather of the layer and of the next layer of this
// rank (prefetch, non-blocking) and waits for its own; after the forward it
// frees the layer; before the layer's backward it gathers it again and
// prefetches the previous layer; after the backward it reduce-scatters the
// layer's gradients (AVG) and adds them to this rank's shard of the
// gradient, frees them, and frees the layer. So a micro-batch's gradients
// are reduced during its own backward and nothing whole is kept across
// micro-batches. The units of no decoder layer (embedding, final norm,
// head) stay gathered for the whole step (they are read at both ends of
// the model) and are reduced by reduce_gradients(), as under stage 2; the
// step gathers them again from the updated shards. Hooks pair per call, so
// pipeline schedules (several forwards before their backwards) and
// recomputation (the layer runs again between before_backward and
// after_backward) need nothing else. Every dp rank of a (tp, pp) position
// runs the same layers in the same order, so all of them issue the same
// collectives in the same order. Checkpoints and the export read the
// parameters whole: gather_all() and release_all() bracket them.
//
// Note [ZeRO with bf16 parameters]
// With bf16 parameters (precision.params bf16) the flat layout is the same,
// and this rank's fp32 shard of it (shard_params_) holds the fp32 masters
// of its pieces: AdamW steps fp32 pieces as it does for fp32 parameters,
// and no rank holds a master it does not update. After the step the shard
// is rounded once into a bf16 copy (shard_model_), and that is what the
// all-gathers send, so the parameters arrive as the masters rounded, as a
// whole AdamW would round them, in half the bytes; under stage 3 the
// units' buffers are bf16. The gradients are flattened into fp32 buffers
// (the bf16 .grad upcast) and reduce-scattered in fp32. With
// ZeroOptions::fp32_grad_accum (precision.grad_accum fp32) a hook added
// before any other moves each micro-batch's bf16 gradient into an fp32 sum
// of the parameter's own (gradient_of()), which the reductions read instead
// of .grad. local_state_dict() lists each piece's master as
// optimizer.master.NAME (1-D, where piece_range() says), which a
// checkpoint stores as the parameter's own fp32 tensor (Note [checkpoints
// of bf16 parameters], trainer/run_checkpoints.cpp), so the checkpoint is
// the fp32 run's on every stage.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "model/recompute.h"
#include "optim/optimizer.h"
#include "parallel/data_parallel.h"
#include "parallel/process_group.h"

namespace loom {

struct ZeroOptions {
  int64_t stage = 1;  // 1, 2 or 3 (parallel.zero_stage)
  // Note [ZeRO units]: indices into the parameters, each exactly once. Empty:
  // one unit of every parameter, in order.
  std::vector<std::vector<size_t>> units;
  // Stage 2: arm() makes the next backward start units' reductions as their
  // gradients complete. false: reduce_gradients() does them all.
  bool overlap = true;
  // bf16 parameters: sum each micro-batch's gradient in fp32 rather than in
  // the parameter's bf16 .grad (Note [ZeRO with bf16 parameters]).
  bool fp32_grad_accum = false;
};

// One unit per decoder layer (the parameters named model.layers.N.*), one of
// the embedding (model.embed_tokens.*) and one of every other parameter
// (final norm, head), ordered by their first parameter: the units ZeRO-2
// reduces as backward completes them. The embedding and the head are units
// of their own because backward completes them at its two ends: the head's
// gradient is reduced (and freed) while the layers' backward runs, not held
// until the embedding's arrives.
std::vector<std::vector<size_t>> zero_units_by_layer(const NamedTensors& params);

class ShardedAdamW : public GradientSync {
 public:
  // `params` (all fp32, or all bf16 or fp16 with fp32 masters in the shard:
  // Note [ZeRO with bf16 parameters]; on the CPU for the MPI group) are
  // updated in place by step(). The group and the parameters must outlive
  // the optimizer.
  ShardedAdamW(ProcessGroup& dp, NamedTensors params, AdamWOptions options, ZeroOptions zero = {});
  ~ShardedAdamW() override;
  ShardedAdamW(const ShardedAdamW&) = delete;
  ShardedAdamW& operator=(const ShardedAdamW&) = delete;

  int64_t stage() const { return stage_; }
  // Zeroes the parameters' gradients (the model's, not the shard's); under
  // stage 2 they are already freed by reduce_gradients().
  void zero_grad();
  // Where the gradient of `param` (one of the parameters) is summed: its
  // fp32 sum under fp32_grad_accum (with what its .grad still holds moved
  // in), else its .grad. The slot may be assigned (undefined: no gradient
  // yet). std::invalid_argument for a tensor that is not a parameter.
  at::Tensor& gradient_of(const at::Tensor& param);
  // Stage 2 with overlap: the next backward (the last micro-batch's) starts
  // each unit's reduce-scatter once its gradients are complete (Note [ZeRO
  // units]). Nothing for stage 1.
  void arm() override;
  // Reduce-scatters the parameters' gradients over dp (average): afterwards
  // shard_params() hold this rank's shard of the averaged gradient. Under
  // stage 2 the parameters' .grad are freed. Collective over dp.
  void reduce_gradients();
  // The most elements the flat gradient buffers of the reductions held at
  // once: the whole padded model under stage 1; under stage 2 at most two
  // units (in flight together), under stage 3 one.
  int64_t peak_flat_grad_numel() const { return peak_flat_grad_numel_; }
  int64_t num_units() const { return static_cast<int64_t>(units_.size()); }
  // Elements of this rank's shard of all units (of the gradient; under
  // stage 3 of the parameters too).
  int64_t shard_numel() const { return shard_size_; }

  // Stage 3 (Note [ZeRO-3]); std::logic_error under stages 1 and 2.
  // The unit of decoder layer `layer` (its global number), and of the next
  // layer this rank holds after it (direction +1) or before it (-1); none
  // when there is none.
  std::optional<size_t> layer_unit(int64_t layer) const;
  std::optional<size_t> next_layer_unit(int64_t layer, int direction) const;
  // Starts the all-gather of a unit's parameters if they are neither
  // gathered nor being gathered; returns at once. Collective over dp.
  void prefetch(size_t unit);
  // Returns when the unit's parameters are whole (starting their gather if
  // need be). Collective over dp.
  void gather(size_t unit);
  // Frees the unit's parameters (after a gather in flight completes); not
  // for the units of no decoder layer, which stay gathered.
  void release(size_t unit);
  // Reduce-scatters (AVG) the unit's gradients over dp, adds them to this
  // rank's shard of the gradient, and frees them. Collective over dp.
  void reduce_unit(size_t unit);
  // Every unit gathered (checkpoints, the export), and freed again.
  void gather_all();
  void release_all();
  bool gathered(size_t unit) const { return units_.at(unit).gathered; }
  // Seconds gather() has spent waiting for gathers to complete, and
  // reduce_unit() for its reduce-scatters, since construction (bench/).
  double gather_wait_seconds() const { return gather_wait_seconds_; }
  double reduce_wait_seconds() const { return reduce_wait_seconds_; }
  // Units whose reduce-scatter the last armed backward started (before
  // reduce_gradients()).
  int64_t last_started_in_backward() const { return last_started_in_backward_; }
  // This rank's pieces (Note [ZeRO-1 layout]); their .grad is valid after
  // reduce_gradients(). For clipping: scale their gradients, not the model's.
  std::vector<at::Tensor> shard_params() const { return shard_->params(); }
  const NamedTensors& shard_named_params() const { return shard_->named_params(); }
  // AdamW on the pieces, then all-gather of the parameters. Collective over dp.
  void step(double lr);

  int64_t step_count() const { return shard_->step_count(); }
  // Bytes of optimizer state this rank holds (exp_avg and exp_avg_sq of its pieces).
  int64_t state_bytes() const;

  // The whole state as AdamW::state_dict() would give it for `params` (every
  // parameter's exp_avg and exp_avg_sq, whole), gathered over dp on every
  // rank (the tests compare it with a whole AdamW; checkpoints store each
  // rank's local_state_dict() instead). Collective.
  NamedTensors state_dict() const;
  // Takes this rank's share of a whole state (AdamW::state_dict() form for
  // `params`). BadInput for a missing or misshapen entry.
  void load_state_dict(const NamedTensors& whole);

  // This rank's own state, as the AdamW over its pieces holds it
  // (optimizer.step, and optimizer.exp_avg.NAME / exp_avg_sq.NAME of the
  // piece of each parameter NAME that meets its shard, 1-D): what a sharded
  // checkpoint stores. The tensors are the optimizer's own, not copies.
  // With bf16 parameters also optimizer.master.NAME, the piece's fp32
  // master (Note [ZeRO with bf16 parameters]), after the AdamW entries.
  NamedTensors local_state_dict() const;
  // Takes local_state_dict()'s entries; BadInput for a missing, unexpected
  // or misshapen one, before anything is copied. The bf16 parameters are
  // left as they are: a resume has read them from the same checkpoint,
  // which stores the masters as the parameters, so they are the masters
  // rounded already (and the next step() all-gathers them anew).
  void load_local_state_dict(const NamedTensors& state);
  // Where the piece of parameter `name` lies in it: elements [first, second)
  // of the parameter, row-major. std::out_of_range when this rank holds no
  // piece of it.
  std::pair<int64_t, int64_t> piece_range(const std::string& name) const;

 private:
  struct Piece {
    size_t param;          // index into params_
    int64_t param_offset;  // first element of the parameter in this piece
    int64_t flat_offset;   // its position in the flat vector
    int64_t shard_offset;  // and in this rank's shard (shard_grad_)
    int64_t numel;
  };
  // Note [ZeRO units]
  struct Unit {
    std::vector<size_t> params;  // indices into params_
    int64_t base = 0;            // of the unit in the flat vector
    int64_t padded = 0;          // its elements, padded to a multiple of dp
    int64_t shard_base = 0;      // of this rank's shard of it in shard_grad_
    int64_t ready = 0;           // parameters whose gradient the armed backward completed
    at::Tensor flat_grad;        // while its reduce-scatter is in flight
    std::unique_ptr<Work> work;
    // Stage 3 (Note [ZeRO-3]): the flat buffer whose views the parameters
    // are (its storage empty while freed), the gather in flight, and the
    // decoder layer of the unit (-1: none, so the unit stays gathered).
    at::Tensor full;
    std::unique_ptr<Work> gathering;
    bool gathered = false;
    int64_t layer = -1;
  };

  void check_stage_3(const char* what) const;
  // Note [ZeRO with bf16 parameters]: the shard the all-gathers send (the
  // masters rounded, or the fp32 shard itself), and its refresh.
  const at::Tensor& gather_source() const { return masters_ ? shard_model_ : shard_params_; }
  void round_masters();
  // Under fp32_grad_accum: what parameter i's .grad holds, added into its
  // fp32 sum; and the slot of the gradient a reduction reads (what
  // gradient_of() gives), and its dropping.
  void move_to_fp32(size_t param);
  at::Tensor& grad_of(size_t param);
  void drop_grad(size_t param);
  void on_grad_ready(size_t param);  // from the accumulator hooks
  void launch(Unit& unit);           // under mutex_
  void launch_ready_units();         // under mutex_
  void retire(Unit& unit);           // waits for its reduction, frees its buffer; under mutex_

  ProcessGroup* dp_;
  NamedTensors params_;
  int64_t stage_;
  bool overlap_;
  std::vector<Unit> units_;
  std::vector<size_t> unit_of_;   // param index -> unit index
  std::vector<int64_t> offsets_;  // of each parameter in the flat vector
  int64_t total_ = 0;             // all units' padded elements
  int64_t shard_size_ = 0;        // this rank's share of them: total_ / dp
  std::vector<Piece> pieces_;
  at::TensorOptions options_;     // fp32 on the parameters' device
  at::TensorOptions model_options_;  // the parameters' dtype and device
  bool masters_ = false;          // the parameters are not fp32: shard_params_ holds their masters
  at::Tensor shard_model_;        // [shard_size_], the masters rounded to the parameters' dtype
  bool fp32_grad_accum_ = false;
  std::vector<at::Tensor> fp32_grads_;  // parallel to params_, under fp32_grad_accum
  std::unique_ptr<GradReadyHooks> fp32_hooks_;  // added before hooks_, so they run first
  at::Tensor shard_params_;       // [shard_size_], this rank's shard of the flat parameter vector
  std::map<int64_t, size_t> layer_units_;  // stage 3: decoder layer -> unit
  at::Tensor shard_grad_;         // [shard_size_], this rank's shard of the averaged gradient
  std::unique_ptr<AdamW> shard_;  // over the pieces: views of shard_params_
  std::unique_ptr<GradReadyHooks> hooks_;  // stage 2 with overlap
  std::mutex mutex_;
  bool armed_ = false;
  size_t launched_ = 0;  // units started this step, from the last one down
  static constexpr int64_t kInFlight = 2;  // stage 2: units whose reduce-scatter may be in flight at once
  int64_t in_flight_ = 0;
  int64_t held_flat_grad_numel_ = 0;
  int64_t peak_flat_grad_numel_ = 0;
  int64_t last_started_in_backward_ = 0;
  double gather_wait_seconds_ = 0.0;
  double reduce_wait_seconds_ = 0.0;
};

// The wrapper every decoder layer runs through under ZeRO-3 (Note [ZeRO-3]),
// one for all layers: gathers, prefetches, frees and reduces the layers'
// units of the optimizers attached to it: the dense parameters', and under
// expert parallelism the experts' (sharded over edp: Note [ZeRO with expert
// parallelism] in trainer/update.h), each in turn at every hook, so every
// rank of each group issues that group's collectives in the same order.
// Before attach() (and after attach(nullptr)) its hooks do nothing: the
// parameters are whole then.
class ZeroLayerWrapper : public LayerWrapper {
 public:
  explicit ZeroLayerWrapper(bool recompute) : LayerWrapper({.recompute = recompute, .backward_hooks = true}) {}
  void attach(ShardedAdamW* zero, ShardedAdamW* experts = nullptr) {
    zeros_.clear();
    for (ShardedAdamW* each : {zero, experts}) {
      if (each != nullptr) zeros_.push_back(each);
    }
  }

 protected:
  void before_forward(const LayerCall& call) override;
  void after_forward(const LayerCall& call) override;
  void before_backward(const LayerCall& call) override;
  void after_backward(const LayerCall& call) override;

 private:
  // Gathers layer `layer`'s units and prefetches those of the next layer
  // in `direction` (+1 forward, -1 backward), of every attached optimizer.
  void gather_layer(int64_t layer, int direction);

  std::vector<ShardedAdamW*> zeros_;
};

}  // namespace loom
