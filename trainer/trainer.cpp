#include "trainer/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <stdexcept>

#include "optim/lr_schedule.h"
#include "trainer/dataset_tokenizer.h"
#include "trainer/device.h"
#include "trainer/step_policy.h"
#include "trainer/tensor_memory.h"
#include "trainer/validation.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int64_t sequence_length(const Config& config) {
  return config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
}

int64_t stop_step_of(const Config& config, const TrainOptions& options) {
  const int64_t train_steps = config.schedule.train_steps;
  return options.stop_after_step >= 0 ? std::min(options.stop_after_step, train_steps) : train_steps;
}

}  // namespace

namespace {

// Note [planted faults]
// For the tests of what one rank's failure does to a job (a CUDA
// out-of-memory, say): LOOM_TEST_FAULT=RANK:STEP makes world rank RANK throw
// at step STEP, after its forward and backward and before the gradients are
// reduced, so that its peers wait in collectives it never joins and its own
// gradient buckets may be in flight. The job must end at once with that
// rank's message first (docs/reliability.md). 0 when the variable does not
// name this rank; a malformed value is BadInput.
int64_t planted_fault_step(int world_rank) {
  const char* value = std::getenv("LOOM_TEST_FAULT");
  if (value == nullptr || *value == '\0') return 0;
  long long rank = -1, step = -1;
  char tail = 0;
  if (std::sscanf(value, "%lld:%lld%c", &rank, &step, &tail) != 2 || rank < 0 || step < 1) {
    throw BadInput(std::string("LOOM_TEST_FAULT='") + value + "': expected RANK:STEP (world rank, step >= 1)");
  }
  return rank == world_rank ? step : 0;
}

}  // namespace

Trainer::Trainer(Config& config, const TrainOptions& options, const TrainHooks* hooks)
    : config_(config),
      options_(options),
      hooks_(hooks),
      // parallel.dp auto resolves here; a layout that does not fit the world
      // size or the model is refused with the factors named.
      dims_(check_training_layout(config, options.world ? options.world->size() : 1)),
      // One rank writes the run folder, the metrics, checkpoints and the
      // export; the others take part in gathering what it writes.
      writer_(options.world == nullptr || options.world->rank() == 0),
      seq_len_(sequence_length(config)),
      train_steps_(config.schedule.train_steps),
      stop_step_(stop_step_of(config, options)),
      global_batch_(global_batch_of(config, dims_)),
      tokens_per_step_(global_batch_ * seq_len_),
      run_dir_(fs::path(config.run.output_dir) / config.run.name),
      log_(writer_, options.log, options.progress_bar) {
  // Every CPU tensor from here on is counted (mem_tensor_peak_bytes), so a
  // layout's memory can be compared with `loom plan`'s prediction.
  install_tensor_memory_counter();
  groups_ = TrainGroups::of(dims_, options.world, options.grid);
  // A dataset tokenized by another tokenizer than the model's is refused
  // before anything is built (Note [dataset tokenizer check]). Every rank
  // checks the same files, so every rank refuses alike.
  for (const std::string& warning : check_dataset_tokenizers(config, dataset_tokenizers_of(config))) {
    if (writer_) std::cerr << "loom: warning: " << warning << std::endl;
  }
  planted_fault_step_ = planted_fault_step(groups_.world ? groups_.world->rank() : 0);
  result_.run_dir = run_dir_.string();
  if (options.job_end_time > 0) job_end_.emplace(options.job_end_time, config.launch.job_end_margin);
  checkpoints_.emplace(config_, dims_, groups_);  // decided before anything is written
  device_ = resolve_device(config.run.device, options.node);
  groups_.use_device(device_, dims_, options.device_grid);
  bf16_ = config.precision.compute == "bf16";
  measure_peak();
  parts_ = build_model_parts(config_, dims_, groups_, device_);
  update_.emplace(config_, dims_, groups_, *parts_);
  open_loader();
  resume();
  make_forward_backward();
  open_run_folder();
  spike_guard_.emplace(config.optimizer, run_dir_.string());
  checkpoints_->start_saving(config_);
}

void Trainer::measure_peak() {
  peak_source_ = "logging.peak_tflops";
  if (config_.logging.peak_tflops > 0) {
    result_.peak_flops = config_.logging.peak_tflops * 1e12;
  } else if (device_.is_cuda()) {
    result_.peak_flops = datasheet_peak_flops(device_name(device_), bf16_);
    peak_source_ = "the datasheet's dense peak";
  }
  if (result_.peak_flops == 0 && options_.measure_peak) {
    result_.peak_flops = measure_matmul_peak_flops(device_, bf16_ ? torch::kBFloat16 : torch::kFloat);
    peak_source_ = "a measured matmul";
  }
}

