// loom_tokenize: drives loom's tokenizer from the interop tests (until the
// `loom tokenizer` commands take over).
//
//   loom_tokenize encode TOKENIZER_JSON INPUT [--threads N] [--special]
//       INPUT holds documents separated by NUL bytes; prints one line of
//       space-separated ids per document, and the throughput on stderr.
//       --special adds the post-processor's special tokens (add_special_tokens).
//   loom_tokenize decode TOKENIZER_JSON IDS
//       IDS holds one line of space-separated ids per document; writes the
//       decoded documents to stdout, each followed by a NUL byte.
//   loom_tokenize train INPUT... --vocab-size N --output PATH [--special TOKEN]...
//
// Exit codes as `loom`: 2 for bad input, 1 for anything else.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "data/bpe_trainer.h"
#include "data/tokenizer.h"
#include "util/error.h"
#include "util/file_io.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int64_t parse_count(const std::string& text, const char* flag) {
  try {
    size_t used = 0;
    const int64_t value = std::stoll(text, &used);
    if (used == text.size() && value > 0) return value;
  } catch (const std::exception&) {
  }
  throw loom::BadInput(std::string(flag) + " expects a positive integer, got '" + text + "'");
}

std::vector<std::string_view> split_documents(std::string_view data) {
  std::vector<std::string_view> docs;
  size_t start = 0;
  while (true) {
    const size_t end = data.find('\0', start);
    if (end == std::string_view::npos) {
      docs.push_back(data.substr(start));
      return docs;
    }
    docs.push_back(data.substr(start, end - start));
    start = end + 1;
  }
}

int encode(std::vector<std::string> args) {
  const auto special_flag = std::find(args.begin(), args.end(), "--special");
  const auto special = special_flag == args.end() ? loom::Tokenizer::SpecialTokens::kOmit
                                                  : loom::Tokenizer::SpecialTokens::kAdd;
  if (special_flag != args.end()) args.erase(special_flag);
  if (args.size() != 2 && !(args.size() == 4 && args[2] == "--threads"))
    throw loom::BadInput("usage: loom_tokenize encode TOKENIZER_JSON INPUT [--threads N] [--special]");
  const int threads = args.size() == 4 ? static_cast<int>(std::min<int64_t>(parse_count(args[3], "--threads"), 64)) : 1;
  const loom::Tokenizer tokenizer = loom::Tokenizer::load(args[0]);
  const std::string data = loom::read_file(args[1]);
  const std::vector<std::string_view> docs = split_documents(data);
  std::vector<std::vector<int32_t>> ids(docs.size());
  const auto start = Clock::now();
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(threads);
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      try {
        for (size_t d = t; d < docs.size(); d += threads) ids[d] = tokenizer.encode(docs[d], special);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& worker : workers) worker.join();
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
  const double elapsed = seconds_since(start);
  std::string out;
  size_t total_ids = 0;
  for (const auto& doc_ids : ids) {
    for (size_t i = 0; i < doc_ids.size(); ++i) {
      if (i > 0) out += ' ';
      out += std::to_string(doc_ids[i]);
    }
    out += '\n';
    total_ids += doc_ids.size();
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  std::fprintf(stderr, "encoded %zu bytes (%zu documents) into %zu ids in %.3f s on %d thread(s): %.1f MB/s\n",
               data.size(), docs.size(), total_ids, elapsed, threads, data.size() / 1e6 / elapsed);
  return 0;
}

int decode(const std::vector<std::string>& args) {
  if (args.size() != 2) throw loom::BadInput("usage: loom_tokenize decode TOKENIZER_JSON IDS");
  const loom::Tokenizer tokenizer = loom::Tokenizer::load(args[0]);
  std::istringstream lines(loom::read_file(args[1]));
  std::string line, out;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::vector<int32_t> ids;
    for (int64_t id; fields >> id;) ids.push_back(static_cast<int32_t>(id));
    out += tokenizer.decode(ids);
    out += '\0';
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

int train(const std::vector<std::string>& args) {
  std::vector<std::string> inputs, specials;
  int64_t vocab_size = 0;
  std::string output;
  for (size_t i = 0; i < args.size(); ++i) {
    const bool has_value = i + 1 < args.size();
    if (args[i] == "--vocab-size" && has_value) {
      vocab_size = parse_count(args[++i], "--vocab-size");
    } else if (args[i] == "--output" && has_value) {
      output = args[++i];
    } else if (args[i] == "--special" && has_value) {
      specials.push_back(args[++i]);
    } else {
      inputs.push_back(args[i]);
    }
  }
  if (inputs.empty() || vocab_size == 0 || output.empty())
    throw loom::BadInput("usage: loom_tokenize train INPUT... --vocab-size N --output PATH [--special TOKEN]...");
  const auto start = Clock::now();
  const loom::TrainedTokenizer trained = loom::train_bpe(inputs, vocab_size, specials);
  trained.write_tokenizer_json(output);
  std::fprintf(stderr, "trained %zu tokens (%zu merges) in %.3f s\n", trained.vocab.size(), trained.merges.size(),
               seconds_since(start));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) throw loom::BadInput("usage: loom_tokenize encode|decode|train ...");
    const std::string command = argv[1];
    const std::vector<std::string> args(argv + 2, argv + argc);
    if (command == "encode") return encode(args);
    if (command == "decode") return decode(args);
    if (command == "train") return train(args);
    throw loom::BadInput("unknown command '" + command + "' (encode, decode, train)");
  } catch (const loom::BadInput& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return loom::kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
    return loom::kExitInternal;
  }
}
