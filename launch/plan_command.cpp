// `loom plan CONFIG --gpus N --gpus-per-node G --gpu-memory GiB [--machine PROFILE]`:
// the config's valid parallel layouts on a cluster, with the predicted
// memory per rank, step time and MFU of each, best first, and the config
// lines of the best (plan/, docs/plan.md). `--layout SPEC` evaluates one
// given layout; `--json` prints machine-readable results; `--calibrate`
// measures this machine and writes a profile (launch/plan_calibrate.cpp).
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "launch/cli.h"
#include "launch/commands.h"
#include "plan/planner.h"
#include "config/config.h"
#include "model/llama.h"
#include "util/error.h"

namespace loom {

namespace {

using nlohmann::json;
using plan::Candidate;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string fixed(double value, int decimals) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", decimals, value);
  return buffer;
}

json candidate_json(const Candidate& c) {
  json ranks = json::array();
  for (const plan::RankMemory& r : c.memory.ranks) {
    ranks.push_back({{"pp_rank", r.pp_rank},
                     {"parameters", r.parameters},
                     {"params_bytes", r.params},
                     {"grads_bytes", r.grads},
                     {"optimizer_bytes", r.optimizer},
                     {"zero_buffers_bytes", r.zero_buffers},
                     {"zero_in_flight_bytes", r.zero_in_flight},
                     {"weight_cache_bytes", r.weight_cache},
                     {"activations_bytes", r.activations},
                     {"pipeline_buffers_bytes", r.pipeline_buffers},
                     {"transient_bytes", r.transient},
                     {"peak_bytes", r.peak},
                     {"peak_phase", r.peak_phase}});
  }
  const plan::Layout& l = c.layout;
  return {{"layout",
           {{"dp", l.dp}, {"cp", l.cp}, {"ep", l.ep}, {"tp", l.tp}, {"pp", l.pp}, {"schedule", l.schedule}, {"virtual_stages", l.virtual_stages},
            {"zero_stage", l.zero_stage}, {"micro_batch", l.micro_batch}, {"recompute", plan::recompute_name(l.recompute)},
            {"sequence_parallel", l.sequence_parallel}}},
          {"describe", l.describe()},
          {"fits", c.fits},
          {"peak_bytes", c.memory.peak},
          {"peak_pp_rank", c.memory.peak_pp_rank},
          {"ranks", ranks},
          {"step_s", c.time.total},
          {"compute_s", c.time.compute},
          {"tp_comm_s", c.time.tp_comm},
          {"zero_comm_s", c.time.zero_comm},
          {"cp_comm_s", c.time.cp_comm},
          {"ep_comm_s", c.time.ep_comm},
          {"pipeline_s", c.time.pipeline},
          {"bubble_s", c.time.bubble},
          {"dp_comm_s", c.time.dp_comm},
          {"optimizer_s", c.time.optimizer},
          {"tokens_per_s", c.time.tokens_per_s},
          {"mfu", c.time.mfu},
          {"checkpoint", {{"total_bytes", c.checkpoint.total_bytes}, {"rank_bytes", c.checkpoint.rank_bytes_max},
                          {"rank_bytes_by_world_rank", c.checkpoint.rank_bytes}, {"node_bytes", c.checkpoint.node_bytes},
                          {"node_read_bytes", c.checkpoint.node_read_bytes}, {"save_s", c.checkpoint.save_s},
                          {"load_s", c.checkpoint.load_s}}},
          {"host_memory", {{"training_bytes", c.host.training}, {"init_bytes", c.host.init},
                           {"resume_bytes", c.host.resume}, {"save_bytes", c.host.save},
                           {"async_bytes", c.host.async}, {"peak_bytes", c.host.peak},
                           {"peak_phase", c.host.peak_phase}}},
          {"config_lines", l.config_lines()}};
}

void print_table(const std::vector<Candidate>& shown) {
  std::printf("%3s  %-46s %9s %9s %8s %8s %8s %10s %6s %9s %8s %7s\n", "#", "layout", "mem GiB", "act GiB", "step s",
              "bubble", "dp+opt", "tok/s", "MFU", "host GiB", "ckpt GiB", "save s");
  for (size_t i = 0; i < shown.size(); ++i) {
    const Candidate& c = shown[i];
    const plan::RankMemory& worst = c.memory.ranks[c.memory.peak_pp_rank];
    std::printf("%3zu  %-46s %9s %9s %8s %8s %8s %10s %5s%% %9s %8s %7s%s\n", i + 1, c.layout.describe().c_str(),
                fixed(c.memory.peak / kGiB, 2).c_str(), fixed(worst.activations / kGiB, 2).c_str(),
                fixed(c.time.total, 3).c_str(), fixed(c.time.bubble, 3).c_str(),
                fixed(c.time.dp_comm + c.time.optimizer, 3).c_str(), fixed(c.time.tokens_per_s, 0).c_str(),
                fixed(100 * c.time.mfu, 1).c_str(), fixed(c.host.peak / kGiB, 2).c_str(),
                fixed(c.checkpoint.rank_bytes_max / kGiB, 2).c_str(),
                c.checkpoint.save_s > 0 ? fixed(c.checkpoint.save_s, 1).c_str() : "-", c.fits ? "" : "  (does not fit)");
  }
}

// The first row's host memory and checkpoint, spelled out.
void print_costs(const Candidate& c) {
  const plan::HostMemory& h = c.host;
  std::cout << "\nhost memory per rank (" << c.layout.describe() << "): ";
  if (h.training > 0) {
    std::cout << fixed(h.training / kGiB, 2) << " GiB of training tensors (run.device cpu)";
  } else {
    std::cout << "init " << fixed(h.init / kGiB, 2) << " GiB (its part built on the CPU), resume "
              << fixed(h.resume / kGiB, 2) << " GiB, save " << fixed(h.save / kGiB, 2) << " GiB";
  }
  if (h.async > 0) std::cout << ", checkpoint.async buffers " << fixed(h.async / kGiB, 2) << " GiB";
  std::cout << "; peak " << fixed(h.peak / kGiB, 2) << " GiB (" << h.peak_phase << ")\n";
  const plan::CheckpointEstimate& k = c.checkpoint;
  std::cout << "checkpoint: " << fixed(k.total_bytes / kGiB, 2) << " GiB in all, at most "
            << fixed(k.rank_bytes_max / kGiB, 2) << " GiB a rank and " << fixed(k.node_bytes / kGiB, 2)
            << " GiB a node";
  if (k.save_s > 0) {
    std::cout << ", written in " << fixed(k.save_s, 1) << " s and read back in " << fixed(k.load_s, 1) << " s";
  } else {
    std::cout << " (no disk rate: --disk-gbps)";
  }
  std::cout << "\n";
}

}  // namespace

