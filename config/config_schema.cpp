// The table of config keys (one row per dotted key) and the typed reading,
// printing and writing of each key's field. See config_schema.h.
#include "config/config_schema.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <set>
#include <type_traits>

#include "util/error.h"

namespace loom::config_schema {
namespace {

// `+` turns the capture-less lambda into the plain function pointer Field holds.
#define LOOM_FIELD(member)   \
  +[](Config & c) -> auto& { \
    return c.member;         \
  }

const Bounds kAny{};
const Bounds kPositive{0, true};
const Bounds kNonNegative{0, false};
const Bounds kAtLeastOne{1, false};
const Bounds kTokenId{-1, false};
const Bounds kFraction{0, false, 1, false};  // [0, 1]
const Bounds kBetaRange{0, false, 1, true};  // [0, 1)
const std::vector<std::string> kPrecisions = {"fp32", "bf16"};
const std::vector<std::string> kExportDtypes = {"bfloat16", "float32", "float16"};

// One row per key: {key, field, default ("" = the struct's), unit, doc, range, allowed values}.
// clang-format off
std::vector<KeySpec> build_table() {
  return {
      // --- run ----------------------------------------------------------------
      {"run.name", LOOM_FIELD(run.name), "", "", "run folder name: the run writes to <run.output_dir>/<run.name>/"},
      {"run.output_dir", LOOM_FIELD(run.output_dir), "", "", "parent folder of run folders"},
      {"run.seed", LOOM_FIELD(run.seed), "", "", "seeds initialization and the data order"},
      {"run.device", LOOM_FIELD(run.device), "", "", "where tensors live; auto = cuda when a GPU is visible, else cpu",
       kAny, {"cpu", "cuda", "auto"}},

      // --- model (Hugging Face's config.json names in the docs) ---------------
      {"model.architecture", LOOM_FIELD(model.architecture), "", "",
       "model family (HF model_type): llama (also SmolLM2, Mistral without a window), qwen2 (q/k/v biases), "
       "qwen3 (per-head q/k RMSNorm), olmo2 (norms after attention and MLP, q/k RMSNorm over the projection) or "
       "smollm3 (model.nope_layers without rotary), mistral (llama with model.sliding_window on every layer), "
       "gemma (scaled embeddings, 1 + w norms, GeGLU), gemma2 (gemma with norms around each block, soft-capping, "
       "alternating windows), gemma3_text (gemma2 with q/k norms and a local rotary) or phi3 (fused qkv_proj and "
       "gate_up_proj in its Hub files, a window on every layer), or the mixtures of experts mixtral, qwen2_moe "
       "(with a shared expert) and qwen3_moe (model.num_experts); docs/training.md", kAny,
       {"llama", "qwen2", "qwen3", "olmo2", "smollm3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
        "qwen2_moe", "qwen3_moe"}},
      {"model.hidden_size", LOOM_FIELD(model.hidden_size), "required", "features",
       "width of the residual stream (HF hidden_size)", kPositive},
      {"model.intermediate_size", LOOM_FIELD(model.intermediate_size), "required", "features",
       "width of the SwiGLU MLP (HF intermediate_size)", kPositive},
      {"model.num_layers", LOOM_FIELD(model.num_layers), "required", "layers",
       "number of decoder layers (HF num_hidden_layers)", kPositive},
      {"model.num_heads", LOOM_FIELD(model.num_heads), "required", "heads",
       "attention query heads (HF num_attention_heads)", kPositive},
      {"model.num_kv_heads", LOOM_FIELD(model.num_kv_heads), "", "heads",
       "key/value heads for grouped-query attention; must divide num_heads; 0 = num_heads (HF num_key_value_heads)",
       kNonNegative},
      {"model.head_dim", LOOM_FIELD(model.head_dim), "", "features",
       "width of one attention head; 0 = hidden_size / num_heads (HF head_dim)", kNonNegative},
      {"model.vocab_size", LOOM_FIELD(model.vocab_size), "required", "tokens",
       "rows of the embedding table; at least the tokenizer's vocabulary (HF vocab_size)", kPositive},
      {"model.max_seq_len", LOOM_FIELD(model.max_seq_len), "", "tokens",
       "longest sequence the model is built for (HF max_position_embeddings)", kAtLeastOne},
      {"model.rope_theta", LOOM_FIELD(model.rope_theta), "", "",
       "base of the rotary embedding frequencies (HF rope_theta)", kPositive},
      {"model.rope_scaling", {}, "none", "",
       "rotary frequency scaling: null or none, or a map of the model.rope_scaling.* keys (HF rope_scaling)"},
      {"model.rope_scaling.type", LOOM_FIELD(model.rope_scaling.type), "", "",
       "scaling method (transformers' formulas, docs/training.md); HF's spelling rope_type is accepted too", kAny,
       {"none", "llama3", "linear", "yarn", "dynamic", "longrope"}},
      {"model.rope_scaling.factor", LOOM_FIELD(model.rope_scaling.factor), "", "",
       "context extension factor (>= 1 for llama3, linear, yarn and dynamic)", kPositive},
      {"model.rope_scaling.low_freq_factor", LOOM_FIELD(model.rope_scaling.low_freq_factor), "", "",
       "llama3: wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully", kPositive},
      {"model.rope_scaling.high_freq_factor", LOOM_FIELD(model.rope_scaling.high_freq_factor), "", "",
       "llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept; > low_freq_factor",
       kPositive},
      {"model.rope_scaling.original_max_position_embeddings",
       LOOM_FIELD(model.rope_scaling.original_max_position_embeddings), "", "tokens",
       "llama3, yarn, longrope: context length the model was pretrained with", kAtLeastOne},
      {"model.rope_scaling.attention_factor", LOOM_FIELD(model.rope_scaling.attention_factor), "", "",
       "yarn, longrope: factor on cos and sin; 0 = derived from factor (and mscale) as transformers does",
       kNonNegative},
      {"model.rope_scaling.beta_fast", LOOM_FIELD(model.rope_scaling.beta_fast), "", "rotations",
       "yarn: dims turning more often than this over the original context keep their frequency", kPositive},
      {"model.rope_scaling.beta_slow", LOOM_FIELD(model.rope_scaling.beta_slow), "", "rotations",
       "yarn: dims turning less often than this are divided by factor", kPositive},
      {"model.rope_scaling.mscale", LOOM_FIELD(model.rope_scaling.mscale), "", "",
       "yarn: with mscale_all_dim, the attention factor is mscale(factor, mscale) / mscale(factor, "
       "mscale_all_dim); 0 = absent", kNonNegative},
      {"model.rope_scaling.mscale_all_dim", LOOM_FIELD(model.rope_scaling.mscale_all_dim), "", "",
       "yarn: see mscale; 0 = absent", kNonNegative},
      {"model.rope_scaling.truncate", LOOM_FIELD(model.rope_scaling.truncate), "", "",
       "yarn: round the interpolation ramp's ends to whole dims"},
      {"model.rope_scaling.short_factor", LOOM_FIELD(model.rope_scaling.short_factor), "", "",
       "longrope: head_dim / 2 divisors of the frequencies for sequences up to original_max_position_embeddings",
       kPositive},
      {"model.rope_scaling.long_factor", LOOM_FIELD(model.rope_scaling.long_factor), "", "",
       "longrope: head_dim / 2 divisors of the frequencies for longer sequences", kPositive},
      {"model.rms_norm_eps", LOOM_FIELD(model.rms_norm_eps), "", "", "epsilon inside RMSNorm (HF rms_norm_eps)",
       kPositive},
      {"model.tie_embeddings", LOOM_FIELD(model.tie_embeddings), "", "",
       "lm_head shares the embedding matrix (HF tie_word_embeddings)"},
      {"model.attention_bias", LOOM_FIELD(model.attention_bias), "", "",
       "bias on q/k/v/o projections (HF attention_bias; qwen2 always has q/k/v biases)"},
      {"model.mlp_bias", LOOM_FIELD(model.mlp_bias), "", "", "bias on the MLP projections (HF mlp_bias)"},
      {"model.init_std", LOOM_FIELD(model.init_std), "", "",
       "standard deviation of the random weight init (HF initializer_range)", kPositive},
      {"model.init_from", LOOM_FIELD(model.init_from), "", "",
       "Hugging Face model folder to start from instead of random init; its config.json supplies any shape key "
       "left out here"},
      {"model.resize_vocab", LOOM_FIELD(model.resize_vocab), "", "tokens",
       "grow model.init_from's embedding and head to this many rows for tokens a fine-tune adds; new rows start "
       "at the mean of the old ones; 0 = keep the vocabulary", kNonNegative},
      {"model.bos_token_id", LOOM_FIELD(model.bos_token_id), "", "", "beginning-of-sequence token id; -1 = none",
       kTokenId},
      {"model.eos_token_id", LOOM_FIELD(model.eos_token_id), "", "", "end-of-sequence token id; -1 = none",
       kTokenId},
      {"model.recompute", LOOM_FIELD(model.recompute), "", "",
       "activation recomputation: full = keep only each decoder layer's input and recompute the layer in "
       "backward (less memory, about a third more compute); selective = recompute only the attention core "
       "(softmax(QK^T)V) in backward, keeping the projections' inputs and outputs (Megatron's selective mode); "
       "none = keep all activations", kAny, {"none", "selective", "full"}},
      {"model.nope_layers", LOOM_FIELD(model.nope_layers), "", "layers",
       "smollm3: decoder layers (0-based) whose attention uses no rotary embedding (HF no_rope_layers holds 0 "
       "for them)", kNonNegative},
      {"model.sliding_window", LOOM_FIELD(model.sliding_window), "", "tokens",
       "sliding-window attention: a query sees itself and the sliding_window - 1 tokens before it, on the layers "
       "model.layer_types names (every layer when it is empty); 0 = full attention (HF sliding_window; mistral, "
       "qwen2, qwen3, smollm3, gemma2, gemma3_text, phi3)", kNonNegative},
      {"model.hidden_act", LOOM_FIELD(model.hidden_act), "", "",
       "the MLP's activation: silu (SwiGLU; every family but gemma) or gelu_pytorch_tanh / gelu (GeGLU; the gemma "
       "families); \"\" = the family's own (HF hidden_act, hidden_activation)", kAny,
       {"\"\"", "silu", "gelu_pytorch_tanh", "gelu"}},
      {"model.attn_logit_softcapping", LOOM_FIELD(model.attn_logit_softcapping), "", "",
       "gemma2, gemma3_text: attention scores s become cap * tanh(s / cap); 0 = none", kNonNegative},
      {"model.final_logit_softcapping", LOOM_FIELD(model.final_logit_softcapping), "", "",
       "gemma2, gemma3_text: output logits x become cap * tanh(x / cap); 0 = none", kNonNegative},
      {"model.query_pre_attn_scalar", LOOM_FIELD(model.query_pre_attn_scalar), "", "",
       "gemma2, gemma3_text: attention scores scaled by its -1/2 power instead of head_dim's; 0 = head_dim",
       kNonNegative},
      {"model.rope_local_theta", LOOM_FIELD(model.rope_local_theta), "", "",
       "gemma3_text: rotary theta of the sliding-window layers, which take no rope scaling (HF "
       "rope_local_base_freq); 0 = one rotary for every layer", kNonNegative},
      {"model.num_experts", LOOM_FIELD(model.num_experts), "", "experts",
       "mixtral, qwen2_moe, qwen3_moe: routed experts per sparse layer (HF num_local_experts, num_experts); 0 = "
       "dense", kNonNegative},
      {"model.num_experts_per_tok", LOOM_FIELD(model.num_experts_per_tok), "", "experts",
       "experts each token is routed to, the top k of the router's softmax (HF num_experts_per_tok)", kNonNegative},
      {"model.moe_intermediate_size", LOOM_FIELD(model.moe_intermediate_size), "", "features",
       "qwen2_moe, qwen3_moe: width of one expert's SwiGLU (HF moe_intermediate_size; mixtral's experts are "
       "model.intermediate_size wide)", kNonNegative},
      {"model.shared_expert_intermediate_size", LOOM_FIELD(model.shared_expert_intermediate_size), "", "features",
       "qwen2_moe: width of the shared expert every token also passes through, scaled by a sigmoid gate (HF "
       "shared_expert_intermediate_size); 0 = none", kNonNegative},
      {"model.norm_topk_prob", LOOM_FIELD(model.norm_topk_prob), "", "",
       "qwen2_moe, qwen3_moe: divide the k kept routing weights by their sum (HF norm_topk_prob; mixtral always does)"},
      {"model.router_aux_loss_coef", LOOM_FIELD(model.router_aux_loss_coef), "", "",
       "the load-balancing loss's weight in the training loss when model.output_router_logits is set (HF "
       "router_aux_loss_coef); with model.init_from the folder's unless given here", kNonNegative},
      {"model.output_router_logits", LOOM_FIELD(model.output_router_logits), "", "",
       "mixtral, qwen2_moe, qwen3_moe: add router_aux_loss_coef times the load-balancing loss, per sequence and "
       "sparse layer, to the training loss (HF output_router_logits; docs/training.md); with model.init_from the "
       "folder's unless given here"},
      {"model.decoder_sparse_step", LOOM_FIELD(model.decoder_sparse_step), "", "layers",
       "qwen2_moe, qwen3_moe: layer i has experts when (i + 1) is a multiple of it (HF decoder_sparse_step)",
       kAtLeastOne},
      {"model.mlp_only_layers", LOOM_FIELD(model.mlp_only_layers), "", "layers",
       "qwen2_moe, qwen3_moe: decoder layers (0-based) that keep a dense MLP of model.intermediate_size (HF "
       "mlp_only_layers)", kNonNegative},
      {"model.layer_types", LOOM_FIELD(model.layer_types), "", "",
       "attention of each decoder layer, full_attention or sliding_attention (HF layer_types); empty = every "
       "layer sliding when model.sliding_window > 0"},

      // --- parallel: world = dp * cp * pp * tp --------------------------------
      {"parallel.dp", LOOM_FIELD(parallel.dp), "", "ranks",
       "data-parallel replicas; auto = launch.ranks / (cp * pp * tp)", kNonNegative, {}, /*accepts_auto=*/true},
      {"parallel.tp", LOOM_FIELD(parallel.tp), "", "ranks",
       "tensor-parallel ranks; must divide num_heads and num_kv_heads", kAtLeastOne},
      {"parallel.pp", LOOM_FIELD(parallel.pp), "", "stages", "pipeline stages; at most num_layers", kAtLeastOne},
      {"parallel.cp", LOOM_FIELD(parallel.cp), "", "ranks",
       "context-parallel ranks: each sequence split over them in 2 * cp zig-zag chunks, attention by ring; "
       "seq_len divisible by 2 * cp",
       kAtLeastOne},
      {"parallel.ep", LOOM_FIELD(parallel.ep), "", "ranks",
       "expert-parallel ranks carved out of dp: each sparse layer's experts split over them, tokens exchanged "
       "by all-to-all; must divide dp and model.num_experts; with ZeRO stages 1 and 2 (the experts' state "
       "sharded over the dp / ep ranks that hold them), not yet stage 3",
       kAtLeastOne},
      {"parallel.sequence_parallel", LOOM_FIELD(parallel.sequence_parallel), "", "",
       "Megatron sequence parallelism: norms and residual activations split along the sequence over the tp "
       "group; needs tp > 1"},
      {"parallel.pp_schedule", LOOM_FIELD(parallel.pp_schedule), "", "",
       "pipeline schedule: all-forward-all-backward, 1F1B, or interleaved 1F1B", kAny,
       {"afab", "1f1b", "interleaved"}},
      {"parallel.virtual_stages", LOOM_FIELD(parallel.virtual_stages), "", "stages",
       "model chunks per pipeline rank; > 1 only with pp_schedule interleaved", kAtLeastOne},
      {"parallel.zero_stage", LOOM_FIELD(parallel.zero_stage), "", "",
       "0: replicated optimizer state; 1: optimizer state sharded over dp (ZeRO-1); 2: and the averaged "
       "gradients, reduce-scattered per decoder layer while backward runs (ZeRO-2); 3: and the parameters, "
       "gathered per decoder layer before its forward and backward and freed after (ZeRO-3, FSDP-style)",
       kAny, {"0", "1", "2", "3"}},
      {"parallel.bucket_mb", LOOM_FIELD(parallel.bucket_mb), "", "MiB",
       "size of the gradient buckets all-reduced while backward runs", kPositive},
      {"parallel.reduce_dtype", LOOM_FIELD(parallel.reduce_dtype), "", "",
       "dtype the dp gradient buckets are averaged in: fp32, or bf16 (the gradients rounded to bf16 first; half "
       "the bytes where the backend reduces bf16, as NCCL does; MPI sums them in fp32 and rounds the average)",
       kAny, kPrecisions},
      {"parallel.comm_timeout", LOOM_FIELD(parallel.comm_timeout), "", "s",
       "hang watchdog: a collective or send/recv that has not completed after this long ends the job (MPI_Abort) "
       "with a message naming the operation, the group and the ranks waited for; must cover a checkpoint write",
       kPositive},
      {"parallel.comm_timeout_first_step", LOOM_FIELD(parallel.comm_timeout_first_step), "", "s",
       "parallel.comm_timeout until the first step of a `loom train` is done (start-up, loading a checkpoint, "
       "the first step's warm-up)", kPositive},
      {"parallel.device_backend", LOOM_FIELD(parallel.device_backend), "", "",
       "what carries the model's device tensors between ranks: nccl (on CUDA; the CPU uses MPI), or mpi_staged, "
       "a TEST-ONLY backend that copies them through host memory and MPI so that several ranks can share one GPU "
       "(slow)", kAny, {"nccl", "mpi_staged"}},

      // --- data ---------------------------------------------------------------
      {"data.train", LOOM_FIELD(data.train), "", "",
       "training datasets (folders made by `loom prepare`): a list of {path, weight} maps or plain paths "
       "(weight 1); weights are relative sampling rates"},
      {"data.valid", LOOM_FIELD(data.valid), "", "", "validation dataset folder; \"\" = none"},
      {"data.valid_interval", LOOM_FIELD(data.valid_interval), "", "steps",
       "validation loss every this many steps (and after the last step) when data.valid is set; 0 = only after "
       "the last step", kNonNegative},
      {"data.valid_batches", LOOM_FIELD(data.valid_batches), "", "micro-batches",
       "micro-batches of batch.micro_batch_size sequences per validation pass, always the same ones",
       kAtLeastOne},
      {"data.seq_len", LOOM_FIELD(data.seq_len), "", "tokens",
       "tokens per training sequence; 0 = model.max_seq_len", kNonNegative},
      {"data.tokenizer", LOOM_FIELD(data.tokenizer), "", "", "Hugging Face tokenizer.json used by the datasets"},
      {"data.check_shard_files", LOOM_FIELD(data.check_shard_files), "", "",
       "check each shard file before this process's HDF5 library reads it, the first time this rank needs it: "
       "its CRC-32C against index.json, then a probe process opens and reads the shard first, so that a damaged "
       "or malformed file is refused instead of crashing or hanging the run; each rank checks only the shards it "
       "reads; auto = for datasets of at most 4 GiB (the checks read every shard a rank reads)",
       kAny, {"auto", "always", "never"}},
      {"data.document_mask", LOOM_FIELD(data.document_mask), "", "",
       "packed documents attend only within themselves: rotary positions restart at 0 at each document start "
       "and the position whose target starts the next document leaves the loss"},
      {"data.allow_tokenizer_mismatch", LOOM_FIELD(data.allow_tokenizer_mismatch), "", "",
       "train on datasets whose tokenizer_hash differs from the model's tokenizer (model.init_from's "
       "tokenizer.json or data.tokenizer); refused otherwise"},

      // --- batch ----------------------------------------------------------------
      {"batch.micro_batch_size", LOOM_FIELD(batch.micro_batch_size), "", "sequences",
       "sequences per rank per forward pass", kAtLeastOne},
      {"batch.global_batch_size", LOOM_FIELD(batch.global_batch_size), "", "sequences",
       "sequences per optimizer step, a multiple of micro_batch_size * dp (gradient accumulation makes up the "
       "rest); 0 = micro_batch_size * dp",
       kNonNegative},

      // --- optimizer (AdamW) ----------------------------------------------------
      {"optimizer.lr", LOOM_FIELD(optimizer.lr), "", "", "peak learning rate", kPositive},
      {"optimizer.betas", LOOM_FIELD(optimizer.betas), "", "", "AdamW [beta1, beta2]; each in [0, 1)",
       kBetaRange},
      {"optimizer.eps", LOOM_FIELD(optimizer.eps), "", "", "AdamW epsilon", kPositive},
      {"optimizer.weight_decay", LOOM_FIELD(optimizer.weight_decay), "", "",
       "decoupled weight decay (not applied to norms and biases)", kNonNegative},
      {"optimizer.clip_grad_norm", LOOM_FIELD(optimizer.clip_grad_norm), "", "",
       "clip the global gradient L2 norm to this; 0 = no clipping", kNonNegative},
      {"optimizer.decay_embeddings", LOOM_FIELD(optimizer.decay_embeddings), "", "",
       "apply weight decay to model.embed_tokens and lm_head as well (norms and biases are never decayed)"},
      {"optimizer.nonfinite_policy", LOOM_FIELD(optimizer.nonfinite_policy), "", "",
       "a step whose loss (any micro-batch) or gradient norm is NaN/Inf: stop = end the run (exit 1) before the "
       "update; skip = zero the gradients, skip the update and the batch, and go on", kAny, {"stop", "skip"}},
      {"optimizer.max_skipped_steps", LOOM_FIELD(optimizer.max_skipped_steps), "", "steps",
       "skip policy: non-finite steps skipped in the whole run (kept across resume) before the run stops; loss "
       "spikes skipped count too", kNonNegative},
      {"optimizer.loss_spike_policy", LOOM_FIELD(optimizer.loss_spike_policy), "", "",
       "a step whose loss exceeds loss_spike_factor x the mean of the last loss_spike_window steps: none = train "
       "on; skip = zero the gradients, skip the update and the batch (as nonfinite_policy skip); rollback = "
       "reload the last checkpoint and skip that step's batch when it comes again", kAny,
       {"none", "skip", "rollback"}},
      {"optimizer.loss_spike_factor", LOOM_FIELD(optimizer.loss_spike_factor), "", "",
       "a loss above this multiple of the running mean is a spike; > 1", kPositive},
      {"optimizer.loss_spike_window", LOOM_FIELD(optimizer.loss_spike_window), "", "steps",
       "steps in the running mean; no step is checked before the window is full (it starts empty at every "
       "start and resume)", kAtLeastOne},
      {"optimizer.max_loss_spike_rollbacks", LOOM_FIELD(optimizer.max_loss_spike_rollbacks), "", "rollbacks",
       "rollback policy: rollbacks in the whole run (kept across resume) before a spike stops the run",
       kNonNegative},

      // --- schedule -------------------------------------------------------------
      {"schedule.train_steps", LOOM_FIELD(schedule.train_steps), "", "steps",
       "optimizer steps to train; must be set (> 0) to train", kNonNegative},
      {"schedule.warmup_steps", LOOM_FIELD(schedule.warmup_steps), "", "steps",
       "linear warmup: step s < warmup_steps uses lr * (s + 1) / warmup_steps; at most train_steps", kNonNegative},
      {"schedule.decay", LOOM_FIELD(schedule.decay), "", "",
       "shape after warmup down to min_lr_ratio * lr (wsd: constant, then linear decay over the last 20%)", kAny,
       {"cosine", "linear", "wsd", "constant"}},
      {"schedule.min_lr_ratio", LOOM_FIELD(schedule.min_lr_ratio), "", "",
       "final learning rate as a fraction of optimizer.lr", kFraction},

      // --- precision --------------------------------------------------------------
      {"precision.compute", LOOM_FIELD(precision.compute), "", "", "dtype of matmuls and activations", kAny,
       kPrecisions},
      {"precision.params", LOOM_FIELD(precision.params), "", "",
       "dtype of the parameters on the device: fp32, or bf16 (with precision.compute bf16; AdamW keeps fp32 "
       "master weights and moments, and checkpoints store the fp32 masters)", kAny, kPrecisions},
      {"precision.grad_accum", LOOM_FIELD(precision.grad_accum), "", "",
       "with precision.params bf16: sum the gradients of a step's micro-batches in fp32 (beside the masters) or "
       "in the parameters' own bf16 gradients", kAny, kPrecisions},

      // --- checkpoint ---------------------------------------------------------------
      {"checkpoint.enabled", LOOM_FIELD(checkpoint.enabled), "", "",
       "false: write no checkpoints (a benchmark or throwaway run; a stopped run cannot resume)"},
      {"checkpoint.interval", LOOM_FIELD(checkpoint.interval), "", "steps",
       "save every this many steps; 0 = only at the end", kNonNegative},
      {"checkpoint.keep_last", LOOM_FIELD(checkpoint.keep_last), "", "checkpoints",
       "older checkpoints are deleted once this many newer ones exist", kAtLeastOne},
      {"checkpoint.resume", LOOM_FIELD(checkpoint.resume), "", "",
       "auto: resume from <run>/checkpoints/latest when it exists; none: start fresh; or a checkpoint folder"},
      {"checkpoint.async", LOOM_FIELD(checkpoint.async), "", "",
       "write checkpoints from a background thread while training continues"},
      {"checkpoint.export_hf_at_end", LOOM_FIELD(checkpoint.export_hf_at_end), "", "",
       "write a Hugging Face model folder to <run>/hf/ when training ends"},
      {"checkpoint.export_dtype", LOOM_FIELD(checkpoint.export_dtype), "", "",
       "dtype of the weights in that folder (the checkpoints keep the training dtype)", kAny, kExportDtypes},

      // --- logging ----------------------------------------------------------------
      {"logging.interval", LOOM_FIELD(logging.interval), "", "steps", "log metrics every this many steps",
       kAtLeastOne},
      {"logging.peak_tflops", LOOM_FIELD(logging.peak_tflops), "", "TFLOP/s",
       "the peak mfu is relative to; 0 = the datasheet's dense peak for a known GPU (H100, H200, A100), else a "
       "measured matmul rate", kNonNegative},

      // --- profile ----------------------------------------------------------------
      {"profile.start_step", LOOM_FIELD(profile.start_step), "", "step",
       "profile the steps from this one on (numbered from 1, as metrics.jsonl's step) with the PyTorch (Kineto) "
       "profiler and write <run>/profile/trace.json and summary.txt; 0 = off", kNonNegative},
      {"profile.steps", LOOM_FIELD(profile.steps), "", "steps", "steps profiled from profile.start_step",
       kAtLeastOne},

      // --- fusion -----------------------------------------------------------------
      {"fusion.wgrad_accumulation", LOOM_FIELD(fusion.wgrad_accumulation), "", "",
       "with precision.compute bf16, fp32 parameters and one rank: each linear layer's weight-gradient GEMM adds "
       "its product straight into the fp32 gradient (on a GPU cuBLAS with an fp32 output and beta 1) instead of "
       "writing a bf16 gradient that a second kernel adds"},
      {"fusion.add_rmsnorm", LOOM_FIELD(fusion.add_rmsnorm), "", "",
       "with precision.compute bf16 and parallel.tp 1, for families whose attention output is added to the "
       "residual stream and then normalized by a plain RMSNorm (not olmo2 or the gemma families): that add and "
       "norm as one op (on a GPU one kernel forward and one backward, which also adds the residual path's "
       "gradient)"},
      {"fusion.clip_in_adamw", LOOM_FIELD(fusion.clip_in_adamw), "", "",
       "with optimizer.clip_grad_norm > 0 and without ZeRO: AdamW applies the clipping factor as it reads each "
       "gradient (on a GPU inside torch's fused AdamW kernel) instead of a pass of its own over the gradients"},

      // --- launch -----------------------------------------------------------------
      {"launch.ranks", LOOM_FIELD(launch.ranks), "", "processes",
       "MPI processes in the job; = dp * tp * pp", kAtLeastOne},
      {"launch.nodes", LOOM_FIELD(launch.nodes), "", "nodes", "machines the ranks are spread over", kAtLeastOne},
      {"launch.procs_per_node", LOOM_FIELD(launch.procs_per_node), "", "processes",
       "ranks per node; 0 = launch.ranks / launch.nodes", kNonNegative},
      {"launch.gpus_per_node", LOOM_FIELD(launch.gpus_per_node), "", "GPUs",
       "GPUs to request per node (Slurm --gpus-per-node); 0 = none", kNonNegative},
      {"launch.mpirun_args", LOOM_FIELD(launch.mpirun_args), "", "",
       "extra arguments for mpirun, e.g. [--oversubscribe]"},
      {"launch.env", LOOM_FIELD(launch.env), "", "",
       "environment variables for every rank (map NAME: value; --set launch.env.NAME=value adds one)"},
      {"launch.max_wall_time", LOOM_FIELD(launch.max_wall_time), "", "s",
       "wall-clock budget of one `loom train`: past it the ranks finish the step, checkpoint and exit 75 "
       "(requeue me), as on SIGTERM; 0 = no limit", kNonNegative},
      {"launch.job_end_margin", LOOM_FIELD(launch.job_end_margin), "", "s",
       "when the job's end time is known (LOOM_JOB_END_TIME, set by the Slurm batch script), the ranks checkpoint "
       "and exit 75 once one more step, one checkpoint save and this margin no longer fit before it", kNonNegative},
      {"launch.slurm.partition", LOOM_FIELD(launch.slurm.partition), "", "",
       "sbatch --partition; \"\" = the cluster's default"},
      {"launch.slurm.account", LOOM_FIELD(launch.slurm.account), "", "",
       "sbatch --account; \"\" = the user's default"},
      {"launch.slurm.time", LOOM_FIELD(launch.slurm.time), "", "HH:MM:SS", "sbatch --time limit"},
      {"launch.slurm.launcher", LOOM_FIELD(launch.slurm.launcher), "", "",
       "how the batch script starts the ranks", kAny, {"srun", "mpirun"}},
      {"launch.slurm.extra_args", LOOM_FIELD(launch.slurm.extra_args), "", "",
       "extra #SBATCH arguments, e.g. [--exclusive]"},
      {"launch.slurm.signal_lead", LOOM_FIELD(launch.slurm.signal_lead), "", "s",
       "sbatch --signal=B:USR1@N: the ranks checkpoint and stop N seconds before the time limit (a backstop: "
       "they stop by themselves earlier when a step and a save need longer, launch.job_end_margin); 0 = no signal",
       kNonNegative},
      {"launch.slurm.cpus_per_task", LOOM_FIELD(launch.slurm.cpus_per_task), "", "CPUs",
       "sbatch and srun --cpus-per-task, and the ranks' OMP_NUM_THREADS; 0 = the submitting host's cores / ranks "
       "per node", kNonNegative},
  };
}

// clang-format on
#undef LOOM_FIELD

// Hugging Face and loom spellings that are the same key.
const std::map<std::string, std::string, std::less<>> kAliases = {
    {"model.rope_scaling.rope_type", "model.rope_scaling.type"},
};

// Names users bring from config.json or other trainers: only for "did you mean".
const std::map<std::string, std::string, std::less<>> kHintsByLeaf = {
    {"num_hidden_layers", "model.num_layers"},
    {"num_attention_heads", "model.num_heads"},
    {"num_key_value_heads", "model.num_kv_heads"},
    {"tie_word_embeddings", "model.tie_embeddings"},
    {"max_position_embeddings", "model.max_seq_len"},
    {"initializer_range", "model.init_std"},
    {"learning_rate", "optimizer.lr"},
    {"world_size", "launch.ranks"},
};

const std::set<std::string, std::less<>> kSections = {
    "run",       "model",      "parallel", "data",   "batch",        "optimizer",         "schedule",
    "precision", "checkpoint", "logging",  "profile",      "fusion",       "launch",            "launch.slurm",
    "model.rope_scaling"};

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string_view leaf_of(std::string_view key) {
  size_t dot = key.rfind('.');
  return dot == std::string_view::npos ? key : key.substr(dot + 1);
}

std::string_view parent_of(std::string_view key) {
  size_t dot = key.rfind('.');
  return dot == std::string_view::npos ? std::string_view() : key.substr(0, dot);
}

std::string truncate(std::string text) {
  constexpr size_t kMax = 60;
  if (text.size() > kMax) text = text.substr(0, kMax) + "...";
  return text;
}

// Strings that a YAML reader would take for null, a bool or a number are
// written quoted so that every reader (PyYAML included) sees a string.
bool needs_quotes(const std::string& s) {
  if (s.empty()) return true;
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::set<std::string> kSpecial = {"~", "null", "true", "false", "yes", "no", "on", "off", "y", "n"};
  if (kSpecial.count(lower)) return true;
  // Anything that starts like a number (over-quoting is harmless).
  auto digit = [](char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; };
  if (digit(s[0])) return true;
  return (s[0] == '.' || s[0] == '+' || s[0] == '-') && s.size() > 1 && (digit(s[1]) || s[1] == '.');
}

// --- typed readers: every value is checked here, before it touches a field ---

const std::string& scalar_or_fail(const YAML::Node& v, const std::string& key, const std::string& where,
                                  const char* expected) {
  if (v.IsNull()) fail(where, key, "missing value", "nothing", expected);
  if (!v.IsScalar()) fail(where, key, "wrong type", describe_node(v), expected);
  return v.Scalar();
}

int64_t read_int(const YAML::Node& v, const std::string& key, const std::string& where) {
  const std::string& text = scalar_or_fail(v, key, where, "an integer");
  std::string_view digits = text;
  if (digits.size() > 1 && digits[0] == '+') digits.remove_prefix(1);
  int64_t value = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec == std::errc::result_out_of_range)
    fail(where, key, "integer out of range", truncate(text), "a 64-bit signed integer");
  if (ec != std::errc() || end != digits.data() + digits.size())
    fail(where, key, "not an integer", truncate(text), "an integer");
  return value;
}

uint64_t read_uint(const YAML::Node& v, const std::string& key, const std::string& where) {
  const std::string& text = scalar_or_fail(v, key, where, "a non-negative integer");
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec == std::errc::result_out_of_range)
    fail(where, key, "integer out of range", truncate(text), "a non-negative integer below 2^64");
  if (ec != std::errc() || end != text.data() + text.size())
    fail(where, key, "not a non-negative integer", truncate(text), "a non-negative integer");
  return value;
}

