#include "plot/svg.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <utility>

namespace loom::plot {
namespace {

constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD in UTF-8

// Length of the well-formed UTF-8 sequence starting at text[at] (Unicode
// table 3-7, which rules out overlong forms and surrogates), or 0 when there
// is none there.
size_t utf8_sequence_length(std::string_view text, size_t at) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[at + i]); };
  const auto continuation = [&](size_t i, uint8_t lo = 0x80, uint8_t hi = 0xBF) {
    return at + i < text.size() && byte(i) >= lo && byte(i) <= hi;
  };
  const uint8_t lead = byte(0);
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return continuation(1) ? 2 : 0;
  if (lead >= 0xE0 && lead <= 0xEF) {
    const uint8_t lo = lead == 0xE0 ? 0xA0 : 0x80, hi = lead == 0xED ? 0x9F : 0xBF;
    return continuation(1, lo, hi) && continuation(2) ? 3 : 0;
  }
  if (lead >= 0xF0 && lead <= 0xF4) {
    const uint8_t lo = lead == 0xF0 ? 0x90 : 0x80, hi = lead == 0xF4 ? 0x8F : 0xBF;
    return continuation(1, lo, hi) && continuation(2) && continuation(3) ? 4 : 0;
  }
  return 0;
}

}  // namespace

std::string svg_colour(Rgb colour) {
  char text[8];
  std::snprintf(text, sizeof text, "#%02x%02x%02x", colour.r, colour.g, colour.b);
  return text;
}

std::string svg_number(double value) {
  if (!std::isfinite(value)) throw std::invalid_argument("svg_number: non-finite value");
  char text[64];
  const auto [end, error] = std::to_chars(text, text + sizeof text, value, std::chars_format::fixed, 2);
  if (error != std::errc()) throw std::invalid_argument("svg_number: value out of range");
  std::string number(text, end);
  number.erase(number.find_last_not_of('0') + 1);
  if (number.back() == '.') number.pop_back();
  if (number == "-0") number = "0";
  return number;
}

std::string escape_xml(std::string_view text) {
  std::string escaped;
  escaped.reserve(text.size());
  for (size_t at = 0; at < text.size();) {
    const char c = text[at];
    const size_t length = utf8_sequence_length(text, at);
    if (length == 0) {
      escaped += kReplacementCharacter;
      ++at;
      continue;
    }
    const std::string_view sequence = text.substr(at, length);
    at += length;
    // XML 1.0 allows no other control characters, and neither U+FFFE nor U+FFFF.
    const bool forbidden = (length == 1 && static_cast<uint8_t>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r') ||
                           sequence == "\xEF\xBF\xBE" || sequence == "\xEF\xBF\xBF";
    if (forbidden) {
      escaped += kReplacementCharacter;
      continue;
    }
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      case '\'': escaped += "&apos;"; break;
      default: escaped += sequence;
    }
  }
  return escaped;
}

SvgWriter::SvgWriter(double width, double height) {
  out_ = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  const std::string w = svg_number(width), h = svg_number(height);
  open("svg", {{"xmlns", "http://www.w3.org/2000/svg"},
               {"width", w},
               {"height", h},
               {"viewBox", "0 0 " + w + " " + h}});
}

void SvgWriter::indent() { out_.append(2 * open_.size(), ' '); }

void SvgWriter::start_tag(std::string_view name, Attributes attributes) {
  if (finished_) throw std::logic_error("SvgWriter: element after finish()");
  indent();
  out_ += '<';
  out_ += name;
  for (const Attribute& attribute : attributes) {
    out_ += ' ';
    out_ += attribute.name;
    out_ += "=\"";
    out_ += escape_xml(attribute.value);
    out_ += '"';
  }
}

void SvgWriter::element(std::string_view name, Attributes attributes) {
  start_tag(name, attributes);
  out_ += "/>\n";
}

void SvgWriter::text_element(std::string_view name, Attributes attributes, std::string_view text) {
  start_tag(name, attributes);
  out_ += '>';
  out_ += escape_xml(text);
  out_ += "</";
  out_ += name;
  out_ += ">\n";
}

void SvgWriter::open(std::string_view name, Attributes attributes) {
  start_tag(name, attributes);
  out_ += ">\n";
  open_.emplace_back(name);
}

void SvgWriter::close() {
  // The root closes in finish(): an element after it would be a second root.
  if (open_.size() <= 1) throw std::logic_error("SvgWriter::close with no open element");
  close_last();
}

void SvgWriter::close_last() {
  const std::string name = std::move(open_.back());
  open_.pop_back();
  indent();
  out_ += "</" + name + ">\n";
}

std::string SvgWriter::finish() {
  if (finished_) throw std::logic_error("SvgWriter::finish called twice");
  while (!open_.empty()) close_last();
  finished_ = true;
  return std::move(out_);
}

}  // namespace loom::plot
