// The HDF5 token dataset: DatasetWriter, index.json and Dataset.
#include "data/dataset.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/hdf5_handle.h"
#include "tests/unit/bad_input.h"
#include "tests/unit/source_dir.h"
#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom {
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Documents = std::vector<std::vector<int32_t>>;

constexpr int32_t kEos = 0;

// `count` documents of 1 to `max_length` ids in [1, vocab_size), each ending in kEos.
Documents make_documents(size_t count, int64_t vocab_size, size_t max_length, uint32_t seed) {
  std::mt19937 random(seed);
  Documents documents(count);
  for (auto& document : documents) {
    const size_t length = 1 + random() % max_length;
    for (size_t i = 0; i + 1 < length; ++i) document.push_back(static_cast<int32_t>(1 + random() % (vocab_size - 1)));
    document.push_back(kEos);
  }
  return documents;
}

std::vector<int64_t> concatenate(const Documents& documents) {
  std::vector<int64_t> stream;
  for (const auto& document : documents) stream.insert(stream.end(), document.begin(), document.end());
  return stream;
}


// EXPECT_BAD_INPUT(statement, "fragment", ...): tests/unit/bad_input.h's check.
#define EXPECT_BAD_INPUT(statement, ...) test_support::expect_bad_input([&] { statement; }, {__VA_ARGS__})

// Files that make libhdf5 itself fault (tests/unit/hdf5_faults/README.md).
constexpr const char* kHdf5FaultFiles[] = {"heap-overflow-in-H5Aexists.h5", "segv-in-H5Aexists.h5",
                                          "16GiB-malloc-in-H5Fopen.h5"};

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("loom-test-dataset-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(root_);
    dir_ = (root_ / "data").string();
  }
  void TearDown() override { fs::remove_all(root_); }

  DatasetIndex write(const Documents& documents, int64_t vocab_size = 1000, uint64_t shard_tokens = 50) {
    DatasetWriter writer(dir_, vocab_size, kEos, "sha256:test", shard_tokens);
    for (const auto& document : documents) writer.add_document(document);
    return writer.finish();
  }

  std::string shard(size_t i) const { return (fs::path(dir_) / shard_file_name(i)).string(); }
  std::string index_path() const { return (fs::path(dir_) / "index.json").string(); }

  void edit_index(const std::function<void(json&)>& edit) const {
    json index = json::parse(read_file(index_path()));
    edit(index);
    write_file_atomic(index_path(), index.dump(2));
  }

  // Makes index.json agree with shard `s`'s file as it is now (size and
  // whole-file CRC-32C), as an index written for that file would: the shard
  // then gets past the check before HDF5, and the later checks must act.
  void record_shard(size_t s) const {
    edit_index([&](json& index) {
      index["shards"][s]["bytes"] = fs::file_size(shard(s));
      index["shards"][s]["file_crc32c"] = crc32c_hex(crc32c_file(shard(s)));
    });
  }

  // A fresh dataset whose shard 0 is replaced by tests/unit/hdf5_faults/NAME
  // (index.json still describes the shard loom wrote). Call it under
  // ASSERT_NO_FATAL_FAILURE.
  void dataset_with_fault_file_as_shard0(const char* name) {
    fs::remove_all(dir_);
    write(make_documents(40, 1000, 20, 24));
    const std::string damaged = read_file(loom_source_dir() + "/tests/unit/hdf5_faults/" + name);
    ASSERT_FALSE(damaged.empty());
    write_file_atomic(shard(0), damaged);
  }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path root_;
  std::string dir_;
};

std::vector<int64_t> read_all(const Dataset& dataset) {
  std::vector<int64_t> tokens(dataset.num_tokens());
  dataset.read_tokens(0, tokens);
  return tokens;
}

// Opens the dataset and runs every shard's first-use checks, which open()
// alone no longer does (Note [Lazy shard checks]).
Dataset open_checked(const std::string& dir, const DatasetOpenOptions& options = {}) {
  Dataset dataset = Dataset::open(dir, options);
  dataset.check_all_shards();
  return dataset;
}

// Descriptors this process has open.
size_t open_descriptors() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator("/proc/self/fd")) ++count;
  return count;
}

// Rewrites an integer root attribute of a shard in place.
void set_root_attribute(const std::string& path, const char* name, int64_t value) {
  hdf5::Lock lock;
  hdf5::FileId file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  hdf5::AttrId attr(H5Aopen(file.get(), name, H5P_DEFAULT));
  ASSERT_TRUE(attr.valid());
  ASSERT_GE(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), 0);
}

// Overwrites element `i` of a shard's /doc_offsets in place.
void set_doc_offset(const std::string& path, uint64_t i, uint64_t value) {
  hdf5::Lock lock;
  hdf5::FileId file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  hdf5::DatasetId offsets(H5Dopen2(file.get(), "doc_offsets", H5P_DEFAULT));
  hdf5::SpaceId file_space(H5Dget_space(offsets.get()));
  const hsize_t start[1] = {i};
  const hsize_t count[1] = {1};
  hdf5::SpaceId memory_space(H5Screate_simple(1, count, nullptr));
  H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr);
  ASSERT_GE(H5Dwrite(offsets.get(), H5T_NATIVE_UINT64, memory_space.get(), file_space.get(), H5P_DEFAULT, &value), 0);
}

// --- round trips ---------------------------------------------------------------

