#include "data/loader.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <span>
#include <stdexcept>
#include <utility>

#include "util/crc32c.h"
#include "util/error.h"

namespace loom {
namespace {

using nlohmann::json;

constexpr const char* kStateFormat = "loom-loader-state";
constexpr int kStateVersion = 1;

// splitmix64's finaliser: a bijective, well-mixing 64-bit hash.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// What identifies a dataset's content: its index (counts and every shard's
// checksum). A dataset moved to another path keeps its fingerprint.
std::string dataset_fingerprint(const DatasetIndex& index) {
  std::string text = std::to_string(index.vocab_size) + "|" + std::to_string(index.eos_id) + "|" +
                     index.tokenizer_hash + "|" + std::to_string(index.num_tokens);
  for (const ShardEntry& shard : index.shards)
    text += "|" + std::to_string(shard.num_tokens) + ":" + std::to_string(shard.crc32c);
  return crc32c_hex(crc32c(std::as_bytes(std::span(text))));
}

uint64_t samples_in(const Dataset& dataset, int64_t seq_len) {
  return dataset.num_tokens() < 1 ? 0 : (dataset.num_tokens() - 1) / static_cast<uint64_t>(seq_len);
}

// The shards that sample `sample` (seq_len + 1 tokens) reads, appended.
void add_shards_of_sample(const Dataset& dataset, uint64_t sample, int64_t seq_len, std::vector<size_t>& shards) {
  for (const size_t s : dataset.shards_of(sample * static_cast<uint64_t>(seq_len), static_cast<uint64_t>(seq_len) + 1))
    shards.push_back(s);
}

// Whether the batches of a run carry a loss mask: when any of its datasets
// (training or validation) has one.
bool any_loss_mask(const std::vector<std::shared_ptr<const Dataset>>& datasets,
                   const std::shared_ptr<const Dataset>& valid) {
  for (const auto& dataset : datasets)
    if (dataset->has_loss_mask()) return true;
  return valid && valid->has_loss_mask();
}

// Note [document positions]
// With LoaderConfig::document_positions every row also gets each token's
// position within its document: token g of the stream, in a document
// starting at token d, is at g - d. Documents never cross shards (the
// DatasetWriter starts a new shard rather than split one), so a shard's
// first token starts a document. In each shard a row touches, the document
// holding the row's first token there is found by a binary search over the
// shard's /doc_offsets that reads one entry per probe (log2 of the shard's
// documents), and the entries after it are read in small blocks until one
// passes the row's end. Memory and reads are bounded by the row, not by the
// dataset: nothing of /doc_offsets is kept (Note [Lazy shard checks] in
// data/dataset.cpp).
constexpr uint64_t kDocOffsetsBlock = 64;

// The positions within their documents of tokens [begin, begin + out.size())
// of `dataset`'s stream.
void read_document_positions(const Dataset& dataset, uint64_t begin, std::span<int32_t> out) {
  const uint64_t end = begin + out.size();
  for (const size_t s : dataset.shards_of(begin, out.size())) {
    const uint64_t first = dataset.shard_first_token(s);
    const uint64_t documents = dataset.index().shards[s].num_documents;
    const uint64_t local_begin = std::max(begin, first) - first;
    const uint64_t local_end = std::min(end, first + dataset.index().shards[s].num_tokens) - first;
    const auto offset_at = [&](uint64_t i) {
      uint64_t value = 0;
      dataset.read_doc_offsets(s, i, std::span(&value, 1));
      return value;
    };
    // The last entry <= local_begin: offsets[0] = 0 is, offsets[documents]
    // (the shard's token count) is not.
    uint64_t low = 0, high = documents;
    while (high - low > 1) {
      const uint64_t middle = low + (high - low) / 2;
      (offset_at(middle) <= local_begin ? low : high) = middle;
    }
    uint64_t document_start = offset_at(low);
    // offsets[low + 1 ...], read a block at a time.
    std::vector<uint64_t> block;
    uint64_t block_first = low + 1, in_block = 0;
    const auto next_offset = [&] {
      if (in_block == block.size()) {
        block_first += block.size();
        block.resize(std::min(kDocOffsetsBlock, documents + 1 - block_first));
        dataset.read_doc_offsets(s, block_first, block);
        in_block = 0;
      }
      return block[in_block];
    };
    for (uint64_t t = local_begin; t < local_end; ++t) {
      // Skips empty documents too: several offsets equal to t.
      while (next_offset() <= t) document_start = block[in_block++];
      const uint64_t position = t - document_start;
      if (position > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
        throw BadInput(dataset.dir() + ": shard " + dataset.index().shards[s].file + " has a document of more than " +
                       "2^31 tokens, beyond data.document_mask's positions");
      out[static_cast<size_t>(first + t - begin)] = static_cast<int32_t>(position);
    }
  }
}

// Reads sample `sample` (seq_len + 1 tokens) into row `row` of `batch`, and
// its loss mask and document positions when the batch has them (sized
// already). A dataset without a mask gives all ones there
// (Dataset::read_loss_mask): in a blend of chat and plain datasets every
// token of a plain one counts.
void read_sample(const Dataset& dataset, uint64_t sample, int64_t seq_len, MicroBatch& batch, int64_t row) {
  const auto first = static_cast<size_t>(row * batch.cols);
  const auto cols = static_cast<size_t>(batch.cols);
  const uint64_t begin = sample * static_cast<uint64_t>(seq_len);
  dataset.read_tokens(begin, std::span(batch.tokens).subspan(first, cols));
  if (!batch.loss_mask.empty()) dataset.read_loss_mask(begin, std::span(batch.loss_mask).subspan(first, cols));
  if (!batch.positions.empty())
    read_document_positions(dataset, begin, std::span(batch.positions).subspan(first, cols));
}

// Typed access to a saved state, naming `context` and the key in errors.
class StateReader {
 public:
  StateReader(const json& state, const std::string& context) : state_(state), context_(context) {
    if (!state.is_object()) fail("state", "expected a JSON object");
  }
  [[noreturn]] void fail(const std::string& key, const std::string& message) const {
    throw BadInput(context_ + ": key '" + key + "': " + message);
  }
  const json& at(const json& object, const std::string& name, const std::string& key) const {
    const auto it = object.find(name);
    if (it == object.end()) fail(key, "missing");
    return *it;
  }
  int64_t integer(const json& object, const std::string& name, const std::string& key) const {
    const json& value = at(object, name, key);
    if (!value.is_number_integer()) fail(key, "expected an integer, found " + value.dump());
    return value.get<int64_t>();
  }
  uint64_t unsigned_integer(const json& object, const std::string& name, const std::string& key) const {
    const json& value = at(object, name, key);
    if (!value.is_number_unsigned()) fail(key, "expected a non-negative integer, found " + value.dump());
    return value.get<uint64_t>();
  }
  // Refuses a resume that would change the samples.
  void expect_same(const std::string& key, const json& saved, const json& now, const std::string& why) const {
    if (saved != now) fail(key, "was " + saved.dump() + " when saved, is " + now.dump() + " now; " + why);
  }
  const json& root() const { return state_; }

 private:
  const json& state_;
  const std::string& context_;
};

}  // namespace

// --- SamplePermutation ------------------------------------------------------------

SamplePermutation::SamplePermutation(uint64_t n, uint64_t key) : n_(n), half_bits_(1) {
  if (n == 0) throw std::invalid_argument("SamplePermutation of an empty range");
  while (half_bits_ < 32 && (uint64_t{1} << (2 * half_bits_)) < n) ++half_bits_;
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  uint64_t state = key;
  for (uint64_t& round_key : round_keys_) {
    state += 0x9e3779b97f4a7c15ULL;
    round_key = mix64(state);
  }
}

uint64_t SamplePermutation::encrypt(uint64_t x) const {
  uint64_t left = x >> half_bits_;
  uint64_t right = x & half_mask_;
  for (const uint64_t round_key : round_keys_) {
    const uint64_t mixed = left ^ (mix64(right ^ round_key) & half_mask_);
    left = right;
    right = mixed;
  }
  return (left << half_bits_) | right;
}

uint64_t SamplePermutation::operator()(uint64_t i) const {
  if (i >= n_) throw std::out_of_range("SamplePermutation: " + std::to_string(i) + " >= " + std::to_string(n_));
  // Cycle walking: encrypt permutes [0, 4^half_bits); following i's cycle
  // until it re-enters [0, n) restricts it to a permutation of [0, n). Since
  // 4^half_bits < 4n, that takes fewer than 4 steps on average.
  uint64_t x = i;
  do {
    x = encrypt(x);
  } while (x >= n_);
  return x;
}

uint64_t permutation_key(uint64_t seed, uint64_t dataset, uint64_t epoch) {
  uint64_t key = mix64(seed + 0x9e3779b97f4a7c15ULL);
  key = mix64(key ^ (dataset * 0xd1b54a32d192ed03ULL + 1));
  return mix64(key ^ (epoch * 0x8cb92ba72f3d8dd7ULL + 2));
}

// --- BlendSchedule -------------------------------------------------------------------

BlendSchedule::BlendSchedule(const std::vector<double>& weights) : counts_(weights.size(), 0) {
  if (weights.empty()) throw std::invalid_argument("BlendSchedule without datasets");
  double sum = 0;
  for (const double weight : weights) sum += weight;
  for (const double weight : weights) {
    const auto fixed = static_cast<uint64_t>(std::llround(weight / sum * 4294967296.0));
    fixed_weights_.push_back(std::max<uint64_t>(fixed, 1));
  }
}

size_t BlendSchedule::next() {
  size_t best = 0;
  __int128 best_deficit = 0;
  for (size_t d = 0; d < counts_.size(); ++d) {
    // 2^32 * (target after this slot - slots given): how far d lags behind.
    const __int128 deficit = static_cast<__int128>(fixed_weights_[d]) * (slots_ + 1) -
                             (static_cast<__int128>(counts_[d]) << 32);
    if (d == 0 || deficit > best_deficit) {
      best = d;
      best_deficit = deficit;
    }
  }
  ++counts_[best];
  ++slots_;
  return best;
}

void BlendSchedule::set_counts(std::vector<uint64_t> counts) {
  if (counts.size() != counts_.size()) throw std::invalid_argument("BlendSchedule::set_counts: wrong size");
  counts_ = std::move(counts);
  slots_ = 0;
  for (const uint64_t count : counts_) slots_ += count;
}

// --- Producer: turns positions into micro-batches -----------------------------------

class Loader::Producer {
 public:
  Producer(const Loader& loader, Position start) : loader_(loader), position_(std::move(start)) { plan_step(); }

