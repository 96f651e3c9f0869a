// safetensors reader and writer: round trips, the exact on-disk layout, and
// refusal of every kind of malformed file with a message naming file and tensor.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoints/safetensors.h"
#include "tests/unit/source_dir.h"
#include "util/error.h"
#include "util/file_io.h"

namespace loom::safetensors {
namespace {

namespace fs = std::filesystem;

template <typename T>
std::span<const std::byte> bytes_of(const std::vector<T>& values) {
  return std::as_bytes(std::span(values));
}

std::string le64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return bytes;
}

// A file image from a hand-written header and `data_bytes` bytes of data.
std::string raw_file(std::string_view header, size_t data_bytes) {
  return le64(header.size()) + std::string(header) + std::string(data_bytes, '\x5a');
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("loom-test-safetensors-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string file(const std::string& name) const { return (dir_ / name).string(); }

  std::string write_raw(const std::string& name, std::string_view content) const {
    const std::string path = file(name);
    std::ofstream(path, std::ios::binary).write(content.data(), static_cast<std::streamsize>(content.size()));
    return path;
  }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  // Opening `content` must throw BadInput whose message starts with the path
  // and contains every fragment (tensor names, offending values).
  void expect_refused(std::string_view content, std::initializer_list<std::string> fragments) const {
    const std::string path = write_raw("bad.safetensors", content);
    try {
      File::open(path);
      ADD_FAILURE() << "file was accepted; expected BadInput containing " << *fragments.begin();
    } catch (const BadInput& e) {
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(path + ": ", 0), 0u) << "message does not start with the path: " << message;
      for (const auto& fragment : fragments)
        EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' missing in: " << message;
    }
  }

  fs::path dir_;
};

std::string bytes_text(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// --- round trips ---------------------------------------------------------------

TEST_F(Safetensors, RoundTripsF32Bf16F16AndI64Tensors) {
  const std::vector<float> f32 = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f, -7.0f};
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x3F00};
  const std::vector<uint16_t> f16 = {0x3C00, 0xB800};
  const std::vector<int64_t> i64 = {1, -2, int64_t{1} << 40, INT64_MIN};
  write_file(file("m.safetensors"), {{"model.f32", Dtype::F32, {2, 3}, bytes_of(f32)},
                                     {"model.bf16", Dtype::BF16, {3}, bytes_of(bf16)},
                                     {"model.f16", Dtype::F16, {1, 2}, bytes_of(f16)},
                                     {"model.i64", Dtype::I64, {2, 2}, bytes_of(i64)}});
  const File f = File::open(file("m.safetensors"));
  ASSERT_EQ(f.tensors().size(), 4u);
  const TensorView v32 = f.tensor("model.f32");
  EXPECT_EQ(v32.info->dtype, Dtype::F32);
  EXPECT_EQ(v32.info->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(v32.info->numel(), 6);
  EXPECT_EQ(bytes_text(v32.bytes), bytes_text(bytes_of(f32)));
  EXPECT_EQ(bytes_text(f.tensor("model.bf16").bytes), bytes_text(bytes_of(bf16)));
  EXPECT_EQ(f.tensor("model.bf16").info->dtype, Dtype::BF16);
  EXPECT_EQ(bytes_text(f.tensor("model.f16").bytes), bytes_text(bytes_of(f16)));
  EXPECT_EQ(f.tensor("model.f16").info->shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(bytes_text(f.tensor("model.i64").bytes), bytes_text(bytes_of(i64)));
  EXPECT_EQ(f.tensor("model.i64").info->dtype, Dtype::I64);
}

TEST_F(Safetensors, TensorsAreListedInFileOrderWhichIsTheWriteOrder) {
  const std::vector<float> one = {1.0f};
  write_file(file("m.safetensors"), {{"z", Dtype::F32, {1}, bytes_of(one)},
                                     {"a", Dtype::F32, {1}, bytes_of(one)},
                                     {"m", Dtype::F32, {1}, bytes_of(one)}});
  const File f = File::open(file("m.safetensors"));
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "z");
  EXPECT_EQ(f.tensors()[1].name, "a");
  EXPECT_EQ(f.tensors()[2].name, "m");
  EXPECT_EQ(f.tensors()[2].begin, 8u);
}

TEST_F(Safetensors, RoundTripsEmptyTensorWithAZeroDimension) {
  const std::vector<float> before = {1.0f, 2.0f};
  const std::vector<float> none;
  write_file(file("m.safetensors"), {{"before", Dtype::F32, {2}, bytes_of(before)},
                                     {"empty", Dtype::F32, {0, 4}, bytes_of(none)},
                                     {"after", Dtype::F32, {2}, bytes_of(before)}});
  const File f = File::open(file("m.safetensors"));
  const TensorView empty = f.tensor("empty");
  EXPECT_EQ(empty.info->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_EQ(empty.info->numel(), 0);
  EXPECT_TRUE(empty.bytes.empty());
  EXPECT_EQ(bytes_text(f.tensor("after").bytes), bytes_text(bytes_of(before)));
}

TEST_F(Safetensors, RoundTripsScalarWithEmptyShape) {
  const std::vector<double> scalar = {7.25};
  write_file(file("m.safetensors"), {{"step", Dtype::F64, {}, bytes_of(scalar)}});
  const File f = File::open(file("m.safetensors"));
  const TensorView view = f.tensor("step");
  EXPECT_TRUE(view.info->shape.empty());
  EXPECT_EQ(view.info->numel(), 1);
  EXPECT_EQ(bytes_text(view.bytes), bytes_text(bytes_of(scalar)));
}

TEST_F(Safetensors, RoundTripsFileWithoutTensors) {
  write_file(file("m.safetensors"), {});
  const File f = File::open(file("m.safetensors"));
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.metadata().at("format"), "pt");
}

TEST_F(Safetensors, MovedFileKeepsItsViewsValid) {
  const std::vector<int32_t> values = {4, 5, 6};
  write_file(file("m.safetensors"), {{"x", Dtype::I32, {3}, bytes_of(values)}});
  File original = File::open(file("m.safetensors"));
  const TensorView view = original.tensor("x");
  const File moved = std::move(original);
  EXPECT_EQ(view.info, moved.tensor("x").info);
  EXPECT_EQ(bytes_text(view.bytes), bytes_text(bytes_of(values)));
}

TEST_F(Safetensors, HeaderIsPaddedWithSpacesToAMultipleOf8) {
  const std::vector<uint8_t> byte = {1};
  for (size_t name_length = 1; name_length <= 16; ++name_length) {
    const std::string path = file("pad" + std::to_string(name_length));
    write_file(path, {{std::string(name_length, 'w'), Dtype::U8, {1}, bytes_of(byte)}});
    const std::string content = read_file(path);
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | static_cast<unsigned char>(content[i]);
    EXPECT_EQ((8 + header_length) % 8, 0u) << "name length " << name_length;
    EXPECT_EQ(content.size(), 8 + header_length + 1);
    const std::string header = content.substr(8, header_length);
    EXPECT_EQ(header.front(), '{');
    const size_t last_brace = header.rfind('}');
    EXPECT_LT(header.size() - last_brace - 1, 8u);
    EXPECT_EQ(header.find_first_not_of(' ', last_brace + 1), std::string::npos) << "padding is not spaces";
  }
}

TEST_F(Safetensors, WritesHeaderInTheReferenceLayoutWithMetadataFirst) {
  const std::vector<float> two = {1.0f, 2.0f};
  write_file(file("m.safetensors"), {{"b", Dtype::F32, {2}, bytes_of(two)}});
  const std::string header = read_file(file("m.safetensors")).substr(8);
  EXPECT_EQ(header.rfind(R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 0),
            0u)
      << header;
}

TEST_F(Safetensors, KeepsMetadata) {
  const std::vector<float> one = {1.0f};
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"step", "1200"}, {"note", "ünïcode"}};
  write_file(file("m.safetensors"), {{"x", Dtype::F32, {1}, bytes_of(one)}}, metadata);
  EXPECT_EQ(File::open(file("m.safetensors")).metadata(), metadata);
}

