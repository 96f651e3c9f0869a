// Streaming training loader: packed samples in a seeded global order, sliced
// over data-parallel ranks, blended over datasets, prefetched by a background
// thread, with exact resume. Torch-free: batches are plain int64 buffers that
// the trainer wraps in tensors.
//
// Note [global sample order]: the training stream is a sequence of global
// sample slots 0, 1, 2, ... Slot g belongs to optimizer step
// g / global_batch. Each slot is assigned to one dataset by the blending
// schedule (BlendSchedule); the k-th slot given to dataset d reads sample
// perm_{d,e}(k mod n_d) of epoch e = k / n_d, where n_d is d's sample count
// and perm_{d,e} a seeded bijection of [0, n_d) (SamplePermutation). So every
// sample of a dataset is read exactly once per epoch of that dataset, a small
// dataset repeats with a fresh order, and the whole order is a function of
// (seed, datasets, weights, seq_len) alone. Data-parallel rank r of dp takes
// the slots r, r + dp, r + 2 dp, ... of each step (strided); its micro-batch m
// holds its local samples [m * micro_batch, (m + 1) * micro_batch). Every rank
// computes the same schedule, so no communication is needed, and changing dp
// (with the same global batch) regroups the same global batches.
//
// A sample is seq_len + 1 consecutive tokens of the dataset's token stream
// (documents packed back to back, crossing document and shard boundaries):
// sample j = tokens[j * seq_len, j * seq_len + seq_len + 1). Consecutive
// samples share one token, so inputs = row[:-1] and targets = row[1:] cover
// every token once as a target. A dataset of N tokens has (N - 1) / seq_len
// samples; the tail that does not fill one is never read.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "data/dataset.h"

namespace loom {

// A seeded bijection of [0, n): a balanced Feistel network over the smallest
// even number of bits covering n, with cycle walking back into [0, n). O(1)
// memory and time per lookup, so datasets of billions of samples need no
// permutation array; defined by integer arithmetic alone, so identical on
// every compiler and standard library.
class SamplePermutation {
 public:
  SamplePermutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;
  uint64_t size() const { return n_; }

 private:
  static constexpr int kRounds = 6;
  uint64_t encrypt(uint64_t x) const;

  uint64_t n_;
  unsigned half_bits_;
  uint64_t half_mask_;
  uint64_t round_keys_[kRounds];
};

// The key of dataset `dataset`'s permutation in epoch `epoch`.
uint64_t permutation_key(uint64_t seed, uint64_t dataset, uint64_t epoch);

// Assigns global sample slots to datasets so that after g slots dataset d has
// had close to w_d * g of them: each slot goes to the dataset furthest below
// its target w_d * (slots + 1) (Megatron's blending rule; ties go to the
// lower index). The lag stays about one sample (at most 1.25 over random
// tests with up to 13 datasets), so fractions are within 1% after a few
// hundred slots. Weights are normalised and fixed to 32-bit
// fractions so the choice is exact integer arithmetic, the same everywhere.
class BlendSchedule {
 public:
  explicit BlendSchedule(const std::vector<double>& weights);
  // The dataset of the next slot; advances the schedule.
  size_t next();
  // Slots given to each dataset so far, and their sum.
  const std::vector<uint64_t>& counts() const { return counts_; }
  uint64_t slots() const { return slots_; }
  void set_counts(std::vector<uint64_t> counts);

 private:
  std::vector<uint64_t> fixed_weights_;  // w_d * 2^32
  std::vector<uint64_t> counts_;
  uint64_t slots_ = 0;
};

struct LoaderDataset {
  std::string path;
  double weight = 1.0;  // relative; need not sum to 1
};

// Datasets opened already, by path: the preflight opens every dataset of the
// run (checking its files and probing it, docs/data.md), and the loaders of
// the same process (a rollback makes a new one) take those instead of
// opening, checking and probing them again.
using OpenedDatasets = std::map<std::string, std::shared_ptr<const Dataset>>;

struct LoaderConfig {
  std::vector<LoaderDataset> datasets;  // data.train
  std::string valid_path;               // data.valid; "" = no validation set
  int64_t seq_len = 0;                  // tokens per sequence (a sample holds seq_len + 1)
  uint64_t seed = 0;
  int64_t global_batch = 0;             // sequences per optimizer step, all ranks
  int64_t micro_batch = 1;              // sequences per micro-batch on one rank
  int64_t dp_rank = 0;
  int64_t dp_size = 1;
  int64_t prefetch_depth = 4;           // micro-batches read ahead; 0 = read in next_micro_batch()
  bool document_positions = false;      // fill MicroBatch::positions (data.document_mask)
  DatasetOpenOptions open_options;
  // Where a path is here, the loader uses that Dataset (opened with the same
  // open_options) instead of opening it. Must outlive the loader.
  const OpenedDatasets* opened = nullptr;
};

// Where a row of a batch came from.
struct SampleId {
  uint64_t global_index = 0;  // slot in the global order (training), sample index (validation)
  uint32_t dataset = 0;       // index into LoaderConfig::datasets (0 for validation)
  uint64_t epoch = 0;         // that dataset's epoch
  uint64_t sample = 0;        // sample index within the dataset: tokens from sample * seq_len

  bool operator==(const SampleId&) const = default;
};

struct MicroBatch {
  std::vector<int64_t> tokens;  // [rows, cols] row-major
  int64_t rows = 0;             // micro_batch
  int64_t cols = 0;             // seq_len + 1
  // 1 where the token counts as a target (an assistant turn of a chat
  // dataset), 0 where it leaves the loss; [rows, cols] like tokens. Empty
  // when no dataset of the run has a /loss_mask: every token counts.
  std::vector<uint8_t> loss_mask;
  // With LoaderConfig::document_positions: each token's position within its
  // document (0 at a document start), [rows, cols] like tokens; the first
  // token of a row continues its document's count unless it starts one.
  // Empty otherwise.
  std::vector<int32_t> positions;
  std::vector<SampleId> samples;  // one per row
  int64_t step = 0;             // optimizer step (validation: batch index)
  int64_t micro_index = 0;      // micro-batch within the step on this rank
};

// Validation batches: the validation dataset's samples in order (not
// shuffled, the same every evaluation), in groups of micro_batch * dp_size,
// rank r taking entries r, r + dp, ... of each group. Every rank gets the same
// number of batches (the remainder that would leave some rank short is
// dropped), so collectives in the evaluation stay matched. Reads happen on
// the calling thread.
class ValidationBatches {
 public:
  class Iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = MicroBatch;
    using difference_type = std::ptrdiff_t;
    using pointer = const MicroBatch*;
    using reference = const MicroBatch&;

    Iterator(const ValidationBatches* owner, int64_t index);
    const MicroBatch& operator*() const;
    const MicroBatch* operator->() const { return &**this; }
    Iterator& operator++();
    bool operator==(const Iterator& other) const { return index_ == other.index_; }

   private:
    const ValidationBatches* owner_;
    int64_t index_;
    mutable std::optional<MicroBatch> current_;
  };

  // fill_loss_mask: the batches carry MicroBatch::loss_mask (some dataset of
  // the run has a loss mask).
  ValidationBatches(const Dataset* dataset, const LoaderConfig* config, int64_t count, bool fill_loss_mask = false);
  int64_t size() const { return count_; }
  MicroBatch at(int64_t index) const;
  Iterator begin() const { return {this, 0}; }
  Iterator end() const { return {this, count_}; }

 private:
  const Dataset* dataset_;
  const LoaderConfig* config_;
  int64_t count_;
  bool fill_loss_mask_;
};

// One per rank. Use from one thread: next_micro_batch, state and restore are
// not meant to be called concurrently (the prefetch thread is internal).
class Loader {
 public:
  // Opens every dataset (and the validation set) read-only and checks the
  // configuration. Throws BadInput naming the dataset or the setting: no
  // datasets, a weight <= 0, seq_len < 1, a dataset with fewer than
  // seq_len + 1 tokens, datasets with different vocab_size or tokenizer_hash,
  // global_batch not a multiple of micro_batch * dp_size, dp_rank outside
  // [0, dp_size).
  explicit Loader(LoaderConfig config);
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;
  // Stops and joins the prefetch thread, waiting at most for the sample read
  // in progress.
  ~Loader();

  // This rank's next micro-batch, [micro_batch, seq_len + 1]. The prefetch
  // thread starts on the first call. An error while reading (a corrupt shard)
  // is rethrown here, with its original type, at the position where it
  // happened; the loader then stays failed until restore().
  MicroBatch next_micro_batch();

  // Micro-batches per optimizer step on each rank:
  // global_batch / (micro_batch * dp_size).
  int64_t micro_batches_per_step() const { return accumulation_; }

  // The position after the last micro-batch returned, as JSON (see
  // docs/data.md): step, micro-batch within it, samples each dataset has
  // given, plus what must match on restore (seed, seq_len, global_batch,
  // weights, dataset fingerprints).
  nlohmann::json state() const;

  // Continues from a state() so that the following micro-batches are exactly
  // those the saved run would have seen next. Throws BadInput (prefixed with
  // `context`, e.g. the checkpoint file) when the state was saved with another
  // seed, seq_len, global_batch, datasets or weights. A different dp_size or
  // micro_batch is accepted when the state is at a step boundary (it always
  // is when saved between optimizer steps): the global order continues and
  // is regrouped over the new ranks.
  void restore(const nlohmann::json& state, const std::string& context = "loader state");

  // Validation batches for this rank (empty when config has no valid_path);
  // at most `max_batches` when >= 0. The Loader must outlive the result.
  ValidationBatches validation_batches(int64_t max_batches = -1) const;

  // Shard files used so far, summed over the datasets (training and
  // validation, each Dataset counted once): for the run log. peak_open and
  // max_open are sums of per-dataset figures, so bounds, not simultaneous
  // counts.
  ShardCacheStats shard_cache_stats() const;

  const LoaderConfig& config() const { return config_; }
  const Dataset& dataset(size_t index) const { return *datasets_[index]; }
  uint64_t num_samples(size_t dataset_index) const { return num_samples_[dataset_index]; }

 private:
  // The position of the next micro-batch: step, micro-batch within the step,
  // and how many slots each dataset had been given when the step began.
  struct Position {
    int64_t step = 0;
    int64_t micro_index = 0;
    std::vector<uint64_t> counts_at_step_start;
  };
  struct Item {
    MicroBatch batch;
    Position next;
    std::exception_ptr error;
  };
  class Producer;

  void start_prefetch();
  void stop_prefetch() noexcept;
  void prefetch_loop(Producer& producer);

  LoaderConfig config_;
  int64_t accumulation_ = 1;
  std::vector<std::shared_ptr<const Dataset>> datasets_;
  std::vector<uint64_t> num_samples_;
  std::shared_ptr<const Dataset> valid_;
  bool loss_mask_ = false;  // batches carry MicroBatch::loss_mask: some dataset has one

  Position position_;                  // after the last micro-batch returned
  std::exception_ptr failure_;         // sticky error of the stream
  std::unique_ptr<Producer> producer_; // owned by the prefetch thread while it runs

  // Producer -> consumer queue, bounded by prefetch_depth.
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Item> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace loom