TEST_F(DatasetTest, Uint16RoundTripOverManyShardsKeepsEveryDocumentWhole) {
  const Documents documents = make_documents(300, 1000, 40, 1);
  const DatasetIndex written = write(documents, 1000, 50);
  ASSERT_GT(written.shards.size(), 10u);

  const Dataset dataset = Dataset::open(dir_, {.verify_checksums = true});
  EXPECT_EQ(dataset.index().token_dtype, TokenDtype::kUint16);
  EXPECT_EQ(dataset.num_documents(), documents.size());
  EXPECT_EQ(read_all(dataset), concatenate(documents));

  // Walking every shard's doc_offsets gives back the documents in order.
  size_t next_document = 0;
  for (size_t s = 0; s < dataset.index().shards.size(); ++s) {
    const std::vector<uint64_t> offsets = dataset.read_doc_offsets(s);
    const uint64_t first = dataset.shard_first_token(s);
    EXPECT_TRUE(offsets.back() <= 50 || offsets.size() == 2) << "shard " << s << " exceeds shard_tokens";
    for (size_t d = 0; d + 1 < offsets.size(); ++d, ++next_document) {
      std::vector<int32_t> document(offsets[d + 1] - offsets[d]);
      dataset.read_tokens(first + offsets[d], document);
      EXPECT_EQ(document, documents[next_document]) << "document " << next_document;
    }
  }
  EXPECT_EQ(next_document, documents.size());
}

TEST_F(DatasetTest, Uint32RoundTripForVocabulariesPast65536) {
  Documents documents = make_documents(40, 70000, 30, 2);
  documents[3] = {65535, 65536, 69999, kEos};
  write(documents, 70000, 64);
  const Dataset dataset = Dataset::open(dir_, {.verify_checksums = true});
  EXPECT_EQ(dataset.index().token_dtype, TokenDtype::kUint32);
  EXPECT_EQ(read_all(dataset), concatenate(documents));
  std::vector<int32_t> as_int32(dataset.num_tokens());
  dataset.read_tokens(0, as_int32);
  EXPECT_TRUE(std::equal(as_int32.begin(), as_int32.end(), concatenate(documents).begin()));
}

TEST_F(DatasetTest, Vocab65536StillFitsUint16) {
  write({{65535, kEos}}, 65536);
  const Dataset dataset = Dataset::open(dir_);
  EXPECT_EQ(dataset.index().token_dtype, TokenDtype::kUint16);
  EXPECT_EQ(read_all(dataset), (std::vector<int64_t>{65535, kEos}));
}

TEST_F(DatasetTest, ReadsCrossShardBoundaries) {
  const Documents documents = make_documents(100, 1000, 20, 3);
  const DatasetIndex index = write(documents, 1000, 30);
  const std::vector<int64_t> stream = concatenate(documents);
  const Dataset dataset = Dataset::open(dir_);
  for (size_t s = 1; s < index.shards.size(); ++s) {
    const uint64_t boundary = dataset.shard_first_token(s);
    std::vector<int64_t> piece(7);
    dataset.read_tokens(boundary - 3, piece);
    EXPECT_TRUE(std::equal(piece.begin(), piece.end(), stream.begin() + boundary - 3)) << "boundary " << boundary;
  }
  // One read spanning several whole shards.
  std::vector<int64_t> wide(100);
  dataset.read_tokens(10, wide);
  EXPECT_TRUE(std::equal(wide.begin(), wide.end(), stream.begin() + 10));
  // The very last token, and nothing past it.
  std::vector<int64_t> last(1);
  dataset.read_tokens(stream.size() - 1, last);
  EXPECT_EQ(last[0], stream.back());
  std::vector<int64_t> past(2);
  EXPECT_THROW(dataset.read_tokens(stream.size() - 1, past), std::out_of_range);
}

TEST_F(DatasetTest, DocumentLongerThanShardSizeGetsAShardOfItsOwn) {
  std::vector<int32_t> long_document(120, 7);
  long_document.back() = kEos;
  const DatasetIndex index = write({{1, kEos}, long_document, {2, kEos}}, 1000, 50);
  ASSERT_EQ(index.shards.size(), 3u);
  EXPECT_EQ(index.shards[1].num_tokens, 120u);
  EXPECT_EQ(index.shards[1].num_documents, 1u);
}

TEST_F(DatasetTest, IndexJsonDescribesEveryShard) {
  write(make_documents(50, 1000, 20, 4), 1000, 100);
  const json index = json::parse(read_file(index_path()));
  EXPECT_EQ(index["format"], "loom-dataset");
  EXPECT_EQ(index["format_version"], 1);
  EXPECT_EQ(index["vocab_size"], 1000);
  EXPECT_EQ(index["eos_id"], kEos);
  EXPECT_EQ(index["tokenizer_hash"], "sha256:test");
  EXPECT_EQ(index["token_dtype"], "uint16");
  uint64_t tokens = 0;
  for (const json& shard : index["shards"]) {
    const std::string path = (fs::path(dir_) / shard["file"].get<std::string>()).string();
    EXPECT_EQ(shard["bytes"].get<uint64_t>(), fs::file_size(path));
    EXPECT_EQ(shard["crc32c"].get<std::string>().size(), 8u);
    tokens += shard["num_tokens"].get<uint64_t>();
  }
  EXPECT_EQ(index["num_tokens"].get<uint64_t>(), tokens);
}

TEST_F(DatasetTest, EmptyDatasetHasNoShards) {
  const DatasetIndex index = write({});
  EXPECT_TRUE(index.shards.empty());
  const Dataset dataset = Dataset::open(dir_, {.verify_checksums = true});
  EXPECT_EQ(dataset.num_tokens(), 0u);
}

// --- the writer ------------------------------------------------------------------

TEST_F(DatasetTest, WriterRefusesAFolderThatHoldsADataset) {
  write({{1, kEos}});
  EXPECT_BAD_INPUT(DatasetWriter(dir_, 1000, kEos, ""), dir_, "index.json");
}

TEST_F(DatasetTest, WriterRefusesIdsOutsideTheVocabulary) {
  DatasetWriter writer(dir_, 1000, kEos, "");
  writer.add_document(std::vector<int32_t>{1, kEos});
  EXPECT_BAD_INPUT(writer.add_document(std::vector<int32_t>{5, 1000, kEos}), "document 1", "1000", "position 1");
  EXPECT_BAD_INPUT(writer.add_document(std::vector<int32_t>{-1}), "document 1", "-1", "position 0");
  EXPECT_EQ(writer.num_documents(), 1u);  // refused documents are not added
}

