// loom_dataset_tool: writes and reads loom datasets from plain text, so that
// the Python interop tests (tests/interop/test_dataset_h5py.py) can compare
// loom's files with what h5py reads. A test helper, not part of loom's CLI
// (`loom prepare` and `loom inspect` are the user-facing commands).
//
//   loom_dataset_tool write DIR --vocab-size N --eos E [--tokenizer-hash H]
//                     [--shard-tokens T] < ids.txt
//       one document per input line, token ids separated by spaces
//   loom_dataset_tool read DIR [--verify]
//       prints one document per line, the same format
//
// Exit codes as loom's: 0 done, 2 bad input (message names file and offset), 1 other.
#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "util/error.h"

namespace {

int usage() {
  std::cerr << "usage: loom_dataset_tool write DIR --vocab-size N --eos E [--tokenizer-hash H]\n"
               "                         [--shard-tokens T] < ids.txt\n"
               "       loom_dataset_tool read DIR [--verify]\n";
  return loom::kExitBadInput;
}

int64_t parse_int(const std::string& text, const std::string& what) {
  int64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size())
    throw loom::BadInput(what + ": '" + text + "' is not an integer");
  return value;
}

int write_dataset(const std::string& dir, const std::map<std::string, std::string>& options) {
  const auto required = [&](const std::string& name) {
    const auto it = options.find(name);
    if (it == options.end()) throw loom::BadInput("write: " + name + " is required");
    return it->second;
  };
  const auto optional = [&](const std::string& name, const std::string& fallback) {
    const auto it = options.find(name);
    return it == options.end() ? fallback : it->second;
  };
  const int64_t shard_tokens =
      parse_int(optional("--shard-tokens", std::to_string(loom::kDefaultShardTokens)), "--shard-tokens");
  if (shard_tokens < 1) throw loom::BadInput("--shard-tokens: expected at least 1");
  loom::DatasetWriter writer(dir, parse_int(required("--vocab-size"), "--vocab-size"),
                             parse_int(required("--eos"), "--eos"), optional("--tokenizer-hash", ""),
                             static_cast<uint64_t>(shard_tokens));
  std::string line;
  std::vector<int32_t> document;
  for (int64_t line_number = 1; std::getline(std::cin, line); ++line_number) {
    document.clear();
    size_t begin = line.find_first_not_of(' ');
    while (begin != std::string::npos) {
      const size_t end = std::min(line.find(' ', begin), line.size());
      const std::string word = line.substr(begin, end - begin);
      const int64_t id = parse_int(word, "stdin line " + std::to_string(line_number));
      if (id < INT32_MIN || id > INT32_MAX)
        throw loom::BadInput("stdin line " + std::to_string(line_number) + ": id " + word + " out of range");
      document.push_back(static_cast<int32_t>(id));
      begin = line.find_first_not_of(' ', end);
    }
    writer.add_document(document);
  }
  writer.finish();
  return loom::kExitOk;
}

int read_dataset(const std::string& dir, bool verify) {
  const loom::Dataset dataset = loom::Dataset::open(dir, {.verify_checksums = verify});
  std::vector<int64_t> document;
  std::string out;
  for (size_t shard = 0; shard < dataset.index().shards.size(); ++shard) {
    const std::vector<uint64_t> offsets = dataset.read_doc_offsets(shard);
    const uint64_t first = dataset.shard_first_token(shard);
    for (size_t d = 0; d + 1 < offsets.size(); ++d) {
      document.resize(offsets[d + 1] - offsets[d]);
      dataset.read_tokens(first + offsets[d], document);
      out.clear();
      for (size_t i = 0; i < document.size(); ++i) {
        if (i > 0) out += ' ';
        out += std::to_string(document[i]);
      }
      out += '\n';
      std::fwrite(out.data(), 1, out.size(), stdout);
    }
  }
  return loom::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2) return usage();
  try {
    std::map<std::string, std::string> options;
    bool verify = false;
    for (size_t i = 2; i < args.size(); ++i) {
      if (args[i] == "--verify") {
        verify = true;
      } else if (args[i].starts_with("--") && i + 1 < args.size()) {
        options[args[i]] = args[i + 1];
        ++i;
      } else {
        return usage();
      }
    }
    if (args[0] == "write") return write_dataset(args[1], options);
    if (args[0] == "read") return read_dataset(args[1], verify);
    return usage();
  } catch (const loom::BadInput& e) {
    std::cerr << "loom_dataset_tool: error: " << e.what() << "\n";
    return loom::kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "loom_dataset_tool: internal error: " << e.what() << "\n";
    return loom::kExitInternal;
  }
}
