// Event file encoding. Event: wall_time (field 1, double), step (2, int64), file_version (3, string) or
// summary (5, Summary{ repeated Value value = 1 }), Value: tag (1, string), simple_value (2, float).
#include "core/tensorboard.h"

#include <unistd.h>

#include <chrono>
#include <cstring>

#include "core/error.h"

namespace rlaif {

namespace {

uint32_t crc_table(int i) {
  static uint32_t table[256];
  static const bool init = [] {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0x82F63B78u ^ (c >> 1) : c >> 1;
      table[n] = c;
    }
    return true;
  }();
  (void)init;
  return table[i];
}

uint32_t masked_crc(const std::string& s) {
  const uint32_t c = crc32c(s.data(), s.size());
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void key(std::string& out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }

void bytes_field(std::string& out, int field, const std::string& v) {
  key(out, field, 2);
  varint(out, v.size());
  out += v;
}

template <typename T>
void fixed(std::string& out, int field, int wire, T v) {
  key(out, field, wire);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

std::string event_header(int64_t step) {
  std::string e;
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  fixed(e, 1, 1, now);
  key(e, 2, 0);
  varint(e, static_cast<uint64_t>(step));
  return e;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xffffffffu;
  for (size_t i = 0; i < n; ++i) c = crc_table((c ^ p[i]) & 0xff) ^ (c >> 8);
  return c ^ 0xffffffffu;
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof host - 1);
  const auto secs = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::system_clock::now().time_since_epoch()).count();
  path_ = dir / ("events.out.tfevents." + std::to_string(secs) + "." + host);
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) throw Error("tensorboard", "cannot create " + path_.string());
  std::string e = event_header(0);
  bytes_field(e, 3, "brain.Event:2");
  write_record(e);
  flush();
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string len(8, '\0');
  const uint64_t n = data.size();
  std::memcpy(len.data(), &n, 8);
  const uint32_t lc = masked_crc(len), dc = masked_crc(data);
  out_.write(len.data(), 8);
  out_.write(reinterpret_cast<const char*>(&lc), 4);
  out_.write(data.data(), static_cast<std::streamsize>(data.size()));
  out_.write(reinterpret_cast<const char*>(&dc), 4);
}

void TensorBoardWriter::scalar(const std::string& tag, double value, int64_t step) {
  std::string v;
  bytes_field(v, 1, tag);
  fixed(v, 2, 5, static_cast<float>(value));
  std::string summary;
  bytes_field(summary, 1, v);
  std::string e = event_header(step);
  bytes_field(e, 5, summary);
  write_record(e);
}

void TensorBoardWriter::flush() { out_.flush(); }

}  // namespace rlaif
