// The pipeline executor: runs one rank's part of a PipeSchedule
// (parallel/pipeline_schedule.h) over its chunks of the model, moving
// activations and their gradients between neighbouring stages with the pp
// group's send and recv.
//
//   auto chunks = build_pipeline_chunks(config.model, factory, schedule, pp.rank());
//   PipelineExecutor executor(pp, schedule, chunks, {batch, seq_len, hidden});
//   double loss = executor.run(inputs, targets);   // one step's forwards and backwards
//
// Note [pipeline executor]
// Every activation crossing a stage boundary is fp32 [batch, seq, hidden],
// known in advance, so no shapes are exchanged. A receive waits for its
// message (polling MPI, which moves the other operations forward too); a
// send is left in flight and waited for at the end of the step, which is what
// the schedules' simulator assumes and what keeps two neighbours that send to
// each other at once from deadlocking. Forward activations and backward
// gradients use different tags, and between two ranks each kind arrives in
// the order it was sent (the simulator checks every schedule for that). The
// last model stage computes the loss of each micro-batch (cross-entropy
// divided by the micro-batch count, so the gradients accumulate to the
// mean's); backward of a chunk is autograd from its output with the
// received gradient, and its input's gradient is what goes back.
// With tied embeddings the first and the last model stage each hold a copy
// of the tied weight; run() ends by giving both the sum of their gradients
// (an all-reduce over the pp group), so the copies stay equal. Not yet:
// sequence and tensor parallelism inside a stage, bf16 activations.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "parallel/pipeline_schedule.h"
#include "parallel/process_group.h"
#include "trainer/model/llama.h"

namespace loom {

// The layers of model stage `stage` of `stages`: num_layers split as evenly as
// possible, the first stages taking one more when it does not divide; stage 0
// has the embedding, the last the final norm and the head. BadInput when
// there are fewer layers than stages.
StageSpec pipeline_stage_spec(int64_t num_layers, int64_t stages, int64_t stage);

// This pipeline rank's chunks (chunk c is model stage c * p + rank), built by
// `factory` with empty weights: load them (by name) before training.
std::vector<std::shared_ptr<LlamaForCausalLM>> build_pipeline_chunks(const ModelConfig& model,
                                                                     const LayerFactory& factory,
                                                                     const PipeSchedule& schedule, int64_t rank);

class PipelineExecutor {
 public:
  struct Shape {
    int64_t batch = 1;   // sequences per micro-batch
    int64_t tokens = 1;  // per sequence
    int64_t hidden = 1;
  };
  // The group, the schedule and the chunks must outlive the executor.
  PipelineExecutor(ProcessGroup& pp, const PipeSchedule& schedule,
                   std::vector<std::shared_ptr<LlamaForCausalLM>> chunks, Shape shape);

  // One step: every forward and backward of the schedule for this rank.
  // `inputs` and `targets` hold the step's micro-batches ([batch, tokens]
  // int64 each); the first stage reads the inputs, the last the targets.
  // Gradients accumulate into the chunks' parameters (the tied weight's
  // copies then hold the whole gradient). Returns the step's
  // mean loss on the rank that holds the last model stage, 0 elsewhere.
  double run(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets);

  // The most micro-batches whose activations (autograd graphs) this rank
  // held at once during the last run(): forwarded, not yet backwarded.
  int64_t last_peak_live() const { return last_peak_live_; }
  // Seconds the last run() spent waiting for received activations and
  // gradients (this rank's part of the bubble), and in all.
  double last_recv_wait_seconds() const { return last_recv_wait_seconds_; }
  double last_run_seconds() const { return last_run_seconds_; }

 private:
  // With tied embeddings, the first and the last model stage's copies of the
  // tied weight get the sum of their gradients (collective over pp).
  void sync_tied_embedding_grads();

  ProcessGroup* pp_;
  const PipeSchedule* schedule_;
  std::vector<std::shared_ptr<LlamaForCausalLM>> chunks_;
  Shape shape_;
  int64_t last_peak_live_ = 0;
  double last_recv_wait_seconds_ = 0;
  double last_run_seconds_ = 0;
};

}  // namespace loom