double read_float(const YAML::Node& v, const std::string& key, const std::string& where) {
  const std::string& text = scalar_or_fail(v, key, where, "a number");
  std::string_view digits = text;
  if (digits.size() > 1 && digits[0] == '+') digits.remove_prefix(1);
  double value = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec == std::errc::result_out_of_range) fail(where, key, "number out of range", truncate(text), "a finite number");
  if (ec != std::errc() || end != digits.data() + digits.size() || !std::isfinite(value))
    fail(where, key, "not a number", truncate(text), "a finite number such as 3e-4 or 0.1");
  return value;
}

bool read_bool(const YAML::Node& v, const std::string& key, const std::string& where) {
  const std::string& text = scalar_or_fail(v, key, where, "true or false");
  if (text == "true" || text == "True" || text == "TRUE") return true;
  if (text == "false" || text == "False" || text == "FALSE") return false;
  fail(where, key, "not a boolean", truncate(text), "true or false");
}

std::string read_string(const YAML::Node& v, const std::string& key, const std::string& where) {
  if (v.IsNull()) return "";  // `key:` with nothing after it, or `key: null`
  return scalar_or_fail(v, key, where, "a string");
}

// A list, or a single scalar standing for a list of one (handy with --set).
std::vector<YAML::Node> elements(const YAML::Node& v, const std::string& key, const std::string& where) {
  std::vector<YAML::Node> items;
  if (v.IsNull()) return items;
  if (v.IsScalar()) return {v};
  if (!v.IsSequence()) fail(where, key, "wrong type", describe_node(v), "a list");
  for (const YAML::Node& item : v) items.push_back(item);
  return items;
}

