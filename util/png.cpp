#include "util/png.h"

#include <zlib.h>

#include <array>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace loom {
namespace {

constexpr std::string_view kSignature("\x89PNG\r\n\x1a\n", 8);
constexpr int64_t kMaxDimension = 0x7FFFFFFF;  // PNG stores width and height as 31-bit values
constexpr uint8_t kFilterNone = 0;             // per-scanline filter byte (spec 9.2)

void append_u32_be(std::string& out, uint32_t value) {
  out.push_back(static_cast<char>(value >> 24));
  out.push_back(static_cast<char>(value >> 16));
  out.push_back(static_cast<char>(value >> 8));
  out.push_back(static_cast<char>(value));
}

// length, type, data, CRC-32 of type + data (spec 5.3).
void append_chunk(std::string& out, std::string_view type, std::string_view data) {
  if (data.size() > static_cast<size_t>(kMaxDimension)) {
    throw std::invalid_argument("PNG chunk " + std::string(type) + " of " + std::to_string(data.size()) +
                                " bytes exceeds the 2^31-1 limit");
  }
  append_u32_be(out, static_cast<uint32_t>(data.size()));
  const size_t crc_from = out.size();
  out.append(type);
  out.append(data);
  const auto* crc_bytes = reinterpret_cast<const Bytef*>(out.data() + crc_from);
  const uLong crc = crc32(crc32(0L, Z_NULL, 0), crc_bytes, static_cast<uInt>(out.size() - crc_from));
  append_u32_be(out, static_cast<uint32_t>(crc));
}

}  // namespace

std::string encode_png_rgb(int64_t width, int64_t height, std::span<const uint8_t> rgb) {
  if (width < 1 || height < 1 || width > kMaxDimension || height > kMaxDimension) {
    throw std::invalid_argument("PNG size " + std::to_string(width) + " x " + std::to_string(height) +
                                " is outside 1 .. 2^31-1");
  }
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  if (rgb.size() != row_bytes * static_cast<size_t>(height)) {
    throw std::invalid_argument("PNG " + std::to_string(width) + " x " + std::to_string(height) + " RGB needs " +
                                std::to_string(row_bytes * height) + " bytes, got " + std::to_string(rgb.size()));
  }

  std::string ihdr;
  append_u32_be(ihdr, static_cast<uint32_t>(width));
  append_u32_be(ihdr, static_cast<uint32_t>(height));
  ihdr.push_back(8);  // bit depth
  ihdr.push_back(2);  // colour type: truecolour (RGB)
  ihdr.push_back(0);  // compression: deflate
  ihdr.push_back(0);  // filter method: adaptive (per-scanline filter byte)
  ihdr.push_back(0);  // no interlace

  // Each scanline is preceded by its filter type. Filter None everywhere:
  // plots are mostly flat colour, which deflate already compresses well.
  std::vector<uint8_t> scanlines;
  scanlines.reserve((row_bytes + 1) * height);
  for (int64_t y = 0; y < height; ++y) {
    scanlines.push_back(kFilterNone);
    const auto row = rgb.subspan(static_cast<size_t>(y) * row_bytes, row_bytes);
    scanlines.insert(scanlines.end(), row.begin(), row.end());
  }
  uLongf deflated_size = compressBound(static_cast<uLong>(scanlines.size()));
  std::string deflated(deflated_size, '\0');
  const int rc = compress2(reinterpret_cast<Bytef*>(deflated.data()), &deflated_size, scanlines.data(),
                           static_cast<uLong>(scanlines.size()), Z_DEFAULT_COMPRESSION);
  if (rc != Z_OK) throw std::runtime_error("zlib compress2 failed with code " + std::to_string(rc));
  deflated.resize(deflated_size);

  std::string png(kSignature);
  append_chunk(png, "IHDR", ihdr);
  append_chunk(png, "IDAT", deflated);
  append_chunk(png, "IEND", "");
  return png;
}

}  // namespace loom
