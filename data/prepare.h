// `loom prepare`: text or JSONL files -> a tokenized dataset folder
// (index.json + shard-NNNNN.h5, see data/dataset.h and docs/data.md).
//
// Documents are read in input order, tokenized by a pool of worker threads
// (one per core by default) and written in the same order, each followed by
// the EOS token, so the output is identical whatever the thread count.
//
// With `chat`, each non-blank line of every input is one conversation
// {"messages": [...]}, rendered with the tokenizer folder's chat template and
// tokenized as transformers' apply_chat_template does (data/chat_encoding.h);
// no EOS is appended (the template's text is the document), and the dataset
// has a loss mask (format 2) that is 1 on the assistant turns.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "data/dataset.h"
#include "data/tokenizer.h"

namespace loom {

struct DocumentSplit {
  // Plain text: a document is a block of lines separated by one or more blank
  // lines, or (per_file) the whole file. JSONL (*.jsonl, *.json lines): one
  // document per line, the string field `text_field`.
  bool per_file = false;
  std::string text_field = "text";
};

// Reads every document of `path` (BadInput naming the file and line for a bad
// JSONL line or a missing field). Calls `emit` with each in order.
void read_documents(const std::string& path, const DocumentSplit& split,
                    const std::function<void(std::string&& document)>& emit);

// The EOS token: `requested` when given (must be in the vocabulary), else
// `eos_token` of a tokenizer_config.json beside the tokenizer, else the first
// of <|endoftext|>, </s>, <|end_of_text|>, <eos> the vocabulary has. BadInput
// naming --eos-token when none is found.
int32_t resolve_eos_id(const Tokenizer& tokenizer, const std::string& tokenizer_path, const std::string& requested);

struct PrepareOptions {
  std::string tokenizer_path;
  std::vector<std::string> inputs;
  std::string output_dir;
  std::string eos_token;  // "" = resolve_eos_id's default
  DocumentSplit split;
  // Conversations rendered with the chat template, a loss mask on their
  // assistant turns; `split` and EOS are not used then.
  bool chat = false;
  ChatTemplateOptions chat_options;
  // Each text document starts (and ends) as the tokenizer's post-processor
  // frames a text, as `tokenizers`' encode does (Llama-3's
  // <|begin_of_text|> first); EOS follows unless the frame already ends
  // with it. --no-special-tokens: none. (Chat templates write their own.)
  bool special_tokens = true;
  uint64_t shard_tokens = kDefaultShardTokens;
  int threads = 0;  // 0 = hardware concurrency
  // parts > 0: write part `part` of a dataset prepared in `parts` parts,
  // into output_dir/part-I-of-N/ without index.json (data/prepare_parts.h);
  // 0: the whole dataset.
  int part = 0;
  int parts = 0;
};

struct PrepareSummary {
  uint64_t documents = 0;
  uint64_t tokens = 0;
  size_t shards = 0;
  double seconds = 0;
  std::string output_dir;     // where the shards went (a part's folder for a part)
  bool already_done = false;  // a part that was complete already (part.json): nothing written
};

// Tokenizes all inputs into a new dataset at output_dir. Prints progress to
// stderr: a bar with tokens/s and ETA on a terminal, a line every few seconds
// otherwise. An empty input (no documents at all) is BadInput; with `chat`, a
// line that is not a conversation, or that the template refuses, is BadInput
// naming the file and line, and nothing is written. With parts >
// 0, tokenizes part `part`'s inputs (inputs_of_part) into its part folder and
// writes part.json instead of index.json; a part may be empty (the merge
// refuses an empty whole), and a part whose part.json exists is left as it is.
PrepareSummary prepare_dataset(const PrepareOptions& options);

}  // namespace loom