TEST_F(Safetensors, EmptyMetadataOmitsTheMetadataEntry) {
  write_file(file("m.safetensors"), {}, {});
  EXPECT_EQ(read_file(file("m.safetensors")).substr(8), "{}      ");
  EXPECT_TRUE(File::open(file("m.safetensors")).metadata().empty());
}

TEST_F(Safetensors, FileSizeForMatchesTheWrittenFile) {
  const std::vector<uint16_t> values(1000, 0x3F80);
  const std::vector<TensorToWrite> tensors = {
      {"model.layers.0.mlp.up_proj.weight", Dtype::BF16, {10, 100}, bytes_of(values)},
      {"s", Dtype::BF16, {1}, std::span(bytes_of(values)).first(2)}};
  write_file(file("m.safetensors"), tensors);
  EXPECT_EQ(file_size_for(tensors), fs::file_size(file("m.safetensors")));
}

TEST_F(Safetensors, WriteIsAtomicAndLeavesNoTemporary) {
  const std::vector<float> old_values = {1.0f}, new_values = {2.0f, 3.0f};
  write_file(file("m.safetensors"), {{"x", Dtype::F32, {1}, bytes_of(old_values)}});
  write_file(file("m.safetensors"), {{"x", Dtype::F32, {2}, bytes_of(new_values)}});
  EXPECT_EQ(entries(), std::vector<std::string>{"m.safetensors"});
  EXPECT_EQ(File::open(file("m.safetensors")).tensor("x").info->numel(), 2);
}

