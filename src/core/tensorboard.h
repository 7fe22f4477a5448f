// TensorBoard event files written directly: TFRecord framing (length, masked CRC32C) around hand-encoded
// Event protobufs with scalar summaries — no protobuf or TensorFlow dependency. Readable by TensorBoard.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace rlaif {

class TensorBoardWriter {
 public:
  // Creates `dir` and an events.out.tfevents.<time>.<host> file in it.
  explicit TensorBoardWriter(const std::filesystem::path& dir);
  void scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::filesystem::path& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::filesystem::path path_;
  std::ofstream out_;
};

uint32_t crc32c(const void* data, size_t n);  // Castagnoli, as TFRecord uses

}  // namespace rlaif
