// Fuzz target: the HDF5 shard reader (Dataset::open and reads in
// data/dataset.cpp over data/hdf5_handle.h) on crafted files: files with an
// index.json made to match them. The input is a shard file's bytes. A damaged
// shard of a dataset loom wrote never reaches HDF5 (its file_crc32c in
// index.json no longer matches: Note [Shard file checksum]), so this target
// gives the index the input's own file_crc32c, as someone shipping a crafted
// file with a matching index would. Such a file reaches libhdf5 first in
// Dataset::open's probe process (Note [Reading shards in a probe process]),
// and a crash or hang of libhdf5 there must come back as BadInput, never
// reach this process; fuzz_dataset_shard covers loom's own checks. The
// target writes the input as shard-00000.h5 of a scratch dataset
// folder (on /dev/shm when present) and writes an index.json that agrees with
// whatever the file seems to hold (its size and CRC-32C; /tokens and
// /doc_offsets lengths and token width; the root attributes), read by a
// best-effort probe through HDF5 directly, in a child process of its own.
// Without that, nearly every mutation would be refused at the first
// comparison with the index, and the deeper reads (attributes, offsets, tokens, checksums) would never run on
// damaged files. Then it opens the dataset with the token range scan, reads
// every token and verifies the data checksum (which fails, as the index's
// crc32c is a dummy: that read is the point).
#include <hdf5.h>
#include <unistd.h>

#include <cstddef>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <span>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/hdf5_handle.h"
#include "util/crc32c.h"
#include "util/isolated.h"
#include "fuzz/fuzz_common.h"

namespace fs = std::filesystem;

namespace {

struct Probe {
  uint64_t tokens = 0;
  size_t token_bytes = 2;
  uint64_t offsets = 1;
  int64_t vocab_size = 65536;
  int64_t eos_id = 0;
  std::string tokenizer_hash;
};

uint64_t vector_length(hid_t file, const char* name, size_t* element_bytes) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) return 0;
  loom::hdf5::DatasetId dataset(H5Dopen2(file, name, H5P_DEFAULT));
  if (!dataset.valid()) return 0;
  loom::hdf5::SpaceId space(H5Dget_space(dataset.get()));
  hsize_t dims[1] = {0};
  if (!space.valid() || H5Sget_simple_extent_ndims(space.get()) != 1) return 0;
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  if (element_bytes != nullptr) {
    loom::hdf5::TypeId type(H5Dget_type(dataset.get()));
    if (type.valid() && H5Tget_size(type.get()) == 4) *element_bytes = 4;
  }
  return dims[0];
}

int64_t int_attribute(hid_t file, const char* name, int64_t fallback) {
  if (H5Aexists(file, name) <= 0) return fallback;
  loom::hdf5::AttrId attr(H5Aopen(file, name, H5P_DEFAULT));
  loom::hdf5::TypeId type(attr.valid() ? H5Aget_type(attr.get()) : H5I_INVALID_HID);
  loom::hdf5::SpaceId space(attr.valid() ? H5Aget_space(attr.get()) : H5I_INVALID_HID);
  int64_t value = fallback;
  if (!type.valid() || H5Tget_class(type.get()) != H5T_INTEGER || !space.valid() ||
      H5Sget_simple_extent_npoints(space.get()) != 1 || H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0)
    return fallback;
  return value;
}

Probe probe(const std::string& path) {
  Probe p;
  loom::hdf5::Lock lock;
  loom::hdf5::FileId file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
  if (!file.valid()) {
    H5Eclear2(H5E_DEFAULT);
    return p;
  }
  p.tokens = vector_length(file.get(), "tokens", &p.token_bytes);
  p.offsets = vector_length(file.get(), "doc_offsets", nullptr);
  p.vocab_size = int_attribute(file.get(), "vocab_size", p.vocab_size);
  p.eos_id = int_attribute(file.get(), "eos_id", p.eos_id);
  H5Eclear2(H5E_DEFAULT);
  return p;
}