std::string indexed(const std::string& key, size_t i) { return key + "[" + std::to_string(i) + "]"; }

std::vector<DataSource> read_sources(const YAML::Node& v, const std::string& key, const std::string& where,
                                     const Origin& origin) {
  std::vector<DataSource> sources;
  std::vector<YAML::Node> items = elements(v, key, where);
  for (size_t i = 0; i < items.size(); ++i) {
    const YAML::Node& item = items[i];
    std::string item_key = indexed(key, i);
    std::string item_where = origin.of(item, v);
    DataSource source;
    if (item.IsScalar()) {
      source.path = item.Scalar();
    } else if (item.IsMap()) {
      std::set<std::string> seen;
      for (const auto& kv : item) {
        std::string name = kv.first.IsScalar() ? kv.first.Scalar() : describe_node(kv.first);
        std::string field_key = item_key + "." + name;
        std::string field_where = origin.of(kv.first);
        if (!seen.insert(name).second) fail(field_where, field_key, "key given twice in the same map");
        if (name == "path") {
          source.path = read_string(kv.second, field_key, origin.of(kv.second, kv.first));
        } else if (name == "weight") {
          source.weight = read_float(kv.second, field_key, origin.of(kv.second, kv.first));
          if (!(source.weight > 0))
            fail(field_where, field_key, "weight out of range", format_number(source.weight), "> 0");
        } else {
          fail(field_where, field_key, "unknown key", name, "path or weight");
        }
      }
      if (!seen.count("path"))
        fail(item_where, item_key + ".path", "missing path of a data source", describe_node(item),
             "{path: DATASET_FOLDER, weight: NUMBER}");
    } else {
      fail(item_where, item_key, "wrong type", describe_node(item), "a path or a {path, weight} map");
    }
    if (source.path.empty()) fail(item_where, item_key + ".path", "empty path", "\"\"", "a dataset folder");
    sources.push_back(source);
  }
  return sources;
}

