// What one rank trains for its place in the dp x cp x pp x tp grid: its groups,
// and its part of the model (the whole model, its tp shards, or its pipeline
// chunks), built so that every layout starts from the same weights.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "checkpoints/regions.h"
#include "config/config.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "parallel/context_parallel.h"
#include "parallel/expert_parallel.h"
#include "parallel/pipeline_schedule.h"
#include "parallel/process_group.h"
#include "parallel/tensor_parallel_model.h"
#include "parallel/topology.h"
#include "parallel/zero.h"

namespace loom {

// This rank's groups, each null where its axis has one rank.
// Note [host and device groups]: what goes through the host (the loss and
// the metrics, flags, gradient norms, checkpoint commits) uses the MPI
// groups `dp`, `tp` and `pp`; the model's own tensors (tp activations and the
// vocabulary-parallel loss, dp gradients and ZeRO shards) use `dp_data` and
// `tp_data`: NCCL's twins on CUDA, the same MPI groups on the CPU. The
// pipeline makes its own groups (Note [pipeline links]).
struct TrainGroups {
  ProcessGroup* world = nullptr;  // null on one rank
  ParallelDims::Coords coords;    // this rank's place in the grid
  // World rank 0, which writes the run folder, metrics, checkpoints and the
  // export; the others take part in gathering what it writes.
  bool writer = true;
  // With cp > 1, `dp` holds the dp x cp ranks that share this rank's
  // parameters (Note [cp replicas] in parallel/process_group.h); `cp` the
  // ring of this replica's cp ranks, `cp_data` its device twin.
  ProcessGroup* dp = nullptr;
  ProcessGroup* pp = nullptr;
  ProcessGroup* tp = nullptr;
  ProcessGroup* cp = nullptr;
  ProcessGroup* dp_data = nullptr;
  ProcessGroup* tp_data = nullptr;
  ProcessGroup* cp_data = nullptr;
  // With ep > 1 (Note [expert groups] in parallel/process_group.h): `ep` the
  // ranks that exchange tokens, `edp` those that hold the same experts (null
  // when it is this rank alone), and their device twins.
  ProcessGroup* ep = nullptr;
  ProcessGroup* edp = nullptr;
  ProcessGroup* ep_data = nullptr;
  ProcessGroup* edp_data = nullptr;

  // The host groups from TrainOptions::grid (std::logic_error when a world
  // of several ranks has none); the device groups are set by use_device.
  static TrainGroups of(const ParallelDims& dims, ProcessGroup* world, const GridGroups* grid);
  // With CUDA on several ranks, the model's tensors go over `device_grid`
  // (NCCL; std::logic_error when it is missing); elsewhere over the host groups.
  void use_device(c10::Device device, const ParallelDims& dims, const GridGroups* device_grid);
};

struct ModelParts {
  ModelParts() = default;
  ModelParts(const ModelParts&) = delete;
  ModelParts& operator=(const ModelParts&) = delete;

  LocalLayerFactory local_factory;
  std::unique_ptr<TensorParallelLayerFactory> tp_factory;  // with tp > 1
  std::unique_ptr<ContextParallelLayerFactory> cp_factory;  // with cp > 1: over the local or tp factory
  // With ep > 1: the sparse layers' exchange (parallel/expert_parallel.h);
  // this rank's expert parameters (is_expert_parameter in model/moe.h) then
  // differ from the other ep ranks'.
  std::shared_ptr<ExpertParallelExchange> expert_exchange;
  std::shared_ptr<LlamaForCausalLM> model;  // the whole model or its tp shards; null with pp
  std::vector<std::shared_ptr<LlamaForCausalLM>> modules;  // what this rank trains: the model, or its chunks
  // ZeRO-3 (parallel.zero_stage 3 with dp > 1): the wrapper every decoder
  // layer runs through, attached to the optimizer by Update::start().
  std::shared_ptr<ZeroLayerWrapper> zero_wrapper;
  std::optional<PipeSchedule> schedule;                      // with pp > 1
  NamedTensors named_params;                 // every module's parameters, in order
  std::map<std::string, int64_t> param_dims;  // tp shard dim of each parameter
  // The vocabulary's parameters when tp does not divide it, with its size
  // (tensor_parallel_unpadded_sizes): their chunks end in padding rows that
  // no checkpoint or export holds (Note [vocab padding]). Empty otherwise.
  std::map<std::string, int64_t> param_unpadded;
  bool model_is_whole = true;  // no tp or pp: checkpoints need no gathering
  // The parameter this rank holds as a copy of another stage's (the last
  // pipeline stage's tied embedding: stage 0 owns it, for the gradient norm
  // and checkpoints); "" when none.
  std::string tied_copy;
  int64_t tp_rank = 0, tp_size = 1;

  std::vector<torch::Tensor> params() const;
};

// Builds the parts on `device`, in train mode, and leaves torch seeded with
// run.seed. Every rank builds only its part (its tp shards of its stages'
// layers) and draws only its part's initial weights, on the CPU, each the
// value the whole model holds there (model/init.h): any layout starts from
// the same weights on any device. With model.init_from every rank reads only
// its part of the folder's tensors (ModelFiles::read_region); `config.model`
// takes the folder's shape.
// On the heap: the layers may keep the factories' addresses.
std::unique_ptr<ModelParts> build_model_parts(Config& config, const ParallelDims& dims, const TrainGroups& groups,
                                              c10::Device device);

// Where this rank's tensor of parameter `param` (of `local_shape`: the
// parameter's, or one of its AdamW moments') lies in the whole tensor, whose
// shape goes into `global_shape` where given: its tp chunk, less the padding
// rows of a padded vocabulary (Note [vocab padding]), which checkpoints leave
// out so that they resume on any tp. The region's elements are the first
// region.numel() of the local tensor (stored_part).
Region checkpoint_region(const ModelParts& parts, const std::string& param, const std::vector<int64_t>& local_shape,
                         std::vector<int64_t>* global_shape = nullptr);

// The first region.numel() elements, row-major, of `values`: a local tensor
// that checkpoint_region placed, or a ZeRO piece of one (1-D, its region's
// flat range cut by clip_to_stored), as a view: its padding rows, which are
// last, left out.
torch::Tensor stored_part(const torch::Tensor& values, const Region& region);

// `region` (from checkpoint_region) with the flat range [begin, end) of the
// local tensor's elements (a ZeRO piece), cut to the elements it stores:
// empty where the piece is all padding.
Region clip_to_stored(Region region, int64_t begin, int64_t end);

// A single-device model holding `params` (full tensors by name), for the
// rank that writes a checkpoint or an export of a sharded run.
std::shared_ptr<LlamaForCausalLM> whole_model(const ModelConfig& shape, const NamedTensors& params);

// The global batch's sequences, by default one micro-batch per replica.
int64_t global_batch_of(const Config& config, const ParallelDims& dims);

// The pipeline schedule of one step (parallel.pp_schedule over pp ranks and
// the step's micro-batches per replica); BadInput when they do not suit it.
PipeSchedule pipeline_schedule_of(const Config& config, const ParallelDims& dims);

}  // namespace loom
