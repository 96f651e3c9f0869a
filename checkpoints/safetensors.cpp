#include "checkpoints/safetensors.h"

#include <algorithm>
#include <array>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string_view>
#include <tuple>

#include "util/crc32c.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom::safetensors {
namespace {

using nlohmann::json;

constexpr size_t kLengthBytes = 8;  // the little-endian u64 before the header

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  size_t size;
};
constexpr std::array<DtypeEntry, 15> kDtypes = {{
    {Dtype::BOOL, "BOOL", 1},
    {Dtype::U8, "U8", 1},
    {Dtype::I8, "I8", 1},
    {Dtype::I16, "I16", 2},
    {Dtype::U16, "U16", 2},
    {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2},
    {Dtype::I32, "I32", 4},
    {Dtype::U32, "U32", 4},
    {Dtype::F32, "F32", 4},
    {Dtype::F64, "F64", 8},
    {Dtype::I64, "I64", 8},
    {Dtype::U64, "U64", 8},
    {Dtype::F8_E4M3, "F8_E4M3", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1},
}};

const DtypeEntry& dtype_entry(Dtype dtype) {
  for (const auto& entry : kDtypes)
    if (entry.dtype == dtype) return entry;
  throw BadInput("invalid safetensors dtype value " + std::to_string(static_cast<int>(dtype)));
}

// --- message helpers ---------------------------------------------------------
// Names and values come from untrusted files; cap what goes into a message.

std::string clip(std::string_view text, size_t max_chars = 120) {
  if (text.size() <= max_chars) return std::string(text);
  return std::string(text.substr(0, max_chars)) + "...";
}

std::string preview(const json& value) { return clip(value.dump(-1, ' ', false, json::error_handler_t::replace)); }

std::string tensor_context(const std::string& path, const std::string& name) {
  std::string context = path.empty() ? std::string() : path + ": ";
  return context + "tensor '" + clip(name) + "'";
}

[[noreturn]] void fail(const std::string& path, const std::string& message) {
  throw BadInput((path.empty() ? std::string() : path + ": ") + message);
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name, const std::string& message) {
  throw BadInput(tensor_context(path, name) + ": " + message);
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

std::string format_json_array(const json& array) {
  std::string text = "[";
  for (size_t i = 0; i < array.size(); ++i) text += (i ? ", " : "") + preview(array[i]);
  return clip(text) + "]";
}

std::string format_offsets(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// numel * dtype_size into *bytes; false when a dimension is negative or the
// product overflows.
bool byte_size(const std::vector<int64_t>& shape, Dtype dtype, uint64_t* bytes) {
  int64_t numel = 1;
  for (const int64_t dim : shape)
    if (dim < 0 || __builtin_mul_overflow(numel, dim, &numel)) return false;
  return !__builtin_mul_overflow(static_cast<uint64_t>(numel), dtype_size(dtype), bytes);
}

uint64_t load_le64(const std::byte* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | std::to_integer<uint64_t>(p[i]);
  return value;
}

// --- header parsing ----------------------------------------------------------

// A valid header nests at most three containers deep (header object -> entry
// object or __metadata__ -> shape/data_offsets array). Refusing deeper input
// early bounds the parser's memory on hostile headers like "[[[[...".
constexpr int kMaxContainerDepth = 2;  // depth of the innermost container start

// nlohmann::json keeps the last of duplicate keys silently; the format forbids
// them (two entries named alike would make one tensor vanish), so the parser
// callback tracks the keys of every open object and refuses a repeat.
json parse_header_json(std::string_view header, const std::string& path) {
  std::vector<std::set<std::string>> open_objects;
  std::string current_entry;
  auto on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth > kMaxContainerDepth) {
          fail(path, (current_entry.empty() ? std::string("header") : "entry '" + clip(current_entry) + "'") +
                         " nests JSON deeper than a safetensors header can");
        }
        if (event == json::parse_event_t::object_start) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (depth == 1) current_entry = key;
        if (!open_objects.back().insert(key).second) {
          if (depth == 1 && key == "__metadata__") fail(path, "header holds '__metadata__' twice");
          if (depth == 1) fail(path, "duplicate tensor name '" + clip(key) + "' in header");
          fail(path, "entry '" + clip(current_entry) + "' has duplicate key '" + clip(key) + "'");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(header.begin(), header.end(), on_event);
  } catch (const json::exception& e) {
    fail(path, "header is not valid JSON: " + std::string(e.what()));
  }
}

std::vector<int64_t> parse_shape(const json& shape_json, const std::string& path, const std::string& name) {
  if (!shape_json.is_array()) fail_tensor(path, name, "shape must be an array of integers, got " + preview(shape_json));
  std::vector<int64_t> shape;
  shape.reserve(shape_json.size());
  for (const auto& dim : shape_json) {
    if (!dim.is_number_integer())
      fail_tensor(path, name, "shape " + format_json_array(shape_json) + " holds a non-integer " + preview(dim));
    if (dim.is_number_unsigned()) {
      const auto value = dim.get<uint64_t>();
      if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_tensor(path, name,
                    "shape " + format_json_array(shape_json) + " has dimension " + std::to_string(value) +
                        ", more than int64 can hold");
      shape.push_back(static_cast<int64_t>(value));
    } else {
      const auto value = dim.get<int64_t>();
      if (value < 0)
        fail_tensor(path, name,
                    "shape " + format_json_array(shape_json) + " has a negative dimension " + std::to_string(value));
      shape.push_back(value);
    }
  }
  return shape;
}

TensorInfo parse_entry(const std::string& name, const json& entry, const std::string& path, uint64_t buffer_bytes) {
  if (!entry.is_object())
    fail_tensor(path, name, "entry must be an object with dtype, shape and data_offsets, got " + preview(entry));
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      fail_tensor(path, name, "unknown field '" + clip(key) + "' (expected only dtype, shape, data_offsets)");
  }
  for (const char* required : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(required)) fail_tensor(path, name, std::string("missing field '") + required + "'");

  TensorInfo info;
  info.name = name;
  const json& dtype_json = entry.at("dtype");
  if (!dtype_json.is_string()) fail_tensor(path, name, "dtype must be a string, got " + preview(dtype_json));
  info.dtype = parse_dtype(dtype_json.get<std::string>(), tensor_context(path, name));
  info.shape = parse_shape(entry.at("shape"), path, name);

  const json& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    fail_tensor(path, name,
                "data_offsets must be [begin, end] with two non-negative integers, got " + preview(offsets));
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  const std::string offsets_text = "data_offsets " + format_offsets(info.begin, info.end);
  if (info.begin > info.end) fail_tensor(path, name, offsets_text + " have begin after end");
  if (info.end > buffer_bytes)
    fail_tensor(path, name,
                offsets_text + " run past the end of the data buffer (" + std::to_string(buffer_bytes) + " bytes)");

  uint64_t needed = 0;
  const bool fits = byte_size(info.shape, info.dtype, &needed);
  const uint64_t held = info.end - info.begin;
  if (!fits || needed != held)
    fail_tensor(path, name,
                offsets_text + " hold " + std::to_string(held) + " bytes but shape " + format_shape(info.shape) +
                    " of " + dtype_name(info.dtype) + " needs " +
                    (fits ? std::to_string(needed) : std::string("more than 2^64")));
  return info;
}