// --- one overload per field type: read (type-checked), text, emit ------------------

void read(int64_t& out, const YAML::Node& v, const KeySpec& spec, const std::string& where, const Origin&) {
  if (spec.accepts_auto && v.IsScalar() && v.Scalar() == "auto") {
    out = 0;
    return;
  }
  int64_t value = read_int(v, spec.key, where);
  if (spec.accepts_auto && value < 1) fail(where, spec.key, "out of range", std::to_string(value), ">= 1 or auto");
  out = value;
}
void read(uint64_t& out, const YAML::Node& v, const KeySpec& spec, const std::string& where, const Origin&) {
  out = read_uint(v, spec.key, where);
}
void read(double& out, const YAML::Node& v, const KeySpec& spec, const std::string& where, const Origin&) {
  out = read_float(v, spec.key, where);
}
void read(bool& out, const YAML::Node& v, const KeySpec& spec, const std::string& where, const Origin&) {
  out = read_bool(v, spec.key, where);
}
void read(std::string& out, const YAML::Node& v, const KeySpec& spec, const std::string& where, const Origin&) {
  out = read_string(v, spec.key, where);
}
// optimizer.betas is a pair; longrope's factors are lists of any length
// (checked against head_dim by validation).
void read(std::vector<double>& out, const YAML::Node& v, const KeySpec& spec, const std::string& where,
          const Origin& origin) {
  if (!v.IsSequence()) fail(where, spec.key, "wrong type", describe_node(v), "a list of numbers");
  if (spec.key == "optimizer.betas" && v.size() != 2)
    fail(where, spec.key, "wrong type", describe_node(v) + (v.IsSequence() ? " of " + std::to_string(v.size()) : ""),
         "a list of 2 numbers, e.g. [0.9, 0.95]");
  std::vector<double> numbers;
  for (size_t i = 0; i < v.size(); ++i) numbers.push_back(read_float(v[i], indexed(spec.key, i), origin.of(v[i], v)));
  out = numbers;
}
void read(std::vector<int64_t>& out, const YAML::Node& v, const KeySpec& spec, const std::string& where,
          const Origin& origin) {
  std::vector<int64_t> integers;
  std::vector<YAML::Node> items = elements(v, spec.key, where);
  for (size_t i = 0; i < items.size(); ++i) integers.push_back(read_int(items[i], indexed(spec.key, i), origin.of(items[i], v)));
  out = integers;
}
void read(std::vector<std::string>& out, const YAML::Node& v, const KeySpec& spec, const std::string& where,
          const Origin& origin) {
  std::vector<std::string> strings;
  std::vector<YAML::Node> items = elements(v, spec.key, where);
  for (size_t i = 0; i < items.size(); ++i)
    strings.push_back(scalar_or_fail(items[i], indexed(spec.key, i), origin.of(items[i], v), "a string"));
  out = strings;
}
void read(std::map<std::string, std::string>& out, const YAML::Node& v, const KeySpec& spec, const std::string& where,
          const Origin& origin) {
  if (!v.IsNull() && !v.IsMap()) fail(where, spec.key, "wrong type", describe_node(v), "a map");
  std::map<std::string, std::string> entries;
  for (const auto& kv : v) {
    std::string name = scalar_or_fail(kv.first, spec.key, origin.of(kv.first), "a variable name");
    std::string entry_key = spec.key + "." + name;
    if (entries.count(name)) fail(origin.of(kv.first), entry_key, "key given twice in the same map");
    entries[name] = read_string(kv.second, entry_key, origin.of(kv.second, kv.first));
  }
  out = entries;
}
void read(std::vector<DataSource>& out, const YAML::Node& v, const KeySpec& spec, const std::string& where,
          const Origin& origin) {
  out = read_sources(v, spec.key, where, origin);
}

