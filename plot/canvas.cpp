#include "plot/canvas.h"

#include <cstdlib>
#include <stdexcept>

#include "plot/font.h"

namespace loom::plot {

Canvas::Canvas(int width, int height, Rgb background) : width_(width), height_(height) {
  if (width < 1 || height < 1) {
    throw std::invalid_argument("canvas size " + std::to_string(width) + " x " + std::to_string(height));
  }
  pixels_.resize(static_cast<size_t>(width) * height * 3);
  fill_rect({0, 0, width, height}, background);
}

Rgb Canvas::pixel(int x, int y) const {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) {
    throw std::out_of_range("pixel (" + std::to_string(x) + ", " + std::to_string(y) + ") outside the canvas");
  }
  const size_t at = (static_cast<size_t>(y) * width_ + x) * 3;
  return {pixels_[at], pixels_[at + 1], pixels_[at + 2]};
}

void Canvas::set_pixel(int x, int y, Rgb colour) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  const size_t at = (static_cast<size_t>(y) * width_ + x) * 3;
  pixels_[at] = colour.r;
  pixels_[at + 1] = colour.g;
  pixels_[at + 2] = colour.b;
}

void Canvas::fill_rect(const PixelRect& rect, Rgb colour) {
  for (int y = rect.y; y <= rect.bottom(); ++y) {
    for (int x = rect.x; x <= rect.right(); ++x) set_pixel(x, y, colour);
  }
}

void Canvas::draw_rect_outline(const PixelRect& rect, Rgb colour) {
  draw_line(rect.x, rect.y, rect.right(), rect.y, colour);
  draw_line(rect.x, rect.bottom(), rect.right(), rect.bottom(), colour);
  draw_line(rect.x, rect.y, rect.x, rect.bottom(), colour);
  draw_line(rect.right(), rect.y, rect.right(), rect.bottom(), colour);
}

void Canvas::draw_line(int x0, int y0, int x1, int y1, Rgb colour, int thickness) {
  const int offset = (thickness - 1) / 2;  // centres the square on the line
  const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
  const int step_x = x0 < x1 ? 1 : -1, step_y = y0 < y1 ? 1 : -1;
  int error = dx + dy;
  for (;;) {
    if (thickness <= 1) {
      set_pixel(x0, y0, colour);
    } else {
      fill_rect({x0 - offset, y0 - offset, thickness, thickness}, colour);
    }
    if (x0 == x1 && y0 == y1) break;
    const int twice = 2 * error;
    if (twice >= dy) {
      error += dy;
      x0 += step_x;
    }
    if (twice <= dx) {
      error += dx;
      y0 += step_y;
    }
  }
}

void Canvas::draw_text(int x, int y, std::string_view text, Rgb colour, int scale) {
  for (char c : text) {
    const auto& columns = glyph_5x7(c);
    for (int col = 0; col < kGlyphWidth; ++col) {
      for (int row = 0; row < kGlyphHeight; ++row) {
        if ((columns[col] >> row) & 1) fill_rect({x + col * scale, y + row * scale, scale, scale}, colour);
      }
    }
    x += kGlyphAdvance * scale;
  }
}

int Canvas::text_width(std::string_view text, int scale) {
  // The last character's spacing column is not part of the text.
  return text.empty() ? 0 : (static_cast<int>(text.size()) * kGlyphAdvance - 1) * scale;
}

int Canvas::text_height(int scale) { return kGlyphHeight * scale; }

}  // namespace loom::plot