TEST_F(DatasetTest, InterruptedWriterLeavesNoIndexAndNoFinalNamedShard) {
  {
    DatasetWriter writer(dir_, 1000, kEos, "", 20);
    for (const auto& document : make_documents(30, 1000, 10, 5)) writer.add_document(document);
    // Mid-write: completed shards have their final names, the open one is a
    // temporary, and there is no index.json.
    const std::vector<std::string> names = entries();
    EXPECT_TRUE(std::count(names.begin(), names.end(), "shard-00000.h5"));
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.ends_with(".h5.tmp"); }));
    EXPECT_FALSE(std::count(names.begin(), names.end(), "index.json"));
  }  // destroyed without finish(), as when an exception unwinds `loom prepare`
  EXPECT_TRUE(entries().empty()) << "left: " << ::testing::PrintToString(entries());
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "missing");
}

TEST_F(DatasetTest, WriterRemovesLeftoversOfAnInterruptedRun) {
  fs::create_directories(dir_);
  std::ofstream(shard(7)) << "stale";
  std::ofstream(shard(0) + ".tmp") << "partial";
  std::ofstream(fs::path(dir_) / "notes.txt") << "kept";
  write({{1, 2, kEos}});
  EXPECT_EQ(entries(), (std::vector<std::string>{"index.json", "notes.txt", "shard-00000.h5"}));
}

// --- what open() refuses -----------------------------------------------------------

TEST_F(DatasetTest, MissingShardIsNamed) {
  write(make_documents(40, 1000, 20, 6));
  fs::remove(shard(1));
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "missing");
}

TEST_F(DatasetTest, TruncatedShardIsNamed) {
  write(make_documents(40, 1000, 20, 7));
  fs::resize_file(shard(0), fs::file_size(shard(0)) / 2);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "truncated");
}

TEST_F(DatasetTest, TruncatedShardIsRefusedByHdf5EvenWhenTheIndexAgrees) {
  write(make_documents(40, 1000, 20, 8));
  const uint64_t cut = fs::file_size(shard(0)) - 100;
  fs::resize_file(shard(0), cut);
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "HDF5");
}

TEST_F(DatasetTest, ShardThatIsNotHdf5IsNamed) {
  write(make_documents(40, 1000, 20, 9));
  const uint64_t bytes = fs::file_size(shard(1));
  write_file_atomic(shard(1), std::string(bytes, 'x'));
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "file CRC32C", "not opened");
  record_shard(1);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "HDF5");
}

TEST_F(DatasetTest, ChecksumMismatchIsFoundWhenVerifying) {
  // A recognisable pair of ids, so the test can find its bytes in the file.
  write({{1, kEos}, {0x1234, 0x4321, kEos}}, 60000, 1000);
  std::string bytes = read_file(shard(0));
  const size_t at = bytes.find(std::string("\x34\x12\x21\x43", 4));
  ASSERT_NE(at, std::string::npos);
  bytes[at] = 0x35;  // id 0x1235: still inside the vocabulary
  write_file_atomic(shard(0), bytes);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "file CRC32C");

  // Only the data checksum tells once the file's own checksum agrees.
  record_shard(0);
  EXPECT_NO_THROW(open_checked(dir_));
  EXPECT_BAD_INPUT(open_checked(dir_, {.verify_checksums = true}), "shard-00000.h5", "CRC32C", "corrupt");
}

TEST_F(DatasetTest, WriterRecordsEachShardFilesChecksum) {
  const DatasetIndex index = write(make_documents(40, 1000, 20, 21));
  ASSERT_GE(index.shards.size(), 2u);
  for (size_t s = 0; s < index.shards.size(); ++s) {
    ASSERT_TRUE(index.shards[s].file_crc32c.has_value()) << s;
    EXPECT_EQ(*index.shards[s].file_crc32c, crc32c_file(shard(s))) << s;
  }
  const json on_disk = json::parse(read_file(index_path()));
  EXPECT_EQ(on_disk["shards"][1]["file_crc32c"], crc32c_hex(crc32c_file(shard(1))));
}

TEST_F(DatasetTest, SameDocumentsGiveTheSameShardBytes) {
  // HDF5 stores modification times unless told not to; the writer turns them
  // off so that file_crc32c does not depend on when a dataset was made.
  const Documents documents = make_documents(40, 1000, 20, 23);
  const DatasetIndex first = write(documents);
  const std::string first_bytes = read_file(shard(1));
  fs::remove_all(dir_);
  ::sleep(1);  // object times have a resolution of a second
  const DatasetIndex second = write(documents);
  EXPECT_EQ(read_file(shard(1)), first_bytes);
  EXPECT_EQ(second.to_json(), first.to_json());
}

// Note [Shard file checksum]: a damaged shard never reaches HDF5.
TEST_F(DatasetTest, DamagedShardFileIsRefusedBeforeHdf5OpensIt) {
  write(make_documents(40, 1000, 20, 22));
  std::string bytes = read_file(shard(1));
  bytes[0] ^= 0x01;  // the HDF5 signature's first byte
  write_file_atomic(shard(1), bytes);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "file CRC32C", "does not match", "not opened");
  EXPECT_BAD_INPUT(open_checked(dir_, {.check_shard_files = ShardFileCheck::kAlways}), "shard-00001.h5",
                   "file CRC32C");
  // Unchecked, the same file goes to HDF5, which refuses it in its own words.
  EXPECT_BAD_INPUT(open_checked(dir_, {.check_shard_files = ShardFileCheck::kNever}), "shard-00001.h5",
                   "cannot open as an HDF5 file");
}