  // The micro-batch at the current position; advances only on success, so a
  // failed read is retried (and fails again) at the same place.
  Item produce() {
    const LoaderConfig& config = loader_.config_;
    if (!step_checked_) {
      check_step_shards();
      step_checked_ = true;
    }
    Item item;
    MicroBatch& batch = item.batch;
    batch.rows = config.micro_batch;
    batch.cols = config.seq_len + 1;
    batch.step = position_.step;
    batch.micro_index = position_.micro_index;
    batch.tokens.resize(static_cast<size_t>(batch.rows * batch.cols));
    if (loader_.loss_mask_) batch.loss_mask.resize(batch.tokens.size());
    if (config.document_positions) batch.positions.resize(batch.tokens.size());
    for (int64_t row = 0; row < batch.rows; ++row) {
      const SampleId& id = local_[static_cast<size_t>(position_.micro_index * config.micro_batch + row)];
      read_sample(*loader_.datasets_[id.dataset], id.sample, config.seq_len, batch, row);
      batch.samples.push_back(id);
    }
    if (++position_.micro_index == loader_.accumulation_) {
      position_ = Position{position_.step + 1, 0, counts_at_step_end_};
      plan_step();
    }
    item.next = position_;
    return item;
  }

 private:
  // Runs the blending schedule over the G slots of the current step (every
  // rank runs all of them: the counts must advance identically everywhere)
  // and keeps this rank's slots, r, r + dp, ... (Note [global sample order]).
  void plan_step() {
    const LoaderConfig& config = loader_.config_;
    std::vector<double> weights;
    for (const LoaderDataset& source : config.datasets) weights.push_back(source.weight);
    BlendSchedule schedule(weights);
    schedule.set_counts(position_.counts_at_step_start);
    local_.clear();
    const auto first_slot = static_cast<uint64_t>(position_.step * config.global_batch);
    for (int64_t i = 0; i < config.global_batch; ++i) {
      const size_t d = schedule.next();
      if (i % config.dp_size != config.dp_rank) continue;
      const uint64_t k = schedule.counts()[d] - 1;  // d's slots before this one
      const uint64_t n = loader_.num_samples_[d];
      SampleId id;
      id.global_index = first_slot + static_cast<uint64_t>(i);
      id.dataset = static_cast<uint32_t>(d);
      id.epoch = k / n;
      id.sample = SamplePermutation(n, permutation_key(config.seed, d, id.epoch))(k % n);
      local_.push_back(id);
    }
    counts_at_step_end_ = schedule.counts();
    step_checked_ = false;
  }

