// A small SVG writer: elements with attributes and text, written as one
// well-formed XML document. Text and attribute values are escaped here, so a
// run name such as `a<b & "c"` reaches the page as written; element and
// attribute names are the caller's literals and are not checked.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

namespace loom::plot {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// "#1f77b4": the form SVG's fill and stroke take.
std::string svg_colour(Rgb colour);

// `value` with at most two decimals and no trailing zeros ("12.5", "-3",
// "0"): a hundredth of a pixel is finer than any screen, and short numbers
// keep the file small and diffable. `value` must be finite.
std::string svg_number(double value);

// `text` as XML character data or attribute value: & < > " ' as entities;
// bytes XML 1.0 forbids (control characters other than tab, newline and
// carriage return) and bytes that are not UTF-8 as U+FFFD, so that any
// folder name yields a document a parser accepts.
std::string escape_xml(std::string_view text);

struct Attribute {
  std::string_view name;
  std::string value;  // unescaped
};
using Attributes = std::initializer_list<Attribute>;

class SvgWriter {
 public:
  // The root <svg> element, `width` x `height` user units (pixels).
  SvgWriter(double width, double height);

  // <name attributes/>
  void element(std::string_view name, Attributes attributes);
  // <name attributes>text</name>
  void text_element(std::string_view name, Attributes attributes, std::string_view text);
  // <name attributes> ... up to the matching close().
  void open(std::string_view name, Attributes attributes);
  // Closes the innermost element open()ed (not the root: finish() does).
  void close();

  // Closes what is still open, the root included, and returns the document.
  // The writer is spent afterwards.
  std::string finish();

 private:
  void start_tag(std::string_view name, Attributes attributes);
  void close_last();
  void indent();

  std::string out_;
  std::vector<std::string> open_;  // names of the open elements, root first
  bool finished_ = false;
};

}  // namespace loom::plot