void parse_metadata(const json& value, const std::string& path, std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) fail(path, "__metadata__ must be an object of strings, got " + preview(value));
  for (const auto& [key, entry] : value.items()) {
    if (!entry.is_string())
      fail(path, "__metadata__ value of '" + clip(key) + "' must be a string, got " + preview(entry));
    if (metadata) (*metadata)[key] = entry.get<std::string>();
  }
}

// Tensors sorted by offset must cover [0, buffer_bytes) exactly once: a hole
// would be bytes no reader accounts for, an overlap two tensors aliasing.
void check_tiling(const std::vector<TensorInfo>& sorted, uint64_t buffer_bytes, const std::string& path) {
  uint64_t expected_begin = 0;
  const TensorInfo* previous = nullptr;
  for (const auto& info : sorted) {
    const std::string offsets_text = "data_offsets " + format_offsets(info.begin, info.end);
    if (info.begin < expected_begin)
      fail_tensor(path, info.name,
                  offsets_text + " overlap tensor '" + clip(previous->name) + "' at " +
                      format_offsets(previous->begin, previous->end));
    if (info.begin > expected_begin)
      fail_tensor(path, info.name,
                  offsets_text + " leave a hole: bytes [" + std::to_string(expected_begin) + ", " +
                      std::to_string(info.begin) + ") of the data buffer belong to " +
                      (previous ? "no tensor (previous tensor '" + clip(previous->name) + "' ends at " +
                                      std::to_string(expected_begin) + ")"
                                : std::string("no tensor")));
    expected_begin = info.end;
    previous = &info;
  }
  if (expected_begin != buffer_bytes)
    fail(path, "tensors end at byte " + std::to_string(expected_begin) + " but the data buffer holds " +
                   std::to_string(buffer_bytes) + " bytes (trailing bytes belong to no tensor)");
}

// --- writing -----------------------------------------------------------------

struct PlannedFile {
  std::string header;  // JSON padded with spaces to a multiple of 8 bytes
  uint64_t data_bytes = 0;
};

