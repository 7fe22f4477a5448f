// File I/O shared by every layer: memory-mapped files (weights are read zero-copy from them), whole-file
// reads, and atomic writes (temporary file, then rename) so a crash never leaves a half-written file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace rlaif {

// A file mapped into memory. Private mappings are writable copy-on-write: the trainer may update weights
// that were loaded zero-copy without touching the file on disk.
class MappedFile {
 public:
  enum class Mode { kReadOnly, kPrivateWritable };
  // Throws rlaif::Error("io", ...) naming the path if it cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::filesystem::path& path, Mode mode = Mode::kReadOnly);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  MappedFile() = default;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::filesystem::path path_;
};

// Reads a whole file; throws rlaif::Error("io", ...) naming the path.
std::string read_file(const std::filesystem::path& path);

// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, then rename.
void write_file_atomic(const std::filesystem::path& path, std::string_view data);

// Directory helpers on plain POSIX calls. std::filesystem::remove_all and directory iteration are avoided on
// purpose: libtorch_cpu.so exports its own copies of them, which the dynamic linker may bind our calls to (a
// crash was seen in remove_all). Missing paths are not errors for remove_tree.
void remove_tree(const std::filesystem::path& path);
std::vector<std::string> list_dir(const std::filesystem::path& dir);  // entry names, no "." or ".."
void rename_path(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace rlaif