std::string text(int64_t v) { return std::to_string(v); }
std::string text(uint64_t v) { return std::to_string(v); }
std::string text(double v) { return format_number(v); }
std::string text(bool v) { return v ? "true" : "false"; }
std::string text(const std::string& v) { return v.empty() ? "\"\"" : v; }
std::string text(const DataSource& s) { return "{path: " + s.path + ", weight: " + text(s.weight) + "}"; }
std::string text(const std::pair<const std::string, std::string>& entry) { return entry.first + ": " + entry.second; }
std::string joined(const std::vector<std::string>& items) {
  std::string result;
  for (const std::string& item : items) result += (result.empty() ? "" : ", ") + item;
  return result;
}
template <class Container>
std::string text(const Container& items) {
  std::vector<std::string> parts;
  for (const auto& item : items) parts.push_back(text(item));
  constexpr bool is_map = std::is_same_v<Container, std::map<std::string, std::string>>;
  return (is_map ? "{" : "[") + joined(parts) + (is_map ? "}" : "]");
}

// "1.0e-05" rather than "1e-05": PyYAML (YAML 1.1) reads a float only with a dot.
std::string yaml_float(double value) {
  std::string text = format_number(value);
  if (text.find_first_of(".ein") != std::string::npos) {
    size_t e = text.find('e');
    if (e != std::string::npos && text.find('.') == std::string::npos) text.insert(e, ".0");
    return text;
  }
  return text + ".0";
}

