// Implementation of the test path helpers.
#include "test_util.h"

#include "core/io.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <sys/wait.h>
#include <unistd.h>

namespace rlaif::test {

namespace fs = std::filesystem;

static std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) : fallback;
}

fs::path source_dir() { return env_or("RLAIF_SOURCE_DIR", RLAIF_SOURCE_DIR_DEFAULT); }
fs::path binary_dir() { return env_or("RLAIF_BINARY_DIR", RLAIF_BINARY_DIR_DEFAULT); }
fs::path shared_data() { return env_or("RLAIF_SHARED_DATA", RLAIF_SHARED_DATA_DEFAULT); }
fs::path reference_dir() { return env_or("RLAIF_REF_DIR", RLAIF_REF_DIR_DEFAULT); }
std::string python() { return env_or("RLAIF_PYTHON", RLAIF_PYTHON_DEFAULT); }

fs::path temp_dir(const std::string& name) {
  fs::path p = binary_dir() / "test_tmp" / (name + "." + std::to_string(::getpid()));
  rlaif::remove_tree(p);  // not std::filesystem::remove_all: see core/io.h
  fs::create_directories(p);
  return p;
}

int run_command(const std::string& cmd, std::string* output) {
  FILE* pipe = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!pipe) throw std::runtime_error("popen failed: " + cmd);
  char buf[4096];
  std::string out;
  while (size_t n = std::fread(buf, 1, sizeof buf, pipe)) out.append(buf, n);
  const int status = ::pclose(pipe);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace rlaif::test
