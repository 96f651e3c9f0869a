#include "plan/layout.h"

#include <charconv>
#include <map>

#include "parallel/pipeline_schedule.h"
#include "parallel/topology.h"
#include "trainer/training.h"
#include "util/error.h"

namespace loom::plan {

Problem Problem::from_config(const Config& config) {
  Problem problem;
  problem.model = config.model;
  problem.seq_len = config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
  const int64_t dp = config.parallel.dp > 0 ? config.parallel.dp : 1;
  problem.global_batch = config.batch.global_batch_size > 0 ? config.batch.global_batch_size
                                                            : config.batch.micro_batch_size * dp;
  problem.bf16 = config.precision.compute == "bf16";
  problem.params_bf16 = config.precision.params == "bf16";
  problem.grad_accum_fp32 = config.precision.grad_accum == "fp32";
  problem.bucket_mb = config.parallel.bucket_mb;
  problem.host_is_device = config.run.device == "cpu";
  problem.checkpoint_async = config.checkpoint.enabled && config.checkpoint.async;
  return problem;
}

const char* recompute_name(Recompute recompute) {
  switch (recompute) {
    case Recompute::kNone:
      return "none";
    case Recompute::kSelective:
      return "selective";
    case Recompute::kFull:
      return "full";
  }
  return "none";
}

std::string Layout::describe() const {
  std::string out = "dp " + std::to_string(dp);
  if (cp > 1) out += " cp " + std::to_string(cp);
  if (ep > 1) out += " ep " + std::to_string(ep);
  out += " tp " + std::to_string(tp) + " pp " + std::to_string(pp);
  if (pp > 1) {
    out += " " + schedule;
    if (virtual_stages > 1) out += " v" + std::to_string(virtual_stages);
  }
  out += " mb " + std::to_string(micro_batch);
  if (zero_stage > 0) out += " zero" + std::to_string(zero_stage);
  if (sequence_parallel) out += " sp";
  if (recompute == Recompute::kFull) out += " recompute";
  if (recompute == Recompute::kSelective) out += " selective";
  return out;
}

std::vector<std::string> Layout::config_lines(bool set_flags) const {
  const std::vector<std::pair<std::string, std::string>> entries = {
      {"parallel.dp", std::to_string(dp)},
      {"parallel.cp", std::to_string(cp)},
      {"parallel.ep", std::to_string(ep)},
      {"parallel.tp", std::to_string(tp)},
      {"parallel.pp", std::to_string(pp)},
      {"parallel.pp_schedule", schedule},
      {"parallel.virtual_stages", std::to_string(virtual_stages)},
      {"parallel.zero_stage", std::to_string(zero_stage)},
      {"parallel.sequence_parallel", sequence_parallel ? "true" : "false"},
      {"batch.micro_batch_size", std::to_string(micro_batch)},
      {"model.recompute", recompute_name(recompute)},
  };
  std::vector<std::string> lines;
  for (const auto& [key, value] : entries) lines.push_back(set_flags ? "--set " + key + "=" + value : key + ": " + value);
  return lines;
}

void Layout::apply_to(Config& config) const {
  config.parallel.dp = dp;
  config.parallel.cp = cp;
  config.parallel.ep = ep;
  config.parallel.tp = tp;
  config.parallel.pp = pp;
  config.parallel.pp_schedule = schedule;
  config.parallel.virtual_stages = virtual_stages;
  config.parallel.zero_stage = zero_stage;
  config.parallel.sequence_parallel = sequence_parallel;
  config.batch.micro_batch_size = micro_batch;
  config.model.recompute = recompute_name(recompute);
}

Layout Layout::of(const Config& config, int64_t dp) {
  Layout layout;
  layout.dp = dp;
  layout.cp = config.parallel.cp;
  layout.ep = config.parallel.ep;
  layout.tp = config.parallel.tp;
  layout.pp = config.parallel.pp;
  layout.schedule = config.parallel.pp_schedule;
  layout.virtual_stages = config.parallel.virtual_stages;
  layout.zero_stage = config.parallel.zero_stage;
  layout.sequence_parallel = config.parallel.sequence_parallel;
  layout.micro_batch = config.batch.micro_batch_size;
  const std::string& recompute = config.model.recompute;
  layout.recompute = recompute == "full" ? Recompute::kFull
                     : recompute == "selective" ? Recompute::kSelective
                                                : Recompute::kNone;
  return layout;
}

Layout parse_layout(const std::string& text, const std::string& flag) {
  Layout layout;
  auto refuse = [&](const std::string& why) -> BadInput {
    return BadInput(flag + ": '" + text + "': " + why +
                    " (expected KEY=VALUE pairs separated by commas, keys dp, cp, ep, tp, pp, schedule, v, zero, mb, "
                    "recompute, sp; e.g. dp=2,tp=1,pp=2,schedule=1f1b,mb=2)");
  };
  auto integer = [&](const std::string& key, const std::string& value) {
    int64_t out = 0;
    auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), out);
    if (value.empty() || ec != std::errc() || end != value.data() + value.size() || out < 0) {
      throw refuse(key + " '" + value + "' is not a whole number");
    }
    return out;
  };
  auto boolean = [&](const std::string& key, const std::string& value) {
    if (value == "1" || value == "true") return true;
    if (value == "0" || value == "false") return false;
    throw refuse(key + " '" + value + "' is not 0/1");
  };
  auto recompute = [&](const std::string& value) {
    if (value == "1" || value == "true" || value == "full") return Recompute::kFull;
    if (value == "0" || value == "false" || value == "none") return Recompute::kNone;
    if (value == "selective") return Recompute::kSelective;
    throw refuse("recompute '" + value + "' is not 0/none, 1/full or selective");
  };
  size_t start = 0;
  while (start < text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(start, comma - start);
    start = comma + 1;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) throw refuse("'" + item + "' has no '='");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "dp") {
      layout.dp = integer(key, value);
    } else if (key == "cp") {
      layout.cp = integer(key, value);
    } else if (key == "ep") {
      layout.ep = integer(key, value);
    } else if (key == "tp") {
      layout.tp = integer(key, value);
    } else if (key == "pp") {
      layout.pp = integer(key, value);
    } else if (key == "schedule") {
      layout.schedule = value;
    } else if (key == "v") {
      layout.virtual_stages = integer(key, value);
    } else if (key == "zero") {
      layout.zero_stage = integer(key, value);
    } else if (key == "mb") {
      layout.micro_batch = integer(key, value);
    } else if (key == "recompute") {
      layout.recompute = recompute(value);
    } else if (key == "sp") {
      layout.sequence_parallel = boolean(key, value);
    } else {
      throw refuse("unknown key '" + key + "'");
    }
  }
  if (layout.dp < 1 || layout.cp < 1 || layout.ep < 1 || layout.tp < 1 || layout.pp < 1 || layout.micro_batch < 1 ||
      layout.virtual_stages < 1) {
    throw refuse("dp, cp, ep, tp, pp, v and mb must be at least 1");
  }
  if (layout.zero_stage > 3) throw refuse("zero must be 0, 1, 2 or 3");
  return layout;
}

