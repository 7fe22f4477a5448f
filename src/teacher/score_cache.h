// Persistent teacher cache in SQLite (WAL): scores and reference solutions keyed by a SHA-256 of everything that
// determines them, with a maximum age. A rerun or a resume never pays twice; several threads or processes may
// share one file (SQLite's locking, a busy timeout, one connection per object behind a mutex).
#pragma once

#include <cstdint>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

struct sqlite3;

namespace rlaif::teacher {

std::string sha256_hex(const std::string& data);
// Key of a value: SHA-256 over the length-prefixed parts, so ("ab","c") and ("a","bc") differ.
std::string cache_key(const std::vector<std::string>& parts);

class ScoreCache {
 public:
  // max_age_s <= 0: entries never expire.
  ScoreCache(const std::filesystem::path& path, int64_t max_age_s);
  ~ScoreCache();
  ScoreCache(const ScoreCache&) = delete;
  ScoreCache& operator=(const ScoreCache&) = delete;

  // The value if present and younger than max_age; expired entries read as missing (and get overwritten).
  std::optional<std::string> get(const std::string& key);
  void put(const std::string& key, const std::string& value);
  const std::filesystem::path& path() const { return path_; }

 private:
  void exec(const char* sql);
  [[noreturn]] void fail(const std::string& what);
  std::filesystem::path path_;
  int64_t max_age_s_;
  sqlite3* db_ = nullptr;
  std::mutex mutex_;
};

}  // namespace rlaif::teacher
