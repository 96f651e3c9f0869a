// A strict reader of the XML subset loom's SVG writer produces, for tests: it
// refuses what a conforming XML parser refuses in that subset (unbalanced or
// mismatched tags, a raw '<' or '&' in text or attribute values, unknown
// entities, duplicate or unquoted attributes, control characters, bytes that
// are not UTF-8, anything after the root) and returns the element tree with
// entities decoded. No DTDs, CDATA or namespaces: the writer emits none.
#pragma once

#include <cctype>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loom::test_support {

struct XmlElement {
  std::string name;
  std::vector<std::pair<std::string, std::string>> attributes;
  std::vector<XmlElement> children;
  std::string text;  // the character data directly inside, concatenated

  bool has(std::string_view key) const {
    for (const auto& attribute : attributes) {
      if (attribute.first == key) return true;
    }
    return false;
  }
  // The attribute's decoded value; throws when it is missing.
  const std::string& at(std::string_view key) const {
    for (const auto& attribute : attributes) {
      if (attribute.first == key) return attribute.second;
    }
    throw std::out_of_range("<" + name + "> has no attribute " + std::string(key));
  }
  // This element and its descendants, in document order, that satisfy `match`.
  std::vector<const XmlElement*> find_all(const std::function<bool(const XmlElement&)>& match) const {
    std::vector<const XmlElement*> found;
    collect(match, found);
    return found;
  }
  std::vector<const XmlElement*> find_all(std::string_view element_name) const {
    return find_all([&](const XmlElement& e) { return e.name == element_name; });
  }

 private:
  void collect(const std::function<bool(const XmlElement&)>& match, std::vector<const XmlElement*>& found) const {
    if (match(*this)) found.push_back(this);
    for (const auto& child : children) child.collect(match, found);
  }
};

class XmlReader {
 public:
  explicit XmlReader(std::string_view document) : doc_(document) {}

