// Fuzz target: the dataset shard reader's own checks (Dataset::open and the
// reads in data/dataset.cpp). The input does not become the file's bytes
// (fuzz_hdf5_bytes does that, and mostly finds libhdf5's own faults); it
// drives a well-formed HDF5 file written through the HDF5 API: which root
// attributes exist, with what type, shape and value; /tokens and
// /doc_offsets present or not, of what type, rank, length, layout and
// contents; and an index.json that agrees with the file or not in each
// field (the file's CRC-32C included). Then the dataset is opened with the token range scan, every token
// and offset is read and the checksum verified, so every check loom makes of
// a shard's contents meets both sides of its condition.
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/hdf5_handle.h"
#include "util/crc32c.h"
#include "fuzz/fuzz_common.h"

namespace fs = std::filesystem;

namespace {

hid_t pick_integer_type(FuzzedDataProvider& in, hid_t usual) {
  const hid_t types[] = {usual, H5T_STD_U8LE, H5T_STD_I32LE, H5T_STD_U16LE, H5T_STD_U32LE,
                         H5T_STD_I64LE, H5T_STD_U64LE, H5T_STD_U16BE, H5T_IEEE_F32LE, H5T_IEEE_F64LE};
  // Mostly the type loom writes, so that the checks after the type's pass.
  return in.ConsumeBool() ? usual : types[in.ConsumeIntegralInRange<size_t>(0, std::size(types) - 1)];
}

void write_int_attribute(FuzzedDataProvider& in, hid_t file, const char* name, int64_t usual) {
  if (in.ConsumeIntegralInRange<int>(0, 9) == 0) return;  // absent
  const hsize_t count = in.ConsumeIntegralInRange<int>(0, 9) == 0 ? 2 : 1;
  loom::hdf5::SpaceId space(count == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &count, nullptr));
  if (in.ConsumeIntegralInRange<int>(0, 9) == 0) {  // a string instead
    loom::hdf5::TypeId type(H5Tcopy(H5T_C_S1));
    H5Tset_size(type.get(), 4);
    loom::hdf5::AttrId attr(H5Acreate2(file, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
    const char text[8] = "abcdefg";
    H5Awrite(attr.get(), type.get(), text);
    return;
  }
  const hid_t type = pick_integer_type(in, H5T_STD_I64LE);
  loom::hdf5::AttrId attr(H5Acreate2(file, name, type, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  const int64_t values[2] = {in.ConsumeBool() ? usual : in.ConsumeIntegral<int64_t>(), 7};
  H5Awrite(attr.get(), H5T_NATIVE_INT64, values);
}

void write_hash_attribute(FuzzedDataProvider& in, hid_t file, const std::string& usual) {
  const int kind = in.ConsumeIntegralInRange<int>(0, 5);
  if (kind == 0) return;  // absent
  const std::string value = in.ConsumeBool() ? usual : in.ConsumeRandomLengthString(16);
  loom::hdf5::SpaceId space(H5Screate(H5S_SCALAR));
  if (kind == 1) {  // an integer
    loom::hdf5::AttrId attr(H5Acreate2(file, "tokenizer_hash", H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT));
    const int64_t v = 5;
    H5Awrite(attr.get(), H5T_NATIVE_INT64, &v);
    return;
  }
  loom::hdf5::TypeId type(H5Tcopy(H5T_C_S1));
  if (kind <= 3) {  // variable-length, as loom and h5py write str
    H5Tset_size(type.get(), H5T_VARIABLE);
    H5Tset_cset(type.get(), kind == 2 ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
    loom::hdf5::AttrId attr(H5Acreate2(file, "tokenizer_hash", type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
    const char* text = value.c_str();
    H5Awrite(attr.get(), type.get(), &text);
  } else {  // fixed-length, null- or space-padded, as h5py writes bytes
    H5Tset_size(type.get(), value.size() + in.ConsumeIntegralInRange<size_t>(1, 4));
    H5Tset_strpad(type.get(), kind == 4 ? H5T_STR_NULLPAD : H5T_STR_SPACEPAD);
    std::string padded = value;
    padded.resize(H5Tget_size(type.get()), kind == 4 ? '\0' : ' ');
    loom::hdf5::AttrId attr(H5Acreate2(file, "tokenizer_hash", type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
    H5Awrite(attr.get(), type.get(), padded.data());
  }
}

// A dataset /name of `count` elements (rank 1, or rank 2 as count x 1), of
// `type` in the file, with the given values (converted by HDF5).
void write_vector(FuzzedDataProvider& in, hid_t file, const char* name, hid_t type, const std::vector<uint64_t>& values) {
  const hsize_t count = values.size();
  const bool rank2 = in.ConsumeIntegralInRange<int>(0, 15) == 0;
  const hsize_t dims[2] = {count, 1};
  loom::hdf5::SpaceId space(H5Screate_simple(rank2 ? 2 : 1, dims, nullptr));
  loom::hdf5::PlistId create(H5Pcreate(H5P_DATASET_CREATE));
  if (count > 0 && in.ConsumeBool()) {
    const hsize_t chunk[2] = {in.ConsumeIntegralInRange<hsize_t>(1, count), 1};
    H5Pset_chunk(create.get(), rank2 ? 2 : 1, chunk);
  }
  loom::hdf5::DatasetId dataset(H5Dcreate2(file, name, type, space.get(), H5P_DEFAULT, create.get(), H5P_DEFAULT));
  if (count > 0) H5Dwrite(dataset.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const fs::path& dir = loom::fuzz::scratch_dir("dataset-shard");
  const std::string shard = (dir / "shard-00000.h5").string();

  // What the file should hold if it were right.
  const bool wide = in.ConsumeBool();
  const int64_t vocab_size = in.ConsumeBool() ? (wide ? 70000 : 300) : in.ConsumeIntegralInRange<int64_t>(1, 1 << 17);
  const int64_t eos_id = in.ConsumeIntegralInRange<int64_t>(0, vocab_size - 1);
  const std::string hash = "0badf00d";
  const size_t num_docs = in.ConsumeIntegralInRange<size_t>(0, 8);
  std::vector<uint64_t> offsets{0};
  for (size_t i = 0; i < num_docs; ++i) {
    // Mostly increasing; sometimes anything.
    offsets.push_back(in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<uint64_t>(0, 80)
                                                                 : offsets.back() + in.ConsumeIntegralInRange<uint64_t>(0, 8));
  }
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) offsets.front() = in.ConsumeIntegralInRange<uint64_t>(1, 5);
  const size_t num_tokens = in.ConsumeIntegralInRange<int>(0, 7) == 0 ? in.ConsumeIntegralInRange<size_t>(0, 80)
                                                                       : offsets.back();
  std::vector<uint64_t> tokens(num_tokens);
  for (auto& t : tokens)
    t = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegral<uint32_t>()
                                                   : in.ConsumeIntegralInRange<uint64_t>(0, vocab_size - 1);
  const hid_t token_type = wide ? H5T_STD_U32LE : H5T_STD_U16LE;
  {
    loom::hdf5::Lock lock;
    loom::hdf5::FileId file(H5Fcreate(shard.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT));
    if (!file.valid()) return 0;
    write_int_attribute(in, file.get(), "format_version", 1);
    write_int_attribute(in, file.get(), "vocab_size", vocab_size);
    write_int_attribute(in, file.get(), "eos_id", eos_id);
    write_hash_attribute(in, file.get(), hash);
    if (in.ConsumeIntegralInRange<int>(0, 15) != 0)
      write_vector(in, file.get(), "tokens", pick_integer_type(in, token_type), tokens);
    if (in.ConsumeIntegralInRange<int>(0, 15) != 0)
      write_vector(in, file.get(), "doc_offsets", pick_integer_type(in, H5T_STD_U64LE), offsets);
    H5Eclear2(H5E_DEFAULT);
  }

  // index.json: each field as the file holds it, or not.
  loom::DatasetIndex index;
  index.vocab_size = vocab_size;
  index.eos_id = eos_id;
  index.tokenizer_hash = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? "other" : hash;
  index.token_dtype = (wide != (in.ConsumeIntegralInRange<int>(0, 15) == 0)) ? loom::TokenDtype::kUint32
                                                                              : loom::TokenDtype::kUint16;
  const uint64_t index_tokens = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegral<uint64_t>() : num_tokens;
  const uint64_t index_docs =
      in.ConsumeIntegralInRange<int>(0, 15) == 0 ? in.ConsumeIntegral<uint64_t>() : offsets.size() - 1;
  std::error_code error;
  const uint64_t bytes = fs::file_size(shard, error);
  index.num_tokens = index_tokens;
  index.num_documents = index_docs;
  // The file's CRC-32C: recorded (mostly, so the reads after it run),
  // absent (an older dataset), or wrong.
  std::optional<uint32_t> file_crc;
  const int crc_kind = in.ConsumeIntegralInRange<int>(0, 15);
  if (crc_kind > 1) file_crc = loom::crc32c_file(shard);
  if (crc_kind == 1) file_crc = in.ConsumeIntegral<uint32_t>();
  index.shards.push_back({"shard-00000.h5", index_tokens, index_docs, 0,
                          in.ConsumeIntegralInRange<int>(0, 15) == 0 ? bytes + 1 : bytes, file_crc});
  {
    std::ofstream out(dir / "index.json", std::ios::trunc);
    out << index.to_json();
  }

  const bool probe = in.ConsumeIntegralInRange<int>(0, 15) == 0;
  loom::fuzz::expect_accept_or_bad_input("Dataset::open", [&] {
    loom::DatasetOpenOptions options;
    options.scan_token_range = loom::TokenRangeScan::kAlways;
    // Mostly in this process, so that a fault in loom's own reading code is
    // a finding here rather than a probe child's BadInput; one input in 16
    // goes through the probe (Note [Reading shards in a probe process]).
    options.probe_in_child = probe;
    options.probe_timeout_seconds = 10;
    const loom::Dataset dataset = loom::Dataset::open(dir.string(), options);
    // Open reads index.json alone (Note [Lazy shard checks]): its num_tokens
    // is only known to match the files once every shard is checked, so the
    // buffer below is sized after that.
    dataset.check_all_shards();
    std::vector<int32_t> all(dataset.num_tokens());
    dataset.read_tokens(0, all);
    (void)dataset.read_doc_offsets(0);
    dataset.verify_checksums();
  });
  return 0;
}