// Regression for what fuzz/fuzz_hdf5_bytes found (docs/fuzzing.md): files
// that make libhdf5 itself overflow a buffer, crash or ask for 16 GiB.
// Each takes the place of a loom-written shard of the same size, whose file
// checksum index.json recorded: loom refuses it before HDF5 reads a byte
// (test_dataset_asan runs this under AddressSanitizer).
TEST_F(DatasetTest, ShardsThatFaultInsideLibhdf5AreRefusedBeforeHdf5ReadsThem) {
  for (const char* name : kHdf5FaultFiles) {
    SCOPED_TRACE(name);
    ASSERT_NO_FATAL_FAILURE(dataset_with_fault_file_as_shard0(name));
    edit_index([&](json& index) { index["shards"][0]["bytes"] = fs::file_size(shard(0)); });
    EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "file CRC32C", "not opened");
  }
}

TEST_F(DatasetTest, CraftedShardsThatFaultInsideLibhdf5AreRefusedByTheProbeProcess) {
  // The same files shipped with an index that matches them, checksum and
  // all: only the probe process stands between them and this process's
  // libhdf5 (Note [Reading shards in a probe process]). Under ASan a read
  // past a buffer in this process would end the test.
  for (const char* name : kHdf5FaultFiles) {
    SCOPED_TRACE(name);
    ASSERT_NO_FATAL_FAILURE(dataset_with_fault_file_as_shard0(name));
    record_shard(0);
    if (kAddressSanitizer && std::string(name).starts_with("heap-overflow")) {
      // ASan sees the child's read past HDF5's buffer, reports it and ends
      // the child. Without ASan the child may come through the reads past
      // buffers (they land in mapped memory; the "segv" file faulted only in
      // the fuzz build's layout), and then so does this process.
      EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "probe process", "did not open it");
    } else {
      EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5");
    }
  }
}

TEST_F(DatasetTest, TheProbeProcessReportsWhatTheReadsInThisProcessWould) {
  // A shard that loom's own checks refuse gives the same BadInput from the
  // probe child as from an open without it; a good dataset opens the same.
  write({{1, 2, kEos}, {3, 4, kEos}}, 1000, 3);
  set_root_attribute(shard(1), "eos_id", 7);
  record_shard(1);
  std::string probed, direct;
  try {
    open_checked(dir_);
  } catch (const BadInput& error) {
    probed = error.what();
  }
  try {
    open_checked(dir_, {.probe_in_child = false});
  } catch (const BadInput& error) {
    direct = error.what();
  }
  EXPECT_NE(probed.find("shard-00001.h5: root attribute 'eos_id' is 7"), std::string::npos) << probed;
  EXPECT_EQ(probed, direct);

  fs::remove_all(dir_);
  write(make_documents(60, 1000, 20, 40), 1000, 100);
  const Dataset with_probe = Dataset::open(dir_, {.verify_checksums = true, .check_shard_files = ShardFileCheck::kAlways});
  const Dataset without = Dataset::open(dir_, {.verify_checksums = true, .probe_in_child = false});
  ASSERT_GE(with_probe.index().shards.size(), 2u);
  EXPECT_EQ(read_all(with_probe), read_all(without));
  EXPECT_EQ(with_probe.read_doc_offsets(1), without.read_doc_offsets(1));
}

TEST_F(DatasetTest, ShardWithoutARecordedFileChecksumIsOpenedUnchecked) {
  // Datasets written before file_crc32c existed, or by other tools.
  write({{1, kEos}, {0x1234, 0x4321, kEos}}, 60000, 1000);
  std::string bytes = read_file(shard(0));
  const size_t at = bytes.find(std::string("\x34\x12\x21\x43", 4));
  ASSERT_NE(at, std::string::npos);
  bytes[at] = 0x35;
  write_file_atomic(shard(0), bytes);
  EXPECT_BAD_INPUT(open_checked(dir_), "file CRC32C");
  edit_index([](json& index) { index["shards"][0].erase("file_crc32c"); });
  const Dataset dataset = Dataset::open(dir_, {.check_shard_files = ShardFileCheck::kAlways});
  EXPECT_FALSE(dataset.index().shards[0].file_crc32c.has_value());
  EXPECT_EQ(read_all(dataset), (std::vector<int64_t>{1, kEos, 0x1235, 0x4321, kEos}));
  EXPECT_EQ(dataset.index().to_json().find("file_crc32c"), std::string::npos);
}

TEST_F(DatasetTest, TokenIdAtOrAboveVocabSizeIsNamedWithShardAndOffset) {
  write({{1, 2, kEos}, {3, 700, kEos}}, 1000, 3);  // id 700 is /tokens[1] of shard 1
  // Claim a smaller vocabulary everywhere, as a dataset prepared with the
  // wrong tokenizer would.
  for (size_t s = 0; s < 2; ++s) {
    set_root_attribute(shard(s), "vocab_size", 500);
    record_shard(s);
  }
  edit_index([&](json& index) { index["vocab_size"] = 500; });
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "/tokens[1] = 700", "vocab_size 500");

  // Without the scan at open, the read that returns the id refuses it.
  const Dataset dataset = Dataset::open(dir_, {.scan_token_range = TokenRangeScan::kNever});
  std::vector<int64_t> first(3);
  EXPECT_NO_THROW(dataset.read_tokens(0, first));
  std::vector<int64_t> second(3);
  EXPECT_BAD_INPUT(dataset.read_tokens(3, second), "shard-00001.h5", "/tokens[1] = 700", "token 4 of the dataset");
}

TEST_F(DatasetTest, IndexTokenCountDisagreeingWithShardIsNamed) {
  write(make_documents(40, 1000, 20, 10));
  edit_index([](json& index) {
    index["shards"][1]["num_tokens"] = index["shards"][1]["num_tokens"].get<uint64_t>() + 1;
    index["num_tokens"] = index["num_tokens"].get<uint64_t>() + 1;
  });
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "'/tokens'", "num_tokens");
}

