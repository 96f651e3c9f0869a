#include "data/prepare.h"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "data/chat_encoding.h"
#include "data/prepare_parts.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;

namespace {

bool is_jsonl(const std::string& path) {
  const std::string ext = fs::path(path).extension().string();
  return ext == ".jsonl" || ext == ".ndjson";
}

bool is_blank(const std::string& line) { return line.find_first_not_of(" \t\r") == std::string::npos; }

// A fixed pool of threads running submitted jobs; results come back through
// futures, so the caller keeps input order by waiting on them in order.
class WorkerPool {
 public:
  explicit WorkerPool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { run(); });
  }
  ~WorkerPool() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }
  template <typename F>
  auto submit(F job) -> std::future<decltype(job())> {
    auto task = std::make_shared<std::packaged_task<decltype(job())()>>(std::move(job));
    auto future = task->get_future();
    {
      std::lock_guard lock(mutex_);
      jobs_.emplace_back([task] { (*task)(); });
    }
    wake_.notify_one();
    return future;
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();  // exceptions travel through the packaged_task's future
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

class Progress {
 public:
  explicit Progress(uint64_t total_bytes) : total_bytes_(total_bytes), terminal_(::isatty(STDERR_FILENO) == 1) {}

  void update(uint64_t bytes, uint64_t tokens, uint64_t documents, bool last = false) {
    const auto now = Clock::now();
    const double since_print = std::chrono::duration<double>(now - last_print_).count();
    if (!last && since_print < (terminal_ ? 0.2 : 5.0)) return;
    last_print_ = now;
    const double elapsed = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    const double fraction = total_bytes_ ? std::min(1.0, static_cast<double>(bytes) / total_bytes_) : 1.0;
    const double eta = fraction > 0 ? elapsed * (1 - fraction) / fraction : 0;
    char line[256];
    if (terminal_) {
      char bar[31];
      const int filled = static_cast<int>(fraction * 30);
      for (int i = 0; i < 30; ++i) bar[i] = i < filled ? '#' : '.';
      bar[30] = 0;
      std::snprintf(line, sizeof line, "\r[%s] %5.1f%%  %llu docs  %llu tokens  %.0f tokens/s  ETA %.0fs   ", bar,
                    100 * fraction, static_cast<unsigned long long>(documents), static_cast<unsigned long long>(tokens),
                    tokens / elapsed, eta);
      std::fputs(line, stderr);
      if (last) std::fputs("\n", stderr);
    } else {
      std::snprintf(line, sizeof line, "prepare: %.1f%% %llu docs %llu tokens %.0f tokens/s ETA %.0fs\n", 100 * fraction,
                    static_cast<unsigned long long>(documents), static_cast<unsigned long long>(tokens),
                    tokens / elapsed, eta);
      std::fputs(line, stderr);
    }
    std::fflush(stderr);
  }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  using Clock = std::chrono::steady_clock;
  uint64_t total_bytes_;
  bool terminal_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_print_ = Clock::now();
};

// Calls emit(line, "path:N") for each non-blank line of `path`: the
// conversations of `loom prepare --chat`, parsed by the workers.
void read_lines(const std::string& path, const std::function<void(std::string&&, std::string&&)>& emit) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BadInput("cannot read input '" + path + "'");
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number)
    if (!is_blank(line)) emit(std::move(line), path + ":" + std::to_string(number));
}

}  // namespace

void read_documents(const std::string& path, const DocumentSplit& split,
                    const std::function<void(std::string&& document)>& emit) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BadInput("cannot read input '" + path + "'");
  std::string line, document;
  if (is_jsonl(path)) {
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (is_blank(line)) continue;
      nlohmann::json record;
      try {
        record = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e999
        throw BadInput(path + ":" + std::to_string(number) + ": not a JSON object (" + e.what() + ")");
      }
      if (!record.is_object() || !record.contains(split.text_field) || !record.at(split.text_field).is_string()) {
        throw BadInput(path + ":" + std::to_string(number) + ": no string field '" + split.text_field +
                       "' (choose the field with --text-field)");
      }
      emit(record.at(split.text_field).get<std::string>());
    }
    return;
  }
  if (split.per_file) {
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!is_blank(all)) emit(std::move(all));
    return;
  }
  // Blank-line-separated blocks; the lines of a block keep their newlines,
  // the block's last newline is dropped (EOS marks the end instead).
  auto flush = [&] {
    if (!document.empty()) {
      document.pop_back();
      emit(std::move(document));
      document.clear();
    }
  };
  while (std::getline(in, line)) {
    if (is_blank(line)) {
      flush();
    } else {
      document += line;
      document += '\n';
    }
  }
  flush();
}

