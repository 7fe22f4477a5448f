// Logging implementation: one mutex keeps lines whole when threads log at once.
#include "core/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <vector>

#include "core/error.h"

namespace rlaif {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mutex;
std::vector<std::string>& secrets() {
  static std::vector<std::string> s;
  return s;
}

}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

LogLevel parse_log_level(std::string_view name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "info") return LogLevel::kInfo;
  if (name == "warn" || name == "warning") return LogLevel::kWarn;
  if (name == "error") return LogLevel::kError;
  if (name == "off") return LogLevel::kOff;
  throw Error("log", fmt::format("unknown log level '{}'", name), "use debug, info, warn, error or off");
}

void add_secret(const std::string& secret) {
  if (secret.empty()) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  secrets().push_back(secret);
}

static std::string redact_locked(std::string text) {
  for (const auto& s : secrets()) {
    for (size_t pos = text.find(s); pos != std::string::npos; pos = text.find(s, pos + 3))
      text.replace(pos, s.size(), "***");
  }
  return text;
}

std::string redact(std::string text) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return redact_locked(std::move(text));
}

void log_line(LogLevel level, std::string_view message) {
  static const char* kNames[] = {"debug", "info", "warn", "error"};
  const auto now = std::chrono::system_clock::now();
  const auto t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  localtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%H:%M:%S", &tm);
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::string line = redact_locked(std::string(message));
  std::fprintf(stderr, "%s %-5s %s\n", stamp, kNames[static_cast<int>(level)], line.c_str());
  std::fflush(stderr);
}

}  // namespace rlaif