TEST_F(Safetensors, RefusedWriteKeepsThePreviousFileAndLeavesNoTemporary) {
  const std::vector<float> values = {1.0f, 2.0f};
  write_file(file("m.safetensors"), {{"x", Dtype::F32, {2}, bytes_of(values)}});
  const std::string before = read_file(file("m.safetensors"));
  EXPECT_THROW(write_file(file("m.safetensors"), {{"x", Dtype::F32, {3}, bytes_of(values)}}), BadInput);
  EXPECT_EQ(read_file(file("m.safetensors")), before);
  EXPECT_EQ(entries(), std::vector<std::string>{"m.safetensors"});
}

TEST_F(Safetensors, WriterRefusesDuplicateNames) {
  const std::vector<float> one = {1.0f};
  try {
    write_file(file("d.safetensors"), {{"w", Dtype::F32, {1}, bytes_of(one)}, {"w", Dtype::F32, {1}, bytes_of(one)}});
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("d.safetensors: tensor 'w'"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(entries().empty());
}

TEST_F(Safetensors, WriterRefusesByteSizeMismatchNamingTensorShapeAndSizes) {
  const std::vector<float> three = {1.0f, 2.0f, 3.0f};
  try {
    write_file(file("s.safetensors"), {{"w", Dtype::F32, {2, 2}, bytes_of(three)}});
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find("s.safetensors: tensor 'w': 12 bytes given but shape [2, 2] of F32 needs 16"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(file_size_for({{"w", Dtype::F32, {4}, bytes_of(three)}}), BadInput);
}

TEST_F(Safetensors, WriterRefusesReservedNameNegativeShapeAndInvalidUtf8) {
  const std::vector<float> one = {1.0f};
  EXPECT_THROW(write_file(file("a"), {{"__metadata__", Dtype::F32, {1}, bytes_of(one)}}), BadInput);
  EXPECT_THROW(write_file(file("b"), {{"w", Dtype::F32, {-1}, bytes_of(one)}}), BadInput);
  EXPECT_THROW(write_file(file("c"), {{"w\xff", Dtype::F32, {1}, bytes_of(one)}}), BadInput);
  EXPECT_TRUE(entries().empty());
}

TEST_F(Safetensors, ReadsAFileWrittenByThePythonPackage) {
  const File f =
      File::open(loom_source_dir() + "/tests/interop/safetensors_fixtures/python_written.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.tensors().size(), 7u);
  const std::vector<float> f32 = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f};
  EXPECT_EQ(bytes_text(f.tensor("weight.f32").bytes), bytes_text(bytes_of(f32)));
  EXPECT_EQ(f.tensor("weight.f32").info->shape, (std::vector<int64_t>{2, 3}));
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x3F00, 0x4040};
  EXPECT_EQ(bytes_text(f.tensor("weight.bf16").bytes), bytes_text(bytes_of(bf16)));
  const std::vector<uint16_t> f16 = {0x3C00, 0xB800};
  EXPECT_EQ(bytes_text(f.tensor("weight.f16").bytes), bytes_text(bytes_of(f16)));
  const std::vector<int64_t> i64 = {1, -2, int64_t{1} << 40};
  EXPECT_EQ(bytes_text(f.tensor("ids.i64").bytes), bytes_text(bytes_of(i64)));
  EXPECT_EQ(bytes_text(f.tensor("mask.bool").bytes), std::string("\x01\x00\x01", 3));
  EXPECT_EQ(f.tensor("mask.bool").info->dtype, Dtype::BOOL);
  EXPECT_EQ(f.tensor("empty").info->shape, (std::vector<int64_t>{0, 4}));
  const std::vector<float> scalar = {7.25f};
  EXPECT_EQ(bytes_text(f.tensor("scalar").bytes), bytes_text(bytes_of(scalar)));
  EXPECT_TRUE(f.tensor("scalar").info->shape.empty());
}

TEST(SafetensorsDtype, NamesAndSizesMatchTheFormat) {
  const std::vector<std::tuple<Dtype, std::string, size_t>> expected = {
      {Dtype::BOOL, "BOOL", 1}, {Dtype::U8, "U8", 1},           {Dtype::I8, "I8", 1},          {Dtype::I16, "I16", 2},
      {Dtype::U16, "U16", 2},   {Dtype::F16, "F16", 2},         {Dtype::BF16, "BF16", 2},      {Dtype::I32, "I32", 4},
      {Dtype::U32, "U32", 4},   {Dtype::F32, "F32", 4},         {Dtype::F64, "F64", 8},        {Dtype::I64, "I64", 8},
      {Dtype::U64, "U64", 8},   {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::F8_E5M2, "F8_E5M2", 1}};
  for (const auto& [dtype, name, size] : expected) {
    EXPECT_EQ(dtype_name(dtype), name);
    EXPECT_EQ(dtype_size(dtype), size) << name;
    EXPECT_EQ(parse_dtype(name, "ctx"), dtype);
  }
  EXPECT_THROW(parse_dtype("f32", "ctx"), BadInput);  // names are case-sensitive
}

// --- malformed files ---------------------------------------------------------------
// A valid two-tensor header to vary: 'a' is 2 floats at [0, 8), 'b' one I64 at [8, 16).
std::string entry(std::string_view name, std::string_view dtype, std::string_view shape, std::string_view offsets) {
  return "\"" + std::string(name) + "\":{\"dtype\":\"" + std::string(dtype) + "\",\"shape\":" + std::string(shape) +
         ",\"data_offsets\":" + std::string(offsets) + "}";
}

TEST_F(Safetensors, HandWrittenMinimalFileIsAccepted) {
  const std::string header = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "I64", "[1]", "[8,16]") + "}";
  EXPECT_EQ(File::open(write_raw("ok", raw_file(header, 16))).tensors().size(), 2u);
  // Trailing whitespace is padding; anything else after the object is not.
  EXPECT_NO_THROW(File::open(write_raw("ok2", raw_file(header + "   \n", 16))));
  expect_refused(raw_file(header + " x", 16), {"not valid JSON"});
}

TEST_F(Safetensors, RefusesTruncatedFileAtAnyPoint) {
  const std::vector<float> values = {1, 2, 3, 4};
  write_file(file("whole"), {{"w", Dtype::F32, {4}, bytes_of(values)}});
  const std::string whole = read_file(file("whole"));
  const size_t data_start = whole.size() - 16;
  for (size_t cut : {size_t{0}, size_t{3}, size_t{7}})  // inside the length
    expect_refused(whole.substr(0, cut), {"too short"});
  for (size_t cut : {size_t{8}, size_t{9}, data_start / 2, data_start - 1})  // inside the header
    expect_refused(whole.substr(0, cut), {"runs past the end of the file"});
  for (size_t cut : {data_start, data_start + 1, whole.size() - 1})  // inside the data
    expect_refused(whole.substr(0, cut), {"tensor 'w'", "run past the end of the data buffer"});
}

TEST_F(Safetensors, RefusesHeaderLengthPastEndOfFile) {
  expect_refused(le64(1000) + "{}", {"header length 1000 runs past the end of the file (10 bytes)"});
}

TEST_F(Safetensors, RefusesHeaderLengthZero) { expect_refused(le64(0) + "{}", {"header length is 0"}); }

TEST_F(Safetensors, RefusesHeaderLengthOverTheLimit) {
  expect_refused(le64(100'000'001) + "{}", {"header length 100000001 exceeds the limit of 100000000"});
  expect_refused(le64(~uint64_t{0}) + "{}", {"exceeds the limit"});
}

TEST_F(Safetensors, RefusesInvalidJson) {
  expect_refused(raw_file("{\"a\": ", 0), {"not valid JSON"});
  expect_refused(raw_file("{\"a\":{}}}", 0), {"not valid JSON"});
  expect_refused(raw_file("{\"\xff\":{}}", 0), {"not valid JSON"});  // not UTF-8
}

TEST_F(Safetensors, RefusesHeaderThatIsNotAnObject) {
  expect_refused(raw_file("[1, 2]", 0), {"must start with '{'"});
  expect_refused(raw_file("  {}", 0), {"must start with '{'"});
  expect_refused(raw_file("{\"a\": 5}", 0), {"tensor 'a'", "entry must be an object", "5"});
}

TEST_F(Safetensors, RefusesUnknownDtype) {
  expect_refused(raw_file("{" + entry("model.norm.weight", "F12", "[2]", "[0,8]") + "}", 8),
                 {"tensor 'model.norm.weight'", "unknown dtype 'F12'"});
  expect_refused(raw_file(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
                 {"tensor 'a'", "dtype must be a string"});
}

TEST_F(Safetensors, RefusesNegativeOrNonIntegerShape) {
  expect_refused(raw_file("{" + entry("a", "F32", "[2,-3]", "[0,8]") + "}", 8),
                 {"tensor 'a'", "shape [2, -3] has a negative dimension -3"});
  expect_refused(raw_file("{" + entry("a", "F32", "[1.5]", "[0,8]") + "}", 8), {"tensor 'a'", "non-integer 1.5"});
  expect_refused(raw_file("{" + entry("a", "F32", "\"2\"", "[0,8]") + "}", 8),
                 {"tensor 'a'", "shape must be an array"});
  expect_refused(raw_file("{" + entry("a", "F32", "[9223372036854775808]", "[0,8]") + "}", 8),
                 {"tensor 'a'", "more than int64 can hold"});
}

TEST_F(Safetensors, RefusesShapeWhoseByteSizeOverflows) {
  expect_refused(raw_file("{" + entry("a", "F32", "[4294967296,4294967296]", "[0,8]") + "}", 8),
                 {"tensor 'a'", "needs more than 2^64"});
  expect_refused(raw_file("{" + entry("a", "F64", "[4611686018427387904]", "[0,8]") + "}", 8),
                 {"tensor 'a'", "needs more than 2^64"});
}

TEST_F(Safetensors, RefusesShapeBytesMismatchWithAFullMessage) {
  const std::string path =
      write_raw("model.safetensors", raw_file("{" + entry("model.norm.weight", "F32", "[64]", "[0,100]") + "}", 100));
  try {
    File::open(path);
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_EQ(
        std::string(e.what()),
        path + ": tensor 'model.norm.weight': data_offsets [0, 100] hold 100 bytes but shape [64] of F32 needs 256");
  }
}

TEST_F(Safetensors, RefusesOverlappingOffsets) {
  const std::string header = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[4,12]") + "}";
  expect_refused(raw_file(header, 12), {"tensor 'b'", "data_offsets [4, 12] overlap tensor 'a' at [0, 8]"});
  const std::string same = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[0,8]") + "}";
  expect_refused(raw_file(same, 8), {"tensor 'b'", "overlap tensor 'a'"});
}

TEST_F(Safetensors, RefusesOffsetsWithAHole) {
  const std::string header = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[12,20]") + "}";
  expect_refused(raw_file(header, 20), {"tensor 'b'", "leave a hole: bytes [8, 12)"});
  expect_refused(raw_file("{" + entry("a", "F32", "[2]", "[4,12]") + "}", 12), {"tensor 'a'", "bytes [0, 4)"});
  expect_refused(raw_file("{" + entry("a", "F32", "[2]", "[0,8]") + "}", 9),
                 {"tensors end at byte 8 but the data buffer holds 9 bytes"});
}

