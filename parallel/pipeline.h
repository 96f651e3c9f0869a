// The pipeline executor: runs one rank's part of a PipeSchedule
// (parallel/pipeline_schedule.h) over its chunks of the model, moving
// activations and their gradients between neighbouring stages over the
// links of PipeGroups (Note [pipeline links]).
//
//   auto chunks = build_pipeline_chunks(config.model, factory, schedule, pp.rank());
//   PipeGroups groups(pp);                          // collective over pp (MPI)
//   PipelineExecutor executor(groups, schedule, chunks, {batch, seq_len, hidden});
//   double loss = executor.run(inputs, targets);   // one step's forwards and backwards
//
// Note [pipeline executor]
// Every activation crossing a stage boundary is [batch, seq, hidden] of the
// residual stream's dtype, known in advance, so no shapes are exchanged; it
// is received onto the chunks' device. A receive waits for its message
// (polling MPI, which moves the other operations forward too); a send is
// left in flight and waited for at the end of the step, which is what the
// schedules' simulator assumes and what keeps two neighbours that send to
// each other at once from deadlocking. Activations and gradients share one
// tag: between two ranks every message is received in the order it was
// sent, whatever its kind, which is how NCCL, which has no tags, pairs them
// (Note [pipeline messages without tags] in parallel/pipeline_schedule.h;
// the simulator checks every schedule for it, and the MPI runs rely on it).
// The last model stage computes the loss of each micro-batch (cross-entropy
// divided by the micro-batch count, so the gradients accumulate to the
// mean's); backward of a chunk is autograd from its output with the
// received gradient, and its input's gradient is what goes back.
// With tied embeddings the first and the last model stage each hold a copy
// of the tied weight; run() ends by giving both the sum of their gradients
// (an all-reduce over PipeGroups::device()), so the copies stay equal.
// A stage may itself be tensor parallel: the hooks give the forward (under
// autocast, say) and the loss (vocabulary-parallel cross-entropy), and the
// boundary shape and dtype are the caller's (a sequence-parallel residual
// stream crosses as [batch, tokens / tp, hidden]; bf16 compute sends bf16).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include <ATen/core/Tensor.h>

#include "parallel/mpi_process_group.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/process_group.h"
#include "model/llama.h"
#include "optim/optimizer.h"

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

// Every rank's named tensors gathered on rank 0 of `pp`, as CPU tensors in
// rank order; a name several ranks hold (the tied embedding's copies) is kept
// once, from the lowest rank. Empty on the other ranks. Names, dtypes and
// shapes travel with the tensors, so ranks need not know each other's.
// Collective over pp.
NamedTensors gather_pipeline_stages(ProcessGroup& pp, const NamedTensors& local);

// Note [pipeline links]
// The executor leaves its sends in flight while it computes and receives
// (Note [pipeline executor]). On MPI that is free; an NCCL send holds its
// communicator's stream until the peer receives it, and nothing later on
// that stream starts before, so a rank whose send to its next stage waits
// could not receive the gradient that its next stage sends first (1f1b on
// two stages does exactly this). So the activations and gradients do not go
// over the pp group: between ring neighbours i and i + 1 (mod p) each
// direction has a group of its own, holding those two ranks, which carries
// only what i sends to i + 1 (or the reverse). A send that waits then holds
// up only the later sends to the same neighbour, which that neighbour takes
// in the order they were sent (the schedules' simulator checks each pair of
// ranks for that order), as with MPI. The CPU runs use the same links,
// split from pp as MPI groups; CUDA runs their NCCL twins. The tied
// weight's gradient sum goes over `device` (pp, or its NCCL twin), and its
// shape, exchanged once on the CPU, over `host` (pp).
class PipeGroups {
 public:
  // Makes a group from an MPI group of the same ranks: NcclProcessGroup's
  // constructor on CUDA. Unset: the MPI groups themselves.
  using Twin = std::function<std::unique_ptr<ProcessGroup>(MpiProcessGroup&)>;

  // The links of this pp rank (two groups per pair of ring neighbours; with
  // one stage, `pp` itself to the rank itself, MPI only), split from `pp` in
  // the same order on every rank.
  // Collective over pp, as is each `twin` call (every member of a link in
  // the order of the links, so no two ranks wait on each other).
  explicit PipeGroups(MpiProcessGroup& pp, const Twin& twin = {});

  // The timeout of every link and of device() (they start with pp's).
  void set_timeout(std::chrono::milliseconds timeout);

  ProcessGroup& host() const { return *host_; }
  ProcessGroup& device() const { return device_twin_ ? *device_twin_ : *host_; }

  // The group that carries what this rank sends to (receives from) pp rank
  // `pp_rank`, and that rank's rank in it. Throws std::invalid_argument for a
  // rank that is not a ring neighbour.
  struct Link {
    ProcessGroup* group = nullptr;
    int peer = -1;
  };
  Link to(int pp_rank) const { return link(to_, pp_rank, "to"); }
  Link from(int pp_rank) const { return link(from_, pp_rank, "from"); }

 private:
  Link link(const std::map<int, Link>& links, int pp_rank, const char* direction) const;

