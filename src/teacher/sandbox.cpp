// Sandbox implementation. Between fork and exec only system calls run (the parent is multi-threaded), so
// everything the child needs — argv, environment, the mount list — is prepared before fork.
#include "teacher/sandbox.h"

#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"
#include "core/logging.h"

namespace rlaif::teacher {

namespace fs = std::filesystem;

namespace {

constexpr uid_t kNobody = 65534;

struct Fd {
  int fd = -1;
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

// Mount points as the parent sees them; the child's new mount namespace starts as a copy of this list.
std::vector<std::string> mount_points() {
  std::vector<std::string> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string id, parent, devno, root, mp;
    if (ss >> id >> parent >> devno >> root >> mp) {
      // mountinfo escapes space, tab, newline and backslash as octal.
      std::string dec;
      for (size_t i = 0; i < mp.size(); ++i) {
        if (mp[i] == '\\' && i + 3 < mp.size()) {
          dec.push_back(static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8)));
          i += 3;
        } else {
          dec.push_back(mp[i]);
        }
      }
      out.push_back(dec);
    }
  }
  return out;
}

unsigned long locked_flags(const char* path) {
  struct statvfs sv{};
  if (::statvfs(path, &sv) != 0) return 0;
  unsigned long f = 0;
  if (sv.f_flag & ST_NOSUID) f |= MS_NOSUID;
  if (sv.f_flag & ST_NODEV) f |= MS_NODEV;
  if (sv.f_flag & ST_NOEXEC) f |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) f |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) f |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) f |= MS_RELATIME;
  return f;
}

void write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w <= 0) return;
    c += w;
    n -= static_cast<size_t>(w);
  }
}

[[noreturn]] void child_fail(int out_fd, const char* what) {
  char buf[256];
  const int n = std::snprintf(buf, sizeof buf, "sandbox: %s: %s\n", what, std::strerror(errno));
  write_all(out_fd, buf, static_cast<size_t>(n));
  ::_exit(126);
}

struct ChildPlan {
  std::vector<char*> argv, envp;
  std::vector<std::string> mounts;
  const char* workdir;
  bool isolate, drop_to_nobody;
  rlim_t cpu, as, nproc, fsize;
};

// Runs in the forked child: isolation, limits, then exec (through a PID-namespace init when isolated).
[[noreturn]] void child_main(const ChildPlan& p, int out_fd, int status_fd) {
  ::setpgid(0, 0);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  const int devnull = ::open("/dev/null", O_RDONLY);
  if (devnull < 0 || ::dup2(devnull, 0) < 0 || ::dup2(out_fd, 1) < 0 || ::dup2(out_fd, 2) < 0)
    child_fail(out_fd, "redirect");
  out_fd = 1;
  if (p.drop_to_nobody) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(kNobody) != 0 || ::setuid(kNobody) != 0)
      child_fail(out_fd, "drop to uid 65534");
  }
  char isolated = 'n';
  if (p.isolate && ::unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0) {
    isolated = 'y';
    if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) child_fail(out_fd, "make mounts private");
    if (::mount(p.workdir, p.workdir, nullptr, MS_BIND | MS_REC, nullptr) != 0) child_fail(out_fd, "bind workdir");
    // Everything else read-only: writes outside the directory fail with EROFS. Some special mounts refuse
    // the remount; they are not writable by the sandbox user anyway.
    for (const auto& mp : p.mounts)
      ::mount(nullptr, mp.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | locked_flags(mp.c_str()), nullptr);
  }
  write_all(status_fd, &isolated, 1);
  if (::chdir(p.workdir) != 0) child_fail(out_fd, "chdir");
  const auto lim = [&](int res, rlim_t soft, rlim_t hard, const char* name) {
    struct rlimit rl{soft, hard};
    if (::setrlimit(res, &rl) != 0) child_fail(out_fd, name);
  };
  lim(RLIMIT_CPU, p.cpu, p.cpu + 1, "RLIMIT_CPU");
  lim(RLIMIT_AS, p.as, p.as, "RLIMIT_AS");
  lim(RLIMIT_NPROC, p.nproc, p.nproc, "RLIMIT_NPROC");
  lim(RLIMIT_FSIZE, p.fsize, p.fsize, "RLIMIT_FSIZE");
  lim(RLIMIT_CORE, 0, 0, "RLIMIT_CORE");
  ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
  if (isolated == 'y') {
    // The first child is PID 1 of the new namespace: when it dies, the kernel kills every process left in it,
    // so nothing a sample forks outlives the sandbox.
    const pid_t inner = ::fork();
    if (inner < 0) child_fail(out_fd, "fork into the PID namespace");
    if (inner == 0) {
      ::execve(p.argv[0], p.argv.data(), p.envp.data());
      child_fail(out_fd, "execve");
    }
    int st = 0;
    while (::waitpid(inner, &st, 0) < 0 && errno == EINTR) {
    }
    write_all(status_fd, &st, sizeof st);
    ::_exit(0);
  }
  ::close(status_fd);
  ::execve(p.argv[0], p.argv.data(), p.envp.data());
  child_fail(out_fd, "execve");
}