TEST_F(Safetensors, RefusesOffsetsOutOfRange) {
  const std::string header = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[4]", "[8,24]") + "}";
  expect_refused(raw_file(header, 16),
                 {"tensor 'b'", "data_offsets [8, 24] run past the end of the data buffer (16 bytes)"});
  expect_refused(raw_file("{" + entry("a", "F32", "[2]", "[18446744073709551608,18446744073709551615]") + "}", 8),
                 {"tensor 'a'", "run past the end"});
}

TEST_F(Safetensors, RefusesBeginAfterEnd) {
  expect_refused(raw_file("{" + entry("a", "F32", "[2]", "[8,0]") + "}", 8),
                 {"tensor 'a'", "data_offsets [8, 0] have begin after end"});
}

TEST_F(Safetensors, RefusesDataOffsetsOfWrongArityOrType) {
  for (const char* offsets : {"[0]", "[0,8,16]", "[]", "8", "[-1,7]", "[0,8.0]", "[\"0\",\"8\"]", "null"})
    expect_refused(raw_file("{" + entry("a", "F32", "[2]", offsets) + "}", 8),
                   {"tensor 'a'", "data_offsets must be [begin, end] with two non-negative integers"});
}

TEST_F(Safetensors, RefusesDuplicateTensorName) {
  const std::string header = "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("a", "F32", "[2]", "[8,16]") + "}";
  expect_refused(raw_file(header, 16), {"duplicate tensor name 'a'"});
}