// Checks that each tensor's bytes match its dtype and shape.
void check_sizes(const std::vector<TensorToWrite>& tensors, const std::string& path) {
  for (const auto& tensor : tensors) {
    uint64_t needed = 0;
    const bool fits = byte_size(tensor.shape, tensor.dtype, &needed);
    if (fits && needed == tensor.bytes.size()) continue;
    for (const int64_t dim : tensor.shape)
      if (dim < 0) fail_tensor(path, tensor.name, "shape " + format_shape(tensor.shape) + " has a negative dimension");
    fail_tensor(path, tensor.name,
                std::to_string(tensor.bytes.size()) + " bytes given but shape " + format_shape(tensor.shape) + " of " +
                    dtype_name(tensor.dtype) + " needs " + (fits ? std::to_string(needed) : "more than 2^64"));
  }
}

std::vector<TensorHeader> headers_of(const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorHeader> out;
  out.reserve(tensors.size());
  for (const auto& tensor : tensors) out.push_back({tensor.name, tensor.dtype, tensor.shape});
  return out;
}

PlannedFile plan_file(const std::vector<TensorHeader>& tensors, const std::map<std::string, std::string>& metadata,
                      const std::string& path) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  // __metadata__ first, as the reference writer does; omitted when empty,
  // which is also what the reference writer does for "no metadata".
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const auto& tensor : tensors) {
    if (tensor.name == "__metadata__") fail(path, "'__metadata__' is reserved and cannot name a tensor");
    if (!names.insert(tensor.name).second) fail_tensor(path, tensor.name, "written twice (duplicate name)");
    for (const int64_t dim : tensor.shape)
      if (dim < 0) fail_tensor(path, tensor.name, "shape " + format_shape(tensor.shape) + " has a negative dimension");
    uint64_t needed = 0;
    if (!byte_size(tensor.shape, tensor.dtype, &needed) || offset + needed < offset)
      fail_tensor(path, tensor.name, "shape " + format_shape(tensor.shape) + " needs more than 2^64 bytes");
    header[tensor.name] = {
        {"dtype", dtype_name(tensor.dtype)}, {"shape", tensor.shape}, {"data_offsets", {offset, offset + needed}}};
    offset += needed;
  }
  PlannedFile plan;
  try {
    plan.header = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    fail(path, "tensor names and metadata must be valid UTF-8: " + std::string(e.what()));
  }
  // Pad so the data buffer starts 8-byte aligned in the file (and in a
  // page-aligned mapping of it); readers treat trailing spaces as whitespace.
  plan.header.append((kLengthBytes - plan.header.size() % kLengthBytes) % kLengthBytes, ' ');
  plan.data_bytes = offset;
  return plan;
}

}  // namespace

// --- dtypes --------------------------------------------------------------------

std::string dtype_name(Dtype dtype) { return dtype_entry(dtype).name; }

size_t dtype_size(Dtype dtype) { return dtype_entry(dtype).size; }

Dtype parse_dtype(const std::string& name, const std::string& context) {
  for (const auto& entry : kDtypes)
    if (name == entry.name) return entry.dtype;
  std::string known;
  for (const auto& entry : kDtypes) known += (known.empty() ? "" : ", ") + std::string(entry.name);
  throw BadInput((context.empty() ? std::string() : context + ": ") + "unknown dtype '" + clip(name) +
                 "' (known: " + known + ")");
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (const int64_t dim : shape) n *= dim;  // validated not to overflow when parsed
  return n;
}

// --- reading -------------------------------------------------------------------

std::vector<TensorInfo> parse_header(std::span<const std::byte> file_bytes, const std::string& path,
                                     std::map<std::string, std::string>* metadata, uint64_t* data_start) {
  const uint64_t file_bytes_total = file_bytes.size();
  if (file_bytes_total < kLengthBytes)
    fail(path, "file holds " + std::to_string(file_bytes_total) +
                   " bytes, too short for the 8-byte header length of a safetensors file");
  const uint64_t header_bytes = load_le64(file_bytes.data());
  if (header_bytes == 0) fail(path, "header length is 0; a safetensors header holds at least '{}'");
  if (header_bytes > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(header_bytes) + " exceeds the limit of " +
                   std::to_string(kMaxHeaderBytes) + " bytes");
  if (header_bytes > file_bytes_total - kLengthBytes)
    fail(path, "header length " + std::to_string(header_bytes) + " runs past the end of the file (" +
                   std::to_string(file_bytes_total) + " bytes)");

  const std::string_view header(reinterpret_cast<const char*>(file_bytes.data() + kLengthBytes), header_bytes);
  if (header.front() != '{')
    fail(path, "header must start with '{', found byte " + std::to_string(static_cast<unsigned char>(header.front())));
  const json root = parse_header_json(header, path);
  if (!root.is_object()) fail(path, "header must be a JSON object, got " + std::string(root.type_name()));

  const uint64_t buffer_bytes = file_bytes_total - kLengthBytes - header_bytes;
  std::vector<TensorInfo> tensors;
  tensors.reserve(root.size());
  if (metadata) metadata->clear();
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      parse_metadata(entry, path, metadata);
    } else {
      tensors.push_back(parse_entry(name, entry, path, buffer_bytes));
    }
  }
  // Zero-byte tensors share their offset with the next one; ordering by end
  // and name too keeps the order deterministic and the tiling check simple.
  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  check_tiling(tensors, buffer_bytes, path);
  if (data_start) *data_start = kLengthBytes + header_bytes;
  return tensors;
}