void Trainer::open_loader() {
  LoaderConfig loader_config;
  for (const auto& source : config_.data.train) loader_config.datasets.push_back({source.path, source.weight});
  loader_config.seq_len = seq_len_;
  loader_config.seed = config_.run.seed;
  loader_config.global_batch = global_batch_;
  loader_config.micro_batch = config_.batch.micro_batch_size;
  loader_config.dp_rank = groups_.coords.dp;
  loader_config.dp_size = dims_.dp;
  loader_config.valid_path = config_.data.valid;
  loader_config.document_positions = config_.data.document_mask;
  loader_config.open_options = dataset_open_options(config_);
  loader_config.opened = options_.datasets;
  loader_.emplace(loader_config);
  micro_batches_ = loader_->micro_batches_per_step();
  for (size_t d = 0; d < config_.data.train.size(); ++d) {
    if (loader_->dataset(d).vocab_size() > config_.model.vocab_size) {
      throw BadInput(config_.data.train[d].path + ": dataset vocab_size " +
                     std::to_string(loader_->dataset(d).vocab_size()) + " exceeds model.vocab_size " +
                     std::to_string(config_.model.vocab_size));
    }
  }
}

void Trainer::resume() {
  const RunCheckpoints::Resumed resumed = checkpoints_->resume(*parts_, *update_, *loader_, train_steps_);
  step_ = resumed.step;
  skipped_steps_ = resumed.skipped_steps;
  result_.resumed_from_step = step_;
}

void Trainer::make_forward_backward() {
  if (config_.model.moe() && config_.model.output_router_logits) {
    // Note [load-balancing loss]: the weight that makes the replicas'
    // averaged gradients coef times the mean over the step's rows and the
    // sparse layers (a cp rank's term covers its share of the rows' tokens).
    int64_t sparse_layers = 0;
    for (int64_t layer = 0; layer < config_.model.num_layers; ++layer) sparse_layers += config_.model.sparse_layer(layer);
    const double rows = static_cast<double>(config_.batch.micro_batch_size * micro_batches_);
    const double weight = config_.model.router_aux_loss_coef * static_cast<double>(dims_.cp) /
                          (static_cast<double>(std::max<int64_t>(sparse_layers, 1)) * rows);
    for (const auto& module : parts_->modules) set_balance_weight(*module, weight);
  }
  ForwardBackwardSetup setup;
  setup.device = device_;
  setup.device_backend = config_.parallel.device_backend;
  setup.bf16 = bf16_;
  setup.micro_batches = micro_batches_;
  setup.micro_batch = config_.batch.micro_batch_size;
  setup.seq_len = seq_len_;
  setup.hidden_size = config_.model.hidden_size;
  setup.sequence_parallel = config_.parallel.sequence_parallel;
  setup.gradient_of = [this](const torch::Tensor& param) -> torch::Tensor& { return update_->gradient_of(param); };
  forward_backward_ = groups_.pp != nullptr
                          ? make_pipeline_forward_backward(*parts_, groups_, setup)
                          : make_plain_forward_backward(*parts_->model, groups_, update_->sync(), setup);
}

// Only the writer has the run folder's files; the other ranks write nothing.
void Trainer::open_run_folder() {
  if (!writer_) return;
  fs::create_directories(run_dir_);
  write_file_atomic((run_dir_ / "config.yaml").string(), config_to_yaml(config_));
  checkpoints_->mark_resumed();
  log_.open_metrics(run_dir_.string(), step_);
}

RunHeader Trainer::header() const {
  RunHeader h;
  h.run_dir = run_dir_.string();
  h.parameters = count_parameters(config_.model);
  h.non_embedding_parameters = count_non_embedding_parameters(config_.model);
  h.layout = dims_.describe();
  h.device = device_name(device_);
  h.compute = config_.precision.compute;
  h.params = config_.precision.params;
  h.recompute = config_.model.recompute;
  h.global_batch = global_batch_;
  h.seq_len = seq_len_;
  h.micro_batches = micro_batches_;
  h.micro_batch = config_.batch.micro_batch_size;
  h.first_step = step_;
  h.stop_step = stop_step_;
  h.train_steps = train_steps_;
  h.resumed_from = checkpoints_->resume_from();
  h.adamw_state_mib = update_->unsharded_state_mib();
  if (const ShardedAdamW* zero = update_->zero()) {
    h.zero_dp = dims_.dp;
    h.zero_stage = zero->stage();
    // Under ep the experts' optimizer too (Note [ZeRO with expert parallelism]).
    if (dims_.ep > 1) h.zero_edp = dims_.dp / dims_.ep * dims_.cp;
    h.zero_state_mib = static_cast<double>(update_->zero_state_bytes()) / (1024.0 * 1024.0);
    h.zero_shard_mib = 4.0 * static_cast<double>(update_->zero_shard_numel()) / (1024.0 * 1024.0);
  }
  h.passed_over = checkpoints_->passed_over();
  h.peak_flops = result_.peak_flops;
  h.peak_source = peak_source_;
  return h;
}

