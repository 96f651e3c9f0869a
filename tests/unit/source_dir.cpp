#include "tests/unit/source_dir.h"

std::string loom_source_dir() { return LOOM_SOURCE_DIR; }
