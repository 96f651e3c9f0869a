// What llama.cpp's common/json.cpp takes from ggml.h, for loom's build of
// llama.cpp's Jinja engine (CMakeLists.txt, loom_llama_jinja): GGML_ASSERT,
// which it makes nlohmann's JSON_ASSERT. loom's own definition, not
// llama.cpp's file: the engine needs nothing else of ggml.
#pragma once

#include <cstdio>
#include <cstdlib>

#define GGML_ASSERT(x)                                                                      \
  do {                                                                                      \
    if (!(x)) {                                                                             \
      std::fprintf(stderr, "%s:%d: GGML_ASSERT(%s) failed\n", __FILE__, __LINE__, #x);      \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)
