// Teacher API client: OpenAI-compatible /v1/chat/completions and Anthropic /v1/messages over libcurl's multi
// interface. One event loop (the calling thread) keeps at most max_concurrency requests in flight, keeps
// requests and tokens per window under the limits, and retries transient faults with backoff and jitter.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "teacher/rate_limiter.h"
#include "teacher/teacher_config.h"

namespace rlaif::teacher {

struct ApiRequest {
  std::string id;  // the caller's key (sample id); the result carries it back
  std::string system;
  std::string user;
  // Checks the answer text: "" if usable, else why not. An unusable answer is retried like a 5xx.
  std::function<std::string(const std::string&)> validate;
};

enum class FailureKind { kNone, kRateLimited, kServerError, kTimeout, kConnection, kMalformedResponse,
                         kUnparseableAnswer };
const char* failure_kind_name(FailureKind k);

struct ApiResult {
  std::string id;
  bool ok = false;
  std::string text;  // the answer's text when ok
  int64_t input_tokens = 0, output_tokens = 0;
  int attempts = 0;
  FailureKind failure = FailureKind::kNone;  // the last attempt's fault when !ok
  std::string message;
};

struct ApiStats {
  int64_t calls = 0;  // HTTP requests sent, retries included
  int64_t input_tokens = 0, output_tokens = 0;
  int64_t succeeded = 0, failed = 0;
  std::map<std::string, int64_t> faults;    // every failed attempt, by kind
  std::map<std::string, int64_t> failures;  // requests that ran out of retries, by kind
  int max_in_flight = 0;
  void add(const ApiStats& o);
};

// Request/response schema of one provider; exposed for tests and for the local fake servers.
struct Endpoint {
  std::string url;
  std::vector<std::string> headers;  // "Name: value"; contains the key: never log these
};
Endpoint make_endpoint(const TeacherConfig& cfg, const std::string& api_key);
std::string make_request_body(const TeacherConfig& cfg, const std::string& system, const std::string& user);
// Extracts the answer text and token usage; throws rlaif::Error("teacher", ...) on a malformed body.
void parse_response_body(const std::string& provider, const std::string& body, std::string* text,
                         int64_t* input_tokens, int64_t* output_tokens);

class ApiClient {
 public:
  // Reads the key from the environment variable cfg.api_key_env and registers it as a secret.
  explicit ApiClient(TeacherConfig cfg);
  // Sends every request; returns one result per request, in the same order, each keyed by its id.
  // Authentication and validation errors (400/401/403/404/422) stop the run: rlaif::Error with the reason.
  std::vector<ApiResult> run(const std::vector<ApiRequest>& requests);
  const ApiStats& stats() const { return stats_; }

 private:
  TeacherConfig cfg_;
  std::string api_key_;
  RateLimiter limiter_;  // lives across run() calls: limits hold over a whole training run
  ApiStats stats_;
};

}  // namespace rlaif::teacher
