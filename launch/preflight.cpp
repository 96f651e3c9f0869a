#include "launch/preflight.h"

#include <sys/statvfs.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "checkpoints/hub.h"
#include "data/dataset.h"
#include "trainer/training.h"
#include "model/llama.h"
#include "plan/checkpoint_model.h"
#include "plan/layout.h"
#include "plan/memory_model.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

// A group's collective gets this long before Work::wait ends the job with a
// message naming the rank and the group: a rank that cannot reach its peers
// shows up here within a minute instead of at the default timeout mid-run.
constexpr std::chrono::milliseconds kPreflightCollectiveTimeout = std::chrono::seconds(60);

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown-host";
  return name;
}

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return text;
}

// The model's shape: with model.init_from the YAML may leave it out and the
// folder's config.json has it. nullopt when that folder cannot be read (a
// problem reported where the model is built, with its own message).
std::optional<ModelConfig> model_shape(const Config& config) {
  if (config.model.init_from.empty() || config.model.num_heads > 0) return config.model;
  try {
    ModelConfig model = ModelFiles::open(config.model.init_from).model_config();
    model.recompute = config.model.recompute;
    return model;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

void check_datasets(const Config& config, int rank, int size, std::vector<std::string>& failures,
                    OpenedDatasets* opened) {
  std::vector<std::pair<std::string, std::string>> datasets;  // key, path
  for (size_t i = 0; i < config.data.train.size(); ++i)
    datasets.emplace_back("data.train[" + std::to_string(i) + "]", config.data.train[i].path);
  if (!config.data.valid.empty()) datasets.emplace_back("data.valid", config.data.valid);
  for (const auto& [key, path] : datasets) {
    try {
      // Opens index.json as the loader would and hands the Dataset to it.
      // The shards are opened, and checked and probed as
      // data.check_shard_files says, by each rank when it first reads them
      // (Note [Lazy shard checks] in data/dataset.cpp); here each rank only
      // looks at its share of the files (i % ranks == rank: one stat each),
      // so that a missing or truncated shard stops the run before step 1.
      auto dataset = std::make_shared<const Dataset>(Dataset::open(path, dataset_open_options(config)));
      dataset->check_shard_sizes(static_cast<size_t>(rank), static_cast<size_t>(size));
      if (opened != nullptr) (*opened)[path] = std::move(dataset);
    } catch (const std::exception& e) {
      failures.push_back(key + " (" + path + "): " + e.what());
    }
  }
}

void check_output_folder(const Config& config, int rank, std::vector<std::string>& failures) {
  const fs::path run_dir = fs::path(config.run.output_dir) / config.run.name;
  std::error_code error;
  fs::create_directories(run_dir, error);
  if (error) {
    failures.push_back("run folder " + run_dir.string() + ": cannot create it: " + error.message());
    return;
  }
  const fs::path probe = run_dir / (".preflight-rank" + std::to_string(rank) + "-" + std::to_string(::getpid()));
  {
    std::ofstream out(probe);
    out << "loom preflight\n";
    out.flush();
    if (!out) failures.push_back("run folder " + run_dir.string() + ": not writable (cannot write " +
                                 probe.filename().string() + ")");
  }
  fs::remove(probe, error);
  if (!config.checkpoint.enabled) return;
  struct statvfs fs_stats {};
  if (::statvfs(run_dir.c_str(), &fs_stats) != 0) return;  // no answer: nothing to compare
  const double free_bytes = static_cast<double>(fs_stats.f_bavail) * static_cast<double>(fs_stats.f_frsize);
  const std::optional<ModelConfig> shape = model_shape(config);
  if (!shape) return;
  const ModelConfig& model = *shape;
  // What `loom plan` counts (plan/checkpoint_model.h): the checkpoints kept,
  // one more being written, and the Hub export at its dtype.
  const double checkpoint = plan::checkpoint_tensor_bytes(model);
  const double needed = plan::run_folder_disk_bytes(config, model, checkpoint);
  if (free_bytes < needed)
    failures.push_back("run folder " + run_dir.string() + ": " + gib(free_bytes) + " free, the run's checkpoints need " +
                       gib(needed) + " (" + gib(checkpoint) + " each: weights and AdamW moments; checkpoint.keep_last " +
                       std::to_string(config.checkpoint.keep_last) + " kept and one being written, and the Hub export at " +
                       config.checkpoint.export_dtype + ")");
}

// Every rank must see the run folder rank 0 sees: rank 0 writes a token
// there and tells the others; each reads it back (retrying a few seconds, for
// a network file system's attribute cache). A rank on a node-local disk, or
// with another run.output_dir, would write checkpoint pieces that rank 0
// never commits.
void check_shared_folder(const Config& config, ProcessGroup& world, std::vector<std::string>& failures) {
  const fs::path token_file = fs::path(config.run.output_dir) / config.run.name / ".loom-shared-folder";
  int64_t token = 0;
  if (world.rank() == 0) {
    token = static_cast<int64_t>((static_cast<uint64_t>(std::random_device{}()) << 31) ^ std::random_device{}()) & INT64_MAX;
    try {
      write_file_atomic(token_file.string(), std::to_string(token) + "\n");
    } catch (const std::exception& e) {
      failures.push_back("run folder: cannot write " + token_file.string() + ": " + e.what());
    }
  }
  at::Tensor sent = at::full({1}, token, at::kLong);
  world.broadcast(sent, BroadcastOptions{0})->wait(kPreflightCollectiveTimeout);
  if (world.rank() == 0) return;
  const std::string expected = std::to_string(sent.item<int64_t>()) + "\n";
  std::string seen;
  for (int attempt = 0; attempt < 50; ++attempt) {
    std::ifstream in(token_file);
    seen.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (seen == expected) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  failures.push_back("run folder " + token_file.parent_path().string() + ": not the folder rank 0 writes (" +
                     (seen.empty() ? "its token file is missing here" : "its token file differs here") +
                     "): every rank must see one shared run.output_dir (a network file system on several nodes)");
}

// A sum of ones over `group` must equal its size.
void check_group(ProcessGroup& group, const std::string& name, std::vector<std::string>& failures) {
  at::Tensor ones = at::ones({1}, at::kLong);
  group.all_reduce(ones)->wait(kPreflightCollectiveTimeout);
  if (ones.item<int64_t>() != group.size())
    failures.push_back("all-reduce over the " + name + " group gave " + std::to_string(ones.item<int64_t>()) +
                       ", expected its size " + std::to_string(group.size()));
}

}  // namespace

bool run_preflight(const Config& config, ProcessGroup* world, const GridGroups* grid, std::ostream& log,
                   std::ostream& errors, OpenedDatasets* opened) {
  const auto start = std::chrono::steady_clock::now();
  const int rank = world ? world->rank() : 0;
  const int size = world ? world->size() : 1;
  std::vector<std::string> failures;

  if (world) {
    check_group(*world, "world", failures);
    if (grid && grid->dp) check_group(*grid->dp, "dp", failures);
    if (grid && grid->pp) check_group(*grid->pp, "pp", failures);
    if (grid && grid->tp) check_group(*grid->tp, "tp", failures);

    // The same config on every rank: a node with another copy of the file
    // (or of a file it names) would train something else or deadlock later.
    const int64_t config_hash = static_cast<int64_t>(std::hash<std::string>{}(config_to_yaml(config)) >> 1);
    at::Tensor rank0_hash = at::full({1}, config_hash, at::kLong);
    world->broadcast(rank0_hash, BroadcastOptions{0})->wait(kPreflightCollectiveTimeout);
    if (rank0_hash.item<int64_t>() != config_hash)
      failures.push_back("the resolved config differs from rank 0's (another copy of " + config.source_path +
                         " or different --set arguments)");
  }

  check_datasets(config, rank, size, failures, opened);
  check_output_folder(config, rank, failures);
  if (world) check_shared_folder(config, *world, failures);

  // One string per line: the ranks share the terminal, and a line written
  // in pieces interleaves with the other ranks' lines.
  for (const std::string& failure : failures)
    errors << ("loom: preflight: rank " + std::to_string(rank) + " on " + host_name() + ": " + failure + "\n")
           << std::flush;
  int64_t failed = failures.empty() ? 0 : 1;
  if (world) {
    at::Tensor failed_ranks = at::full({1}, failed, at::kLong);
    world->all_reduce(failed_ranks)->wait(kPreflightCollectiveTimeout);
    failed = failed_ranks.item<int64_t>();
  }
  if (world && rank == 0) {
    std::error_code ignored;  // every rank has read the token (the all-reduce above)
    fs::remove(fs::path(config.run.output_dir) / config.run.name / ".loom-shared-folder", ignored);
  }
  if (rank == 0) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char took[32];
    std::snprintf(took, sizeof took, "%.2f s", seconds);
    if (failed == 0)
      log << "preflight: " << size << " rank" << (size == 1 ? "" : "s")
          << " ok (groups, config, data, shared run folder) in " << took << std::endl;
    else
      errors << "loom: preflight failed on " << failed << " of " << size << " rank" << (size == 1 ? "" : "s")
             << " (lines above)" << std::endl;
  }
  return failed == 0;
}

void log_memory_forecast(const Config& config, int64_t dp, std::ostream& log) {
  const std::optional<ModelConfig> shape = model_shape(config);
  if (!shape) return;
  plan::Problem problem = plan::Problem::from_config(config);
  problem.model = *shape;
  // Layout::of carries parallel.cp: the model counts a cp rank's seq / cp
  // tokens and its ring attention's blocks and scores.
  const plan::Layout layout = plan::Layout::of(config, dp);
  problem.gpus = layout.world();
  problem.gpus_per_node = layout.world();
  plan::MemoryEstimate memory;
  try {
    memory = plan::estimate_memory(problem, layout);
  } catch (const std::exception& e) {
    // A log line never stops a run: what the model cannot price is named.
    log << ("memory: no forecast (" + std::string(e.what()) + ")\n") << std::flush;
    return;
  }
  for (const plan::RankMemory& rank : memory.ranks) {
    log << ("memory: pp rank " + std::to_string(rank.pp_rank) + " predicted to peak at " + gib(rank.peak) + " (" +
            std::to_string(static_cast<int64_t>(rank.peak)) + " bytes) of tensors, in the " + rank.peak_phase + "\n")
        << std::flush;
  }
}

}  // namespace loom