TrainResult Trainer::run() {
  log_.header(header());
  run_start_ = Clock::now();
  profiler_.emplace(config_.profile, device_, run_dir_ / "profile", writer_);
  // bf16 weights cast once per step, gradients added straight into the fp32
  // .grad (model/compute_weights.h); on one rank only, as no reducer may
  // wait on the weights' accumulation hooks. fusion.wgrad_accumulation: by
  // the weight-gradient GEMM itself (Note [weight-gradient accumulation]).
  compute_weights_.emplace(bf16_ && dims_.world == 1, config_.fusion.wgrad_accumulation);
  // The memory peaks in metrics.jsonl are those of the steps, not of the
  // set-up before them (which may load a whole checkpoint on every rank).
  reset_peak_memory(device_);
  while (step_ < stop_step_) {
    const StepReport report = train_step();
    log_step(report);
    after_step();
    maybe_validate();
    const bool stopping = stop_agreed();
    maybe_checkpoint(stopping);
    if (stopping) {
      result_.stopped_by_signal = stop_requested_;
      break;
    }
    log_.progress(step_, stop_step_, seconds_since(run_start_), step_ - result_.resumed_from_step);
  }
  return finish();
}

StepReport Trainer::train_step() {
  profiler_->step_begin(step_ + 1);
  step_start_ = Clock::now();
  update_->zero_grad();
  StepReport report;
  if (config_.model.moe()) {
    // Note [router metrics]: this step's routing only; a validation's since
    // the last step is dropped here, on each rank, without a collective.
    for (const auto& module : parts_->modules) take_router_stats(*module, config_.model);
  }
  LossEdit edit;  // TrainHooks, in tests only
  if (hooks_ != nullptr && hooks_->poison_step) edit.poison = hooks_->poison_step(step_ + 1);
  if (hooks_ != nullptr && hooks_->scale_loss) edit.scale = hooks_->scale_loss(step_ + 1);
  // A stop request is honoured at the next step boundary: a checkpoint
  // cannot hold half-accumulated gradients, and dropping them would make
  // the resumed run differ. So the step is finished first.
  torch::Tensor step_loss = forward_backward_->run(*loader_, edit, report.samples,
                                                   [this](int64_t micro_done) { notice_stop_request(micro_done); });
  if (step_ + 1 == planted_fault_step_) {
    // Note [planted faults]: here the dp gradient buckets are in flight.
    throw std::runtime_error("planted fault (LOOM_TEST_FAULT) on world rank " +
                             std::to_string(groups_.world ? groups_.world->rank() : 0) + " at step " +
                             std::to_string(step_ + 1));
  }
  update_->reduce_gradients();
  if (groups_.dp != nullptr) {
    // The replicas' means over the same number of samples: their mean is
    // the global batch's.
    all_reduce_through_cpu(*groups_.dp, step_loss, ReduceOp::kAvg);
  }
  if (config_.model.moe()) {
    const RouterMetrics router = router_metrics(take_step_router_stats());
    report.moe = true;
    report.router_load_max_over_mean = router.load_max_over_mean;
    report.router_aux_loss = router.aux_loss;
    report.router_balance_loss = config_.model.output_router_logits ? router.balance_loss : -1.0;
  }
  // A NaN or inf in any micro-batch's loss makes the sum non-finite.
  report.loss = step_loss.item<double>();
  const int64_t loss_tokens = forward_backward_->last_loss_tokens();
  report.loss_tokens = loss_tokens >= 0 ? loss_tokens : tokens_per_step_;
  report.grad_norm = update_->clip(config_.optimizer.clip_grad_norm);

  StepFacts facts{step_ + 1, report.loss, report.grad_norm, spike_guard_->rolled_back(step_ + 1),
                  LossSpikeGuard::Action::kTrain, skipped_steps_};
  if (step_is_finite(facts) && !facts.rolled_back) facts.spike = spike_guard_->check(step_ + 1, report.loss);
  const StepVerdict verdict = decide_step(facts, config_.optimizer);
  switch (verdict.action) {
    case StepAction::kRollBack:
      spike_guard_->roll_back(step_ + 1, report.loss, report.samples, writer_);  // throws LossSpikeRollback
    case StepAction::kStop:
      // Not BadInput: the input is not known to be at fault (exit 1).
      throw std::runtime_error(stopped_step_message(facts, verdict, describe_samples(report.samples, 64),
                                                    checkpoints_->checkpoints_dir().string()));
    case StepAction::kSkip:
      report.loss_spike = verdict.loss_spike;
      report.rolled_back = facts.rolled_back;
      skip_step(report);
      break;
    case StepAction::kUpdate:
      update_step(report);
      break;
  }
  const double step_seconds = seconds_since(step_start_);
  interval_seconds_ += step_seconds;
  total_seconds_ += step_seconds;
  ++interval_steps_;
  return report;
}