void emit(YAML::Emitter& out, int64_t v) { out << v; }
void emit(YAML::Emitter& out, uint64_t v) { out << v; }
void emit(YAML::Emitter& out, double v) { out << yaml_float(v); }
void emit(YAML::Emitter& out, bool v) { out << v; }
void emit(YAML::Emitter& out, const std::string& s) {
  if (needs_quotes(s)) out << YAML::DoubleQuoted;
  out << s;
}
void emit(YAML::Emitter& out, const DataSource& s) {
  out << YAML::Flow << YAML::BeginMap << YAML::Key << "path" << YAML::Value;
  emit(out, s.path);
  out << YAML::Key << "weight" << YAML::Value;
  emit(out, s.weight);
  out << YAML::EndMap;
}
void emit(YAML::Emitter& out, const std::map<std::string, std::string>& entries) {
  out << YAML::BeginMap;
  for (const auto& [name, value] : entries) {
    out << YAML::Key << name << YAML::Value;
    emit(out, value);
  }
  out << YAML::EndMap;
}
template <class T>
void emit(YAML::Emitter& out, const std::vector<T>& items) {
  if constexpr (!std::is_same_v<T, DataSource>) out << YAML::Flow;  // [0.9, 0.95]; data sources one per line
  out << YAML::BeginSeq;
  for (const T& item : items) emit(out, item);
  out << YAML::EndSeq;
}

