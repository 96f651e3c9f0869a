#include "data/text_unicode.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <stdexcept>

#include "util/error.h"

namespace loom::tokenization {
namespace {

// --- byte-level table ----------------------------------------------------------------

struct ByteTable {
  std::array<std::string, 256> byte_to_utf8;
  std::array<int16_t, 324> code_point_to_byte;  // 256 + 68 code points in use
};


const ByteTable& byte_table() {
  static const ByteTable table = [] {
    ByteTable t;
    t.code_point_to_byte.fill(-1);
    uint32_t next_extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : next_extra++;
      append_utf8(cp, t.byte_to_utf8[b]);
      t.code_point_to_byte[cp] = static_cast<int16_t>(b);
    }
    return t;
  }();
  return table;
}

// Scans the UTF-8 sequence at text[i] (Unicode Table 3-7). Returns how many
// bytes of it are well formed so far (at least 1); `complete` says whether
// they form a whole character. An incomplete prefix is the "maximal
// ill-formed part" that gets one U+FFFD in lossy decoding.
size_t utf8_scan(std::string_view text, size_t i, bool& complete) {
  const auto lead = static_cast<uint8_t>(text[i]);
  complete = lead < 0x80;
  if (complete) return 1;
  size_t len = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    len = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    len = 3;
    lo = lead == 0xE0 ? 0xA0 : 0x80;
    hi = lead == 0xED ? 0x9F : 0xBF;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    len = 4;
    lo = lead == 0xF0 ? 0x90 : 0x80;
    hi = lead == 0xF4 ? 0x8F : 0xBF;
  } else {
    return 1;
  }
  size_t k = 1;
  for (; k < len && i + k < text.size(); ++k) {
    const auto b = static_cast<uint8_t>(text[i + k]);
    if (k == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) break;
  }
  complete = k == len;
  return k;
}

// Length of the well-formed character at text[i], or 0.
size_t utf8_sequence_length(std::string_view text, size_t i) {
  bool complete;
  const size_t len = utf8_scan(text, i, complete);
  return complete ? len : 0;
}



// Note [onig vs PCRE2]: Oniguruma's \s is exactly the White_Space property;
// PCRE2's (with UCP) also matches U+180E. Rewriting \s and \S to the property
// makes them agree; both forms are valid inside and outside a class.
std::string onig_to_pcre2(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    const char next = pattern[i + 1];
    if (next == 's') {
      out += "\\p{White_Space}";
    } else if (next == 'S') {
      out += "\\P{White_Space}";
    } else if (next == 'Q') {  // \Q...\E quotes literally: copy it as it is
      const size_t end = pattern.find("\\E", i + 2);
      const size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
      out.append(pattern.substr(i, stop - i));
      i = stop - 1;
      continue;
    } else {
      out += '\\';
      out += next;
    }
    ++i;
  }
  return out;
}

}  // namespace

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}


// Decodes the well-formed character at text[i]; sets `len`.
uint32_t decode_utf8(std::string_view text, size_t i, size_t& len) {
  len = utf8_sequence_length(text, i);
  const auto byte = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(text[i + k])); };
  switch (len) {
    case 1: return byte(0);
    case 2: return ((byte(0) & 0x1F) << 6) | (byte(1) & 0x3F);
    case 3: return ((byte(0) & 0x0F) << 12) | ((byte(1) & 0x3F) << 6) | (byte(2) & 0x3F);
    case 4:
      return ((byte(0) & 0x07) << 18) | ((byte(1) & 0x3F) << 12) | ((byte(2) & 0x3F) << 6) | (byte(3) & 0x3F);
    default: len = 1; return 0xFFFD;
  }
}

// Rust's char::is_whitespace (the Unicode White_Space property), which
// `tokenizers` uses for lstrip/rstrip of added tokens.
bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// --- byte-level, UTF-8 ------------------------------------------------------------------

const std::string& byte_to_unicode(uint8_t b) { return byte_table().byte_to_utf8[b]; }

int unicode_char_to_byte(uint32_t code_point) {
  const auto& t = byte_table().code_point_to_byte;
  return code_point < t.size() ? t[code_point] : -1;
}

