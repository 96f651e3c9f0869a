// A 5 x 7 pixel bitmap font for printable ASCII, so plots carry their own
// text without a font library. Rows 0-6 hold capitals and digits, row 7 the
// descenders of g, j, p, q and y; one column of spacing follows each glyph.
#pragma once

#include <array>
#include <cstdint>

namespace loom::plot {

inline constexpr int kGlyphWidth = 5;
inline constexpr int kGlyphHeight = 8;  // 7 rows + a descender row
inline constexpr int kGlyphAdvance = 6;  // pixels from one character to the next, at scale 1

// Column-major: byte c is column c from the left, bit r is row r from the
// top. Characters outside ' '..'~' get the glyph of '?'.
const std::array<uint8_t, kGlyphWidth>& glyph_5x7(char c);

}  // namespace loom::plot