bool probe_namespaces(bool drop) {
  const pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    if (drop && (::setgroups(0, nullptr) != 0 || ::setgid(kNobody) != 0 || ::setuid(kNobody) != 0)) ::_exit(2);
    ::_exit(::unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0 ? 0 : 1);
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

// Bounds the sandboxes running at once (compilers are memory-hungry; the machine is shared).
class Slots {
 public:
  void acquire(int max) {
    std::unique_lock<std::mutex> lock(m_);
    cv_.wait(lock, [&] { return used_ < std::max(1, max); });
    ++used_;
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(m_);
      --used_;
    }
    cv_.notify_one();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int used_ = 0;
};
Slots& slots() {
  static Slots s;
  return s;
}

}  // namespace

std::string SandboxResult::reason() const {
  if (!started) return "sandbox setup failed";
  if (timed_out) return "timeout";
  if (output_limited) return "output limit";
  if (signal == SIGXCPU) return "cpu limit";
  if (signal == SIGXFSZ) return "file size limit";
  if (signal != 0) return fmt::format("killed by signal {}", signal);
  if (exit_code != 0) return fmt::format("exit {}", exit_code);
  return "ok";
}

const SandboxSupport& sandbox_support() {
  static const SandboxSupport s = [] {
    SandboxSupport r;
    r.drops_to_nobody = ::geteuid() == 0;
    r.namespaces = probe_namespaces(r.drops_to_nobody);
    if (r.namespaces) {
      r.note = "user+mount+pid+network namespaces: no network, read-only filesystem outside the sandbox directory";
    } else {
      r.note = "namespaces unavailable (unshare refused: user namespaces disabled or restricted): samples run with "
               "rlimits and a private directory only, and CAN reach the network and write where their user may";
    }
    if (r.drops_to_nobody) r.note += "; running as root, so sandboxes run as uid 65534 (RLIMIT_NPROC counts them)";
    return r;
  }();
  return s;
}

std::string find_tool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::vector<std::string> dirs = {"/usr/local/bin", "/usr/bin", "/bin"};
  if (path) {
    std::stringstream ss(path);
    std::string d;
    dirs.clear();
    while (std::getline(ss, d, ':'))
      if (!d.empty()) dirs.push_back(d);
  }
  const bool as_nobody = sandbox_support().drops_to_nobody;
  for (const auto& d : dirs) {
    const fs::path p = fs::path(d) / name;
    std::error_code ec;
    if (!fs::exists(p, ec) || ::access(p.c_str(), X_OK) != 0) continue;
    if (as_nobody) {
      // The sandbox user needs search permission on every directory above the tool (e.g. not under /root).
      bool ok = true;
      for (fs::path a = fs::canonical(p, ec); !ec && a.has_relative_path(); a = a.parent_path()) {
        struct stat st{};
        if (::stat(a.c_str(), &st) != 0 || !(st.st_mode & S_IXOTH)) {
          ok = false;
          break;
        }
      }
      if (!ok) continue;
    }
    return p.string();
  }
  return "";
}

SandboxDir::SandboxDir(const SandboxConfig& cfg) {
  const fs::path base = cfg.scratch_dir.empty() ? fs::temp_directory_path() : fs::path(cfg.scratch_dir);
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng(std::random_device{}());
  path_ = base / fmt::format("rlaif_sbx_{}_{}_{:x}", ::getpid(), counter++, rng());
  fs::create_directories(path_);
  if (sandbox_support().drops_to_nobody && ::chown(path_.c_str(), kNobody, kNobody) != 0)
    throw Error("sandbox", fmt::format("cannot chown {} to uid 65534: {}", path_.string(), std::strerror(errno)));
  fs::permissions(path_, fs::perms::owner_all);
}

SandboxDir::~SandboxDir() {
  // nftw rather than std::filesystem::remove_all: in the torch-linked binary the latter can resolve to an
  // incompatible copy inside libtorch.so and crash. Best effort: a leftover temp dir is harmless.
  ::nftw(
      path_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p), 0; }, 16,
      FTW_DEPTH | FTW_PHYS);
}

void SandboxDir::write(const std::string& name, const std::string& content) {
  const fs::path p = path_ / name;
  std::ofstream(p, std::ios::binary) << content;
  if (!fs::exists(p)) throw Error("sandbox", fmt::format("cannot write {}", p.string()));
  if (sandbox_support().drops_to_nobody && ::chown(p.c_str(), kNobody, kNobody) != 0)
    throw Error("sandbox", fmt::format("cannot chown {}: {}", p.string(), std::strerror(errno)));
}

SandboxResult run_sandboxed(const SandboxConfig& cfg, const std::vector<std::string>& argv, const fs::path& workdir) {
  RLAIF_CHECK(!argv.empty() && fs::path(argv[0]).is_absolute(), "sandbox argv[0] must be an absolute path");
  const SandboxSupport& support = sandbox_support();
  static std::once_flag logged;
  std::call_once(logged, [&] { log_info("[sandbox] {}", support.note); });

  ChildPlan plan;
  std::vector<std::string> args = argv;
  const std::string wd = workdir.string();
  std::vector<std::string> env = {"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + wd, "TMPDIR=" + wd, "LANG=C.UTF-8",
                                  "PYTHONDONTWRITEBYTECODE=1"};
  for (auto& a : args) plan.argv.push_back(a.data());
  plan.argv.push_back(nullptr);
  for (auto& e : env) plan.envp.push_back(e.data());
  plan.envp.push_back(nullptr);
  plan.isolate = cfg.isolate_network && support.namespaces;
  if (plan.isolate) plan.mounts = mount_points();
  plan.workdir = wd.c_str();
  plan.drop_to_nobody = support.drops_to_nobody;
  plan.cpu = static_cast<rlim_t>(std::max(1.0, cfg.cpu_seconds));
  plan.as = static_cast<rlim_t>(cfg.memory_mb) << 20;
  plan.nproc = static_cast<rlim_t>(std::max<int64_t>(1, cfg.max_processes));
  plan.fsize = static_cast<rlim_t>(cfg.max_file_mb) << 20;

  slots().acquire(cfg.max_parallel);
  struct Release {
    ~Release() { slots().release(); }
  } release;

  int out_pipe[2], status_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(status_pipe, O_CLOEXEC) != 0)
    throw Error("sandbox", fmt::format("pipe: {}", std::strerror(errno)));
  Fd out_r{out_pipe[0]}, out_w{out_pipe[1]}, st_r{status_pipe[0]}, st_w{status_pipe[1]};
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("sandbox", fmt::format("fork: {}", std::strerror(errno)));
  if (pid == 0) {
    ::close(out_pipe[0]);
    ::close(status_pipe[0]);
    // The output pipe must survive exec; the status pipe must not reach the sample.
    ::fcntl(out_pipe[1], F_SETFD, 0);
    child_main(plan, out_pipe[1], status_pipe[1]);
  }
  ::setpgid(pid, pid);  // also done by the child; whichever runs first wins the race harmlessly
  out_w.reset();
  st_w.reset();

  SandboxResult r;
  r.started = true;
  const size_t cap = static_cast<size_t>(cfg.max_output_kb) * 1024;
  const auto deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(cfg.wall_seconds));
  bool killed = false;
  auto kill_group = [&] {
    ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);
    killed = true;
  };
  char buf[8192];
  while (out_r.fd >= 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      kill_group();
      break;
    }
    pollfd pfd{out_r.fd, POLLIN, 0};
    const int pr = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count(), 100)));
    if (pr < 0 && errno != EINTR) break;
    if (pr <= 0) continue;
    const ssize_t n = ::read(out_r.fd, buf, sizeof buf);
    if (n <= 0) break;  // EOF: every holder of the pipe is gone
    const size_t room = cap > r.output.size() ? cap - r.output.size() : 0;
    r.output.append(buf, std::min(room, static_cast<size_t>(n)));
    if (static_cast<size_t>(n) > room) {
      r.output_limited = true;
      kill_group();
      break;
    }
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  ::kill(-pid, SIGKILL);  // anything left in the group (non-isolated mode) goes too
  r.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  char iso = 0;
  int inner = 0;
  const bool got_iso = ::read(st_r.fd, &iso, 1) == 1;
  r.isolated = got_iso && iso == 'y';
  if (r.isolated && !killed && ::read(st_r.fd, &inner, sizeof inner) == static_cast<ssize_t>(sizeof inner))
    st = inner;  // the sample's own status, reported by the namespace's init
  if (WIFEXITED(st)) {
    r.exit_code = WEXITSTATUS(st);
  } else if (WIFSIGNALED(st)) {
    r.signal = WTERMSIG(st);
  }
  if (!got_iso && !killed) r.started = false;  // died before the isolation step: setup failure
  return r;
}

}  // namespace rlaif::teacher
