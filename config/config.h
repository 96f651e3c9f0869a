// The run configuration: YAML -> typed structs, validated once at load.
//
// Every field has a type, a default (or is required), a unit and a one-line
// doc; the table of fields lives in config_schema.cpp and docs/configuration.md
// documents each key (a unit test keeps the two in step). Validation errors are
// loom::BadInput whose message names the file, line, key, value and what was
// expected, e.g.
//   configs/x.yaml:12:14: model.num_kv_heads: 3 does not divide model.num_heads (8)
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "config/model_config.h"

namespace loom {

struct RunConfig {
  std::string name = "loom";        // run folder name under output_dir
  std::string output_dir = "runs";  // parent folder of run folders
  uint64_t seed = 1234;             // seeds init, data order, dropout-free sampling
  std::string device = "cpu";       // cpu | cuda | auto
};

struct ParallelConfig {
  int64_t dp = 1;  // 0 = auto (world / (cp * pp * tp)); YAML accepts "auto"
  int64_t tp = 1;
  int64_t pp = 1;
  // Context parallelism: each sequence split over cp ranks, attention by ring
  // (parallel/context_parallel.h).
  int64_t cp = 1;
  // Expert parallelism: each sparse layer's experts split over ep ranks
  // carved out of dp (parallel/expert_parallel.h); ep divides dp.
  int64_t ep = 1;
  bool sequence_parallel = false;
  std::string pp_schedule = "1f1b";  // afab | 1f1b | interleaved
  int64_t virtual_stages = 1;
  int64_t zero_stage = 0;  // 0 | 1 | 2 | 3
  double bucket_mb = 25.0;
  std::string reduce_dtype = "fp32";  // fp32 | bf16: of the dp gradient reduction
  // Seconds a rank waits for one collective or send/recv before it ends the
  // job with a message naming the operation (the hang watchdog); the longer
  // first-step value covers start-up, loading a checkpoint and the first step.
  double comm_timeout = 600.0;
  double comm_timeout_first_step = 1800.0;
  // nccl | mpi_staged (TEST-ONLY: parallel/staged_process_group.h)
  std::string device_backend = "nccl";
};

struct DataSource {
  std::string path;
  double weight = 1.0;
};

struct DataConfig {
  std::vector<DataSource> train;
  std::string valid;
  int64_t valid_interval = 0;  // steps between validation passes; 0 = only at the end
  int64_t valid_batches = 8;   // micro-batches per validation pass
  int64_t seq_len = 0;  // 0 -> model.max_seq_len
  std::string tokenizer;
  // Whether each shard file's CRC-32C is checked before HDF5 opens it
  // (data/dataset.h ShardFileCheck).
  std::string check_shard_files = "auto";  // auto | always | never
  // Packed documents attend only within themselves, rotary positions restart
  // at each document start, and the position whose target starts the next
  // document leaves the loss (docs/fine-tuning.md).
  bool document_mask = false;
  // Train on a dataset whose tokenizer_hash differs from the model's or
  // data.tokenizer's (refused otherwise).
  bool allow_tokenizer_mismatch = false;
};

struct BatchConfig {
  int64_t micro_batch_size = 1;   // sequences per rank per forward
  int64_t global_batch_size = 0;  // sequences per optimizer step; 0 -> micro * dp
};

struct OptimizerConfig {
  double lr = 3e-4;
  std::vector<double> betas = {0.9, 0.95};
  double eps = 1e-8;
  double weight_decay = 0.1;
  double clip_grad_norm = 1.0;  // 0 = no clipping
  bool decay_embeddings = true;  // weight decay on embed_tokens and lm_head too
  // A step whose loss (any micro-batch) or grad norm is NaN/Inf:
  // stop = throw before the update; skip = drop the update and go on.
  std::string nonfinite_policy = "stop";  // stop | skip
  int64_t max_skipped_steps = 10;         // skips allowed in the whole run (skip policy)
  // A step whose loss exceeds loss_spike_factor x the mean of the last
  // loss_spike_window steps' losses (trainer/loss_spike.h):
  // none = train on; skip = drop its update and data as a non-finite skip;
  // rollback = reload the last checkpoint and skip that step's data there.
  std::string loss_spike_policy = "none";  // none | skip | rollback
  double loss_spike_factor = 3.0;
  int64_t loss_spike_window = 20;          // steps
  int64_t max_loss_spike_rollbacks = 3;    // rollbacks in the whole run (rollback policy)
};

struct ScheduleConfig {
  int64_t train_steps = 0;  // required for training
  int64_t warmup_steps = 0;
  std::string decay = "cosine";  // cosine | linear | wsd | constant
  double min_lr_ratio = 0.1;
};

struct PrecisionConfig {
  std::string compute = "fp32";  // fp32 | bf16
  std::string params = "fp32";   // fp32 | bf16
  // bf16 parameters: whether their gradients are summed over micro-batches
  // in fp32 (beside the optimizer's fp32 masters) or in their own bf16 .grad.
  std::string grad_accum = "fp32";  // fp32 | bf16
};

struct CheckpointConfig {
  bool enabled = true;   // false: no checkpoints at all (benchmarks, throwaway runs)
  int64_t interval = 0;  // steps; 0 = only at the end
  int64_t keep_last = 2;
  std::string resume = "auto";  // auto | none | a path
  bool async = false;
  bool export_hf_at_end = true;
  std::string export_dtype = "bfloat16";  // bfloat16 | float32 | float16: of the end-of-run Hub export
};

struct LoggingConfig {
  int64_t interval = 1;      // steps
  double peak_tflops = 0.0;  // peak for mfu; 0 = datasheet (known GPUs) or measured
};

// The PyTorch (Kineto) profiler over a few training steps (trainer/profiler.h).
struct ProfileConfig {
  int64_t start_step = 0;  // first profiled step, numbered from 1 as metrics.jsonl's "step"; 0 = off
  int64_t steps = 2;       // steps profiled from start_step
};

// Fusions of the bf16 training step, each its own switch so that one GPU
// session times every combination (docs/performance.md, "Tuning notes").
struct FusionConfig {
  // Each linear layer's weight-gradient GEMM adds into the fp32 .grad
  // (model/compute_weights.h, Note [weight-gradient accumulation]).
  bool wgrad_accumulation = false;
  // Each decoder layer's residual add and the RMSNorm after it as one op
  // (model/kernels/fused_ops.h, add_rms_norm).
  bool add_rmsnorm = false;
  // Gradient clipping's factor applied inside AdamW rather than in a pass
  // of its own (optim/optimizer.h, AdamW::step).
  bool clip_in_adamw = false;
};

struct SlurmConfig {
  std::string partition;
  std::string account;
  std::string time = "01:00:00";
  std::string launcher = "srun";  // srun | mpirun
  std::vector<std::string> extra_args;
  int64_t signal_lead = 300;  // seconds before the time limit that SIGUSR1 comes; 0 = none
  int64_t cpus_per_task = 0;  // CPUs per rank (sbatch/srun --cpus-per-task); 0 = this host's cores / ranks per node
};

struct LaunchConfig {
  int64_t ranks = 1;
  int64_t nodes = 1;
  int64_t procs_per_node = 0;  // 0 -> ranks / nodes
  int64_t gpus_per_node = 0;
  std::vector<std::string> mpirun_args;
  std::map<std::string, std::string> env;
  double max_wall_time = 0;  // seconds a `loom train` runs before it checkpoints and stops; 0 = no limit
  double job_end_margin = 120;  // seconds kept free before the job's end time beyond one step and one save
  SlurmConfig slurm;
};

struct Config {
  RunConfig run;
  ModelConfig model;
  ParallelConfig parallel;
  DataConfig data;
  BatchConfig batch;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  PrecisionConfig precision;
  CheckpointConfig checkpoint;
  LoggingConfig logging;
  ProfileConfig profile;
  FusionConfig fusion;
  LaunchConfig launch;