bool unicode_to_bytes(std::string_view token, std::string& out) {
  out.clear();
  for (size_t i = 0; i < token.size();) {
    size_t len;
    if (utf8_sequence_length(token, i) == 0) return false;
    const int b = unicode_char_to_byte(decode_utf8(token, i, len));
    if (b < 0) return false;
    out += static_cast<char>(b);
    i += len;
  }
  return true;
}

size_t find_invalid_utf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    if (static_cast<uint8_t>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = utf8_sequence_length(text, i);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string utf8_lossy(std::string_view bytes) {
  if (find_invalid_utf8(bytes) == std::string_view::npos) return std::string(bytes);
  std::string out;
  out.reserve(bytes.size() + 16);
  for (size_t i = 0; i < bytes.size();) {
    bool complete;
    const size_t len = utf8_scan(bytes, i, complete);
    if (complete) {
      out.append(bytes.substr(i, len));
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
    }
    i += len;
  }
  return out;
}

// --- PCRE2 ----------------------------------------------------------------------------

void Pcre2CodeDeleter::operator()(pcre2_code_8* code) const { pcre2_code_free_8(code); }
void Pcre2MatchDataDeleter::operator()(pcre2_match_data_8* data) const { pcre2_match_data_free_8(data); }

MatchData::MatchData() : data_(pcre2_match_data_create_8(1, nullptr)) {
  if (!data_) throw std::bad_alloc();
}

Regex Regex::compile(std::string_view pattern, bool literal, const std::string& context) {
  const std::string translated = literal ? std::string(pattern) : onig_to_pcre2(pattern);
  const uint32_t options = literal ? (PCRE2_UTF | PCRE2_LITERAL) : (PCRE2_UTF | PCRE2_UCP);
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code_8* code = pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(translated.data()), translated.size(),
                                       options, &error, &error_offset, nullptr);
  if (code == nullptr) {
    std::array<PCRE2_UCHAR8, 256> message{};
    pcre2_get_error_message_8(error, message.data(), message.size());
    throw BadInput(context + ": invalid regex '" + std::string(pattern) + "': " +
                   reinterpret_cast<const char*>(message.data()) + " at offset " + std::to_string(error_offset));
  }
  // JIT makes matching several times faster; when it is unavailable the
  // interpreter gives the same results.
  pcre2_jit_compile_8(code, PCRE2_JIT_COMPLETE);
  Regex regex;
  regex.code_ = std::shared_ptr<pcre2_code_8>(code, Pcre2CodeDeleter());
  return regex;
}

bool Regex::find(std::string_view subject, size_t start, MatchData& match, size_t& begin, size_t& end) const {
  static const char kEmpty[] = "";
  const char* data = subject.empty() ? kEmpty : subject.data();
  // NO_UTF_CHECK: otherwise PCRE2 re-validates the whole subject on every
  // call, which is quadratic over a long piece. Callers validate once.
  const int rc = pcre2_match_8(code_.get(), reinterpret_cast<PCRE2_SPTR8>(data), subject.size(), start,
                               PCRE2_NO_UTF_CHECK, match.get(), nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    std::array<PCRE2_UCHAR8, 256> message{};
    pcre2_get_error_message_8(rc, message.data(), message.size());
    throw std::runtime_error(std::string("regex match failed: ") + reinterpret_cast<const char*>(message.data()));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(match.get());
  begin = ovector[0];
  end = std::max(ovector[0], ovector[1]);
  return true;
}

void find_matches(const Regex& regex, std::string_view subject, MatchData& match, std::vector<SplitSpan>& out) {
  out.clear();
  if (subject.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  size_t prev = 0;
  size_t search_from = 0;
  size_t last_match_end = std::string_view::npos;
  size_t begin, end;
  while (search_from <= subject.size() && regex.find(subject, search_from, match, begin, end)) {
    // Oniguruma's FindMatches: an empty match where the previous one ended
    // is not reported; the search moves on by one character instead.
    if (begin == end && end == last_match_end) {
      size_t step = 1;
      if (search_from < subject.size()) {
        decode_utf8(subject, search_from, step);
      }
      search_from += step;
      continue;
    }
    search_from = end;
    last_match_end = end;
    if (prev != begin) out.push_back({prev, begin, false});
    out.push_back({begin, end, true});
    prev = end;
  }
  if (prev != subject.size()) out.push_back({prev, subject.size(), false});
}

}  // namespace loom::tokenization
