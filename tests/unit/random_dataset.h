// A dataset of uniformly random tokens for training tests: nothing to learn
// beyond the unigram distribution, but every batch differs.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace loom::test_support {

// Writes `documents` documents of `tokens_per_document` tokens drawn from
// [1, vocab) (0 is the eos id) with a fixed seed into `dir`, and returns it.
inline std::string write_random_dataset(const std::string& dir, int64_t vocab, int documents,
                                        int tokens_per_document = 50) {
  DatasetWriter writer(dir, vocab, 0, "test-tokenizer");
  std::mt19937 random(7);
  std::vector<int32_t> document;
  for (int d = 0; d < documents; ++d) {
    document.clear();
    for (int i = 0; i < tokens_per_document; ++i) document.push_back(1 + static_cast<int32_t>(random() % (vocab - 1)));
    writer.add_document(document);
  }
  writer.finish();
  return dir;
}

}  // namespace loom::test_support