int32_t resolve_eos_id(const Tokenizer& tokenizer, const std::string& tokenizer_path, const std::string& requested) {
  if (!requested.empty()) {
    if (auto id = tokenizer.token_to_id(requested)) return *id;
    throw BadInput("--eos-token '" + requested + "' is not in the vocabulary of " + tokenizer_path);
  }
  const fs::path config_path = fs::path(tokenizer_path).parent_path() / "tokenizer_config.json";
  if (fs::exists(config_path)) {
    try {
      auto config = nlohmann::json::parse(read_file(config_path.string()));
      if (config.contains("eos_token")) {
        const auto& eos = config.at("eos_token");
        std::string token = eos.is_string() ? eos.get<std::string>()
                            : eos.is_object() && eos.contains("content") ? eos.at("content").get<std::string>()
                                                                        : "";
        if (auto id = tokenizer.token_to_id(token); id && !token.empty()) return *id;
      }
    } catch (const nlohmann::json::exception& e) {
      throw BadInput(config_path.string() + ": not valid JSON (" + e.what() + ")");
    }
  }
  for (const char* token : {"<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"}) {
    if (auto id = tokenizer.token_to_id(token)) return *id;
  }
  throw BadInput(tokenizer_path + ": no end-of-document token found (no tokenizer_config.json eos_token, none of "
                 "<|endoftext|>, </s>, <|end_of_text|>, <eos>); name one with --eos-token");
}

namespace {

// What changes the tokens of a part besides its inputs: parts made with
// other settings must not be merged.
std::string encoding_settings(const PrepareOptions& options) {
  return std::string(options.chat ? "chat " + options.chat_options.date : "text") + " eos=" + options.eos_token +
         " special=" + (options.special_tokens ? "1" : "0") + " field=" + options.split.text_field +
         " per_file=" + (options.split.per_file ? "1" : "0");
}

}  // namespace