  // Note [Lazy shard checks] (data/dataset.cpp): before the first read of a
  // step, the shards of this rank's samples of the step have their first-use
  // checks, all of a dataset's in one probe process: a rank checks what it
  // reads and nothing else, at one fork per step at most. Without a probe
  // the reads check their shards themselves. In produce(), not plan_step():
  // a failure then leaves the position where it was.
  void check_step_shards() const {
    const LoaderConfig& config = loader_.config_;
    std::vector<std::vector<size_t>> shards(loader_.datasets_.size());
    for (const SampleId& id : local_)
      add_shards_of_sample(*loader_.datasets_[id.dataset], id.sample, config.seq_len, shards[id.dataset]);
    for (size_t d = 0; d < shards.size(); ++d)
      if (!shards[d].empty() && loader_.datasets_[d]->checks_in_probe())
        loader_.datasets_[d]->check_shards(shards[d]);
  }

  const Loader& loader_;
  Position position_;
  std::vector<SampleId> local_;  // this rank's samples of the current step
  std::vector<uint64_t> counts_at_step_end_;
  bool step_checked_ = false;  // check_step_shards() done for the current step
};

// --- Loader --------------------------------------------------------------------------

Loader::Loader(LoaderConfig config) : config_(std::move(config)) {
  const LoaderConfig& c = config_;
  if (c.datasets.empty()) throw BadInput("data.train: no training datasets given");
  if (c.seq_len < 1) throw BadInput("data.seq_len: expected at least 1, found " + std::to_string(c.seq_len));
  if (c.micro_batch < 1)
    throw BadInput("batch.micro_batch_size: expected at least 1, found " + std::to_string(c.micro_batch));
  if (c.dp_size < 1 || c.dp_rank < 0 || c.dp_rank >= c.dp_size)
    throw BadInput("data-parallel rank " + std::to_string(c.dp_rank) + " is outside [0, dp " +
                   std::to_string(c.dp_size) + ")");
  if (c.global_batch < 1 || c.global_batch % (c.micro_batch * c.dp_size) != 0)
    throw BadInput("batch.global_batch_size " + std::to_string(c.global_batch) +
                   " is not a positive multiple of batch.micro_batch_size " + std::to_string(c.micro_batch) +
                   " x parallel.dp " + std::to_string(c.dp_size));
  if (c.prefetch_depth < 0) throw BadInput("loader prefetch depth must be >= 0");
  accumulation_ = c.global_batch / (c.micro_batch * c.dp_size);

  // The caller's Dataset where it opened this path already (the preflight).
  const auto open = [&](const std::string& path) -> std::shared_ptr<const Dataset> {
    if (c.opened != nullptr) {
      const auto found = c.opened->find(path);
      if (found != c.opened->end()) return found->second;
    }
    return std::make_shared<const Dataset>(Dataset::open(path, c.open_options));
  };
  const auto check_compatible = [&](const Dataset& dataset, const std::string& key) {
    if (samples_in(dataset, c.seq_len) == 0)
      throw BadInput(key + ": " + dataset.dir() + " has " + std::to_string(dataset.num_tokens()) +
                     " tokens, fewer than data.seq_len + 1 = " + std::to_string(c.seq_len + 1));
    if (datasets_.empty()) return;
    const DatasetIndex& first = datasets_.front()->index();
    if (dataset.vocab_size() != first.vocab_size || dataset.index().tokenizer_hash != first.tokenizer_hash)
      throw BadInput(key + ": " + dataset.dir() + " was tokenized differently (vocab_size " +
                     std::to_string(dataset.vocab_size()) + ", tokenizer_hash \"" + dataset.index().tokenizer_hash +
                     "\") from " + datasets_.front()->dir() + " (vocab_size " + std::to_string(first.vocab_size) +
                     ", tokenizer_hash \"" + first.tokenizer_hash + "\")");
  };
  for (size_t i = 0; i < c.datasets.size(); ++i) {
    const std::string key = "data.train[" + std::to_string(i) + "]";
    const double weight = c.datasets[i].weight;
    if (!std::isfinite(weight) || weight <= 0)
      throw BadInput(key + ".weight: expected a positive number, found " + std::to_string(weight));
    std::shared_ptr<const Dataset> dataset = open(c.datasets[i].path);
    check_compatible(*dataset, key);
    num_samples_.push_back(samples_in(*dataset, c.seq_len));
    datasets_.push_back(std::move(dataset));
  }
  if (!c.valid_path.empty()) {
    valid_ = open(c.valid_path);
    check_compatible(*valid_, "data.valid");
  }
  position_.counts_at_step_start.assign(datasets_.size(), 0);
  loss_mask_ = any_loss_mask(datasets_, valid_);
}

Loader::~Loader() { stop_prefetch(); }

void Loader::start_prefetch() {
  producer_ = std::make_unique<Producer>(*this, position_);
  stop_ = false;
  queue_.clear();
  thread_ = std::thread([this] { prefetch_loop(*producer_); });
}

void Loader::stop_prefetch() noexcept {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  // Wakes the thread if it waits for room in the queue; a read in progress
  // finishes first (HDF5 calls cannot be interrupted).
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
  queue_.clear();
  producer_.reset();
  stop_ = false;
}

void Loader::prefetch_loop(Producer& producer) {
  const auto depth = static_cast<size_t>(config_.prefetch_depth);
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (stop_) return;
    }
    Item item;
    try {
      item = producer.produce();
    } catch (...) {
      // Handed to the consumer in order, after the batches before it: an
      // exception escaping a std::thread would terminate the process, and a
      // thread that just stopped would leave next_micro_batch() waiting.
      item.error = std::current_exception();
    }
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return stop_ || queue_.size() < depth; });
    if (stop_) return;
    const bool failed = item.error != nullptr;
    queue_.push_back(std::move(item));
    changed_.notify_all();
    if (failed) return;
  }
}