  MpiProcessGroup* host_;
  std::unique_ptr<ProcessGroup> device_twin_;
  std::vector<std::unique_ptr<ProcessGroup>> owned_;
  std::map<int, Link> to_, from_;
};

class PipelineExecutor {
 public:
  struct Shape {
    int64_t batch = 1;   // sequences per micro-batch
    int64_t tokens = 1;  // per sequence
    int64_t hidden = 1;
    at::ScalarType dtype = at::kFloat;  // of the residual stream between stages
  };
  // How a chunk runs forward (`positions`: the micro-batch's document
  // positions, undefined without them), and the loss of the last stage's
  // logits ([batch, tokens, vocab or its tp slice]) against the targets
  // ([batch, tokens]): a mean over the tokens. Unset: chunk.forward and fp32
  // cross-entropy.
  struct Hooks {
    std::function<at::Tensor(LlamaForCausalLM& chunk, const at::Tensor& input, const at::Tensor& positions)> forward;
    std::function<at::Tensor(const at::Tensor& logits, const at::Tensor& targets)> loss;
    // Where a parameter's gradient is summed, with whatever its own .grad
    // still holds moved in (a slot that may be assigned): an fp32 sum under
    // precision.params bf16 (Note [fp32 gradients of bf16 parameters],
    // optim/optimizer.h). Not given: the parameter's .grad. The tied
    // weight's copies are summed there.
    std::function<at::Tensor&(const at::Tensor& param)> gradient_of;
  };
  // The groups, the schedule and the chunks must outlive the executor.
  // Collective over pp (with tied embeddings: the tied weight's shape).
  PipelineExecutor(const PipeGroups& groups, const PipeSchedule& schedule,
                   std::vector<std::shared_ptr<LlamaForCausalLM>> chunks, Shape shape, Hooks hooks = {});

  // One step: every forward and backward of the schedule for this rank.
  // `inputs` and `targets` hold the step's micro-batches ([batch, tokens]
  // int64 each); the first stage reads the inputs, the last the targets.
  // `positions`, empty or one per micro-batch ([batch, tokens], the whole
  // sequence's: data.document_mask), go to every stage's forward of that
  // micro-batch: each stage's attention needs them, and every pp rank has
  // them from its own loader, so they never travel between stages.
  // Gradients accumulate into the chunks' parameters (the tied weight's
  // copies then hold the whole gradient). Returns the step's
  // mean loss on the rank that holds the last model stage, 0 elsewhere.
  // With `loss_scales` (one per micro-batch), micro-batch m's loss is
  // multiplied by loss_scales[m] instead of divided by the number of
  // micro-batches, and the sum is returned (Note [masked loss] in
  // trainer/forward_backward.cpp); a scale of 0 adds a zero whose backward
  // still runs.
  double run(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
             const std::vector<double>& loss_scales = {}, const std::vector<at::Tensor>& positions = {});

  // The mean loss over `inputs` (micro-batches of the same shape, any
  // number) without gradients: each micro-batch passes the stages in order.
  // On the rank holding the last model stage; 0 elsewhere. Collective over pp.
  // With `loss_scales`, the sum of each micro-batch's loss times its scale;
  // `positions` as for run().
  double evaluate(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
                  const std::vector<double>& loss_scales = {}, const std::vector<at::Tensor>& positions = {});

  // The most micro-batches whose activations (autograd graphs) this rank
  // held at once during the last run(): forwarded, not yet backwarded.
  int64_t last_peak_live() const { return last_peak_live_; }
  // Seconds the last run() spent waiting for received activations and
  // gradients (this rank's part of the bubble), and in all.
  double last_recv_wait_seconds() const { return last_recv_wait_seconds_; }
  double last_run_seconds() const { return last_run_seconds_; }

 private:
  // With tied embeddings, the first and the last model stage's copies of the
  // tied weight get the sum of their gradients, where those are summed
  // (Hooks::gradient_of; collective over pp).
  void sync_tied_embedding_grads();
  // The loss of one micro-batch's logits, as run() and evaluate() weigh it.
  at::Tensor scaled_loss(const at::Tensor& logits, const at::Tensor& targets, const std::vector<double>& loss_scales,
                         int64_t micro_batch, int64_t micro_batches) const;

  // Starts sending `tensor` to, or receiving it from, pp rank `pp_rank`.
  std::unique_ptr<Work> send_to(int pp_rank, const at::Tensor& tensor) const;
  std::unique_ptr<Work> recv_from(int pp_rank, const at::Tensor& tensor) const;

  const PipeGroups* groups_;
  const PipeSchedule* schedule_;
  std::vector<std::shared_ptr<LlamaForCausalLM>> chunks_;
  Shape shape_;
  Hooks hooks_;
  c10::Device device_ = c10::kCPU;  // the chunks', where received activations and gradients are put
  std::vector<int64_t> tied_shape_;  // of this rank's slice of the tied weight, agreed over pp
  int64_t last_peak_live_ = 0;
  double last_recv_wait_seconds_ = 0;
  double last_run_seconds_ = 0;
};

}  // namespace loom
