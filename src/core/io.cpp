// POSIX implementation of the I/O helpers (mmap, fsync + rename).
#include "core/io.h"

#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace rlaif {

namespace fs = std::filesystem;

std::shared_ptr<MappedFile> MappedFile::open(const fs::path& path, Mode mode) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw Error("io", fmt::format("cannot open '{}': {}", path.string(), std::strerror(errno)));
  struct stat st{};
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error("io", fmt::format("cannot stat '{}': {}", path.string(), std::strerror(e)));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw Error("io", fmt::format("'{}' is a directory, expected a file", path.string()));
  }
  auto f = std::shared_ptr<MappedFile>(new MappedFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    const int prot = mode == Mode::kReadOnly ? PROT_READ : (PROT_READ | PROT_WRITE);
    void* p = mmap(nullptr, f->size_, prot, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw Error("io", fmt::format("cannot mmap '{}': {}", path.string(), std::strerror(e)));
    }
    f->data_ = static_cast<uint8_t*>(p);
  }
  ::close(fd);
  return f;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) munmap(data_, size_);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("io", fmt::format("cannot read '{}': {}", path.string(), std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const fs::path& path, std::string_view data) {
  const fs::path tmp = path.string() + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    throw Error("io", fmt::format("cannot create '{}': {}", tmp.string(), std::strerror(errno)));
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw Error("io", fmt::format("cannot write '{}': {}", tmp.string(), std::strerror(e)));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error("io", fmt::format("cannot flush '{}': {}", tmp.string(), std::strerror(errno)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw Error("io", fmt::format("cannot rename '{}' to '{}': {}", tmp.string(), path.string(), std::strerror(e)));
  }
}

void remove_tree(const fs::path& path) {
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0) return;
  const int rc = ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
                        FTW_DEPTH | FTW_PHYS);
  if (rc != 0) throw Error("io", fmt::format("cannot remove '{}': {}", path.string(), std::strerror(errno)));
}

std::vector<std::string> list_dir(const fs::path& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw Error("io", fmt::format("cannot list '{}': {}", dir.string(), std::strerror(errno)));
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  return out;
}

void rename_path(const fs::path& from, const fs::path& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw Error("io", fmt::format("cannot rename '{}' to '{}': {}", from.string(), to.string(), std::strerror(errno)));
}

}  // namespace rlaif
