// What a checkpoint save costs the training loop, synchronous and
// asynchronous (checkpoint.async), against a plain write of the same bytes:
//
//   build/bench_checkpoint [--hidden H --intermediate I --layers L --vocab V --rounds R --dir DIR]
//
// A Llama model of the given shape and its AdamW state (two moments per
// parameter, as after a real step) are saved R times each way into DIR
// (default: a folder under /tmp, removed at the end):
//   sync   save_training_checkpoint: the loop waits for the whole write,
//          fsyncs and commit.
//   async  snapshot_training_state(copy) + AsyncCheckpointWriter::start: the
//          loop waits for the copy to host memory only; the thread's write
//          time gives its throughput.
//   plain  the same number of bytes written to one file in 8 MiB pieces and
//          fsynced: what the disk gives a simple sequential writer.
// It prints the median of each, the async stall as a fraction of the sync
// save (target <= 0.10) and the async write throughput as a fraction of the
// plain one (target >= 0.70). Results: docs/performance.md.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "model/llama.h"
#include "optim/optimizer.h"
#include "trainer/training_checkpoint.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Options {
  int64_t hidden = 1024, intermediate = 2816, layers = 6, vocab = 32000, rounds = 3;
  std::string dir;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_checkpoint: %s needs a value\n", arg.c_str());
      std::exit(2);
    }
    const char* value = argv[++i];
    if (arg == "--hidden") o.hidden = std::atoll(value);
    else if (arg == "--intermediate") o.intermediate = std::atoll(value);
    else if (arg == "--layers") o.layers = std::atoll(value);
    else if (arg == "--vocab") o.vocab = std::atoll(value);
    else if (arg == "--rounds") o.rounds = std::atoll(value);
    else if (arg == "--dir") o.dir = value;
    else {
      std::fprintf(stderr, "bench_checkpoint: unknown option %s\n", arg.c_str());
      std::exit(2);
    }
  }
  return o;
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

uint64_t folder_bytes(const fs::path& folder) {
  uint64_t bytes = 0;
  for (const auto& entry : fs::recursive_directory_iterator(folder)) {
    if (entry.is_regular_file()) bytes += entry.file_size();
  }
  return bytes;
}

// `bytes` from a buffer to `path` in 8 MiB writes, then fsync: the disk's
// sequential write rate for one simple writer.
double plain_write_seconds(const std::string& path, uint64_t bytes) {
  std::vector<char> buffer(size_t{8} << 20);
  std::mt19937 random(1);
  for (auto& c : buffer) c = static_cast<char>(random());
  const auto start = Clock::now();
  {
    AtomicFile file(path);
    for (uint64_t left = bytes; left > 0;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left, buffer.size()));
      file.write(std::as_bytes(std::span(buffer.data(), n)));
      left -= n;
    }
    file.commit();
  }
  const double seconds = seconds_since(start);
  fs::remove(path);
  return seconds;
}

int run(const Options& o) {
  const fs::path dir = o.dir.empty() ? fs::temp_directory_path() / ("loom_bench_checkpoint_" + std::to_string(::getpid()))
                                     : fs::path(o.dir);
  fs::remove_all(dir);
  fs::create_directories(dir);

  ModelConfig config;
  config.hidden_size = o.hidden;
  config.intermediate_size = o.intermediate;
  config.num_layers = o.layers;
  config.num_heads = std::max<int64_t>(1, o.hidden / 64);
  config.num_kv_heads = config.num_heads;
  config.vocab_size = o.vocab;
  config.max_seq_len = 64;
  config.tie_embeddings = false;
  LocalLayerFactory factory;
  LlamaForCausalLM model(config, factory);
  model.init_weights(/*seed=*/1);
  AdamW optimizer(to_named_tensors(model.named_parameters()), AdamWOptions{});
  // One update, so that both moments exist and hold real numbers.
  for (auto& p : model.parameters()) p.mutable_grad() = torch::randn_like(p) * 1e-3;
  optimizer.step(1e-4);

  // The loader only contributes its position to the trainer state.
  const std::string dataset = (dir / "data").string();
  {
    DatasetWriter writer(dataset, o.vocab, 0, "bench");
    std::vector<int32_t> document(4096);
    for (size_t i = 0; i < document.size(); ++i) document[i] = static_cast<int32_t>(1 + i % (o.vocab - 1));
    writer.add_document(document);
    writer.finish();
  }
  LoaderConfig loader_config;
  loader_config.datasets = {{dataset, 1.0}};
  loader_config.seq_len = 32;
  loader_config.global_batch = 2;
  loader_config.micro_batch = 2;
  Loader loader(loader_config);

  TrainingCheckpointOptions options;
  options.keep_last = 1;
  const std::string sync_dir = (dir / "sync").string(), async_dir = (dir / "async").string();
  AsyncCheckpointWriter async_writer(async_dir, options, CheckpointRank{});
  std::vector<double> sync_s, stall_s, write_s, plain_s;
  uint64_t bytes = 0;
  for (int64_t round = 1; round <= o.rounds; ++round) {
    auto start = Clock::now();
    const std::string folder = save_training_checkpoint(sync_dir, round, model, optimizer, loader, options);
    sync_s.push_back(seconds_since(start));
    bytes = folder_bytes(folder);

    start = Clock::now();
    TrainingSnapshot spare = async_writer.take_spare();  // the previous round's buffers, as in training
    async_writer.start(snapshot_training_state(round, model, optimizer, loader, 0, /*copy=*/true, &spare));
    stall_s.push_back(seconds_since(start));
    write_s.push_back(async_writer.wait());

    plain_s.push_back(plain_write_seconds((dir / "plain.bin").string(), bytes));
    std::printf("round %lld: sync %.3f s, async stall %.3f s (write %.3f s), plain %.3f s\n",
                static_cast<long long>(round), sync_s.back(), stall_s.back(), write_s.back(), plain_s.back());
  }
  const double mib = static_cast<double>(bytes) / (1 << 20);
  const double sync = median(sync_s), stall = median(stall_s), write = median(write_s), plain = median(plain_s);
  std::printf("checkpoint: %lld parameters, %.1f MiB on disk, %lld rounds (medians below)\n",
              static_cast<long long>(count_parameters(config)), mib, static_cast<long long>(o.rounds));
  std::printf("sync save (loop stalled)  %8.3f s  %7.1f MiB/s\n", sync, mib / sync);
  std::printf("async loop stall          %8.3f s  ratio to sync %.3f (target <= 0.10)\n", stall, stall / sync);
  std::printf("async background write    %8.3f s  %7.1f MiB/s\n", write, mib / write);
  std::printf("plain sequential write    %8.3f s  %7.1f MiB/s\n", plain, mib / plain);
  std::printf("async write throughput / plain: %.3f (target >= 0.70)\n", plain / write);
  if (o.dir.empty()) fs::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) { return loom::run(loom::parse(argc, argv)); }