MicroBatch Loader::next_micro_batch() {
  if (failure_) std::rethrow_exception(failure_);
  Item item;
  if (config_.prefetch_depth == 0) {
    if (!producer_) producer_ = std::make_unique<Producer>(*this, position_);
    try {
      item = producer_->produce();
    } catch (...) {
      item.error = std::current_exception();
    }
  } else {
    if (!thread_.joinable()) start_prefetch();
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return !queue_.empty(); });
    item = std::move(queue_.front());
    queue_.pop_front();
    changed_.notify_all();
  }
  if (item.error) {
    failure_ = item.error;
    std::rethrow_exception(failure_);
  }
  position_ = std::move(item.next);
  return std::move(item.batch);
}

json Loader::state() const {
  json datasets = json::array();
  for (size_t d = 0; d < datasets_.size(); ++d) {
    const uint64_t count = position_.counts_at_step_start[d];
    datasets.push_back({{"path", config_.datasets[d].path},
                        {"weight", config_.datasets[d].weight},
                        {"fingerprint", dataset_fingerprint(datasets_[d]->index())},
                        {"num_samples", num_samples_[d]},
                        {"samples_before_step", count},
                        {"epoch", count / num_samples_[d]},
                        {"position_in_epoch", count % num_samples_[d]}});
  }
  return {{"format", kStateFormat},
          {"version", kStateVersion},
          {"seed", config_.seed},
          {"seq_len", config_.seq_len},
          {"global_batch", config_.global_batch},
          {"micro_batch", config_.micro_batch},
          {"dp_size", config_.dp_size},
          {"step", position_.step},
          {"micro_index", position_.micro_index},
          {"global_samples_before_step", static_cast<uint64_t>(position_.step * config_.global_batch)},
          {"datasets", datasets}};
}

