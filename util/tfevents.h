// TensorBoard event files, written without TensorFlow or a protobuf library.
//
// An event file is a sequence of TFRecords, each framing one serialized
// `tensorflow.Event` protobuf:
//   uint64 length (little endian) | uint32 masked_crc32c(length bytes) |
//   data[length] | uint32 masked_crc32c(data)
// with masked_crc32c(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 over
// CRC-32C (util/crc32c.h). loom writes three kinds of Event, encoded by hand
// (tensorflow/core/util/event.proto, summary.proto):
//   Event { double wall_time = 1; int64 step = 2; string file_version = 3; }   the first record
//   Event { wall_time; step; Summary summary = 5; }
//     Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
//   Event { wall_time; step; SessionLog session_log = 7; }  SessionLog { SessionStatus status = 1; }  START = 1
// TensorBoard's readers (and its event_accumulator) take these as they are.
// A SessionLog START at step s tells them to drop the scalars of steps >= s
// that earlier files of the folder hold: what a run resumed from step s - 1
// does, as TensorFlow's own writers do after a restart.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

namespace loom {

// The TFRecord frame of `data` (the layout above).
std::string tfrecord_frame(std::string_view data);

// CRC-32C of `data`, masked as TFRecord does (so that a CRC of data holding
// CRCs does not look like data).
uint32_t tfrecord_masked_crc32c(std::string_view data);

// Serialized Event messages (the layout above).
std::string tf_event_file_version(double wall_time);
std::string tf_event_scalar(double wall_time, int64_t step, std::string_view tag, float value);
std::string tf_event_session_start(double wall_time, int64_t step);

// One event file in `dir`: events.out.tfevents.<unix seconds>.<host>.<pid>
// (TensorBoard finds files by "tfevents" in the name and reads a folder's
// files in name order, that is by creation time).
class TfEventsWriter {
 public:
  // Creates the file and writes the file_version record. Throws
  // std::runtime_error when the file cannot be created.
  explicit TfEventsWriter(const std::string& dir);
  TfEventsWriter(const TfEventsWriter&) = delete;
  TfEventsWriter& operator=(const TfEventsWriter&) = delete;

  // A scalar summary; `value` is stored as float32, as TensorBoard's
  // simple_value is.
  void add_scalar(std::string_view tag, float value, int64_t step);
  // A SessionLog START at `step` (see the top of this file).
  void add_session_start(int64_t step);
  // Pushes the records written so far to the file (so a live TensorBoard sees them).
  void flush();

  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);

  std::string path_;
  std::ofstream out_;
};

}  // namespace loom