template <class T>
std::vector<double> numbers(const T&) {
  return {};
}
std::vector<double> numbers(int64_t v) { return {static_cast<double>(v)}; }
std::vector<double> numbers(uint64_t v) { return {static_cast<double>(v)}; }
std::vector<double> numbers(double v) { return {v}; }
std::vector<double> numbers(const std::vector<double>& v) { return v; }
std::vector<double> numbers(const std::vector<int64_t>& v) { return {v.begin(), v.end()}; }

template <class T>
const char* type_name(const T&) {
  return "list";
}
const char* type_name(int64_t) { return "int"; }
const char* type_name(uint64_t) { return "int"; }
const char* type_name(double) { return "float"; }
const char* type_name(bool) { return "bool"; }
const char* type_name(const std::string&) { return "string"; }
const char* type_name(const std::map<std::string, std::string>&) { return "map"; }

// The accessors take Config& so that one pointer type serves reading and
// writing; this is the one place a const Config is read through them.
template <class Accessor>
const auto& get(Accessor field, const Config& config) {
  return field(const_cast<Config&>(config));
}

template <class Accessor>
constexpr bool kIsSection = std::is_same_v<Accessor, std::monostate>;

}  // namespace

// --- Bounds, Origin, messages ---------------------------------------------------

std::string Bounds::describe() const {
  std::string lo_text = format_number(lo), hi_text = format_number(hi);
  if (std::isinf(hi)) return (lo_open ? "> " : ">= ") + lo_text;
  if (std::isinf(lo)) return (hi_open ? "< " : "<= ") + hi_text;
  return "in " + std::string(lo_open ? "(" : "[") + lo_text + ", " + hi_text + (hi_open ? ")" : "]");
}

