// CRC-32C against published vectors (RFC 3720 appendix B.4 and the common
// "123456789" check value), incremental use, and the file helper.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "util/crc32c.h"
#include "util/error.h"

namespace loom {
namespace {

std::span<const std::byte> as_bytes(std::string_view text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

std::vector<std::byte> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xFF);
  return bytes;
}

class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() /
            ("loom-test-crc32c-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

void write_bytes(const std::string& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

TEST(Crc32c, EmptyInputIsZero) {
  EXPECT_EQ(crc32c({}), 0u);
  EXPECT_EQ(detail::crc32c_portable({}), 0u);
}

TEST(Crc32c, CheckValueOfDigitsOneToNine) {
  EXPECT_EQ(crc32c(as_bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(detail::crc32c_portable(as_bytes("123456789")), 0xE3069283u);
}

TEST(Crc32c, MatchesRfc3720Vectors) {
  std::vector<std::byte> zeros(32, std::byte{0});
  std::vector<std::byte> ones(32, std::byte{0xFF});
  std::vector<std::byte> increasing(32), decreasing(32);
  for (int i = 0; i < 32; ++i) {
    increasing[i] = static_cast<std::byte>(i);
    decreasing[i] = static_cast<std::byte>(31 - i);
  }
  for (auto fn : {&crc32c, &detail::crc32c_portable}) {
    EXPECT_EQ(fn(zeros, 0), 0x8A9136AAu);
    EXPECT_EQ(fn(ones, 0), 0x62A8AB43u);
    EXPECT_EQ(fn(increasing, 0), 0x46DD794Eu);
    EXPECT_EQ(fn(decreasing, 0), 0x113FDB5Cu);
  }
}

TEST(Crc32c, IncrementalEqualsOneShotAtEverySplit) {
  const auto data = random_bytes(100, 1);
  const uint32_t whole = crc32c(data);
  for (size_t split = 0; split <= data.size(); ++split) {
    const std::span<const std::byte> all(data);
    EXPECT_EQ(crc32c(all.subspan(split), crc32c(all.first(split))), whole) << "split at " << split;
    EXPECT_EQ(detail::crc32c_portable(all.subspan(split), detail::crc32c_portable(all.first(split))), whole);
  }
}

TEST(Crc32c, HardwareAndPortablePathsAgreeOnAllLengthsAndAlignments) {
  const auto data = random_bytes(4096 + 16, 2);
  const std::span<const std::byte> all(data);
  for (size_t offset = 0; offset < 8; ++offset) {
    for (size_t length : {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4096}) {
      const auto piece = all.subspan(offset, length);
      EXPECT_EQ(crc32c(piece), detail::crc32c_portable(piece)) << "offset " << offset << " length " << length;
    }
  }
}

TEST(Crc32cFile, MatchesInMemoryChecksumAcrossChunkBoundaries) {
  TempDir dir;
  // 2.5 MiB plus a few bytes: three 1 MiB reads, the last one short.
  const auto data = random_bytes((5u << 19) + 3, 3);
  write_bytes(dir.file("blob"), data);
  EXPECT_EQ(crc32c_file(dir.file("blob")), crc32c(data));
}

TEST(Crc32cFile, EmptyFileIsZero) {
  TempDir dir;
  write_bytes(dir.file("empty"), {});
  EXPECT_EQ(crc32c_file(dir.file("empty")), 0u);
}

TEST(Crc32cFile, MissingFileThrowsBadInputNamingThePath) {
  TempDir dir;
  const std::string missing = dir.file("missing.bin");
  try {
    crc32c_file(missing);
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loom