const CommandSpec& plan_spec() {
  static const CommandSpec spec{
      .name = "plan",
      .synopsis = "CONFIG --gpus N --gpu-memory GiB [OPTIONS]",
      .summary = "the layouts that fit, fastest first, with memory, step time and MFU (docs/plan.md)",
      .arguments = {{"CONFIG", "a training config, e.g. configs/llama3-8b.yaml"}},
      .flags = {{"gpus", "N", "ranks in all (GPUs, or CPU ranks) (required)"},
                {"gpus-per-node", "G", "ranks per node (default: --gpus, one node)"},
                {"gpu-memory", "GiB", "memory per rank (required)"},
                {"machine", "PROFILE", "a name in configs/machines/ or a .yaml path (default h100-node)"},
                {"set", "KEY=VALUE", "override a config key", kRepeatable},
                {"top", "K", "how many layouts to print (default 10)"},
                {"layout", "SPEC", "evaluate this one layout, e.g. dp=2,tp=1,pp=2,schedule=1f1b,mb=2"},
                {"disk-gbps", "GB/s", "a node's checkpoint write rate (default: the profile's storage.write_bytes_per_s)"},
                {"json", "", "print JSON instead of a table"}},
      .examples = {"loom plan configs/llama3-8b.yaml --gpus 64 --gpus-per-node 8 --gpu-memory 80",
                   "loom plan configs/tiny.yaml --gpus 2 --gpu-memory 20 --layout dp=1,pp=2,schedule=1f1b,mb=2 --json"},
      .notes = "A layout is dp, cp, tp, pp, the pipeline schedule, the ZeRO stage (0-3), the micro-batch and recomputation\n"
               "(none, selective or full).\n"
               "loom plan --calibrate measures this machine for --machine (loom plan --calibrate --help).",
  };
  return spec;
}

