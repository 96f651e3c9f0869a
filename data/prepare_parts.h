// `loom prepare` in parts, for a corpus too large for one node: N independent
// jobs (a Slurm array) each tokenize a contiguous run of the input files into
// DIR/part-I-of-N/ (shards and a part.json, no index.json), and
// `loom prepare --merge DIR` checks that all N parts are complete and
// consistent, renames their shards into one sequence in DIR and writes
// index.json last (Note [Preparing in parts] in data/prepare_parts.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace loom {

inline constexpr const char* kPartRecordFile = "part.json";

struct PartSpec {
  int part = 0;   // 0-based
  int parts = 1;
};

// "I/N" with 0 <= I < N; BadInput naming --part otherwise.
PartSpec parse_part_spec(const std::string& text);

// "part-00003-of-00016": sorts in part order.
std::string part_folder_name(const PartSpec& spec);

// Part spec.part's inputs: a contiguous run of whole files, the runs
// balanced by bytes (`bytes[i]` is inputs[i]'s size), at least one file
// each. The same inputs give every job the same split. BadInput when there
// are fewer files than parts.
std::vector<std::string> inputs_of_part(const std::vector<std::string>& inputs, const std::vector<uint64_t>& bytes,
                                        const PartSpec& spec);

// What identifies one `loom prepare --part` command line's inputs: every
// input's path and size in order, the number of parts and shard_tokens.
// Parts of one dataset must agree on it.
// `encoding`: the settings that change the tokens (chat, special tokens, EOS).
std::string parts_fingerprint(const std::vector<std::string>& inputs, const std::vector<uint64_t>& bytes, int parts,
                              uint64_t shard_tokens, const std::string& encoding);

// Whether `dir` (a part folder) holds a finished part (its part.json).
bool part_is_complete(const std::string& dir);

// Writes `dir`/part.json, last, atomically: the part's shards are complete.
void write_part_record(const std::string& dir, const PartSpec& spec, const std::string& fingerprint,
                       uint64_t shard_tokens, const DatasetIndex& index);

struct MergeSummary {
  int parts = 0;
  uint64_t documents = 0;
  uint64_t tokens = 0;
  size_t shards = 0;
};

// Merges DIR/part-*-of-N/ into the dataset DIR. BadInput naming the part
// (and the command that makes it) when one is missing or unfinished, and
// naming both parts when two disagree (inputs, shard_tokens, tokenizer hash,
// vocab_size, eos_id, token dtype, loss mask). An interrupted merge can be run again.
MergeSummary merge_parts(const std::string& dir);

}  // namespace loom
