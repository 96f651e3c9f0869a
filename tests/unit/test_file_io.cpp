// read_file, crash-safe writes (write_file_atomic, AtomicFile) and MappedFile.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "util/error.h"
#include "util/file_io.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

class FileIo : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("loom-test-file-io-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  // Every entry of the test directory, to prove nothing (no temporary) is left.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

void write_plain(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
}

std::string message_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

TEST_F(FileIo, ReadFileReturnsWholeContentIncludingNulBytes) {
  const std::string content("a\0b\nc", 5);
  write_plain(file("x"), content);
  EXPECT_EQ(read_file(file("x")), content);
}

TEST_F(FileIo, ReadFileOfMissingFileThrowsBadInputNamingPathAndReason) {
  const std::string path = file("missing.txt");
  EXPECT_THROW(read_file(path), BadInput);
  const std::string message = message_of([&] { read_file(path); });
  EXPECT_NE(message.find("cannot read '" + path + "'"), std::string::npos) << message;
  EXPECT_NE(message.find("No such file"), std::string::npos) << message;
}

TEST_F(FileIo, ReadFileOfDirectoryThrowsBadInput) { EXPECT_THROW(read_file(dir_.string()), BadInput); }

TEST_F(FileIo, WriteFileAtomicCreatesFileAndLeavesNoTemporary) {
  write_file_atomic(file("out.json"), "{\"a\": 1}");
  EXPECT_EQ(read_file(file("out.json")), "{\"a\": 1}");
  EXPECT_EQ(entries(), std::vector<std::string>{"out.json"});
}

TEST_F(FileIo, WriteFileAtomicReplacesExistingContent) {
  write_plain(file("out"), "old content that is longer");
  write_file_atomic(file("out"), "new");
  EXPECT_EQ(read_file(file("out")), "new");
  EXPECT_EQ(entries(), std::vector<std::string>{"out"});
}

TEST_F(FileIo, WriteFileAtomicWritesEmptyFile) {
  write_file_atomic(file("empty"), "");
  EXPECT_EQ(read_file(file("empty")), "");
}

TEST_F(FileIo, WriteFileAtomicIntoMissingDirectoryThrowsRuntimeErrorNamingPath) {
  const std::string path = file("no/such/dir/out");
  EXPECT_THROW(write_file_atomic(path, "x"), std::runtime_error);
  EXPECT_NE(message_of([&] { write_file_atomic(path, "x"); }).find(path), std::string::npos);
  EXPECT_TRUE(entries().empty());
}

TEST_F(FileIo, WriteFileAtomicOntoDirectoryFailsAndRemovesTemporary) {
  fs::create_directory(file("taken"));
  // rename(2) of a file over a directory fails (EISDIR) after the data was written.
  EXPECT_THROW(write_file_atomic(file("taken"), "x"), std::runtime_error);
  EXPECT_EQ(entries(), std::vector<std::string>{"taken"});
  EXPECT_TRUE(fs::is_directory(file("taken")));
}

TEST_F(FileIo, AtomicFileStreamsChunksAndCommits) {
  {
    AtomicFile out(file("big"));
    EXPECT_EQ(out.temp_path(), file("big") + ".tmp." + std::to_string(::getpid()));
    EXPECT_TRUE(fs::exists(out.temp_path()));
    EXPECT_FALSE(fs::exists(file("big")));  // invisible under its final name until commit
    std::vector<std::byte> chunk(1 << 16);
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<std::byte>(i * 7);
    for (int i = 0; i < 10; ++i) out.write(chunk);
    out.write(std::string_view("tail"));
    EXPECT_EQ(out.bytes_written(), 10u * chunk.size() + 4);
    out.commit();
  }
  EXPECT_EQ(fs::file_size(file("big")), 10u * (1 << 16) + 4);
  EXPECT_EQ(read_file(file("big")).substr(10u * (1 << 16)), "tail");
  EXPECT_EQ(entries(), std::vector<std::string>{"big"});
}

TEST_F(FileIo, AtomicFileDestroyedWithoutCommitLeavesNoFileAndNoTemporary) {
  {
    AtomicFile out(file("abandoned"));
    out.write(std::string_view("partial"));
  }
  EXPECT_TRUE(entries().empty());
}

TEST_F(FileIo, AtomicFileAbortedByExceptionKeepsPreviousFileIntact) {
  write_plain(file("ckpt"), "previous");
  try {
    AtomicFile out(file("ckpt"));
    out.write(std::string_view("half of the new"));
    throw std::runtime_error("crash while writing");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(read_file(file("ckpt")), "previous");
  EXPECT_EQ(entries(), std::vector<std::string>{"ckpt"});
}

TEST_F(FileIo, AtomicFileMovedFromDoesNotRemoveTheTemporary) {
  AtomicFile first(file("moved"));
  first.write(std::string_view("abc"));
  AtomicFile second(std::move(first));
  second.write(std::string_view("def"));
  second.commit();
  EXPECT_EQ(read_file(file("moved")), "abcdef");
}

TEST_F(FileIo, AtomicFileWriteAfterCommitIsALogicError) {
  AtomicFile out(file("done"));
  out.commit();
  EXPECT_THROW(out.write(std::string_view("late")), std::logic_error);
  EXPECT_THROW(out.commit(), std::logic_error);
}

TEST_F(FileIo, FsyncDirectorySucceedsOnDirectoryAndThrowsNamingMissingOne) {
  EXPECT_NO_THROW(fsync_directory(dir_.string()));
  const std::string missing = file("nope");
  EXPECT_THROW(fsync_directory(missing), std::runtime_error);
  EXPECT_NE(message_of([&] { fsync_directory(missing); }).find(missing), std::string::npos);
}

TEST_F(FileIo, MappedFileExposesFileBytes) {
  write_plain(file("m"), "mapped bytes");
  const MappedFile mapped = MappedFile::open(file("m"));
  const auto bytes = mapped.bytes();
  ASSERT_EQ(bytes.size(), 12u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()), "mapped bytes");
  EXPECT_EQ(mapped.path(), file("m"));
}

TEST_F(FileIo, MappedFileOfEmptyFileIsEmptySpan) {
  write_plain(file("empty"), "");
  const MappedFile mapped = MappedFile::open(file("empty"));
  EXPECT_TRUE(mapped.bytes().empty());
}

TEST_F(FileIo, MappedFileOfMissingFileThrowsBadInputNamingPath) {
  const std::string path = file("absent.safetensors");
  EXPECT_THROW(MappedFile::open(path), BadInput);
  EXPECT_NE(message_of([&] { MappedFile::open(path); }).find(path), std::string::npos);
}

TEST_F(FileIo, MappedFileOfDirectoryThrowsBadInput) { EXPECT_THROW(MappedFile::open(dir_.string()), BadInput); }

TEST_F(FileIo, MappedFileMoveTransfersTheMapping) {
  write_plain(file("a"), "aaaa");
  write_plain(file("b"), "bb");
  MappedFile a = MappedFile::open(file("a"));
  const std::byte* data = a.bytes().data();
  MappedFile moved(std::move(a));
  EXPECT_EQ(moved.bytes().data(), data);
  EXPECT_EQ(moved.bytes().size(), 4u);
  EXPECT_TRUE(a.bytes().empty());  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  MappedFile b = MappedFile::open(file("b"));
  b = std::move(moved);  // unmaps b's old mapping
  EXPECT_EQ(b.bytes().size(), 4u);
  EXPECT_EQ(static_cast<char>(b.bytes()[0]), 'a');
}

}  // namespace
}  // namespace loom