TEST_F(Safetensors, RefusesDuplicateFieldInsideAnEntry) {
  expect_refused(raw_file(R"({"a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}})", 8),
                 {"entry 'a' has duplicate key 'dtype'"});
}

TEST_F(Safetensors, RefusesMetadataThatIsNotStringToString) {
  const std::string tensor = entry("a", "F32", "[2]", "[0,8]");
  expect_refused(raw_file(R"({"__metadata__":{"format":"pt","step":1},)" + tensor + "}", 8),
                 {"__metadata__ value of 'step' must be a string, got 1"});
  expect_refused(raw_file(R"({"__metadata__":{"nested":{}},)" + tensor + "}", 8), {"__metadata__", "'nested'"});
  expect_refused(raw_file(R"({"__metadata__":["pt"],)" + tensor + "}", 8), {"__metadata__ must be an object"});
}

TEST_F(Safetensors, RefusesUnknownOrMissingFieldInAnEntry) {
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}})", 8),
                 {"tensor 'a'", "unknown field 'extra'"});
  expect_refused(raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), {"tensor 'a'", "missing field 'shape'"});
}

TEST_F(Safetensors, RefusesDeeplyNestedJsonWithoutParsingIt) {
  expect_refused(raw_file("{" + entry("a", "F32", "[[[[[2]]]]]", "[0,8]") + "}", 8),
                 {"entry 'a'", "nests JSON deeper"});
  expect_refused(raw_file("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}", 0),
                 {"nests JSON deeper"});
}

