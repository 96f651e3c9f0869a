#include "model/init_rng.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace loom {

namespace {

// Salmon et al. 2011, table 2: the multipliers and the Weyl key schedule.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// Ten rounds of the bijection, the key bumped between them; the state in four
// scalars, inline here, so that the loop of NormalInitStream::fill keeps it
// in registers (an array round-tripped through memory cost twice the time).
inline PhiloxCounter philox10(const PhiloxCounter& counter, const PhiloxKey& key) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const auto hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const auto hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;  // after the last round too: unused then
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// A 32-bit word as a uniform in (0, 1): never 0, so its log is finite.
inline double open_uniform(uint32_t x) { return (static_cast<double>(x) + 0.5) * 0x1p-32; }

}  // namespace

PhiloxCounter philox4x32_10(PhiloxCounter counter, PhiloxKey key) { return philox10(counter, key); }

uint64_t fnv1a_64(std::string_view text) {
  uint64_t hash = 0xcbf29ce484222325ull;  // FNV offset basis
  for (const char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;  // FNV prime
  }
  return hash;
}

NormalInitStream::NormalInitStream(uint64_t seed, std::string_view name, double std)
    : key_{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}, std_(std) {
  const uint64_t hash = fnv1a_64(name);
  name_lo_ = static_cast<uint32_t>(hash);
  name_hi_ = static_cast<uint32_t>(hash >> 32);
}

std::array<float, 4> NormalInitStream::block(uint64_t block) const {
  const PhiloxCounter x = philox10(
      {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), name_lo_, name_hi_}, key_);
  // Box-Muller: two uniforms give two independent N(0, 1) values,
  // r cos(theta) and r sin(theta). In double, then rounded once to float.
  std::array<float, 4> out;
  for (int pair = 0; pair < 2; ++pair) {
    const double r = std::sqrt(-2.0 * std::log(open_uniform(x[2 * pair])));
    const double theta = 2.0 * std::numbers::pi * open_uniform(x[2 * pair + 1]);
    out[2 * pair] = static_cast<float>(std_ * r * std::cos(theta));
    out[2 * pair + 1] = static_cast<float>(std_ * r * std::sin(theta));
  }
  return out;
}

float NormalInitStream::at(uint64_t index) const { return block(index >> 2)[index & 3]; }

void NormalInitStream::fill(float* out, uint64_t first, int64_t count) const {
  const uint64_t end = first + static_cast<uint64_t>(count);
  for (uint64_t i = first; i < end;) {
    const std::array<float, 4> values = block(i >> 2);
    const uint64_t lane = i & 3;
    const uint64_t n = std::min<uint64_t>(4 - lane, end - i);
    std::copy_n(values.begin() + static_cast<int64_t>(lane), n, out);
    out += n;
    i += n;
  }
}

}  // namespace loom