int command_plan(const std::vector<std::string>& argv) {
  if (std::find(argv.begin(), argv.end(), "--calibrate") != argv.end()) return plan_calibrate(argv);
  Args args(plan_spec(), argv);
  args.expect_positional(1, "CONFIG (a training config, e.g. configs/llama3-8b.yaml)");
  const std::string config_path = args.positional()[0];
  const Config config = load_config(config_path, args.all("set"));
  plan::Problem problem = plan::Problem::from_config(config);
  problem.gpus = args.get_int("gpus", 0);
  if (problem.gpus < 1) throw BadInput("loom plan: --gpus N is required (N >= 1: the ranks to plan for)");
  problem.gpus_per_node = args.get_int("gpus-per-node", problem.gpus);
  if (problem.gpus_per_node < 1 || problem.gpus % problem.gpus_per_node != 0) {
    throw BadInput("loom plan: --gpus-per-node " + std::to_string(problem.gpus_per_node) + " must be >= 1 and divide --gpus " +
                   std::to_string(problem.gpus));
  }
  if (!args.has("gpu-memory")) throw BadInput("loom plan: --gpu-memory GiB is required (memory per rank)");
  const double memory_gib = args.get_double("gpu-memory", 0);
  if (!(memory_gib > 0)) throw BadInput("loom plan: --gpu-memory must be > 0 GiB");
  problem.gpu_memory_bytes = memory_gib * kGiB;
  const std::string profile_path = plan::resolve_machine_profile(args.get_or("machine", "h100-node"));
  const plan::MachineProfile machine = plan::load_machine_profile(profile_path);
  const bool as_json = args.has("json");
  if (args.has("disk-gbps")) {
    const double gbps = args.get_double("disk-gbps", 0);
    if (!(gbps > 0)) throw BadInput("loom plan: --disk-gbps must be > 0 (GB/s a node writes)");
    problem.disk_write_bytes_per_s = gbps * 1e9;
  }

  if (args.has("layout")) {
    const plan::Layout layout = plan::parse_layout(args.require("layout"), "--layout");
    if (const std::string why = plan::layout_problem(problem, layout); !why.empty()) {
      throw BadInput("loom plan: --layout " + layout.describe() + " cannot train this config: " + why);
    }
    const Candidate candidate = plan::evaluate_layout(problem, layout, machine);
    if (as_json) {
      std::cout << candidate_json(candidate).dump(2) << "\n";
    } else {
      print_table({candidate});
      print_costs(candidate);
    }
    return kExitOk;
  }

  const std::vector<Candidate> candidates = plan::plan_layouts(problem, machine);
  if (candidates.empty()) {
    throw BadInput("loom plan: no layout of " + config_path + " runs on " + std::to_string(problem.gpus) +
                   " ranks: check that --gpus allows a tp dividing the heads (" + std::to_string(config.model.num_heads) +
                   ") and kv heads, and that batch.global_batch_size (" + std::to_string(problem.global_batch) +
                   ") is divisible by dp");
  }
  if (!candidates.front().fits) {
    const Candidate& smallest = candidates.front();
    throw BadInput("loom plan: no layout of " + config_path + " fits in " + fixed(memory_gib, 1) + " GiB per rank (" +
                   fixed(100 * plan::kUsableMemoryFraction, 0) + "% usable): the smallest, " +
                   smallest.layout.describe() + ", needs " + fixed(smallest.memory.peak / kGiB, 2) +
                   " GiB; use more GPUs or a smaller micro-batch or model");
  }
  const auto top = static_cast<size_t>(std::max<int64_t>(1, args.get_int("top", 10)));
  std::vector<Candidate> shown(candidates.begin(), candidates.begin() + std::min(top, candidates.size()));
  for (Candidate& c : shown) plan::with_costs(problem, machine, c);
  if (as_json) {
    json out = {{"config", config_path},
                {"machine", {{"name", machine.name}, {"source", machine.source}, {"path", profile_path}}},
                {"gpus", problem.gpus},
                {"gpus_per_node", problem.gpus_per_node},
                {"gpu_memory_gib", memory_gib},
                {"layouts_valid", candidates.size()},
                {"best", json::array()}};
    for (const Candidate& c : shown) out["best"].push_back(candidate_json(c));
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  size_t fitting = 0;
  for (const Candidate& c : candidates) fitting += c.fits ? 1 : 0;
  // A mixture of experts: memory counts every expert, FLOPs the active ones.
  const std::string active =
      config.model.moe() ? " (" + std::to_string(count_active_non_embedding_parameters(config.model)) +
                               " active non-embedding)"
                         : "";
  std::cout << "loom plan: " << config_path << ": " << count_parameters(config.model) << " parameters" << active
            << ", sequence "
            << problem.seq_len << ", global batch " << problem.global_batch << " sequences, compute "
            << config.precision.compute << "\n"
            << "cluster: " << problem.gpus << " ranks, " << problem.gpus_per_node << " per node, " << fixed(memory_gib, 1)
            << " GiB each; machine " << machine.name << " (" << profile_path << ", " << machine.source << ")\n"
            << candidates.size() << " valid layouts, " << fitting << " fit in " << fixed(plan::kUsableMemoryFraction * 100, 0)
            << "% of the memory; the fastest " << shown.size() << ":\n";
  print_table(shown);
  print_costs(shown.front());
  std::cout << "\nthe best layout, for the config file:\n";
  for (const std::string& line : shown.front().layout.config_lines()) std::cout << "  " << line << "\n";
  std::cout << "or on the command line:\n ";
  for (const std::string& line : shown.front().layout.config_lines(/*set_flags=*/true)) std::cout << " " << line;
  std::cout << "\n";
  return kExitOk;
}

}  // namespace loom