void Loader::restore(const json& state, const std::string& context) {
  const StateReader reader(state, context);
  const json& root = reader.root();
  if (reader.at(root, "format", "format") != kStateFormat)
    reader.fail("format", "expected \"" + std::string(kStateFormat) + "\"");
  if (reader.integer(root, "version", "version") != kStateVersion)
    reader.fail("version", "expected " + std::to_string(kStateVersion));
  const std::string changes = "resuming would change the training samples";
  reader.expect_same("seed", reader.at(root, "seed", "seed"), config_.seed, changes);
  reader.expect_same("seq_len", reader.at(root, "seq_len", "seq_len"), config_.seq_len, changes);
  reader.expect_same("global_batch", reader.at(root, "global_batch", "global_batch"), config_.global_batch, changes);

  const json& datasets = reader.at(root, "datasets", "datasets");
  if (!datasets.is_array() || datasets.size() != datasets_.size())
    reader.fail("datasets", "saved with " + std::to_string(datasets.is_array() ? datasets.size() : 0) +
                                " training datasets, the config has " + std::to_string(datasets_.size()));
  Position position;
  position.step = reader.integer(root, "step", "step");
  position.micro_index = reader.integer(root, "micro_index", "micro_index");
  uint64_t slots = 0;
  for (size_t d = 0; d < datasets_.size(); ++d) {
    const std::string key = "datasets[" + std::to_string(d) + "]";
    const json& saved = datasets[d];
    if (!saved.is_object()) reader.fail(key, "expected an object");
    reader.expect_same(key + ".fingerprint", reader.at(saved, "fingerprint", key + ".fingerprint"),
                       dataset_fingerprint(datasets_[d]->index()),
                       "the dataset at " + config_.datasets[d].path + " has other content");
    reader.expect_same(key + ".weight", reader.at(saved, "weight", key + ".weight"), config_.datasets[d].weight,
                       changes);
    const uint64_t count = reader.unsigned_integer(saved, "samples_before_step", key + ".samples_before_step");
    position.counts_at_step_start.push_back(count);
    slots += count;
  }
  if (position.step < 0) reader.fail("step", "expected a non-negative step");
  if (slots != static_cast<uint64_t>(position.step * config_.global_batch))
    reader.fail("datasets", "samples per dataset add up to " + std::to_string(slots) + ", not step x global_batch = " +
                                std::to_string(position.step * config_.global_batch));
  if (position.micro_index != 0) {
    // Mid-step, the position is "this rank's micro-batch m", which only means
    // the same thing under the same layout.
    const std::string mid_step = "saved in the middle of a step (micro_index " +
                                 std::to_string(position.micro_index) + "), which resumes only with the same layout";
    reader.expect_same("dp_size", reader.at(root, "dp_size", "dp_size"), config_.dp_size, mid_step);
    reader.expect_same("micro_batch", reader.at(root, "micro_batch", "micro_batch"), config_.micro_batch, mid_step);
    if (position.micro_index < 0 || position.micro_index >= accumulation_)
      reader.fail("micro_index", "expected 0 to " + std::to_string(accumulation_ - 1));
  }
  stop_prefetch();
  failure_ = nullptr;
  position_ = std::move(position);
}