RouterStats Trainer::take_step_router_stats() {
  RouterStats stats = zero_router_stats(config_.model);
  for (const auto& module : parts_->modules) stats.sums_lc += take_router_stats(*module, config_.model).sums_lc;
  // Every rank's layers and tokens: the pipeline stages hold different
  // layers, the dp replicas route different tokens.
  if (groups_.world != nullptr) all_reduce_through_cpu(*groups_.world, stats.sums_lc, ReduceOp::kSum);
  return stats;
}

// Drops the gradients and the update; the step and the data still advance,
// so the offending batch is not seen again.
void Trainer::skip_step(StepReport& report) {
  update_->zero_grad();
  ++skipped_steps_;
  ++step_;
  report.step = step_;
  report.skipped = true;
  report.skipped_steps = skipped_steps_;
  report.running_mean = spike_guard_->running_mean();
}

void Trainer::update_step(StepReport& report) {
  report.lr = learning_rate(config_.optimizer, config_.schedule, step_);
  update_->step(report.lr);
  compute_weights_->weights_changed();
  ++step_;
  report.step = step_;
  report.skipped_steps = skipped_steps_;
  result_.last_loss = report.loss;
}

void Trainer::log_step(const StepReport& report) {
  if (report.skipped) {
    log_.skipped_step(report, train_steps_, config_.optimizer.loss_spike_factor, config_.optimizer.max_skipped_steps);
    return;
  }
  if (step_ % config_.logging.interval != 0 && step_ != stop_step_) return;
  const IntervalReport interval = interval_report();
  const double eta = (stop_step_ - step_) * (interval_seconds_ / interval_steps_);
  log_.logged_step(report, interval, train_steps_, seconds_since(run_start_), eta);
  reset_peak_memory(device_);
  interval_seconds_ = 0.0;
  interval_steps_ = 0;
}

IntervalReport Trainer::interval_report() {
  IntervalReport r;
  r.tokens_per_s = interval_steps_ * tokens_per_step_ / std::max(interval_seconds_, 1e-9);
  r.mfu = mfu_of(r.tokens_per_s);
  r.tokens = step_ * tokens_per_step_;
  r.step_time_s = interval_seconds_ / interval_steps_;
  r.peak_flops = result_.peak_flops;
  const MemoryStats memory = memory_stats(device_);
  r.mem_peak_bytes = memory.peak_bytes;
  r.mem_reserved_bytes = memory.reserved_bytes;
  // Each rank's tensor peak (ranks of different pipeline stages hold
  // different amounts): collective over the world, at the same steps on
  // every rank.
  r.tensor_peaks = {static_cast<int64_t>(memory.tensor_peak_bytes)};
  if (options_.world != nullptr && options_.world->size() > 1) {
    torch::Tensor peaks = torch::zeros({options_.world->size()}, torch::kLong);
    peaks[options_.world->rank()] = r.tensor_peaks[0];
    all_reduce_through_cpu(*options_.world, peaks);
    r.tensor_peaks.assign(peaks.data_ptr<int64_t>(), peaks.data_ptr<int64_t>() + peaks.numel());
  }
  return r;
}

// Model FLOPs utilization of all the job's devices together.
double Trainer::mfu_of(double tokens_per_s) const {
  return result_.peak_flops > 0
             ? tokens_per_s * flops_per_token(config_.model, seq_len_) / (result_.peak_flops * dims_.world)
             : 0.0;
}

void Trainer::after_step() {
  log_.profiler_report(profiler_->step_end(step_));
  if (options_.on_step_done) options_.on_step_done(step_);
  // The pipeline's links wait as long as pp does (on_step_done may have
  // shortened it after the first step).
  if (groups_.pp != nullptr) forward_backward_->follow_timeout(groups_.pp->timeout());
}