TEST_F(DatasetTest, IndexDocumentCountDisagreeingWithShardIsNamed) {
  write(make_documents(40, 1000, 20, 11));
  edit_index([](json& index) {
    index["shards"][0]["num_documents"] = index["shards"][0]["num_documents"].get<uint64_t>() - 1;
    index["num_documents"] = index["num_documents"].get<uint64_t>() - 1;
  });
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "'/doc_offsets'", "num_documents");
}

TEST_F(DatasetTest, IndexDtypeDisagreeingWithShardIsNamed) {
  write(make_documents(40, 1000, 20, 12));
  edit_index([](json& index) { index["token_dtype"] = "uint32"; });
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "uint16", "token_dtype uint32");
}

TEST_F(DatasetTest, ShardAttributeDisagreeingWithIndexIsNamed) {
  write(make_documents(40, 1000, 20, 13));
  edit_index([](json& index) { index["tokenizer_hash"] = "sha256:other"; });
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "tokenizer_hash", "sha256:test", "sha256:other");
}

TEST_F(DatasetTest, DecreasingDocOffsetsAreNamed) {
  write({{1, 2, kEos}, {3, kEos}, {4, kEos}}, 1000, 1000);
  set_doc_offset(shard(0), 2, 1);
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "/doc_offsets[2]", "must not decrease");
}

TEST_F(DatasetTest, MissingIndexJsonMeansNotADataset) {
  write({{1, kEos}});
  fs::remove(index_path());
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "missing");
}

TEST_F(DatasetTest, MalformedIndexJsonIsNamed) {
  write({{1, kEos}});
  write_file_atomic(index_path(), "{\"format\": ");
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "not valid JSON");
}

TEST_F(DatasetTest, EveryMissingIndexKeyIsNamed) {
  write({{1, kEos}});
  const std::string original = read_file(index_path());
  for (const char* key : {"format", "format_version", "vocab_size", "eos_id", "tokenizer_hash", "token_dtype",
                          "num_tokens", "num_documents", "shards"}) {
    write_file_atomic(index_path(), original);
    edit_index([&](json& index) { index.erase(key); });
    EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "key '" + std::string(key) + "'", "missing");
  }
  for (const char* key : {"file", "num_tokens", "num_documents", "crc32c", "bytes"}) {
    write_file_atomic(index_path(), original);
    edit_index([&](json& index) { index["shards"][0].erase(key); });
    EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "key 'shards[0]." + std::string(key) + "'", "missing");
  }
}

TEST_F(DatasetTest, WrongIndexValuesAreNamedWithKeyAndValue) {
  write({{1, kEos}});
  const std::string original = read_file(index_path());
  const auto expect_refused = [&](const std::function<void(json&)>& edit, const std::string& key,
                                  const std::string& value) {
    write_file_atomic(index_path(), original);
    edit_index(edit);
    EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "key '" + key + "'", value);
  };
  expect_refused([](json& j) { j["format"] = "other"; }, "format", "\"other\"");
  expect_refused([](json& j) { j["format_version"] = 3; }, "format_version", "3");
  // Format 2 is a dataset with a loss mask; the index must say so.
  expect_refused([](json& j) { j["format_version"] = 2; }, "loss_mask", "no key");
  expect_refused([](json& j) { j["loss_mask"] = true; }, "loss_mask", "format_version 1");
  expect_refused([](json& j) { j["vocab_size"] = "1000"; }, "vocab_size", "\"1000\"");
  expect_refused([](json& j) { j["eos_id"] = 1000; }, "eos_id", "1000");
  expect_refused([](json& j) { j["token_dtype"] = "int8"; }, "token_dtype", "int8");
  expect_refused([](json& j) { j["num_tokens"] = -1; }, "num_tokens", "-1");
  expect_refused([](json& j) { j["num_tokens"] = 99; }, "num_tokens", "99");
  expect_refused([](json& j) { j["shards"][0]["crc32c"] = "xyz"; }, "shards[0].crc32c", "xyz");
  expect_refused([](json& j) { j["shards"][0]["file_crc32c"] = "12g45678"; }, "shards[0].file_crc32c", "12g45678");
  expect_refused([](json& j) { j["shards"][0]["file_crc32c"] = 7; }, "shards[0].file_crc32c", "7");
  expect_refused([](json& j) { j["shards"][0]["file"] = "../shard-00000.h5"; }, "shards[0].file", "../");
  expect_refused([](json& j) { j["vocab_size"] = 70000; }, "token_dtype", "uint16");
}

// Found by fuzz/fuzz_dataset_index (docs/fuzzing.md): a number too large for
// a double is nlohmann's out_of_range, not parse_error, and escaped
// DatasetIndex::parse as an internal error. The input is also in
// fuzz/corpus/fuzz_dataset_index/number-overflow.json.
TEST_F(DatasetTest, IndexNumberTooLargeForADoubleIsBadInput) {
  write({{1, kEos}});
  write_file_atomic(index_path(), read_file(loom_source_dir() + "/fuzz/corpus/fuzz_dataset_index/number-overflow.json"));
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "not valid JSON", "1e999");
}

// Shard counts whose sums wrap around 2^64 could add up to a forged total,
// and num_documents + 1 entries of /doc_offsets would wrap to none.
TEST_F(DatasetTest, IndexCountsThatOverflowAreRefused) {
  write({{1, kEos}, {2, kEos}}, 1000, 2);
  const std::string original = read_file(index_path());
  write_file_atomic(index_path(), original);
  edit_index([](json& j) {
    j["shards"][0]["num_tokens"] = UINT64_MAX;
    j["shards"][1]["num_tokens"] = 5;  // UINT64_MAX + 5 wraps to 4 = num_tokens
  });
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "shards[1].num_tokens", "overflow");
  write_file_atomic(index_path(), original);
  edit_index([](json& j) {
    j["shards"][0]["num_documents"] = UINT64_MAX;
    j["shards"][1]["num_documents"] = 3;  // wraps to 2 = num_documents
  });
  EXPECT_BAD_INPUT(open_checked(dir_), "index.json", "shards[0].num_documents", "overflow");
}

