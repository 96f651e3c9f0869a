// Linked into sanitizer test binaries that also load libtorch: libtorch is not
// instrumented and keeps allocations alive until exit, so LeakSanitizer would
// report libtorch's memory, not loom's. Out-of-bounds and use-after-free
// checks stay on.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }
