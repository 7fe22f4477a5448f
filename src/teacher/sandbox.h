// Runs untrusted completions: a child process with CPU, memory, process-count, file-size and output limits,
// a wall-clock timeout that kills its whole process group, a private directory and, where the kernel allows,
// new user, mount, PID and network namespaces (no network, everything read-only but its directory).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "teacher/teacher_config.h"

namespace rlaif::teacher {

struct SandboxResult {
  bool started = false;  // false: the sandbox itself could not be set up (see detail)
  int exit_code = -1;    // when the program exited
  int signal = 0;        // when it was killed by a signal
  bool timed_out = false;
  bool output_limited = false;
  bool isolated = false;  // namespaces were in place
  double wall_s = 0;
  std::string output;  // stdout and stderr, at most max_output_kb
  bool ok() const { return started && exit_code == 0 && !timed_out && !output_limited; }
  // "ok", "exit 1", "timeout", "cpu limit", "killed by signal 9", "output limit", ...
  std::string reason() const;
};

// What isolation this machine gives sandboxes, probed once; also logged at the first run.
struct SandboxSupport {
  bool namespaces = false;   // user+mount+pid+net namespaces work
  bool drops_to_nobody = false;  // running as root: children run as uid 65534 so RLIMIT_NPROC counts
  std::string note;
};
const SandboxSupport& sandbox_support();

// Runs argv (argv[0] an absolute path) in `workdir` under the limits; at most cfg.max_parallel at once.
SandboxResult run_sandboxed(const SandboxConfig& cfg, const std::vector<std::string>& argv,
                            const std::filesystem::path& workdir);

// Absolute path of a tool on PATH that the sandbox user can execute, or "" (then its tier is skipped).
std::string find_tool(const std::string& name);

// A fresh private directory for one sandbox (under cfg.scratch_dir), removed by the destructor.
class SandboxDir {
 public:
  explicit SandboxDir(const SandboxConfig& cfg);
  ~SandboxDir();
  SandboxDir(const SandboxDir&) = delete;
  SandboxDir& operator=(const SandboxDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  void write(const std::string& name, const std::string& content);

 private:
  std::filesystem::path path_;
};

}  // namespace rlaif::teacher