  XmlElement read_document() {
    check_characters();
    if (doc_.substr(0, 5) == "<?xml") {
      const size_t end = doc_.find("?>");
      if (end == std::string_view::npos) fail("unterminated XML declaration");
      at_ = end + 2;
    }
    skip_misc();
    if (at_ >= doc_.size() || doc_[at_] != '<') fail("no root element");
    XmlElement root = read_element();
    skip_misc();
    if (at_ != doc_.size()) fail("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("not well-formed XML at byte " + std::to_string(at_) + ": " + what);
  }

  // XML 1.0 Char: tab, newline, carriage return and U+0020 up, as UTF-8.
  void check_characters() {
    for (size_t i = 0; i < doc_.size();) {
      const auto byte = [&](size_t k) { return i + k < doc_.size() ? static_cast<uint8_t>(doc_[i + k]) : uint8_t{0}; };
      const uint8_t lead = byte(0);
      size_t length = 0;
      if (lead < 0x80) {
        length = (lead >= 0x20 || lead == '\t' || lead == '\n' || lead == '\r') ? 1 : 0;
      } else if (lead >= 0xC2 && lead <= 0xDF) {
        length = 2;
      } else if (lead >= 0xE0 && lead <= 0xEF) {
        length = 3;
        if ((lead == 0xE0 && byte(1) < 0xA0) || (lead == 0xED && byte(1) > 0x9F)) length = 0;
        if (lead == 0xEF && byte(1) == 0xBF && (byte(2) == 0xBE || byte(2) == 0xBF)) length = 0;  // U+FFFE, U+FFFF
      } else if (lead >= 0xF0 && lead <= 0xF4) {
        length = 4;
        if ((lead == 0xF0 && byte(1) < 0x90) || (lead == 0xF4 && byte(1) > 0x8F)) length = 0;
      }
      for (size_t k = 1; k < length; ++k) {
        if ((byte(k) & 0xC0) != 0x80) length = 0;
      }
      if (length == 0) {
        at_ = i;
        fail("byte " + std::to_string(lead) + " is not an XML character in UTF-8");
      }
      i += length;
    }
  }

  void skip_space() {
    while (at_ < doc_.size() && (doc_[at_] == ' ' || doc_[at_] == '\t' || doc_[at_] == '\n' || doc_[at_] == '\r')) {
      ++at_;
    }
  }

  // Whitespace and comments between the declaration, the root and the end.
  void skip_misc() {
    for (;;) {
      skip_space();
      if (doc_.substr(at_, 4) != "<!--") return;
      const size_t end = doc_.find("-->", at_ + 4);
      if (end == std::string_view::npos) fail("unterminated comment");
      at_ = end + 3;
    }
  }

  static bool name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; }
  static bool name_char(char c) {
    return name_start(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
  }

  std::string read_name() {
    if (at_ >= doc_.size() || !name_start(doc_[at_])) fail("expected a name");
    const size_t start = at_;
    while (at_ < doc_.size() && name_char(doc_[at_])) ++at_;
    return std::string(doc_.substr(start, at_ - start));
  }

  void expect(char c) {
    if (at_ >= doc_.size() || doc_[at_] != c) fail(std::string("expected '") + c + "'");
    ++at_;
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // At '&': one entity or character reference, decoded onto `out`.
  void read_reference(std::string& out) {
    const size_t semicolon = doc_.find(';', at_);
    if (semicolon == std::string_view::npos || semicolon - at_ > 12) fail("'&' that starts no reference");
    const std::string_view name = doc_.substr(at_ + 1, semicolon - at_ - 1);
    if (name == "amp") out += '&';
    else if (name == "lt") out += '<';
    else if (name == "gt") out += '>';
    else if (name == "quot") out += '"';
    else if (name == "apos") out += '\'';
    else if (name.size() >= 2 && name[0] == '#') {
      const bool hex = name[1] == 'x';
      const std::string digits(name.substr(hex ? 2 : 1));
      const char* allowed = hex ? "0123456789abcdefABCDEF" : "0123456789";
      if (digits.empty() || digits.find_first_not_of(allowed) != std::string::npos) {
        fail("bad character reference &" + std::string(name) + ";");
      }
      const unsigned long code = std::stoul(digits, nullptr, hex ? 16 : 10);
      if (code == 0 || code > 0x10FFFF || (code < 0x20 && code != 9 && code != 10 && code != 13)) {
        fail("character reference to a non-character");
      }
      append_utf8(out, static_cast<uint32_t>(code));
    } else {
      fail("unknown entity &" + std::string(name) + ";");
    }
    at_ = semicolon + 1;
  }

  std::string read_attribute_value() {
    if (at_ >= doc_.size() || (doc_[at_] != '"' && doc_[at_] != '\'')) fail("attribute value without quotes");
    const char quote = doc_[at_++];
    std::string value;
    for (;;) {
      if (at_ >= doc_.size()) fail("unterminated attribute value");
      const char c = doc_[at_];
      if (c == quote) break;
      if (c == '<') fail("'<' in an attribute value");
      if (c == '&') {
        read_reference(value);
      } else {
        value += c;
        ++at_;
      }
    }
    ++at_;
    return value;
  }

  XmlElement read_element() {
    expect('<');
    XmlElement element;
    element.name = read_name();
    for (;;) {
      const size_t before_space = at_;
      skip_space();
      if (at_ >= doc_.size()) fail("unterminated start tag");
      if (doc_.substr(at_, 2) == "/>") {
        at_ += 2;
        return element;
      }
      if (doc_[at_] == '>') {
        ++at_;
        break;
      }
      if (at_ == before_space) fail("attributes must be separated by whitespace");
      std::string name = read_name();
      if (element.has(name)) fail("duplicate attribute " + name);
      skip_space();
      expect('=');
      skip_space();
      element.attributes.emplace_back(std::move(name), read_attribute_value());
    }
    for (;;) {
      if (at_ >= doc_.size()) fail("<" + element.name + "> is never closed");
      if (doc_.substr(at_, 2) == "</") {
        at_ += 2;
        if (read_name() != element.name) fail("end tag does not match <" + element.name + ">");
        skip_space();
        expect('>');
        return element;
      }
      if (doc_.substr(at_, 4) == "<!--") {
        skip_misc();
        continue;
      }
      if (doc_[at_] == '<') {
        element.children.push_back(read_element());
        continue;
      }
      if (doc_.substr(at_, 3) == "]]>") fail("']]>' in character data");
      if (doc_[at_] == '&') {
        read_reference(element.text);
      } else {
        element.text += doc_[at_++];
      }
    }
  }

  std::string_view doc_;
  size_t at_ = 0;
};

// The document's root element; throws std::runtime_error when it is not well-formed.
inline XmlElement parse_xml(std::string_view document) { return XmlReader(document).read_document(); }

}  // namespace loom::test_support