namespace {

// Why the model and sequence of `problem` cannot be planned under
// parallel.cp `cp` ("" when they can): the zig-zag split's 2 x cp chunks
// (Note [zig-zag chunks] in parallel/context_parallel.h), and windows and
// soft-capping, which the trainer runs under cp but the ring model
// (plan/ring_model.h) does not price yet.
std::string context_parallel_problem(const Problem& problem, int64_t cp) {
  const std::string name = "parallel.cp " + std::to_string(cp);
  if (problem.model.sliding_window > 0) return name + ": loom plan does not model sliding windows under cp yet";
  if (problem.model.attn_logit_softcapping > 0) return name + ": loom plan does not model soft-capping under cp yet";
  if (problem.seq_len % (2 * cp) != 0) {
    return name + ": the sequence length (" + std::to_string(problem.seq_len) + ") is not divisible by 2 * cp (" +
           std::to_string(2 * cp) + ")";
  }
  return "";
}

}  // namespace

std::string layout_problem(const Problem& problem, const Layout& layout) {
  if (layout.world() != problem.gpus) {
    return "dp " + std::to_string(layout.dp) + (layout.cp > 1 ? " x cp " + std::to_string(layout.cp) : "") +
           " x tp " + std::to_string(layout.tp) + " x pp " + std::to_string(layout.pp) + " = " +
           std::to_string(layout.world()) + " ranks, not --gpus " + std::to_string(problem.gpus);
  }
  if (layout.cp > 1) {
    const std::string why = context_parallel_problem(problem, layout.cp);
    if (!why.empty()) return why;
    // The trainer runs it (ZeRO shards over the dp x cp ranks); the memory
    // and time models do not count that yet.
    if (layout.zero_stage > 0) {
      return "parallel.cp " + std::to_string(layout.cp) + ": loom plan does not model ZeRO with context parallelism yet";
    }
  }
  // What config's check_expert_parallel refuses at load (ep | dp and ep |
  // experts: ParallelDims::from_config below).
  if (layout.ep > 1) {
    const std::string ep = "parallel.ep " + std::to_string(layout.ep);
    if (!problem.model.moe()) return ep + ": parallel.ep needs a mixture of experts";
  }
  if (layout.tp > problem.gpus_per_node) {
    return "tp " + std::to_string(layout.tp) + " spans nodes of " + std::to_string(problem.gpus_per_node) +
           " GPUs (loom keeps a tensor-parallel group inside a node)";
  }
  // The refusals loom itself makes at start-up (ParallelDims::from_config,
  // make_pipe_schedule), on a config with this layout.
  Config config;
  config.model = problem.model;
  config.data.seq_len = problem.seq_len;
  config.batch.global_batch_size = problem.global_batch;
  config.precision.compute = problem.bf16 ? "bf16" : "fp32";
  config.precision.params = problem.params_bf16 ? "bf16" : "fp32";
  layout.apply_to(config);
  try {
    check_precision(config, ParallelDims::from_config(config, layout.world()));
    if (problem.global_batch % (layout.dp * layout.micro_batch) != 0) {
      return "batch.global_batch_size (" + std::to_string(problem.global_batch) + ") is not divisible by dp x micro-batch";
    }
    if (layout.pp > 1) make_pipe_schedule(layout.schedule, layout.pp, layout.micro_batches(problem), layout.virtual_stages);
  } catch (const BadInput& e) {
    return e.what();
  }
  if (layout.pp * layout.virtual_stages > problem.model.num_layers) {
    return "pp x virtual_stages (" + std::to_string(layout.pp * layout.virtual_stages) + ") exceeds model.num_layers (" +
           std::to_string(problem.model.num_layers) + ")";
  }
  return "";
}