// --- lazy shards: the open-shard cache and first-use checks ----------------------
// (Note [Open shard cache] and Note [Lazy shard checks] in data/dataset.cpp)

TEST_F(DatasetTest, OpenReadsOnlyTheIndexAndAMissingShardIsBadInputWhenAReadNeedsIt) {
  const Documents documents = make_documents(100, 1000, 20, 50);
  const DatasetIndex index = write(documents, 1000, 30);
  ASSERT_GE(index.shards.size(), 5u);
  fs::remove(shard(3));
  const Dataset dataset = Dataset::open(dir_, {.check_shard_files = ShardFileCheck::kAlways});
  EXPECT_EQ(dataset.shard_cache_stats().distinct_opened, 0u);
  EXPECT_EQ(dataset.shard_cache_stats().checked, 0u);
  // Shard 0 reads; shard 3 fails on the read that needs it, naming the file.
  std::vector<int64_t> first(5);
  dataset.read_tokens(0, first);
  EXPECT_TRUE(std::equal(first.begin(), first.end(), concatenate(documents).begin()));
  std::vector<int64_t> in_shard3(2);
  EXPECT_BAD_INPUT(dataset.read_tokens(dataset.shard_first_token(3), in_shard3), "shard-00003.h5", "missing");
  EXPECT_BAD_INPUT(dataset.check_shard_sizes(), "shard-00003.h5", "missing");
  EXPECT_NO_THROW(dataset.check_shard_sizes(0, 3 + 1));  // shards 0, 4, 8, ...: not shard 3
  EXPECT_EQ(dataset.shard_cache_stats().distinct_opened, 1u);
}

TEST_F(DatasetTest, NeverMoreShardFilesOpenThanTheLimitAndReopenedShardsReadTheSame) {
  const Documents documents = make_documents(200, 1000, 20, 51);
  const DatasetIndex index = write(documents, 1000, 25);
  ASSERT_GE(index.shards.size(), 40u);
  const std::vector<int64_t> stream = concatenate(documents);
  const size_t before = open_descriptors();
  const Dataset dataset = Dataset::open(dir_, {.max_open_shards = 4});
  // Reads that hop between shards in a random order, twice over: every shard
  // is evicted and reopened, and reads the same tokens each time.
  std::mt19937 random(52);
  size_t most_descriptors = 0;
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<size_t> order(index.shards.size());
    for (size_t s = 0; s < order.size(); ++s) order[s] = s;
    std::shuffle(order.begin(), order.end(), random);
    for (const size_t s : order) {
      const uint64_t first = dataset.shard_first_token(s);
      std::vector<int64_t> piece(std::min<uint64_t>(index.shards[s].num_tokens + 3, stream.size() - first));
      dataset.read_tokens(first, piece);
      ASSERT_TRUE(std::equal(piece.begin(), piece.end(), stream.begin() + static_cast<std::ptrdiff_t>(first)))
          << "shard " << s << ", pass " << pass;
      most_descriptors = std::max(most_descriptors, open_descriptors());
      ASSERT_LE(dataset.shard_cache_stats().open_now, 4u);
    }
  }
  const ShardCacheStats stats = dataset.shard_cache_stats();
  EXPECT_EQ(stats.distinct_opened, index.shards.size());
  EXPECT_EQ(stats.checked, index.shards.size());
  EXPECT_EQ(stats.peak_open, 4u);
  EXPECT_EQ(stats.max_open, 4u);
  // One descriptor per open shard file, and nothing else left open.
  EXPECT_LE(most_descriptors, before + 4);
  EXPECT_EQ(read_all(dataset), stream);
}

TEST_F(DatasetTest, DocOffsetsAreReadWhenTheShardIsFirstUsedNotAtOpen) {
  write({{1, 2, kEos}, {3, kEos}, {4, 5, kEos}, {6, kEos}}, 1000, 5);  // shards of 2 documents
  set_doc_offset(shard(1), 1, 9);  // past the shard's 5 tokens... and above the last entry
  record_shard(1);
  for (const bool probe : {true, false}) {
    SCOPED_TRACE(probe ? "probed" : "in this process");
    const Dataset dataset = Dataset::open(dir_, {.probe_in_child = probe});
    std::vector<int64_t> shard0(5);
    dataset.read_tokens(0, shard0);
    EXPECT_EQ(shard0, (std::vector<int64_t>{1, 2, kEos, 3, kEos}));
    EXPECT_EQ(dataset.read_doc_offsets(0), (std::vector<uint64_t>{0, 3, 5}));
    std::vector<int64_t> shard1(1);
    EXPECT_BAD_INPUT(dataset.read_tokens(5, shard1), "shard-00001.h5", "/doc_offsets");
    // Not checked, so checked again on the next use, and refused again.
    EXPECT_BAD_INPUT(dataset.read_tokens(5, shard1), "shard-00001.h5", "/doc_offsets");
    EXPECT_EQ(dataset.shard_cache_stats().checked, 1u);
  }
}

TEST_F(DatasetTest, ReadDocOffsetsAfterEvictionReadsThemAgain) {
  const Documents documents = make_documents(60, 1000, 10, 53);
  const DatasetIndex index = write(documents, 1000, 20);
  ASSERT_GE(index.shards.size(), 4u);
  const Dataset dataset = Dataset::open(dir_, {.max_open_shards = 1});
  const std::vector<uint64_t> first = dataset.read_doc_offsets(0);
  for (size_t s = 1; s < index.shards.size(); ++s) (void)dataset.read_doc_offsets(s);
  EXPECT_EQ(dataset.read_doc_offsets(0), first);
  EXPECT_EQ(first.size(), index.shards[0].num_documents + 1);
  EXPECT_EQ(dataset.shard_cache_stats().peak_open, 1u);
}