struct File::Mapping {
  MappedFile file;
};

File::File(File&&) noexcept = default;
File& File::operator=(File&&) noexcept = default;
File::~File() = default;

File File::open(const std::string& path) {
  File file;
  file.path_ = path;
  file.mapping_ = std::make_unique<Mapping>(Mapping{MappedFile::open(path)});
  const std::span<const std::byte> bytes = file.mapping_->file.bytes();
  uint64_t data_start = 0;
  file.tensors_ = parse_header(bytes, path, &file.metadata_, &data_start);
  file.data_ = bytes.data() + data_start;
  file.data_offset_ = data_start;
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_.emplace(file.tensors_[i].name, i);
  return file;
}

bool File::contains(const std::string& name) const { return index_.count(name) != 0; }

TensorView File::tensor(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end())
    fail_tensor(path_, name, "not found (the file holds " + std::to_string(tensors_.size()) + " tensors)");
  const TensorInfo& info = tensors_[it->second];
  return TensorView{&info, std::span(data_ + info.begin, info.end - info.begin)};
}

// --- writing -------------------------------------------------------------------

struct StreamWriter::Impl {
  AtomicFile file;
};

StreamWriter::StreamWriter(const std::string& path, const std::vector<TensorHeader>& tensors,
                           const std::map<std::string, std::string>& metadata) {
  // Validate everything before creating the temporary file.
  const PlannedFile plan = plan_file(tensors, metadata, path);
  impl_ = std::make_unique<Impl>(Impl{AtomicFile(path)});
  std::array<std::byte, kLengthBytes> length{};
  for (size_t i = 0; i < kLengthBytes; ++i)
    length[i] = static_cast<std::byte>((uint64_t{plan.header.size()} >> (8 * i)) & 0xFF);
  impl_->file.write(length);
  crc_ = loom::crc32c(length);
  const auto header = std::as_bytes(std::span(plan.header.data(), plan.header.size()));
  impl_->file.write(header);
  crc_ = loom::crc32c(header, crc_);
  remaining_ = plan.data_bytes;
}

StreamWriter::StreamWriter(StreamWriter&&) noexcept = default;
StreamWriter::~StreamWriter() = default;

void StreamWriter::append(std::span<const std::byte> bytes) {
  if (bytes.size() > remaining_) {
    throw std::logic_error(impl_->file.path() + ": " + std::to_string(bytes.size()) + " bytes appended but only " +
                           std::to_string(remaining_) + " remain of the tensors in the header");
  }
  impl_->file.write(bytes);
  crc_ = loom::crc32c(bytes, crc_);
  remaining_ -= bytes.size();
}

void StreamWriter::commit() {
  if (remaining_ != 0) {
    throw std::logic_error(impl_->file.path() + ": committed with " + std::to_string(remaining_) +
                           " bytes of tensor data missing");
  }
  impl_->file.commit();
}

uint64_t StreamWriter::file_bytes() const { return impl_->file.bytes_written(); }

uint32_t write_file(const std::string& path, const std::vector<TensorToWrite>& tensors,
                    const std::map<std::string, std::string>& metadata) {
  check_sizes(tensors, path);
  StreamWriter writer(path, headers_of(tensors), metadata);
  // Tensors go straight from their buffers to the file: a multi-GB shard is
  // never assembled in memory.
  for (const auto& tensor : tensors) writer.append(tensor.bytes);
  writer.commit();
  return writer.crc32c();
}

uint64_t file_size_for(const std::vector<TensorHeader>& tensors, const std::map<std::string, std::string>& metadata) {
  const PlannedFile plan = plan_file(tensors, metadata, "");
  return kLengthBytes + plan.header.size() + plan.data_bytes;
}

uint64_t file_size_for(const std::vector<TensorToWrite>& tensors, const std::map<std::string, std::string>& metadata) {
  check_sizes(tensors, "");
  return file_size_for(headers_of(tensors), metadata);
}

}  // namespace loom::safetensors