std::vector<Layout> enumerate_layouts(const Problem& problem) {
  std::vector<Layout> layouts;
  for (int64_t cp = 1; cp <= problem.gpus; ++cp) {
    if (problem.gpus % cp != 0 || (cp > 1 && !context_parallel_problem(problem, cp).empty())) continue;
    const int64_t replica_ranks = problem.gpus / cp;  // dp x tp x pp
    for (int64_t tp = 1; tp <= problem.gpus_per_node; ++tp) {
      if (problem.gpus_per_node % tp != 0 || replica_ranks % tp != 0) continue;
      for (int64_t pp = 1; pp <= replica_ranks / tp; ++pp) {
        if ((replica_ranks / tp) % pp != 0) continue;
        const int64_t dp = replica_ranks / (tp * pp);
        std::vector<std::pair<std::string, int64_t>> schedules = {{"1f1b", 1}};
        if (pp > 1) schedules = {{"afab", 1}, {"1f1b", 1}, {"interleaved", 2}, {"interleaved", 4}};
        // Expert parallelism: blocks of ep dp ranks, for a mixture of experts without cp.
        std::vector<int64_t> eps = {1};
        for (int64_t ep = 2; ep <= dp && problem.model.moe() && cp == 1; ++ep) {
          if (dp % ep == 0 && problem.model.num_experts % ep == 0) eps.push_back(ep);
        }
        for (const int64_t ep : eps) {
          for (int64_t mb = 1; mb <= problem.global_batch / dp; mb *= 2) {
            for (const auto& [schedule, v] : schedules) {
              // ZeRO does not compose with cp in the plan yet.
              for (int64_t zero = 0; zero <= (dp > 1 && cp == 1 ? 3 : 0); ++zero) {
                for (const Recompute recompute : {Recompute::kNone, Recompute::kSelective, Recompute::kFull}) {
                  for (const bool sp : {false, true}) {
                    if (sp && tp == 1) continue;
                    Layout layout{dp, tp, pp, schedule, v, zero, mb, recompute, sp, cp, ep};
                    if (layout_problem(problem, layout).empty()) layouts.push_back(layout);
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  return layouts;
}

}  // namespace loom::plan