// probe(), in a child process: the crafted bytes can crash or hang libhdf5
// there as well (Note [Reading shards in a probe process]). If they do, the
// index gets the defaults, and Dataset::open's own probe meets the fault.
Probe probe_isolated(const std::string& path) {
  loom::IsolatedOptions options;
  options.timeout = std::chrono::seconds(3);
  options.prepare = loom::hdf5::lock_for_fork;
  options.in_parent = loom::hdf5::unlock_after_fork;
  options.in_child = loom::hdf5::renew_lock_in_child;
  const loom::IsolatedResult result = loom::run_isolated(
      [&](loom::IsolatedChannel& channel) {
        const Probe p = probe(path);
        channel.progress(std::to_string(p.tokens) + " " + std::to_string(p.token_bytes) + " " +
                         std::to_string(p.offsets) + " " + std::to_string(p.vocab_size) + " " +
                         std::to_string(p.eos_id));
      },
      options);
  Probe p;
  if (result.outcome == loom::IsolatedOutcome::kFinished) {
    std::istringstream fields(result.last_progress);
    fields >> p.tokens >> p.token_bytes >> p.offsets >> p.vocab_size >> p.eos_id;
  }
  return p;
}

}  // namespace

// HDF5 1.10's H5Fopen leaks a few of its own blocks when it refuses a damaged
// file (allocated and lost inside libhdf5, under H5G_mkroot). That is the
// library's, not loom's, and bounded by one per refused file, so leaks
// allocated inside libhdf5 are not findings; loom's own allocations are
// still checked.
extern "C" const char* __lsan_default_suppressions() { return "leak:libhdf5\n"; }

// A damaged object header can make HDF5 ask malloc for absurd sizes (800 TB
// was seen). Outside ASan, malloc returns NULL and HDF5 refuses the file,
// which loom reports as BadInput; ASan by default aborts instead. Let it
// return NULL as the real allocator does. (fuzz/run.sh also raises
// libFuzzer's -malloc_limit_mb for this target; real memory use stays under
// -rss_limit_mb. operator new still throws std::bad_alloc, which the harness
// reports as a finding.)
extern "C" const char* __asan_default_options() { return "allocator_may_return_null=1"; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path& dir = loom::fuzz::scratch_dir("shard");
  const std::string shard = (dir / "shard-00000.h5").string();
  {
    std::ofstream out(shard, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  const Probe p = probe_isolated(shard);
  // The index may not itself be valid (vocab_size 0, a 0-length
  // /doc_offsets): the reader must refuse that too.
  loom::DatasetIndex index;
  index.vocab_size = p.vocab_size;
  index.eos_id = p.eos_id;
  index.tokenizer_hash = "fuzz";
  index.token_dtype = p.token_bytes == 4 ? loom::TokenDtype::kUint32 : loom::TokenDtype::kUint16;
  index.num_tokens = p.tokens;
  index.num_documents = p.offsets - 1;
  index.shards.push_back({"shard-00000.h5", p.tokens, p.offsets - 1, 0, size,
                          loom::crc32c(std::as_bytes(std::span(data, size)))});
  {
    std::ofstream out(dir / "index.json", std::ios::trunc);
    out << index.to_json();
  }
  loom::fuzz::expect_accept_or_bad_input("Dataset::open", [&] {
    loom::DatasetOpenOptions options;
    options.scan_token_range = loom::TokenRangeScan::kAlways;
    options.check_shard_files = loom::ShardFileCheck::kAlways;
    options.probe_timeout_seconds = 5;
    const loom::Dataset dataset = loom::Dataset::open(dir.string(), options);
    // Open reads index.json alone (Note [Lazy shard checks]): its num_tokens
    // is only known to match the files once every shard is checked, so the
    // buffer below is sized after that.
    dataset.check_all_shards();
    std::vector<int32_t> tokens(dataset.num_tokens());
    dataset.read_tokens(0, tokens);
    for (size_t s = 0; s < dataset.index().shards.size(); ++s) (void)dataset.read_doc_offsets(s);
    dataset.verify_checksums();
  });
  return 0;
}