ShardCacheStats Loader::shard_cache_stats() const {
  ShardCacheStats total;
  std::vector<const Dataset*> counted;
  const auto add = [&](const std::shared_ptr<const Dataset>& dataset) {
    if (!dataset || std::find(counted.begin(), counted.end(), dataset.get()) != counted.end()) return;
    counted.push_back(dataset.get());
    const ShardCacheStats stats = dataset->shard_cache_stats();
    total.shards += stats.shards;
    total.distinct_opened += stats.distinct_opened;
    total.checked += stats.checked;
    total.open_now += stats.open_now;
    total.peak_open += stats.peak_open;
    total.max_open += stats.max_open;
  };
  for (const auto& dataset : datasets_) add(dataset);
  add(valid_);
  return total;
}

// --- validation ----------------------------------------------------------------------

ValidationBatches Loader::validation_batches(int64_t max_batches) const {
  if (!valid_) return ValidationBatches(nullptr, &config_, 0, loss_mask_);
  const auto group = static_cast<uint64_t>(config_.micro_batch * config_.dp_size);
  auto count = static_cast<int64_t>(samples_in(*valid_, config_.seq_len) / group);
  if (max_batches >= 0) count = std::min(count, max_batches);
  return ValidationBatches(valid_.get(), &config_, count, loss_mask_);
}