TEST_F(DatasetTest, CheckShardsChecksOnlyTheShardsAskedForInOneProbe) {
  write(make_documents(100, 1000, 20, 54), 1000, 30);
  write_file_atomic(shard(4), read_file(shard(4)) + "x");  // damaged: size and file CRC differ
  const Dataset dataset = Dataset::open(dir_, {.check_shard_files = ShardFileCheck::kAlways});
  EXPECT_EQ(dataset.shards_of(dataset.shard_first_token(1), 1), (std::vector<size_t>{1}));
  EXPECT_EQ(dataset.shards_of(dataset.shard_first_token(2) - 1, 2), (std::vector<size_t>{1, 2}));
  dataset.check_shards({0, 2, 3});
  EXPECT_EQ(dataset.shard_cache_stats().checked, 3u);
  // The probe opened them; this process has not yet.
  EXPECT_EQ(dataset.shard_cache_stats().distinct_opened, 0u);
  EXPECT_BAD_INPUT(dataset.check_shards({5, 4}), "shard-00004.h5");
  EXPECT_EQ(dataset.shard_cache_stats().checked, 3u);
}

// --- the loss mask (format 2) ------------------------------------------------------

using Masks = std::vector<std::vector<uint8_t>>;

// One mask per document of `documents`: 1 on the second half of each.
Masks half_masks(const Documents& documents) {
  Masks masks;
  for (const auto& document : documents) {
    masks.emplace_back(document.size(), 0);
    std::fill(masks.back().begin() + static_cast<std::ptrdiff_t>(document.size() / 2), masks.back().end(), 1);
  }
  return masks;
}

std::vector<uint8_t> concatenate(const Masks& masks) {
  std::vector<uint8_t> stream;
  for (const auto& mask : masks) stream.insert(stream.end(), mask.begin(), mask.end());
  return stream;
}

