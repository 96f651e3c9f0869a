#include "trainer/model_parts.h"

#include <algorithm>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/types.h>
#include <torch/utils.h>

#include "checkpoints/init_from.h"
#include "checkpoints/regions.h"
#include "parallel/pipeline.h"
#include "trainer/training_checkpoint.h"

namespace loom {

TrainGroups TrainGroups::of(const ParallelDims& dims, ProcessGroup* world, const GridGroups* grid) {
  if (dims.world > 1 && (grid == nullptr || !grid->tp)) {
    throw std::logic_error("train: a world of " + std::to_string(dims.world) + " ranks needs TrainOptions::grid");
  }
  TrainGroups groups;
  groups.world = world;
  groups.coords = dims.coords_of(world != nullptr ? world->rank() : 0);
  groups.writer = world == nullptr || world->rank() == 0;
  groups.tp = dims.tp > 1 ? grid->tp.get() : nullptr;
  groups.dp = dims.dp * dims.cp > 1 ? grid->dp.get() : nullptr;  // Note [cp replicas]
  groups.pp = dims.pp > 1 ? grid->pp.get() : nullptr;
  groups.cp = dims.cp > 1 ? grid->cp.get() : nullptr;
  if (dims.cp > 1 && groups.cp == nullptr) {
    throw std::logic_error("train: cp " + std::to_string(dims.cp) + " needs TrainOptions::grid's cp group");
  }
  if (dims.ep > 1) {
    if (grid->ep == nullptr || grid->edp == nullptr) {
      throw std::logic_error("train: ep " + std::to_string(dims.ep) + " needs TrainOptions::grid's ep and edp groups");
    }
    groups.ep = grid->ep.get();
    groups.edp = grid->edp->size() > 1 ? grid->edp.get() : nullptr;
  }
  groups.tp_data = groups.tp;
  groups.dp_data = groups.dp;
  groups.cp_data = groups.cp;
  groups.ep_data = groups.ep;
  groups.edp_data = groups.edp;
  return groups;
}

void TrainGroups::use_device(c10::Device device, const ParallelDims& dims, const GridGroups* device_grid) {
  if (dims.world > 1 && device.is_cuda() && device_grid == nullptr) {
    throw std::logic_error("train: CUDA on " + std::to_string(dims.world) +
                           " ranks needs TrainOptions::device_grid (the NCCL groups)");
  }
  // The device groups where the run has them (CUDA, or the test backend
  // mpi_staged on any device), else the host groups.
  tp_data = tp != nullptr && device_grid != nullptr ? device_grid->tp.get() : tp;
  dp_data = dp != nullptr && device_grid != nullptr ? device_grid->dp.get() : dp;
  cp_data = cp != nullptr && device_grid != nullptr ? device_grid->cp.get() : cp;
  ep_data = ep != nullptr && device_grid != nullptr ? device_grid->ep.get() : ep;
  edp_data = edp != nullptr && device_grid != nullptr ? device_grid->edp.get() : edp;
}

std::vector<torch::Tensor> ModelParts::params() const {
  std::vector<torch::Tensor> out;
  for (const auto& [name, param] : named_params) out.push_back(param);
  return out;
}

namespace {

// Reads into every parameter of `module` (tp shards of a stage) its part of
// the tensor of the same name in `files`: its tp slice of the global tensor
// (with rows model.resize_vocab adds, Note [growing the vocabulary]), and
// zeros in the padding rows of a padded vocabulary (Note [vocab padding]).
void load_part(const ModelFiles& files, torch::nn::Module& module, int64_t tp_rank, int64_t tp_size) {
  const std::map<std::string, int64_t> dims = tensor_parallel_shard_dims(module);
  const std::map<std::string, int64_t> unpadded = tensor_parallel_unpadded_sizes(module);
  for (auto& named : module.named_parameters()) {
    const int64_t dim = dims.at(named.key());
    std::vector<int64_t> shape = named.value().sizes().vec();
    if (dim >= 0) shape[dim] *= tp_size;
    const auto padded = unpadded.find(named.key());
    if (padded == unpadded.end()) {
      read_init_from(files, named.key(), shape, Region::chunk(shape, dim, tp_rank, tp_size), named.value());
      continue;
    }
    shape[0] = padded->second;
    const Region region = Region::padded_chunk(shape, 0, tp_rank, tp_size);
    torch::NoGradGuard no_grad;
    named.value().zero_();
    if (region.numel() > 0) read_init_from(files, named.key(), shape, region, stored_part(named.value(), region));
  }
}

}  // namespace

std::unique_ptr<ModelParts> build_model_parts(Config& config, const ParallelDims& dims, const TrainGroups& groups,
                                              c10::Device device) {
  auto owned = std::make_unique<ModelParts>();
  ModelParts& parts = *owned;
  parts.model_is_whole = groups.tp == nullptr && groups.pp == nullptr;
  if (groups.tp != nullptr) {
    parts.tp_rank = groups.tp->rank();
    parts.tp_size = groups.tp->size();
  }
  // model.init_from: every rank reads only its part of the folder's tensors.
  // Fresh weights: each rank draws only its own part (Note
  // [layout-independent initialization]). Neither needs the whole model.
  const bool from_folder = !config.model.init_from.empty();
  check_resize_vocab(config);
  std::optional<ModelFiles> files;
  if (from_folder) {
    files.emplace(open_init_from(config));  // config.model takes the folder's shape
    // The folder's shape (and model.resize_vocab) against the layout, as the
    // YAML's shape keys were checked (a tp that does not divide the vocabulary).
    ParallelDims::from_config(config, dims.world);
  } else {
    validate_model_config(config.model, config.source_path.empty() ? "config" : config.source_path);
  }
  parts.local_factory.fuse_residual_add_norm = config.fusion.add_rmsnorm;
  if (groups.tp != nullptr) {
    parts.tp_factory = std::make_unique<TensorParallelLayerFactory>(*groups.tp_data, config.parallel.sequence_parallel);
  }
  LayerFactory* factory = parts.tp_factory ? static_cast<LayerFactory*>(parts.tp_factory.get())
                                           : static_cast<LayerFactory*>(&parts.local_factory);
  // ZeRO-3: one wrapper for every layer gathers, prefetches and frees their
  // parameters (Note [ZeRO-3]).
  if (groups.dp != nullptr && config.parallel.zero_stage == 3) {
    parts.zero_wrapper = std::make_shared<ZeroLayerWrapper>(config.model.recompute == "full");
    factory->use_layer_wrapper(parts.zero_wrapper);
  }
  if (groups.cp != nullptr) {
    // Context parallelism: the same layers, a ring attention core, and this
    // rank's zig-zag share of the sequence for rotary.
    const int64_t seq_len = config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
    parts.cp_factory = std::make_unique<ContextParallelLayerFactory>(*factory, *groups.cp_data, seq_len);
    factory = parts.cp_factory.get();
  }
  if (groups.ep != nullptr) {
    // Expert parallelism: the sparse layers hold this rank's share of the
    // experts and exchange tokens over ep (Note [expert exchange]).
    parts.expert_exchange = std::make_shared<ExpertParallelExchange>(*groups.ep_data, *groups.ep);
    factory->use_expert_exchange(parts.expert_exchange);
  }
  if (groups.pp != nullptr) {
    if (groups.pp->rank() != 0 && config.model.tie_embeddings) parts.tied_copy = "model.embed_tokens.weight";
    parts.schedule.emplace(pipeline_schedule_of(config, dims));
    parts.modules = build_pipeline_chunks(config.model, *factory, *parts.schedule, groups.pp->rank());
  } else {
    parts.model = std::make_shared<LlamaForCausalLM>(config.model, *factory);
    parts.modules = {parts.model};
  }
  // On the CPU and then moved, so every device starts from the same weights.
  if (from_folder) {
    for (auto& module : parts.modules) load_part(*files, *module, parts.tp_rank, parts.tp_size);
  } else {
    for (auto& module : parts.modules) {
      init_tensor_parallel_shards(*module, config.model.init_std, config.run.seed, parts.tp_rank, parts.tp_size);
    }
  }
  // Nothing above draws from torch's generator; seeded here, it starts every
  // run in the same state, whatever the layout and the weights' source.
  torch::manual_seed(config.run.seed);
  const bool bf16_params = config.precision.params == "bf16";
  for (auto& module : parts.modules) {
    module->to(device);
    // precision.params bf16: the parameters only; buffers (rotary tables)
    // keep their dtype. The optimizer's fp32 masters start from these.
    if (bf16_params) {
      at::NoGradGuard no_grad;
      for (auto& param : module->parameters()) param.set_data(param.to(torch::kBFloat16));
    }
    module->train();
    for (auto& named : to_named_tensors(module->named_parameters())) parts.named_params.push_back(std::move(named));
    parts.param_dims.merge(tensor_parallel_shard_dims(*module));
    parts.param_unpadded.merge(tensor_parallel_unpadded_sizes(*module));
  }
  return owned;
}

Region checkpoint_region(const ModelParts& parts, const std::string& param, const std::vector<int64_t>& local_shape,
                         std::vector<int64_t>* global_shape) {
  const int64_t dim = parts.param_dims.at(param);
  std::vector<int64_t> shape = local_shape;
  if (dim >= 0) shape[dim] *= parts.tp_size;
  const auto padded = parts.param_unpadded.find(param);
  if (padded != parts.param_unpadded.end()) shape[0] = padded->second;  // padding is along dim 0
  if (global_shape != nullptr) *global_shape = shape;
  return padded != parts.param_unpadded.end() ? Region::padded_chunk(shape, 0, parts.tp_rank, parts.tp_size)
                                              : Region::chunk(shape, dim, parts.tp_rank, parts.tp_size);
}

torch::Tensor stored_part(const torch::Tensor& values, const Region& region) {
  const int64_t n = region.numel();
  if (n == values.numel()) return values;
  // The padding rows are the last rows of the local tensor (the last
  // elements of a 1-D piece): the stored ones are its first rows.
  const int64_t row = values.dim() > 1 ? values.numel() / values.size(0) : 1;
  return values.narrow(0, 0, n / row);
}

Region clip_to_stored(Region region, int64_t begin, int64_t end) {
  const int64_t stored = region.box_numel();
  region.flat = Range{std::min(begin, stored), std::min(end, stored)};
  return region;
}

std::shared_ptr<LlamaForCausalLM> whole_model(const ModelConfig& shape, const NamedTensors& params) {
  LocalLayerFactory factory;
  auto model = std::make_shared<LlamaForCausalLM>(shape, factory);
  load_tensor_parallel_shards(*model, params, /*rank=*/0, /*size=*/1);
  return model;
}

int64_t global_batch_of(const Config& config, const ParallelDims& dims) {
  return config.batch.global_batch_size > 0 ? config.batch.global_batch_size
                                            : config.batch.micro_batch_size * dims.dp;
}

PipeSchedule pipeline_schedule_of(const Config& config, const ParallelDims& dims) {
  const int64_t micro_batches = global_batch_of(config, dims) / (config.batch.micro_batch_size * dims.dp);
  return make_pipe_schedule(config.parallel.pp_schedule, dims.pp, micro_batches, config.parallel.virtual_stages);
}

}  // namespace loom