ValidationBatches::ValidationBatches(const Dataset* dataset, const LoaderConfig* config, int64_t count,
                                     bool fill_loss_mask)
    : dataset_(dataset), config_(config), count_(count), fill_loss_mask_(fill_loss_mask) {}

MicroBatch ValidationBatches::at(int64_t index) const {
  if (index < 0 || index >= count_)
    throw std::out_of_range("validation batch " + std::to_string(index) + " of " + std::to_string(count_));
  MicroBatch batch;
  batch.rows = config_->micro_batch;
  batch.cols = config_->seq_len + 1;
  batch.step = index;
  batch.tokens.resize(static_cast<size_t>(batch.rows * batch.cols));
  if (fill_loss_mask_) batch.loss_mask.resize(batch.tokens.size());
  if (config_->document_positions) batch.positions.resize(batch.tokens.size());
  const int64_t group = config_->micro_batch * config_->dp_size;
  const auto sample_of_row = [&](int64_t row) {
    return static_cast<uint64_t>(index * group + row * config_->dp_size + config_->dp_rank);
  };
  // The batch's shards checked in one probe (Note [Lazy shard checks]).
  if (dataset_->checks_in_probe()) {
    std::vector<size_t> shards;
    for (int64_t row = 0; row < batch.rows; ++row)
      add_shards_of_sample(*dataset_, sample_of_row(row), config_->seq_len, shards);
    dataset_->check_shards(shards);
  }
  for (int64_t row = 0; row < batch.rows; ++row) {
    SampleId id;
    id.sample = sample_of_row(row);
    id.global_index = id.sample;
    read_sample(*dataset_, id.sample, config_->seq_len, batch, row);
    batch.samples.push_back(id);
  }
  return batch;
}

ValidationBatches::Iterator::Iterator(const ValidationBatches* owner, int64_t index) : owner_(owner), index_(index) {}

const MicroBatch& ValidationBatches::Iterator::operator*() const {
  if (!current_) current_ = owner_->at(index_);
  return *current_;
}

ValidationBatches::Iterator& ValidationBatches::Iterator::operator++() {
  ++index_;
  current_.reset();
  return *this;
}

}  // namespace loom
