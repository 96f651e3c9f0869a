#include "data/prepare_parts.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <span>

#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {

namespace fs = std::filesystem;
using nlohmann::json;

// Note [Preparing in parts]: a single `loom prepare` writes the documents of
// its inputs in input order, packing each shard until the next document
// would overflow shard_tokens. Part I of N tokenizes a contiguous run of
// whole input files (inputs_of_part), so the parts concatenated in order
// hold the same documents in the same order, tokenized the same way (each
// document alone, then EOS): the merged dataset has the single run's token
// stream, document boundaries, num_tokens and num_documents. Its shard
// boundaries match within a part but not at the seams: a single run would
// fill the last shard of part I with the first documents of part I+1, and
// where a shard ends depends on the token counts of everything before it,
// which part I+1 cannot know without tokenizing parts 0..I. Matching them
// would mean rewriting every later shard at the merge, a single-node pass
// over the whole corpus, which is what parts are meant to avoid. So the
// merged dataset has up to N-1 more (short) shards than the single run and
// its shard files, index.json's "shards" and the loader's dataset
// fingerprint differ; what training reads does not: samples are cut from the
// token stream by offset (Note [global sample order] in data/loader.h),
// whatever the shards. Splitting by whole files (not inside a file) keeps
// every part independent and each document whole; a corpus for a Slurm array
// comes as many files, and a part needs at least one.
PartSpec parse_part_spec(const std::string& text) {
  const auto slash = text.find('/');
  const auto parse = [&](const std::string& digits) -> long {
    if (digits.empty() || digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
    return std::stol(digits);
  };
  const long part = slash == std::string::npos ? -1 : parse(text.substr(0, slash));
  const long parts = slash == std::string::npos ? -1 : parse(text.substr(slash + 1));
  if (part < 0 || parts < 1 || part >= parts)
    throw BadInput("loom prepare: --part '" + text + "': expected I/N with 0 <= I < N (e.g. 3/16, the part of a " +
                   "Slurm array task: --part $SLURM_ARRAY_TASK_ID/16)");
  return {static_cast<int>(part), static_cast<int>(parts)};
}

std::string part_folder_name(const PartSpec& spec) {
  char name[48];
  std::snprintf(name, sizeof name, "part-%05d-of-%05d", spec.part, spec.parts);
  return name;
}

std::vector<std::string> inputs_of_part(const std::vector<std::string>& inputs, const std::vector<uint64_t>& bytes,
                                        const PartSpec& spec) {
  const size_t files = inputs.size();
  const auto parts = static_cast<size_t>(spec.parts);
  if (files < parts)
    throw BadInput("loom prepare: --part " + std::to_string(spec.part) + "/" + std::to_string(spec.parts) + ": " +
                   std::to_string(files) + " input file" + (files == 1 ? "" : "s") + " cannot be split into " +
                   std::to_string(spec.parts) + " parts (a part is a run of whole files; give at least as many " +
                   "files as parts)");
  std::vector<unsigned __int128> before(files + 1, 0);  // bytes of the files before each
  for (size_t i = 0; i < files; ++i) before[i + 1] = before[i] + bytes[i];
  // Part p starts at the first file with at least p/N of the bytes before
  // it, leaving every part (this one and those after it) one file at least.
  std::vector<size_t> starts(parts + 1, 0);
  starts[parts] = files;
  for (size_t p = 1; p < parts; ++p) {
    const unsigned __int128 target = before[files] * p / parts;
    size_t j = starts[p - 1] + 1;
    while (j < files - (parts - p) && before[j] < target) ++j;
    starts[p] = j;
  }
  const auto p = static_cast<size_t>(spec.part);
  return std::vector<std::string>(inputs.begin() + static_cast<std::ptrdiff_t>(starts[p]),
                                  inputs.begin() + static_cast<std::ptrdiff_t>(starts[p + 1]));
}

std::string parts_fingerprint(const std::vector<std::string>& inputs, const std::vector<uint64_t>& bytes, int parts,
                              uint64_t shard_tokens, const std::string& encoding) {
  std::string text = std::to_string(parts) + "|" + std::to_string(shard_tokens) + "|" + encoding;
  for (size_t i = 0; i < inputs.size(); ++i) text += "|" + inputs[i] + "|" + std::to_string(bytes[i]);
  return crc32c_hex(crc32c(std::as_bytes(std::span(text)))) + "-" + std::to_string(inputs.size());
}

bool part_is_complete(const std::string& dir) { return fs::exists(fs::path(dir) / kPartRecordFile); }

void write_part_record(const std::string& dir, const PartSpec& spec, const std::string& fingerprint,
                       uint64_t shard_tokens, const DatasetIndex& index) {
  const json record = {{"format", "loom-dataset-part"},
                       {"version", 1},
                       {"part", spec.part},
                       {"parts", spec.parts},
                       {"inputs_fingerprint", fingerprint},
                       {"shard_tokens", shard_tokens},
                       {"index", json::parse(index.to_json())}};
  write_file_atomic((fs::path(dir) / kPartRecordFile).string(), record.dump(2) + "\n");
}

namespace {

struct PartRecord {
  std::string dir;
  std::string path;  // its part.json
  std::string fingerprint;
  uint64_t shard_tokens = 0;
  DatasetIndex index;
};

PartRecord read_part_record(const fs::path& dir, const PartSpec& spec) {
  PartRecord record;
  record.dir = dir.string();
  record.path = (dir / kPartRecordFile).string();
  const std::string redo = "; run `loom prepare --part " + std::to_string(spec.part) + "/" +
                           std::to_string(spec.parts) + "` with the same inputs (again)";
  if (!fs::is_directory(dir))
    throw BadInput(record.dir + ": missing: part " + std::to_string(spec.part) + " of " +
                   std::to_string(spec.parts) + " was not prepared" + redo);
  if (!fs::exists(record.path))
    throw BadInput(record.path + ": missing: part " + std::to_string(spec.part) + " of " +
                   std::to_string(spec.parts) + " did not finish" + redo);
  json root;
  try {
    root = json::parse(read_file(record.path));
  } catch (const json::exception& e) {
    throw BadInput(record.path + ": not valid JSON (" + e.what() + ")");
  }
  const auto field = [&](const char* key) -> const json& {
    if (!root.is_object() || !root.contains(key)) throw BadInput(record.path + ": key '" + key + "' is missing");
    return root.at(key);
  };
  if (field("format") != "loom-dataset-part" || field("version") != 1)
    throw BadInput(record.path + ": not a loom dataset part record (format loom-dataset-part, version 1)");
  if (field("part") != spec.part || field("parts") != spec.parts)
    throw BadInput(record.path + ": records part " + field("part").dump() + "/" + field("parts").dump() +
                   ", expected " + std::to_string(spec.part) + "/" + std::to_string(spec.parts));
  if (!field("inputs_fingerprint").is_string() || !field("shard_tokens").is_number_unsigned())
    throw BadInput(record.path + ": keys 'inputs_fingerprint' and 'shard_tokens' must be a string and a count");
  record.fingerprint = field("inputs_fingerprint").get<std::string>();
  record.shard_tokens = field("shard_tokens").get<uint64_t>();
  record.index = DatasetIndex::parse(field("index").dump(), record.path + " (key 'index')");
  return record;
}

// Part `other` must have been made by the same command line as part 0.
void check_same(const PartRecord& first, const PartRecord& other) {
  const auto differ = [&](const std::string& what, const std::string& a, const std::string& b) {
    throw BadInput(other.path + ": " + what + " " + b + " differs from " + first.path + "'s " + a +
                   ": the parts were not prepared from the same inputs and options");
  };
  if (other.fingerprint != first.fingerprint)
    differ("inputs (paths, sizes, number of parts, shard_tokens)", first.fingerprint, other.fingerprint);
  if (other.shard_tokens != first.shard_tokens)
    differ("shard_tokens", std::to_string(first.shard_tokens), std::to_string(other.shard_tokens));
  const DatasetIndex& a = first.index;
  const DatasetIndex& b = other.index;
  if (b.tokenizer_hash != a.tokenizer_hash) differ("tokenizer_hash", a.tokenizer_hash, b.tokenizer_hash);
  if (b.vocab_size != a.vocab_size) differ("vocab_size", std::to_string(a.vocab_size), std::to_string(b.vocab_size));
  if (b.eos_id != a.eos_id) differ("eos_id", std::to_string(a.eos_id), std::to_string(b.eos_id));
  if (b.token_dtype != a.token_dtype)
    differ("token_dtype", token_dtype_name(a.token_dtype), token_dtype_name(b.token_dtype));
  // A part of --chat (with a loss mask) and one without cannot make one dataset.
  if (b.has_loss_mask != a.has_loss_mask)
    differ("loss_mask", a.has_loss_mask ? "true" : "false", b.has_loss_mask ? "true" : "false");
}

// The part folders of `dir` by part number, all of one N.
std::vector<fs::path> find_part_folders(const std::string& dir, int& parts) {
  std::map<int, fs::path> found;
  parts = 0;
  std::error_code error;
  if (!fs::is_directory(dir, error)) throw BadInput(dir + ": no such folder (loom prepare --merge DIR)");
  for (const auto& item : fs::directory_iterator(dir)) {
    const std::string name = item.path().filename().string();
    int part = -1, of = -1;
    char tail = 0;
    if (!item.is_directory() || std::sscanf(name.c_str(), "part-%d-of-%d%c", &part, &of, &tail) != 2) continue;
    if (parts != 0 && of != parts)
      throw BadInput(dir + ": holds parts of " + std::to_string(parts) + " and of " + std::to_string(of) +
                     " (" + name + "): one dataset is prepared with one N");
    parts = of;
    found[part] = item.path();
  }
  if (parts == 0)
    throw BadInput(dir + ": no part folders (part-I-of-N) to merge; prepare them with `loom prepare --part I/N`");
  std::vector<fs::path> folders;
  for (int p = 0; p < parts; ++p) folders.push_back(found.count(p) ? found[p] : fs::path(dir) / part_folder_name({p, parts}));
  return folders;
}

}  // namespace

MergeSummary merge_parts(const std::string& dir) {
  if (fs::exists(fs::path(dir) / kDatasetIndexFile))
    throw BadInput(dir + ": already holds a dataset (index.json exists); nothing to merge");
  int parts = 0;
  const std::vector<fs::path> folders = find_part_folders(dir, parts);
  std::vector<PartRecord> records;
  for (int p = 0; p < parts; ++p) {
    records.push_back(read_part_record(folders[static_cast<size_t>(p)], {p, parts}));
    check_same(records.front(), records.back());
  }

  // Every shard, in part order, and its new name. A shard already at its new
  // name (a merge interrupted after renaming it) counts as moved.
  struct Move {
    fs::path from, to;
    uint64_t bytes;
  };
  std::vector<Move> moves;
  DatasetIndex merged = records.front().index;
  merged.shards.clear();
  merged.num_tokens = 0;
  merged.num_documents = 0;
  for (const PartRecord& record : records) {
    for (ShardEntry shard : record.index.shards) {
      Move move{fs::path(record.dir) / shard.file, fs::path(dir) / shard_file_name(merged.shards.size()), shard.bytes};
      std::error_code error;
      const bool at_source = fs::exists(move.from, error);
      const bool at_target = fs::exists(move.to, error);
      if (at_source && at_target)
        throw BadInput(move.to.string() + ": exists already, and " + move.from.string() +
                       " would replace it; remove the shard files from " + dir + " that are not in a part folder");
      const fs::path& where = at_source ? move.from : move.to;
      if (!at_source && !at_target) throw BadInput(move.from.string() + ": missing (listed in " + record.path + ")");
      if (fs::file_size(where, error) != shard.bytes || error)
        throw BadInput(where.string() + ": not the size " + record.path + " records (" + std::to_string(shard.bytes) +
                       " bytes)");
      shard.file = move.to.filename().string();
      merged.num_tokens += shard.num_tokens;
      merged.num_documents += shard.num_documents;
      merged.shards.push_back(std::move(shard));
      if (at_source) moves.push_back(std::move(move));
    }
  }
  if (merged.num_documents == 0) throw BadInput(dir + ": the parts hold no documents (every input is empty or blank)");

  // A shard file's bytes hold no name, so a renamed shard keeps its
  // file_crc32c. The renames first, then index.json: until it exists the
  // folder is not a dataset, and a second merge finishes an interrupted one.
  for (const Move& move : moves) {
    std::error_code error;
    fs::rename(move.from, move.to, error);
    if (error) throw std::runtime_error("cannot rename '" + move.from.string() + "' to '" + move.to.string() + "': " +
                                        error.message());
  }
  fsync_directory(dir);
  write_file_atomic((fs::path(dir) / kDatasetIndexFile).string(), merged.to_json());
  // The part folders are empty but for part.json now; best effort.
  for (const PartRecord& record : records) {
    std::error_code ignored;
    fs::remove(record.path, ignored);
    fs::remove(record.dir, ignored);
  }
  return {parts, merged.num_documents, merged.num_tokens, merged.shards.size()};
}

}  // namespace loom