std::string Origin::of(const YAML::Node& node, const YAML::Node& fallback) const {
  if (!override_arg.empty()) return override_arg;
  YAML::Mark mark = node.Mark();
  if ((node.IsNull() || mark.is_null()) && fallback.IsDefined()) mark = fallback.Mark();
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

std::string message(std::string_view where, std::string_view key, std::string_view what, std::string_view got,
                    std::string_view expected) {
  constexpr size_t kMaxKey = 100;  // a long multi-line scalar used as a key stays readable
  std::string key_text = key.size() > kMaxKey ? std::string(key.substr(0, kMaxKey)) + "..." : std::string(key);
  std::string text = std::string(where) + ": " + key_text + ": " + std::string(what);
  if (!got.empty() && !expected.empty()) {
    text += " (got " + std::string(got) + "; expected " + std::string(expected) + ")";
  } else if (!got.empty()) {
    text += " (got " + std::string(got) + ")";
  } else if (!expected.empty()) {
    text += " (expected " + std::string(expected) + ")";
  }
  // One line, whatever the YAML held: a quoted key or value may span lines.
  std::string line;
  for (char c : text) line += c == '\n' ? "\\n" : c == '\r' ? "\\r" : std::string(1, c);
  return line;
}

void fail(std::string_view where, std::string_view key, std::string_view what, std::string_view got,
          std::string_view expected) {
  throw BadInput(message(where, key, what, got, expected));
}

std::string describe_node(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      return truncate(node.Scalar());
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    default:
      return "nothing";
  }
}

std::string format_number(double value) {
  char buffer[64];
  auto [end, ec] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, end);
}

// --- the table ------------------------------------------------------------------

const std::vector<KeySpec>& key_specs() {
  static const std::vector<KeySpec> table = build_table();
  return table;
}

std::string_view canonical_key(std::string_view key) {
  auto alias = kAliases.find(key);
  return alias == kAliases.end() ? key : std::string_view(alias->second);
}

const KeySpec* find_key(std::string_view key) {
  key = canonical_key(key);
  for (const KeySpec& spec : key_specs()) {
    if (spec.key == key) return &spec;
  }
  return nullptr;
}

bool is_section(std::string_view key) { return kSections.count(key) > 0; }

std::string suggest_for_unknown(std::string_view key) {
  if (auto hint = kHintsByLeaf.find(leaf_of(key)); hint != kHintsByLeaf.end())
    return " (did you mean " + hint->second + "?)";
  std::vector<std::string> known;
  for (const KeySpec& spec : key_specs()) known.push_back(spec.key);
  for (const std::string& section : kSections) known.push_back(section);
  // The same name in another section ("model.seq_len" -> "data.seq_len") is as
  // likely a slip as a typo.
  std::string best;
  size_t best_distance = std::string::npos;
  for (const std::string& candidate : known) {
    size_t distance = edit_distance(key, candidate);
    if (leaf_of(candidate) == leaf_of(key) && parent_of(key).find('.') == std::string_view::npos) {
      distance = std::min<size_t>(distance, 2);
    }
    if (distance < best_distance) best_distance = distance, best = candidate;
  }
  if (best_distance <= std::max<size_t>(2, leaf_of(key).size() / 3)) return " (did you mean " + best + "?)";
  // No close match: list what the section does accept.
  std::string section(parent_of(key));
  std::vector<std::string> siblings;
  for (const std::string& candidate : known) {
    if (parent_of(candidate) == section) siblings.emplace_back(leaf_of(candidate));
  }
  if (siblings.empty()) return "";
  return " (known keys" + (section.empty() ? std::string() : " in " + section) + ": " + joined(siblings) + ")";
}

// --- reading, printing and writing fields -----------------------------------------

void set_field(Config& config, const KeySpec& spec, const YAML::Node& value, const std::string& where,
               const Origin& origin) {
  std::visit(
      [&](auto field) {
        if constexpr (kIsSection<decltype(field)>) {
          fail(where, spec.key, "internal: a section has no field of its own");
        } else {
          read(field(config), value, spec, where, origin);
        }
      },
      spec.field);
}

std::string format_value(const Config& config, const KeySpec& spec) {
  if (spec.key == "model.rope_scaling") return config.model.rope_scaling.type;
  return std::visit(
      [&](auto field) -> std::string {
        if constexpr (kIsSection<decltype(field)>) {
          return "";
        } else {
          const auto& value = get(field, config);
          if constexpr (std::is_same_v<std::decay_t<decltype(value)>, int64_t>) {
            if (spec.accepts_auto && value == 0) return "auto";
          }
          return text(value);
        }
      },
      spec.field);
}

std::vector<double> numeric_values(const Config& config, const KeySpec& spec) {
  return std::visit(
      [&](auto field) -> std::vector<double> {
        if constexpr (kIsSection<decltype(field)>) {
          return {};
        } else {
          return numbers(get(field, config));
        }
      },
      spec.field);
}

void emit_value(YAML::Emitter& out, const Config& config, const KeySpec& spec) {
  std::visit(
      [&](auto field) {
        if constexpr (kIsSection<decltype(field)>) {
          out << YAML::Null;
        } else {
          const auto& value = get(field, config);
          if constexpr (std::is_same_v<std::decay_t<decltype(value)>, int64_t>) {
            if (spec.accepts_auto && value == 0) {
              out << "auto";
              return;
            }
          }
          emit(out, value);
        }
      },
      spec.field);
}

}  // namespace loom::config_schema

namespace loom {

const std::vector<ConfigKeyInfo>& config_keys() {
  static const std::vector<ConfigKeyInfo> keys = [] {
    using namespace config_schema;
    const Config defaults;
    std::vector<ConfigKeyInfo> infos;
    for (const KeySpec& spec : key_specs()) {
      std::string type = std::visit(
          [&](auto field) -> std::string {
            if constexpr (kIsSection<decltype(field)>) {
              return "map";
            } else {
              return type_name(get(field, defaults));
            }
          },
          spec.field);
      std::string default_value = spec.default_text.empty() ? format_value(defaults, spec) : spec.default_text;
      infos.push_back({spec.key, type, default_value, spec.unit, spec.doc});
    }
    return infos;
  }();
  return keys;
}

}  // namespace loom
