// A minimal PNG encoder: 8-bit RGB, no interlacing, one IDAT chunk holding
// the zlib-deflated scanlines, each chunk closed by its CRC-32 (PNG spec,
// ISO/IEC 15948, sections 5 and 12). Enough for loom's plots; loom reads no
// PNGs, so there is no decoder (the tests inflate with zlib themselves).
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace loom {

// The PNG file for a `width` x `height` image whose pixels are `rgb`: rows
// top to bottom, 3 bytes (R, G, B) per pixel, no padding. Throws
// std::invalid_argument when the sizes disagree or are out of PNG's range
// (a bug in the caller, not bad input).
std::string encode_png_rgb(int64_t width, int64_t height, std::span<const uint8_t> rgb);

}  // namespace loom
