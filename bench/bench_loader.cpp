// Loader throughput against what training consumes, on this machine.
//
//   bench_loader DATASET CONFIG...
//
// For each config it measures, in this one process:
//   consume    tokens/s that one forward+backward of the config's model eats
//              (one sequence of data.seq_len tokens, fp32, this machine's CPU
//              threads) - the rate a single rank's training step would need;
//   loader     tokens/s the Loader delivers with the config's seq_len,
//              micro-batch and global batch (dp = 1, prefetch thread on);
//   sequential tokens/s of a plain sequential read of the same shards
//              (Dataset::read_tokens in 1 Mi-token chunks), the I/O baseline.
// and prints loader/consume and loader/sequential. The dataset need not match
// the config's vocabulary: the loader never looks at token values' meaning.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <chrono>
#include <cstdio>
#include <iostream>

#include "data/dataset.h"
#include "data/loader.h"
#include "config/config.h"
#include "model/llama.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double sequential_tokens_per_s(const loom::Dataset& dataset) {
  std::vector<int32_t> buffer(1 << 20);
  uint64_t read = 0;
  const auto start = Clock::now();
  while (seconds_since(start) < 2.0) {
    for (uint64_t begin = 0; begin < dataset.num_tokens(); begin += buffer.size()) {
      const uint64_t n = std::min<uint64_t>(buffer.size(), dataset.num_tokens() - begin);
      dataset.read_tokens(begin, std::span<int32_t>(buffer.data(), n));
      read += n;
    }
  }
  return read / seconds_since(start);
}

double loader_tokens_per_s(const std::string& dataset_dir, const loom::Config& config, int64_t seq_len) {
  loom::LoaderConfig lc;
  lc.datasets = {{dataset_dir, 1.0}};
  lc.seq_len = seq_len;
  lc.seed = config.run.seed;
  lc.micro_batch = config.batch.micro_batch_size;
  lc.global_batch = config.batch.global_batch_size > 0 ? config.batch.global_batch_size : lc.micro_batch;
  loom::Loader loader(lc);
  loader.next_micro_batch();  // starts the prefetch thread, opens the shards
  uint64_t tokens = 0;
  const auto start = Clock::now();
  while (seconds_since(start) < 2.0) {
    const auto batch = loader.next_micro_batch();
    tokens += static_cast<uint64_t>(batch.rows) * seq_len;
  }
  return tokens / seconds_since(start);
}

double consume_tokens_per_s(const loom::Config& config, int64_t seq_len) {
  torch::manual_seed(0);
  loom::LocalLayerFactory factory;
  loom::LlamaForCausalLM model(config.model, factory);
  model.init_weights(0);
  auto ids = torch::randint(config.model.vocab_size, {1, seq_len + 1}, torch::kLong);
  auto step = [&] {
    auto logits = model.forward(ids.narrow(1, 0, seq_len));
    auto loss = at::cross_entropy_loss(logits.flatten(0, 1), ids.narrow(1, 1, seq_len).flatten());
    loss.backward();
  };
  step();  // warm-up: first-touch allocation
  const auto start = Clock::now();
  int steps = 0;
  do {
    step();
    ++steps;
  } while (seconds_since(start) < 3.0);
  return steps * seq_len / seconds_since(start);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: bench_loader DATASET CONFIG...\n";
    return 2;
  }
  try {
    const std::string dataset_dir = argv[1];
    const loom::Dataset dataset = loom::Dataset::open(dataset_dir);
    const double sequential = sequential_tokens_per_s(dataset);
    std::printf("dataset %s: %llu tokens, %zu shard(s); torch threads %d\n", dataset_dir.c_str(),
                static_cast<unsigned long long>(dataset.num_tokens()), dataset.index().shards.size(),
                at::get_num_threads());
    std::printf("%-28s %8s %6s %14s %14s %14s %12s %12s\n", "config", "seq_len", "micro", "consume tok/s",
                "loader tok/s", "seq-read tok/s", "loader/cons", "loader/seq");
    for (int i = 2; i < argc; ++i) {
      const loom::Config config = loom::load_config(argv[i]);
      const int64_t seq_len = config.data.seq_len > 0 ? config.data.seq_len : config.model.max_seq_len;
      const double loader = loader_tokens_per_s(dataset_dir, config, seq_len);
      const double consume = consume_tokens_per_s(config, seq_len);
      std::printf("%-28s %8lld %6lld %14.0f %14.0f %14.0f %11.0fx %11.2fx\n", argv[i], static_cast<long long>(seq_len),
                  static_cast<long long>(config.batch.micro_batch_size), consume, loader, sequential,
                  loader / consume, loader / sequential);
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_loader: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
