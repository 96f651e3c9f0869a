#pragma once

#include <string>

// The checkout's root folder, for tests that read its files (configs, docs,
// fixtures). One object (tests/unit/source_dir.cpp) is compiled with the
// path: a path among every test's compile flags made each test a ccache miss
// in a clone at another path, which a fresh CI clone always is.
std::string loom_source_dir();
