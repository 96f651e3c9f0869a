// An RGB raster with the few drawing primitives loom's charts need: filled
// rectangles, thick lines and text in the built-in 5 x 7 font. No
// anti-aliasing, so every drawn pixel has exactly the colour it was drawn
// with (tests look for a series by its colour).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loom::plot {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// Pixels [x, x + width) x [y, y + height), y growing downwards.
struct PixelRect {
  int x = 0, y = 0, width = 0, height = 0;
  int right() const { return x + width - 1; }   // last column inside
  int bottom() const { return y + height - 1; }  // last row inside
  bool contains(int px, int py) const { return px >= x && px <= right() && py >= y && py <= bottom(); }
};

class Canvas {
 public:
  Canvas(int width, int height, Rgb background);

  int width() const { return width_; }
  int height() const { return height_; }
  Rgb pixel(int x, int y) const;

  // Drawing outside the canvas is clipped silently.
  void set_pixel(int x, int y, Rgb colour);
  void fill_rect(const PixelRect& rect, Rgb colour);
  void draw_rect_outline(const PixelRect& rect, Rgb colour);
  // Bresenham's line, each point stamped as a `thickness` x `thickness` square.
  void draw_line(int x0, int y0, int x1, int y1, Rgb colour, int thickness = 1);
  // Text with its top-left corner at (x, y), each font pixel `scale` x `scale`.
  void draw_text(int x, int y, std::string_view text, Rgb colour, int scale = 1);

  static int text_width(std::string_view text, int scale);
  static int text_height(int scale);

  // Rows top to bottom, 3 bytes per pixel: what encode_png_rgb takes.
  std::span<const uint8_t> rgb() const { return pixels_; }

 private:
  int width_;
  int height_;
  std::vector<uint8_t> pixels_;
};

}  // namespace loom::plot
