#include "util/crc32c.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "util/error.h"
#include "util/file_io.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LOOM_CRC32C_X86 1
#endif

namespace loom {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

// kTables[0] is the classic byte-at-a-time table; kTables[k][b] is the CRC of
// byte b followed by k zero bytes, which lets slicing-by-8 fold 8 input bytes
// with 8 independent lookups.
constexpr std::array<std::array<uint32_t, 256>, 8> make_tables() {
  std::array<std::array<uint32_t, 256>, 8> tables{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) ? kPolyReflected : 0u);
    tables[0][b] = crc;
  }
  for (size_t k = 1; k < 8; ++k)
    for (uint32_t b = 0; b < 256; ++b) tables[k][b] = (tables[k - 1][b] >> 8) ^ tables[0][tables[k - 1][b] & 0xFFu];
  return tables;
}
constexpr auto kTables = make_tables();

// Reads 8 bytes as a little-endian integer without alignment requirements.
inline uint64_t load_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// `state` is the inverted running CRC (the inversion happens once at the ends).
uint32_t update_portable(uint32_t state, const unsigned char* p, size_t n) {
  while (n >= 8) {
    const uint64_t word = load_le64(p) ^ state;
    state = kTables[7][word & 0xFF] ^ kTables[6][(word >> 8) & 0xFF] ^ kTables[5][(word >> 16) & 0xFF] ^
            kTables[4][(word >> 24) & 0xFF] ^ kTables[3][(word >> 32) & 0xFF] ^ kTables[2][(word >> 40) & 0xFF] ^
            kTables[1][(word >> 48) & 0xFF] ^ kTables[0][(word >> 56) & 0xFF];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) state = (state >> 8) ^ kTables[0][(state ^ *p++) & 0xFF];
  return state;
}

#ifdef LOOM_CRC32C_X86
// Compiled for SSE4.2 regardless of the global flags and called only after a
// run-time check, so one binary runs everywhere and is fast where it can be.
__attribute__((target("sse4.2"))) uint32_t update_sse42(uint32_t state, const unsigned char* p, size_t n) {
  uint64_t state64 = state;
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);  // unaligned-safe; x86 is little-endian
    state64 = _mm_crc32_u64(state64, word);
    p += 8;
    n -= 8;
  }
  state = static_cast<uint32_t>(state64);
  while (n-- > 0) state = _mm_crc32_u8(state, *p++);
  return state;
}

bool cpu_has_sse42() {
  static const bool has = [] {
    __builtin_cpu_init();  // needed when first called from a static initializer
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return has;
}
#endif

}  // namespace

namespace detail {
uint32_t crc32c_portable(std::span<const std::byte> data, uint32_t crc) {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  return ~update_portable(~crc, p, data.size());
}
}  // namespace detail

uint32_t crc32c(std::span<const std::byte> data, uint32_t crc) {
#ifdef LOOM_CRC32C_X86
  if (cpu_has_sse42()) {
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    return ~update_sse42(~crc, p, data.size());
  }
#endif
  return detail::crc32c_portable(data, crc);
}

std::string crc32c_hex(uint32_t crc) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", crc);
  return text;
}

uint32_t crc32c_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) throw BadInput("cannot read '" + path + "': " + std::strerror(errno));
  constexpr size_t kChunkBytes = size_t{1} << 20;
  std::vector<std::byte> buffer(kChunkBytes);
  uint32_t crc = 0;
  for (;;) {
    const ssize_t got = ::read(fd.get(), buffer.data(), buffer.size());
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EISDIR) throw BadInput("cannot read '" + path + "': " + std::strerror(errno));
      throw std::runtime_error("error reading '" + path + "': " + std::strerror(errno));
    }
    if (got == 0) break;
    crc = crc32c(std::span(buffer.data(), static_cast<size_t>(got)), crc);
  }
  return crc;
}

}  // namespace loom