PrepareSummary prepare_dataset(const PrepareOptions& options) {
  if (options.inputs.empty()) throw BadInput("loom prepare: no --input files given");
  std::vector<uint64_t> sizes;
  for (const auto& input : options.inputs) {
    std::error_code error;
    const auto size = fs::file_size(input, error);
    if (error) throw BadInput("cannot read input '" + input + "': " + error.message());
    sizes.push_back(size);
  }
  const bool in_parts = options.parts > 0;
  const PartSpec part{options.part, options.parts};
  std::vector<std::string> inputs = options.inputs;
  std::string output_dir = options.output_dir;
  if (in_parts) {
    // Note [Preparing in parts] (data/prepare_parts.cpp).
    inputs = inputs_of_part(options.inputs, sizes, part);
    output_dir = (fs::path(options.output_dir) / part_folder_name(part)).string();
    if (part_is_complete(output_dir)) return {.output_dir = output_dir, .already_done = true};
  }
  uint64_t total_bytes = 0;
  for (const auto& input : inputs) total_bytes += fs::file_size(input);
  const Tokenizer tokenizer = Tokenizer::load(options.tokenizer_path);
  const int32_t eos_id = resolve_eos_id(tokenizer, options.tokenizer_path, options.eos_token);
  const int threads = options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());

  // The template is parsed here once, so that a template loom cannot parse
  // fails before any input is read; each job parses its own copy
  // (ChatTemplate is not thread-safe), a few milliseconds per batch.
  std::optional<ChatTemplateSource> chat_source;
  nlohmann::ordered_json special_tokens;
  if (options.chat) {
    chat_source = find_chat_template(options.tokenizer_path);
    special_tokens = read_special_tokens(options.tokenizer_path);
    const ChatTemplate parsed(*chat_source, special_tokens, options.chat_options);
  }

  DatasetWriter writer(output_dir, tokenizer.vocab_size(), eos_id, tokenizer.hash(), options.shard_tokens,
                       /*with_loss_mask=*/options.chat);
  // A batch holds each document's text and, with --chat, its "file:line".
  struct Batch {
    std::vector<std::string> texts;
    std::vector<std::string> locations;
  };
  using Encoded = std::vector<ChatDocument>;  // loss_mask empty without --chat
  // The workers' code, declared before the pool: the pool's destructor waits
  // for jobs that an exception left running, and they use these.
  const auto special = options.special_tokens ? Tokenizer::SpecialTokens::kAdd : Tokenizer::SpecialTokens::kOmit;
  const auto frame_end = tokenizer.special_ids_after();
  const bool frame_ends_with_eos = special == Tokenizer::SpecialTokens::kAdd && !frame_end.empty() &&
                                   frame_end.back() == eos_id;
  auto encode_text = [&tokenizer, eos_id, special, frame_ends_with_eos](const Batch& docs) {
    Encoded out(docs.texts.size());
    for (size_t i = 0; i < docs.texts.size(); ++i) {
      out[i].ids = tokenizer.encode(docs.texts[i], special);
      if (!frame_ends_with_eos) out[i].ids.push_back(eos_id);
    }
    return out;
  };
  auto encode_chat = [&tokenizer, &chat_source, &special_tokens, &options](const Batch& docs) {
    const ChatTemplate chat_template(*chat_source, special_tokens, options.chat_options);
    Encoded out(docs.texts.size());
    for (size_t i = 0; i < docs.texts.size(); ++i) {
      try {
        out[i] = encode_conversation(chat_template, tokenizer, parse_conversation(docs.texts[i]));
      } catch (const BadInput& e) {
        throw BadInput(docs.locations[i] + ": " + e.what());
      }
    }
    return out;
  };
  WorkerPool pool(threads);
  Progress progress(total_bytes);

  // Documents go to the workers in batches; results are written in batch
  // order. At most 4 batches per thread are in flight, which bounds memory.
  std::deque<std::pair<std::future<Encoded>, uint64_t>> in_flight;  // (result, bytes)
  uint64_t bytes_done = 0, documents = 0;
  auto write_oldest = [&] {
    auto [future, bytes] = std::move(in_flight.front());
    in_flight.pop_front();
    for (const ChatDocument& document : future.get()) {
      if (options.chat)
        writer.add_document(document.ids, document.loss_mask);
      else
        writer.add_document(document.ids);
      ++documents;
    }
    bytes_done += bytes;
    progress.update(bytes_done, writer.num_tokens(), documents);
  };
  Batch batch;
  uint64_t batch_bytes = 0;
  auto submit = [&] {
    if (batch.texts.empty()) return;
    auto job = [&options, &encode_text, &encode_chat, docs = std::move(batch)] {
      return options.chat ? encode_chat(docs) : encode_text(docs);
    };
    in_flight.emplace_back(pool.submit(std::move(job)), batch_bytes);
    batch = {};
    batch_bytes = 0;
    if (in_flight.size() >= static_cast<size_t>(4 * threads)) write_oldest();
  };
  for (const auto& input : inputs) {
    if (options.chat) {
      read_lines(input, [&](std::string&& line, std::string&& location) {
        batch_bytes += line.size() + 1;
        batch.texts.push_back(std::move(line));
        batch.locations.push_back(std::move(location));
        if (batch_bytes >= (256u << 10)) submit();
      });
      continue;
    }
    read_documents(input, options.split, [&](std::string&& document) {
      batch_bytes += document.size() + 1;
      batch.texts.push_back(std::move(document));
      if (batch_bytes >= (256u << 10)) submit();
    });
  }
  submit();
  while (!in_flight.empty()) write_oldest();
  if (in_parts) {
    const DatasetIndex& index = writer.finish_part();
    write_part_record(output_dir, part, parts_fingerprint(options.inputs, sizes, options.parts, options.shard_tokens,
                                                      encoding_settings(options)),
                      options.shard_tokens, index);
    progress.update(total_bytes, index.num_tokens, documents, /*last=*/true);
    return {documents, index.num_tokens, index.shards.size(), progress.seconds(), output_dir};
  }
  if (documents == 0) {
    std::string names;
    for (size_t i = 0; i < options.inputs.size() && i < 5; ++i) names += (i ? ", " : "") + options.inputs[i];
    if (options.inputs.size() > 5) names += ", ...";
    throw BadInput("no documents in the input (" + names + "): every file is empty or blank");
  }
  const DatasetIndex& index = writer.finish();
  progress.update(total_bytes, index.num_tokens, documents, /*last=*/true);
  return {documents, index.num_tokens, index.shards.size(), progress.seconds(), output_dir};
}

}  // namespace loom
