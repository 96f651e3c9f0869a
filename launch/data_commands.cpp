// Data subcommands: `loom prepare` (whole, or in parts and merged), `loom
// tokenizer train`, and `loom inspect` of a dataset folder (in parallel over
// ranks under mpirun).
#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>

#include "data/bpe_trainer.h"
#include "data/dataset.h"
#include "data/prepare.h"
#include "data/prepare_parts.h"
#include "data/tokenizer.h"
#include "launch/cli.h"
#include "launch/commands.h"
#include "parallel/mpi_process_group.h"
#include "util/crc32c.h"
#include "util/error.h"

namespace loom {

namespace fs = std::filesystem;

const CommandSpec& prepare_spec() {
  static const CommandSpec spec{
      .name = "prepare",
      .synopsis = "--tokenizer T --input FILE... --output DIR [--part I/N] [OPTIONS] | --merge DIR",
      .summary = "text or JSONL files (or chat conversations) -> a tokenized HDF5 dataset, the input of loom train "
                 "(docs/data.md)",
      .arguments = {{"FILE...", "more input files, as --input FILE"}},
      .flags = {{"tokenizer", "T", "tokenizer.json (required)"},
                {"input", "FILE", "text or JSONL file", kRepeatable},
                {"output", "DIR", "dataset folder to create (required)"},
                {"eos-token", "TOK", "token appended to every document"},
                {"text-field", "NAME", "JSONL field holding the text (default text)"},
                {"doc-per-file", "", "each text file is one document"},
                {"chat", "", "each line is {\"messages\": [...]}: rendered with the tokenizer's chat template, "
                             "with a loss mask on the assistant turns"},
                {"no-special-tokens", "", "do not frame each document with the special tokens of the tokenizer's "
                                          "post-processor (Llama-3's <|begin_of_text|>), only EOS after it"},
                {"chat-date", "YYYY-MM-DD", std::string("the date strftime_now gives the chat template (default ") +
                                                kDefaultChatDate + ")"},
                {"shard-tokens", "N", "tokens per shard (default 64Mi)"},
                {"threads", "N", "tokenizer threads (default: all cores)"},
                {"part", "I/N", "write only part I (0-based) of N into DIR/part-I-of-N/, for a Slurm array"},
                {"merge", "DIR", "merge DIR's N finished parts into one dataset (writes DIR/index.json)"}},
      .examples = {"loom prepare --tokenizer runs/data/tokenizer.json --input runs/data/kjv.txt "
                   "--output runs/data/tiny",
                   "loom prepare --chat --tokenizer models/Llama-3.1-8B-Instruct/tokenizer.json "
                   "--input chats.jsonl --output runs/data/chats",
                   "loom prepare --tokenizer T --input corpus/*.jsonl --output DIR --part $SLURM_ARRAY_TASK_ID/64",
                   "loom prepare --merge DIR"},
  };
  return spec;
}

int command_prepare(const std::vector<std::string>& argv) {
  Args args(prepare_spec(), argv);
  if (args.has("merge")) {
    for (const char* other : {"tokenizer", "input", "output", "part"})
      if (args.has(other)) throw BadInput(std::string("loom prepare: --merge takes no --") + other);
    const std::string dir = args.require("merge");
    const MergeSummary merged = merge_parts(dir);
    std::cout << "merged " << merged.parts << " parts into " << dir << ": " << merged.documents << " documents, "
              << merged.tokens << " tokens in " << merged.shards << " shard" << (merged.shards == 1 ? "" : "s")
              << "\n";
    return kExitOk;
  }
  PrepareOptions options;
  options.tokenizer_path = args.require("tokenizer");
  options.output_dir = args.require("output");
  options.inputs = args.all("input");
  for (const auto& extra : args.positional()) options.inputs.push_back(extra);  // --input a b c
  options.eos_token = args.get_or("eos-token", "");
  options.split.text_field = args.get_or("text-field", "text");
  options.split.per_file = args.has("doc-per-file");
  options.chat = args.has("chat");
  options.special_tokens = !args.has("no-special-tokens");
  if (options.chat && args.has("no-special-tokens"))
    throw BadInput("loom prepare: --no-special-tokens is for text: with --chat the template writes the special tokens");
  if (options.chat) {
    for (const char* other : {"text-field", "doc-per-file"})
      if (args.has(other))
        throw BadInput(std::string("loom prepare: --chat takes no --") + other +
                       " (each line is a conversation {\"messages\": [...]})");
    options.chat_options.date = args.get_or("chat-date", kDefaultChatDate);
  } else if (args.has("chat-date")) {
    throw BadInput("loom prepare: --chat-date is for --chat");
  }
  const int64_t shard_tokens = args.get_int("shard-tokens", static_cast<int64_t>(kDefaultShardTokens));
  if (shard_tokens < 1) throw BadInput("loom prepare: --shard-tokens must be positive");
  options.shard_tokens = static_cast<uint64_t>(shard_tokens);
  options.threads = static_cast<int>(args.get_int("threads", 0));
  if (args.has("part")) {
    const PartSpec part = parse_part_spec(args.require("part"));
    options.part = part.part;
    options.parts = part.parts;
  }
  const PrepareSummary summary = prepare_dataset(options);
  if (summary.already_done) {
    std::cout << "prepared " << summary.output_dir << " already (its part.json exists): nothing to do\n";
    return kExitOk;
  }
  std::cout << "prepared " << summary.output_dir << ": " << summary.documents << " documents, " << summary.tokens
            << " tokens in " << summary.shards << " shard" << (summary.shards == 1 ? "" : "s") << " ("
            << static_cast<int64_t>(summary.tokens / std::max(summary.seconds, 1e-9)) << " tokens/s)\n";
  return kExitOk;
}

const CommandSpec& tokenizer_train_spec() {
  static const CommandSpec spec{
      .name = "tokenizer train",
      .synopsis = "--input FILE... --vocab-size N --output T [OPTIONS]",
      .summary = "train a byte-level BPE tokenizer on text files, for loom prepare (docs/data.md)",
      .arguments = {{"FILE...", "more input files, as --input FILE"}},
      .flags = {{"input", "FILE", "text file", kRepeatable},
                {"vocab-size", "N", "tokens in the vocabulary, special tokens included (>= 257) (required)"},
                {"output", "T", "tokenizer.json to write (required)"},
                {"special-token", "TOK", "special token (default <|endoftext|>)", kRepeatable}},
      .examples = {"loom tokenizer train --input runs/data/kjv.txt --vocab-size 2048 "
                   "--output runs/data/tokenizer.json"},
  };
  return spec;
}

const CommandSpec& tokenizer_encode_spec() {
  static const CommandSpec spec{
      .name = "tokenizer encode",
      .synopsis = "T --text TEXT [--no-special-tokens] [--tokens]",
      .summary = "print the token ids of a text, as Hugging Face tokenizers' encode gives them (docs/data.md)",
      .arguments = {{"T", "tokenizer.json"}},
      .flags = {{"text", "TEXT", "text to encode (required)"},
                {"no-special-tokens", "", "without the post-processor's special tokens (add_special_tokens=False)"},
                {"tokens", "", "print the token strings too, one id and token per line"}},
      .examples = {"loom tokenizer encode models/Llama-3.1-8B/tokenizer.json --text 'Hello world'"},
  };
  return spec;
}

int command_tokenizer_encode(const std::vector<std::string>& argv) {
  Args args(tokenizer_encode_spec(), argv);
  if (args.positional().size() != 1)
    throw BadInput("loom tokenizer encode: give one tokenizer.json (loom tokenizer encode T --text TEXT)");
  const Tokenizer tokenizer = Tokenizer::load(args.positional().front());
  const auto special = args.has("no-special-tokens") ? Tokenizer::SpecialTokens::kOmit : Tokenizer::SpecialTokens::kAdd;
  const std::vector<int32_t> ids = tokenizer.encode(args.require("text"), special);
  if (args.has("tokens")) {
    for (int32_t id : ids) std::cout << id << "\t" << tokenizer.id_to_token(id).value_or("") << "\n";
  } else {
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n";
  }
  return kExitOk;
}

int command_tokenizer(const std::vector<std::string>& argv) {
  const CommandSpec& spec = tokenizer_train_spec();
  if (!argv.empty() && argv[0] == "encode")
    return command_tokenizer_encode(std::vector<std::string>(argv.begin() + 1, argv.end()));
  if (argv.empty() || argv[0] != "train") {
    if (!argv.empty() && is_help_flag(argv[0]))
      throw HelpRequested{usage(spec) + "\n" + usage(tokenizer_encode_spec())};
    throw BadInput("loom tokenizer: expected 'train' or 'encode' (loom " + spec.name + " " + spec.synopsis +
                   "; loom tokenizer encode " + tokenizer_encode_spec().synopsis + ")");
  }
  Args args(spec, std::vector<std::string>(argv.begin() + 1, argv.end()));
  std::vector<std::string> inputs = args.all("input");
  for (const auto& extra : args.positional()) inputs.push_back(extra);
  if (inputs.empty()) throw BadInput("loom tokenizer train: no --input files given");
  bool any_text = false;
  for (const auto& input : inputs) {
    if (!fs::is_regular_file(input)) throw BadInput("loom tokenizer train: cannot read input '" + input + "'");
    any_text = any_text || fs::file_size(input) > 0;
  }
  if (!any_text) throw BadInput("loom tokenizer train: the inputs are empty (" + inputs.front() + ", ...)");
  const int64_t vocab_size = args.get_int("vocab-size", 0);
  if (vocab_size < 257) throw BadInput("loom tokenizer train: --vocab-size must be at least 257 (256 bytes + 1)");
  std::vector<std::string> specials = args.all("special-token");
  if (specials.empty()) specials = {"<|endoftext|>"};
  const std::string output = args.require("output");
  const TrainedTokenizer trained = train_bpe(inputs, vocab_size, specials);
  trained.write_tokenizer_json(output);
  if (static_cast<int64_t>(trained.vocab.size()) < vocab_size) {
    std::cerr << "loom tokenizer train: warning: the input ran out of pairs to merge at " << trained.vocab.size()
              << " tokens (asked for " << vocab_size << "); give more text for the full vocabulary\n";
  }
  std::cout << "trained " << output << ": " << trained.vocab.size() << " tokens, " << trained.merges.size()
            << " merges\n";
  return kExitOk;
}

bool is_dataset_folder(const std::string& path) { return fs::exists(fs::path(path) / kDatasetIndexFile); }

namespace {

void print_dataset(const std::string& path, const Dataset& dataset, bool verify, const std::string& checked_where) {
  const DatasetIndex& index = dataset.index();
  std::cout << path << ": loom dataset, " << index.num_documents << " documents, " << index.num_tokens
            << " tokens, vocab " << index.vocab_size << " (" << token_dtype_name(index.token_dtype) << "), eos "
            << index.eos_id << ", tokenizer " << index.tokenizer_hash << "\n";
  if (index.has_loss_mask)
    std::cout << "loss mask: /loss_mask in every shard (format_version " << index.format_version()
              << "): 1 on the tokens that are targets of the loss\n";
  std::cout << "checked" << checked_where << ": every shard against index.json, every shard file's CRC32C that "
            << "index.json records, every token id < vocab"
            << (index.has_loss_mask ? ", every loss-mask value 0 or 1" : "")
            << (verify ? ", CRC32C checksums of the data" : " (add --verify for the data's checksums)") << "\n";
  for (const auto& shard : index.shards) {
    std::cout << "  " << shard.file << "  " << shard.num_tokens << " tokens  " << shard.num_documents
              << " documents  " << shard.bytes << " bytes  file CRC32C "
              << (shard.file_crc32c ? crc32c_hex(*shard.file_crc32c) : std::string("not recorded")) << "\n";
  }
}

// A sample: the start of the first document, decoded when a tokenizer is at hand.
void print_first_tokens(const Dataset& dataset, const std::string& tokenizer_path) {
  const DatasetIndex& index = dataset.index();
  const uint64_t length = std::min<uint64_t>(index.num_tokens, 48);
  std::vector<int32_t> ids(length);
  dataset.read_tokens(0, ids);
  std::cout << "first tokens:";
  for (int32_t id : ids) std::cout << " " << id;
  std::cout << "\n";
  if (index.has_loss_mask) {
    std::vector<uint8_t> mask(length);
    dataset.read_loss_mask(0, mask);
    std::cout << "first loss mask:";
    for (uint8_t value : mask) std::cout << " " << static_cast<int>(value);
    std::cout << "\n";
  }
  if (!tokenizer_path.empty()) {
    const Tokenizer tokenizer = Tokenizer::load(tokenizer_path);
    if (tokenizer.hash() != index.tokenizer_hash) {
      std::cout << "note: " << tokenizer_path << " is not the tokenizer this dataset was made with\n";
    }
    std::cout << "decoded: " << tokenizer.decode(ids) << "\n";
  }
}

// Under mpirun: rank r checks the shards i with i % ranks == r, each in its
// own probe so that every bad shard is found, not only a rank's first; each
// rank prints its own failures (one line each, naming the file), and rank 0
// prints the dataset and the union of the verdicts. Every rank exits 2 when
// any shard failed.
int inspect_dataset_on_ranks(const std::string& path, const Dataset& dataset, bool verify,
                             const std::string& tokenizer_path) {
  MpiSession session;
  const std::unique_ptr<MpiProcessGroup> world = session.world();
  const int rank = world->rank();
  const int ranks = world->size();
  const size_t shards = dataset.num_shards();
  at::Tensor failed = at::zeros({static_cast<int64_t>(std::max<size_t>(shards, 1))}, at::kLong);
  for (size_t s = static_cast<size_t>(rank); s < shards; s += static_cast<size_t>(ranks)) {
    try {
      dataset.check_shards({s});
    } catch (const BadInput& e) {
      failed[static_cast<int64_t>(s)] = 1;
      std::cerr << ("loom inspect: rank " + std::to_string(rank) + ": error: " + e.what() + "\n") << std::flush;
    }
  }
  world->all_reduce(failed)->wait();
  std::vector<std::string> bad;
  for (size_t s = 0; s < shards; ++s)
    if (failed[static_cast<int64_t>(s)].item<int64_t>() != 0) bad.push_back(dataset.index().shards[s].file);
  if (rank == 0) {
    const std::string where = " on " + std::to_string(ranks) + " ranks (shard i on rank i % " +
                              std::to_string(ranks) + ")";
    print_dataset(path, dataset, verify, where);
    if (bad.empty()) {
      std::cout << "verified: all " << shards << " shards" << where << "\n";
      print_first_tokens(dataset, tokenizer_path);
    } else {
      std::string names;
      for (size_t i = 0; i < bad.size() && i < 10; ++i) names += (i ? ", " : "") + bad[i];
      if (bad.size() > 10) names += ", ...";
      std::cerr << "loom inspect: error: " << path << ": " << bad.size() << " of " << shards
                << " shards failed their checks (lines above): " << names << std::endl;
    }
  }
  world->barrier()->wait();
  return bad.empty() ? kExitOk : kExitBadInput;
}

}  // namespace

int inspect_dataset(const std::string& path, bool verify, const std::string& tokenizer_path) {
  DatasetOpenOptions options;
  options.verify_checksums = verify;
  options.scan_token_range = TokenRangeScan::kAlways;
  options.check_shard_files = ShardFileCheck::kAlways;
  const Dataset dataset = Dataset::open(path, options);
  if (launched_by_mpi()) return inspect_dataset_on_ranks(path, dataset, verify, tokenizer_path);
  // All shards in one probe process (Note [Lazy shard checks]); the first
  // bad shard is the error.
  dataset.check_all_shards();
  print_dataset(path, dataset, verify, "");
  print_first_tokens(dataset, tokenizer_path);
  return kExitOk;
}

}  // namespace loom