void Trainer::maybe_validate() {
  if (!validation_due(config_, step_)) return;
  const auto start = Clock::now();
  const double valid_loss = validation_loss(*forward_backward_, *loader_, config_, dims_, groups_.dp);
  result_.last_valid_loss = valid_loss;
  log_.validation(step_, train_steps_, valid_loss, config_.data.valid_batches, seconds_since(start));
}

void Trainer::notice_stop_request(int64_t micro_done) {
  if (stop_requested_ != 0 || options_.stop_signal == nullptr) return;
  stop_requested_ = options_.stop_signal->load();
  if (stop_requested_ == 0) return;
  log_.stop_requested(stop_requested_, micro_done, micro_batches_, step_, config_.checkpoint.enabled);
}

bool Trainer::stop_agreed() {
  // A request that came after the last micro-batch's check.
  notice_stop_request(0);
  // Note [stopping before the job ends] (trainer/job_end.h): decided here on
  // each rank with its own times, agreed below like a signal.
  if (job_end_) {
    job_end_->record_iteration(seconds_since(step_start_));
    const double now = unix_seconds_now();
    // Not after the last step: the run ends there anyway, with its checkpoint.
    if (stop_requested_ == 0 && step_ < stop_step_ && job_end_->stop_now(now)) {
      stop_requested_ = kJobEndStop;
      log_.job_end_stop(step_, job_end_->end_time() - now, job_end_->step_seconds(), job_end_->save_seconds(),
                        config_.launch.job_end_margin, config_.checkpoint.enabled);
    }
  }
  // Every rank must stop at the same step (the others would wait for it in
  // the next collective): the signal may have reached them at different
  // moments, so they agree on the largest.
  if (options_.world != nullptr && options_.world->size() > 1) {
    torch::Tensor agreed = torch::tensor(static_cast<int64_t>(stop_requested_));
    all_reduce_through_cpu(*options_.world, agreed, ReduceOp::kMax);
    stop_requested_ = static_cast<int>(agreed.item<int64_t>());
  }
  return stop_requested_ != 0;
}

void Trainer::maybe_checkpoint(bool stopping) {
  const bool interval_due = config_.checkpoint.interval > 0 && step_ % config_.checkpoint.interval == 0;
  if (!config_.checkpoint.enabled || !(interval_due || step_ == stop_step_ || stopping)) return;
  const auto save_start = Clock::now();
  update_->gather_params();  // ZeRO-3: the checkpoint reads the parameters whole
  result_.last_checkpoint = checkpoints_->save(step_, skipped_steps_, *parts_, *update_, *loader_);
  update_->release_params();
  // The time the loop stood still for the save: with checkpoint.async only
  // the gather and the copy to host memory (and any wait for the previous
  // save); without, the whole write.
  const double stall = seconds_since(save_start);
  result_.checkpoint_stall_seconds += stall;
  // A stop's save costs the stall and (async) the background write it waits for at the end.
  if (job_end_) job_end_->record_save(stall + checkpoints_->last_background_write_seconds());
  log_.checkpoint(result_.last_checkpoint, stall, checkpoints_->async());
}

TrainResult Trainer::finish() {
  log_.end_progress();
  log_.close_metrics();
  if (checkpoints_->async()) {
    // The run is not over until its last checkpoint is committed; a write
    // that failed is reported here (its folder absent, `latest` unchanged).
    log_.checkpoint_written(result_.last_checkpoint, checkpoints_->wait());
  }
  result_.final_step = step_;
  const int64_t steps_here = step_ - result_.resumed_from_step;
  result_.tokens_per_s = total_seconds_ > 0 ? steps_here * tokens_per_step_ / total_seconds_ : 0.0;
  // ZeRO-3: the export and the caller read the parameters whole; training is over.
  update_->gather_params();
  if (step_ == train_steps_ && config_.checkpoint.export_hf_at_end) {
    checkpoints_->export_hub(step_, *parts_);
    log_.exported((run_dir_ / "hf").string());
  }
  log_.data_shards(loader_->shard_cache_stats());
  log_.summary({steps_here, step_, train_steps_, total_seconds_, result_.tokens_per_s, mfu_of(result_.tokens_per_s),
                result_.last_loss, result_.last_valid_loss, skipped_steps_, result_.last_checkpoint,
                (run_dir_ / "metrics.jsonl").string(), run_dir_.string()});
  // No rank returns (and ends the job) while the writer is still writing.
  if (options_.world != nullptr && options_.world->size() > 1) options_.world->barrier()->wait();
  result_.model = parts_->model;  // null with pipeline parallelism (no rank holds it all)
  return result_;
}

}  // namespace loom