// Replaces a shard's /loss_mask by `values` stored as `type`.
void replace_loss_mask(const std::string& path, hid_t type, const std::vector<uint16_t>& values) {
  hdf5::Lock lock;
  hdf5::FileId file(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  ASSERT_GE(H5Ldelete(file.get(), "loss_mask", H5P_DEFAULT), 0);
  const hsize_t size[1] = {values.size()};
  hdf5::SpaceId space(H5Screate_simple(1, size, nullptr));
  hdf5::DatasetId mask(H5Dcreate2(file.get(), "loss_mask", type, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  ASSERT_TRUE(mask.valid());
  ASSERT_GE(H5Dwrite(mask.get(), H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
}

class LossMaskTest : public DatasetTest {
 protected:
  DatasetIndex write_masked(const Documents& documents, const Masks& masks, uint64_t shard_tokens = 50) {
    DatasetWriter writer(dir_, 1000, kEos, "sha256:test", shard_tokens, /*with_loss_mask=*/true);
    for (size_t i = 0; i < documents.size(); ++i) writer.add_document(documents[i], masks[i]);
    return writer.finish();
  }

  std::vector<uint8_t> shard_mask(size_t s) const {
    hdf5::Lock lock;
    hdf5::FileId file(H5Fopen(shard(s).c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
    hdf5::DatasetId mask(H5Dopen2(file.get(), "loss_mask", H5P_DEFAULT));
    hdf5::SpaceId space(H5Dget_space(mask.get()));
    if (!space.valid()) {
      ADD_FAILURE() << "cannot read /loss_mask of " << shard(s);
      return {};
    }
    std::vector<uint8_t> values(static_cast<size_t>(H5Sget_simple_extent_npoints(space.get())));
    EXPECT_GE(H5Dread(mask.get(), H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data()), 0);
    return values;
  }
};

TEST_F(LossMaskTest, RoundTripsOverManyShardsAlignedWithTheTokens) {
  const Documents documents = make_documents(60, 1000, 20, 31);
  const Masks masks = half_masks(documents);
  const DatasetIndex index = write_masked(documents, masks);
  ASSERT_GT(index.shards.size(), 4u);
  EXPECT_TRUE(index.has_loss_mask);
  // Each shard's /loss_mask is as long as its /tokens (read before a
  // Dataset holds the files open).
  for (size_t s = 0; s < index.shards.size(); ++s) EXPECT_EQ(shard_mask(s).size(), index.shards[s].num_tokens);

  const Dataset dataset = open_checked(dir_);
  ASSERT_TRUE(dataset.has_loss_mask());
  EXPECT_EQ(read_all(dataset), concatenate(documents));
  std::vector<uint8_t> all(dataset.num_tokens());
  dataset.read_loss_mask(0, all);
  EXPECT_EQ(all, concatenate(masks));
  // A window across shard boundaries reads the same as the whole.
  std::vector<uint8_t> window(137);
  dataset.read_loss_mask(41, window);
  EXPECT_TRUE(std::equal(window.begin(), window.end(), all.begin() + 41));
  std::vector<uint8_t> past(2);
  EXPECT_THROW(dataset.read_loss_mask(dataset.num_tokens() - 1, past), std::out_of_range);
}

TEST_F(LossMaskTest, OnlyDatasetsWithAMaskAreFormat2AndOthersReadAsAllOnes) {
  const Documents documents = make_documents(10, 1000, 20, 32);
  write_masked(documents, half_masks(documents), 1000);
  json index = json::parse(read_file(index_path()));
  EXPECT_EQ(index["format_version"], 2);
  EXPECT_EQ(index["loss_mask"], true);
  {
    hdf5::Lock lock;
    hdf5::FileId file(H5Fopen(shard(0).c_str(), H5F_ACC_RDONLY, H5P_DEFAULT));
    hdf5::AttrId attr(H5Aopen(file.get(), "format_version", H5P_DEFAULT));
    int64_t version = 0;
    ASSERT_GE(H5Aread(attr.get(), H5T_NATIVE_INT64, &version), 0);
    EXPECT_EQ(version, 2);
  }

  fs::remove_all(dir_);
  write(documents, 1000, 1000);
  index = json::parse(read_file(index_path()));
  EXPECT_EQ(index["format_version"], 1);
  EXPECT_FALSE(index.contains("loss_mask"));
  const Dataset plain = open_checked(dir_);
  EXPECT_FALSE(plain.has_loss_mask());
  std::vector<uint8_t> mask(plain.num_tokens(), 7);
  plain.read_loss_mask(0, mask);
  EXPECT_EQ(mask, std::vector<uint8_t>(plain.num_tokens(), 1));
}

TEST_F(LossMaskTest, WriterRefusesMaskValuesOtherThanZeroAndOneAndMixedUse) {
  DatasetWriter writer(dir_, 1000, kEos, "", 50, /*with_loss_mask=*/true);
  writer.add_document(std::vector<int32_t>{1, kEos}, std::vector<uint8_t>{0, 1});
  EXPECT_BAD_INPUT(writer.add_document(std::vector<int32_t>{1, 2, kEos}, std::vector<uint8_t>{0, 2, 1}), "document 1",
                   "loss-mask value 2", "position 1");
  EXPECT_THROW(writer.add_document(std::vector<int32_t>{1, kEos}, std::vector<uint8_t>{1}), std::logic_error);
  EXPECT_THROW(writer.add_document(std::vector<int32_t>{1, kEos}), std::logic_error);
  EXPECT_EQ(writer.finish().num_documents, 1u);

  fs::remove_all(dir_);
  DatasetWriter plain(dir_, 1000, kEos, "", 50);
  EXPECT_THROW(plain.add_document(std::vector<int32_t>{1, kEos}, std::vector<uint8_t>{0, 1}), std::logic_error);
}

TEST_F(LossMaskTest, ChecksumCoversTokensThenDocOffsetsThenTheMask) {
  const Documents documents = {{5, 6, 7, kEos}, {8, kEos}};
  const Masks masks = {{0, 0, 1, 1}, {1, 1}};
  const DatasetIndex index = write_masked(documents, masks, 1000);
  std::vector<std::byte> bytes;
  const auto append = [&](uint64_t value, size_t width) {
    for (size_t i = 0; i < width; ++i) bytes.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xff));
  };
  for (const auto& document : documents)
    for (const int32_t id : document) append(static_cast<uint64_t>(id), 2);
  for (const uint64_t offset : {0, 4, 6}) append(offset, 8);
  for (const auto& mask : masks)
    for (const uint8_t value : mask) append(value, 1);
  EXPECT_EQ(crc32c_hex(index.shards[0].crc32c), crc32c_hex(crc32c(bytes)));
}

TEST_F(LossMaskTest, ChangedMaskIsFoundByTheDataChecksum) {
  const Documents documents = make_documents(10, 1000, 20, 33);
  write_masked(documents, half_masks(documents), 1000);
  // A valid value changed: only the checksum can tell.
  const std::vector<uint8_t> stored = shard_mask(0);
  std::vector<uint16_t> changed(stored.begin(), stored.end());
  changed[0] ^= 1;
  replace_loss_mask(shard(0), H5T_STD_U8LE, changed);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "file CRC32C");
  record_shard(0);
  EXPECT_NO_THROW(open_checked(dir_));
  EXPECT_BAD_INPUT(open_checked(dir_, {.verify_checksums = true}), "shard-00000.h5", "CRC32C", "corrupt");
}

TEST_F(LossMaskTest, MaskValueOtherThanZeroOrOneIsNamedWithShardAndOffset) {
  const Documents documents = {{1, 2, kEos}, {3, 4, kEos}};
  write_masked(documents, {{0, 1, 1}, {0, 1, 1}}, 3);  // one document per shard
  replace_loss_mask(shard(1), H5T_STD_U8LE, {0, 2, 1});
  record_shard(1);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00001.h5", "/loss_mask[1] = 2", "not 0 or 1");

  // Without the scan at open, the read that returns the value refuses it.
  const Dataset dataset = Dataset::open(dir_, {.scan_token_range = TokenRangeScan::kNever});
  std::vector<uint8_t> first(3);
  EXPECT_NO_THROW(dataset.read_loss_mask(0, first));
  std::vector<uint8_t> second(3);
  EXPECT_BAD_INPUT(dataset.read_loss_mask(3, second), "shard-00001.h5", "/loss_mask[1] = 2", "token 4 of the dataset");
}

TEST_F(LossMaskTest, MissingMistypedOrMisSizedMaskIsNamed) {
  const Documents documents = make_documents(10, 1000, 20, 34);
  write_masked(documents, half_masks(documents), 1000);
  const std::string original = read_file(shard(0));
  const std::vector<uint8_t> stored = shard_mask(0);
  const std::vector<uint16_t> values(stored.begin(), stored.end());

  replace_loss_mask(shard(0), H5T_STD_U16LE, values);
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "'/loss_mask' is uint16", "expected uint8");

  write_file_atomic(shard(0), original);
  replace_loss_mask(shard(0), H5T_STD_U8LE, std::vector<uint16_t>(values.begin(), values.end() - 1));
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "'/loss_mask'", "num_tokens");

  write_file_atomic(shard(0), original);
  {
    hdf5::Lock lock;
    hdf5::FileId file(H5Fopen(shard(0).c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
    ASSERT_GE(H5Ldelete(file.get(), "loss_mask", H5P_DEFAULT), 0);
  }
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "'/loss_mask' is missing");
}

TEST_F(LossMaskTest, ShardOfAnotherFormatThanItsIndexIsNamed) {
  const Documents documents = make_documents(10, 1000, 20, 35);
  write_masked(documents, half_masks(documents), 1000);
  set_root_attribute(shard(0), "format_version", 1);
  record_shard(0);
  EXPECT_BAD_INPUT(open_checked(dir_), "shard-00000.h5", "'format_version' is 1", "index.json says 2");
}

}  // namespace
}  // namespace loom
