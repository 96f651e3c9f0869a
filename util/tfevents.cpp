// TensorBoard event files: TFRecord framing and hand-encoded Event protobufs.
// See tfevents.h for the layout.
#include "util/tfevents.h"

#include <unistd.h>

#include <bit>
#include <chrono>
#include <cstring>
#include <span>
#include <stdexcept>

#include "util/crc32c.h"

namespace loom {
namespace {

static_assert(std::endian::native == std::endian::little, "the encoders below write host-order bytes");

// Protobuf wire types.
constexpr uint32_t kVarint = 0;
constexpr uint32_t kFixed64 = 1;
constexpr uint32_t kLengthDelimited = 2;
constexpr uint32_t kFixed32 = 5;

void put_varint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out += static_cast<char>((value & 0x7f) | 0x80);
    value >>= 7;
  }
  out += static_cast<char>(value);
}

void put_tag(std::string& out, uint32_t field, uint32_t wire_type) { put_varint(out, (field << 3) | wire_type); }

template <typename T>
void put_fixed(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_tag(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out.append(bytes);
}

// Event fields 1 (wall_time) and 2 (step), which every record has.
std::string event_header(double wall_time, int64_t step) {
  std::string event;
  put_tag(event, 1, kFixed64);
  put_fixed(event, wall_time);
  put_tag(event, 2, kVarint);
  put_varint(event, static_cast<uint64_t>(step));  // int64: two's complement for negatives, as protobuf does
  return event;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

uint32_t tfrecord_masked_crc32c(std::string_view data) {
  const uint32_t crc = crc32c(std::as_bytes(std::span(data.data(), data.size())));
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string tfrecord_frame(std::string_view data) {
  std::string length;
  put_fixed(length, static_cast<uint64_t>(data.size()));
  std::string frame = length;
  put_fixed(frame, tfrecord_masked_crc32c(length));
  frame.append(data);
  put_fixed(frame, tfrecord_masked_crc32c(data));
  return frame;
}

std::string tf_event_file_version(double wall_time) {
  std::string event = event_header(wall_time, 0);
  put_bytes(event, 3, "brain.Event:2");
  return event;
}

std::string tf_event_scalar(double wall_time, int64_t step, std::string_view tag, float value) {
  std::string summary_value;
  put_bytes(summary_value, 1, tag);
  put_tag(summary_value, 2, kFixed32);
  put_fixed(summary_value, value);
  std::string summary;
  put_bytes(summary, 1, summary_value);
  std::string event = event_header(wall_time, step);
  put_bytes(event, 5, summary);
  return event;
}

std::string tf_event_session_start(double wall_time, int64_t step) {
  std::string session_log;
  put_tag(session_log, 1, kVarint);
  put_varint(session_log, 1);  // SessionLog.START
  std::string event = event_header(wall_time, step);
  put_bytes(event, 7, session_log);
  return event;
}

TfEventsWriter::TfEventsWriter(const std::string& dir) {
  const double wall_time = now_seconds();
  path_ = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(wall_time)) + "." + host_name() + "." +
          std::to_string(::getpid());
  out_.open(path_, std::ios::binary | std::ios::trunc);
  if (!out_) throw std::runtime_error("cannot create TensorBoard event file " + path_ + ": " + std::strerror(errno));
  write_record(tf_event_file_version(wall_time));
  flush();
}

void TfEventsWriter::add_scalar(std::string_view tag, float value, int64_t step) {
  write_record(tf_event_scalar(now_seconds(), step, tag, value));
}

void TfEventsWriter::add_session_start(int64_t step) { write_record(tf_event_session_start(now_seconds(), step)); }

void TfEventsWriter::flush() {
  out_.flush();
  if (!out_) throw std::runtime_error("cannot write TensorBoard event file " + path_);
}

void TfEventsWriter::write_record(const std::string& event) { out_ << tfrecord_frame(event); }

}  // namespace loom