  std::string source_path;  // the YAML file it was read from ("" when built in code)
  std::set<std::string> given;  // the keys the YAML or --set gave ("model.seed"), not left at their defaults
  std::vector<std::string> base_files;  // its base: chain, deepest first (config/config_compose.h)
};

// Where each key's value came from: "file:line:column" of the line that set it
// (the config or one of its base files), or the "--set KEY=VALUE" argument.
// Keys left at their defaults are absent.
using ConfigOrigins = std::map<std::string, std::string>;

// Reads `path` and its `base:` files (config/config_compose.h: composition
// and ${NAME} interpolation), applies `overrides` ("a.b=value", YAML scalar or
// flow syntax), fills defaults and validates. Throws loom::BadInput naming
// file:line, key, value and expectation. `origins`, when given, receives
// where each key was set.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {},
                   ConfigOrigins* origins = nullptr);

// Same from YAML text; `source_name` is used in messages in place of a path
// (and its folder is where `base:` files are looked for).
Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {}, ConfigOrigins* origins = nullptr);

// Checks only the model section (used by import, where no YAML exists).
void validate_model_config(const ModelConfig& model, const std::string& source_name);

// The resolved config as YAML (every key, defaults filled in). With
// `origins`, each key is followed by a comment saying where its value came
// from (`loom inspect CONFIG`).
std::string config_to_yaml(const Config& config, const ConfigOrigins* origins = nullptr);

// Every dotted key the loader accepts, with its doc line (for docs and tests).
struct ConfigKeyInfo {
  std::string key;      // e.g. "model.hidden_size"
  std::string type;     // int | float | bool | string | list | map
  std::string default_value;  // "required" when there is none
  std::string unit;     // "" when unitless
  std::string doc;
};
const std::vector<ConfigKeyInfo>& config_keys();

}  // namespace loom
