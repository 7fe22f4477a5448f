// safetensors reader (mmap, zero-copy views) and writer, plus sharded checkpoints through
// model.safetensors.index.json. Format: 8-byte LE header length, JSON header, then the data buffer
// (https://github.com/huggingface/safetensors#format). Independent of libtorch: models/ wraps views as tensors.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/io.h"

namespace rlaif {

enum class DType { kBool, kU8, kI8, kI16, kU16, kF16, kBF16, kI32, kU32, kF32, kF64, kI64, kU64, kF8E4M3, kF8E5M2 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // the safetensors spelling: "BF16", "F32", ...
// Throws rlaif::Error("safetensors", ...) for an unknown name; `where` names the file and tensor.
DType parse_dtype(std::string_view name, const std::string& where = "");

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint8_t* data = nullptr;  // inside the file's private mapping: writable copy-on-write
  size_t nbytes = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Opens and validates a file; every malformation is an Error naming the file (and tensor).
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);

  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::shared_ptr<MappedFile>& file() const { return file_; }

 private:
  std::shared_ptr<MappedFile> file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors, or shards listed in model.safetensors.index.json.
class Checkpoint {
 public:
  static Checkpoint open_dir(const std::filesystem::path& dir);
  // Also accepts a single .safetensors file.
  static Checkpoint open_file(const std::filesystem::path& file);

  std::vector<std::string> names() const;
  const TensorView* find(std::string_view name) const;
  // The mapped file that owns a tensor's bytes (keeps them alive while a tensor views them).
  std::shared_ptr<MappedFile> owner(std::string_view name) const;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const TensorView*>, std::less<>> by_name_;
};

// Collects tensors and writes one safetensors file atomically. Data is copied at add() time.
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data,
           size_t nbytes);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  void write(const std::filesystem::path& path) const;
  // The serialized file, for callers that stream or test it.
  std::string serialize() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace rlaif