TEST_F(Safetensors, LookupOfMissingTensorThrowsNamingFileAndTensor) {
  const std::vector<float> one = {1.0f};
  write_file(file("m.safetensors"), {{"x", Dtype::F32, {1}, bytes_of(one)}});
  const File f = File::open(file("m.safetensors"));
  EXPECT_TRUE(f.contains("x"));
  EXPECT_FALSE(f.contains("lm_head.weight"));
  try {
    f.tensor("lm_head.weight");
    FAIL() << "expected BadInput";
  } catch (const BadInput& e) {
    EXPECT_NE(std::string(e.what()).find(file("m.safetensors") + ": tensor 'lm_head.weight': not found"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(Safetensors, MissingFileThrowsBadInputNamingIt) {
  EXPECT_THROW(File::open(file("absent.safetensors")), BadInput);
}

// --- mutations -----------------------------------------------------------------
// Every damaged variant of a valid file must either parse into views that stay
// inside the file or throw BadInput; never crash or read out of bounds (this
// test also runs under AddressSanitizer, on buffers of exactly the file size).

TEST_F(Safetensors, MutatedFilesAreParsedOrRefusedNeverReadOutOfBounds) {
  const std::vector<float> f32 = {1, 2, 3, 4, 5, 6};
  const std::vector<uint16_t> bf16 = {1, 2, 3};
  const std::vector<float> none;
  write_file(file("seed"),
             {{"model.embed_tokens.weight", Dtype::F32, {2, 3}, bytes_of(f32)},
              {"model.norm.weight", Dtype::BF16, {3}, bytes_of(bf16)},
              {"empty", Dtype::F32, {0}, bytes_of(none)}},
             {{"format", "pt"}, {"step", "10"}});
  const std::string seed = read_file(file("seed"));
  const size_t header_end = seed.size() - 30;  // 24 + 6 data bytes
  using namespace std::string_literals;
  const std::string interesting = "{}[]\",:0123456789-. eE\\\x00\xff"s;

  std::mt19937_64 rng(20240531);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  int parsed = 0, refused = 0;
  for (int variant = 0; variant < 4000; ++variant) {
    std::string bytes = seed;
    size_t variant_header_end = header_end;  // follows edits of case 4
    const int edits = 1 + static_cast<int>(pick(3));
    for (int e = 0; e < edits && !bytes.empty(); ++e) {
      const size_t header_bytes_now = std::min(bytes.size(), variant_header_end);
      switch (pick(6)) {
        case 0:  // flip one bit anywhere
          bytes[pick(bytes.size())] ^= static_cast<char>(1 << pick(8));
          break;
        case 1:  // trim the tail
          bytes.resize(pick(bytes.size() + 1));
          break;
        case 2:  // insert a random byte anywhere
          bytes.insert(bytes.begin() + static_cast<ptrdiff_t>(pick(bytes.size() + 1)), static_cast<char>(rng()));
          break;
        case 3:  // overwrite a header byte with a JSON-significant one
          if (header_bytes_now > 8) bytes[8 + pick(header_bytes_now - 8)] = interesting[pick(interesting.size())];
          break;
        case 4: {  // insert or delete inside the header and fix the length, so
                   // the damage reaches the JSON checks instead of the length check
          if (header_bytes_now <= 9 || bytes.size() < variant_header_end) break;
          const size_t at = 8 + pick(header_bytes_now - 8);
          if (rng() & 1) {
            bytes.insert(bytes.begin() + static_cast<ptrdiff_t>(at), interesting[pick(interesting.size())]);
            ++variant_header_end;
          } else {
            bytes.erase(bytes.begin() + static_cast<ptrdiff_t>(at));
            --variant_header_end;
          }
          const std::string length = le64(variant_header_end - 8);
          std::copy(length.begin(), length.end(), bytes.begin());
          break;
        }
        default:  // rewrite one byte of the length field
          bytes[pick(std::min<size_t>(8, bytes.size()))] = static_cast<char>(rng());
          break;
      }
    }
    // An allocation of exactly the file size, so ASan sees any read past its end.
    const std::unique_ptr<std::byte[]> exact(new std::byte[std::max<size_t>(bytes.size(), 1)]);
    std::memcpy(exact.get(), bytes.data(), bytes.size());
    const std::span<const std::byte> image(exact.get(), bytes.size());
    try {
      std::map<std::string, std::string> metadata;
      uint64_t data_start = 0;
      const auto tensors = parse_header(image, "mutant", &metadata, &data_start);
      ++parsed;
      ASSERT_LE(data_start, bytes.size());
      for (const auto& info : tensors) {
        ASSERT_LE(info.begin, info.end);
        ASSERT_LE(data_start + info.end, bytes.size()) << "variant " << variant;
        ASSERT_EQ(static_cast<uint64_t>(info.numel()) * dtype_size(info.dtype), info.end - info.begin);
      }
    } catch (const BadInput& e) {
      ++refused;
      ASSERT_EQ(std::string(e.what()).rfind("mutant: ", 0), 0u) << e.what();
    }
    if (variant % 100 == 0) {  // the file path too, through File::open and the views
      const std::string path = write_raw("mutant.safetensors", bytes);
      try {
        const File f = File::open(path);
        for (const auto& info : f.tensors()) ASSERT_EQ(f.tensor(info.name).bytes.size(), info.end - info.begin);
      } catch (const BadInput&) {
      }
    }
  }
  RecordProperty("parsed", parsed);
  RecordProperty("refused", refused);
  EXPECT_GT(refused, 3000);
  EXPECT_GT(parsed, 0) << "no mutation survived; the test no longer exercises the accept path";
}

}  // namespace
}  // namespace loom::safetensors
