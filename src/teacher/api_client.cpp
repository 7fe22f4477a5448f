// libcurl multi event loop with retries, backoff, Retry-After and rate limits (see api_client.h).
#include "teacher/api_client.h"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <queue>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/logging.h"

namespace rlaif::teacher {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

const char* failure_kind_name(FailureKind k) {
  switch (k) {
    case FailureKind::kNone: return "none";
    case FailureKind::kRateLimited: return "rate_limited";
    case FailureKind::kServerError: return "server_error";
    case FailureKind::kTimeout: return "timeout";
    case FailureKind::kConnection: return "connection";
    case FailureKind::kMalformedResponse: return "malformed_response";
    case FailureKind::kUnparseableAnswer: return "unparseable_answer";
  }
  return "?";
}

void ApiStats::add(const ApiStats& o) {
  calls += o.calls;
  input_tokens += o.input_tokens;
  output_tokens += o.output_tokens;
  succeeded += o.succeeded;
  failed += o.failed;
  for (const auto& [k, v] : o.faults) faults[k] += v;
  for (const auto& [k, v] : o.failures) failures[k] += v;
  max_in_flight = std::max(max_in_flight, o.max_in_flight);
}

namespace {

void curl_global() {
  static std::once_flag once;
  std::call_once(once, [] {
    const CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) throw Error("teacher", fmt::format("curl_global_init failed: {}", curl_easy_strerror(rc)));
  });
}

#define RLAIF_CURL(call)                                                                            \
  do {                                                                                              \
    const CURLcode rc_ = (call);                                                                    \
    if (rc_ != CURLE_OK) throw Error("teacher", fmt::format("{} failed: {}", #call, curl_easy_strerror(rc_))); \
  } while (0)
#define RLAIF_CURLM(call)                                                                           \
  do {                                                                                              \
    const CURLMcode rc_ = (call);                                                                   \
    if (rc_ != CURLM_OK) throw Error("teacher", fmt::format("{} failed: {}", #call, curl_multi_strerror(rc_))); \
  } while (0)

std::string strip_slash(std::string s) {
  while (!s.empty() && s.back() == '/') s.pop_back();
  if (s.size() >= 3 && s.compare(s.size() - 3, 3, "/v1") == 0) s.resize(s.size() - 3);  // accept ".../v1"
  return s;
}

size_t on_body(char* ptr, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(ptr, size * n);
  return size * n;
}

size_t on_header(char* ptr, size_t size, size_t n, void* user) {
  std::string line(ptr, size * n);
  static constexpr std::string_view kName = "retry-after:";
  if (line.size() > kName.size()) {
    std::string head = line.substr(0, kName.size());
    std::transform(head.begin(), head.end(), head.begin(), [](unsigned char c) { return std::tolower(c); });
    if (head == kName) {
      std::string v = line.substr(kName.size());
      const auto b = v.find_first_not_of(" \t"), e = v.find_last_not_of(" \t\r\n");
      *static_cast<std::string*>(user) = b == std::string::npos ? "" : v.substr(b, e - b + 1);
    }
  }
  return size * n;
}

// Seconds to wait from a Retry-After value (delta seconds, fractional accepted, or an HTTP date); <0 if none.
double parse_retry_after(const std::string& v) {
  if (v.empty()) return -1;
  char* end = nullptr;
  const double s = std::strtod(v.c_str(), &end);
  if (end != v.c_str() && *end == '\0') return std::max(0.0, s);
  const time_t when = curl_getdate(v.c_str(), nullptr);
  if (when < 0) return -1;
  return std::max(0.0, std::difftime(when, std::time(nullptr)));
}

struct Transfer {
  CURL* easy = nullptr;
  curl_slist* headers = nullptr;
  std::string body, response, retry_after;
  size_t index = 0;
  ~Transfer() {
    if (headers) curl_slist_free_all(headers);
    if (easy) curl_easy_cleanup(easy);
  }
};

struct Waiting {
  Clock::time_point not_before;
  size_t index;
  bool operator>(const Waiting& o) const { return not_before > o.not_before; }
};

}  // namespace

Endpoint make_endpoint(const TeacherConfig& cfg, const std::string& api_key) {
  Endpoint e;
  if (cfg.provider == "anthropic") {
    e.url = strip_slash(cfg.base_url.empty() ? "https://api.anthropic.com" : cfg.base_url) + "/v1/messages";
    if (!api_key.empty()) e.headers.push_back("x-api-key: " + api_key);
    e.headers.push_back("anthropic-version: 2023-06-01");
  } else if (cfg.provider == "openai" || cfg.provider == "local") {
    const std::string def = cfg.provider == "local" ? "http://127.0.0.1:8000" : "https://api.openai.com";
    e.url = strip_slash(cfg.base_url.empty() ? def : cfg.base_url) + "/v1/chat/completions";
    if (!api_key.empty()) e.headers.push_back("Authorization: Bearer " + api_key);
  } else {
    throw Error("teacher", fmt::format("unknown provider '{}'", cfg.provider), "use openai, anthropic or local");
  }
  e.headers.push_back("Content-Type: application/json");
  e.headers.push_back("Expect:");  // no 100-continue round trip for large prompts
  return e;
}

std::string make_request_body(const TeacherConfig& cfg, const std::string& system, const std::string& user) {
  json body = {{"model", cfg.model_name}, {"max_tokens", cfg.max_tokens}, {"temperature", cfg.temperature}};
  if (cfg.provider == "anthropic") {
    body["system"] = system;
    body["messages"] = json::array({{{"role", "user"}, {"content", user}}});
  } else {
    body["messages"] = json::array({{{"role", "system"}, {"content", system}}, {{"role", "user"}, {"content", user}}});
  }
  // A completion cut inside a multi-byte character must not abort scoring: invalid UTF-8 becomes U+FFFD.
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

void parse_response_body(const std::string& provider, const std::string& body, std::string* text,
                         int64_t* input_tokens, int64_t* output_tokens) {
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) throw Error("teacher", "response is not a JSON object");
  text->clear();
  *input_tokens = *output_tokens = 0;
  try {
    if (provider == "anthropic") {
      for (const auto& part : j.at("content"))
        if (part.value("type", "") == "text") *text += part.at("text").get<std::string>();
      if (j.contains("usage")) {
        *input_tokens = j["usage"].value("input_tokens", int64_t{0});
        *output_tokens = j["usage"].value("output_tokens", int64_t{0});
      }
    } else {
      const json& msg = j.at("choices").at(0).at("message");
      if (msg.contains("content") && msg["content"].is_string()) *text = msg["content"].get<std::string>();
      if (j.contains("usage") && j["usage"].is_object()) {
        *input_tokens = j["usage"].value("prompt_tokens", int64_t{0});
        *output_tokens = j["usage"].value("completion_tokens", int64_t{0});
      }
    }
  } catch (const json::exception& e) {
    throw Error("teacher", fmt::format("response lacks the {} answer fields ({})", provider, e.what()));
  }
}

ApiClient::ApiClient(TeacherConfig cfg)
    : cfg_(std::move(cfg)), limiter_(cfg_.requests_per_minute * cfg_.rate_window_s / 60.0,
                                     cfg_.tokens_per_minute * cfg_.rate_window_s / 60.0, cfg_.rate_window_s) {
  curl_global();
  if (!cfg_.api_key_env.empty()) {
    const char* v = std::getenv(cfg_.api_key_env.c_str());
    if (v && *v) api_key_ = v;
  }
  if (api_key_.empty() && cfg_.provider != "local")
    throw Error("teacher", fmt::format("environment variable '{}' (teacher.api_key_env) is not set", cfg_.api_key_env),
                "export the API key in that variable, or use provider: local for a server without keys");
  add_secret(api_key_);
  RLAIF_CHECK(cfg_.max_concurrency >= 1, "max_concurrency {}", cfg_.max_concurrency);
  make_endpoint(cfg_, "");  // validates the provider early
}

std::vector<ApiResult> ApiClient::run(const std::vector<ApiRequest>& requests) {
  const Endpoint ep = make_endpoint(cfg_, api_key_);
  std::vector<ApiResult> results(requests.size());
  std::vector<std::string> bodies(requests.size());
  std::vector<double> cost(requests.size());
  std::priority_queue<Waiting, std::vector<Waiting>, std::greater<>> waiting;
  const auto start = Clock::now();
  for (size_t i = 0; i < requests.size(); ++i) {
    results[i].id = requests[i].id;
    bodies[i] = make_request_body(cfg_, requests[i].system, requests[i].user);
    // Upper bound of what the request can consume: ~3 bytes per token in, max_tokens out.
    cost[i] = static_cast<double>(requests[i].system.size() + requests[i].user.size()) / 3.0 + 16 + cfg_.max_tokens;
    waiting.push({start, i});
  }
  std::mt19937_64 rng(std::random_device{}());

  CURLM* multi = curl_multi_init();
  if (!multi) throw Error("teacher", "curl_multi_init failed");
  std::map<CURL*, std::unique_ptr<Transfer>> active;
  auto cleanup = [&] {
    for (auto& [easy, t] : active) curl_multi_remove_handle(multi, easy);  // teardown: nothing to report
    active.clear();
    curl_multi_cleanup(multi);
  };

  auto start_transfer = [&](size_t i) {
    auto t = std::make_unique<Transfer>();
    t->index = i;
    t->body = bodies[i];
    t->easy = curl_easy_init();
    if (!t->easy) throw Error("teacher", "curl_easy_init failed");
    for (const auto& h : ep.headers) {
      curl_slist* n = curl_slist_append(t->headers, h.c_str());
      if (!n) throw Error("teacher", "curl_slist_append failed");
      t->headers = n;
    }
    CURL* e = t->easy;
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_URL, ep.url.c_str()));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_POSTFIELDS, t->body.c_str()));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(t->body.size())));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_WRITEDATA, &t->response));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_HEADERDATA, &t->retry_after));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, static_cast<long>(cfg_.timeout_s * 1000)));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(std::min(cfg_.timeout_s, 30.0) * 1000)));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, ""));
    RLAIF_CURL(curl_easy_setopt(e, CURLOPT_PRIVATE, t.get()));
    RLAIF_CURLM(curl_multi_add_handle(multi, e));
    active.emplace(e, std::move(t));
    results[i].attempts++;
    stats_.calls++;
    stats_.max_in_flight = std::max(stats_.max_in_flight, static_cast<int>(active.size()));
  };

  // Either schedules a retry or records the final failure.
  auto fail_attempt = [&](size_t i, FailureKind kind, const std::string& msg, double retry_after_s) {
    ApiResult& r = results[i];
    stats_.faults[failure_kind_name(kind)]++;
    r.failure = kind;
    r.message = redact(msg);
    if (r.attempts > cfg_.max_retries) {
      stats_.failed++;
      stats_.failures[failure_kind_name(kind)]++;
      log_warn("[teacher] request '{}' failed after {} attempts: {}", r.id, r.attempts, r.message);
      return;
    }
    const double cap = std::min(cfg_.backoff_max_s, cfg_.backoff_base_s * std::pow(2.0, r.attempts - 1));
    double delay = std::uniform_real_distribution<double>(0.5 * cap, cap)(rng);  // jitter spreads the herd
    if (retry_after_s >= 0) delay = std::max(delay, retry_after_s);
    log_debug("[teacher] request '{}' attempt {}: {}; retry in {:.2f}s", r.id, r.attempts, r.message, delay);
    waiting.push({Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(delay)), i});
  };

  auto finish = [&](Transfer& t, CURLcode code) {
    const size_t i = t.index;
    ApiResult& r = results[i];
    if (code != CURLE_OK) {
      const FailureKind kind = code == CURLE_OPERATION_TIMEDOUT ? FailureKind::kTimeout : FailureKind::kConnection;
      fail_attempt(i, kind, fmt::format("curl: {}", curl_easy_strerror(code)), -1);
      return;
    }
    long status = 0;
    RLAIF_CURL(curl_easy_getinfo(t.easy, CURLINFO_RESPONSE_CODE, &status));
    const std::string snippet = t.response.substr(0, 300);
    if (status == 429 || status == 408 || status >= 500) {
      fail_attempt(i, status == 429 ? FailureKind::kRateLimited : FailureKind::kServerError,
                   fmt::format("HTTP {}", status), parse_retry_after(t.retry_after));
      return;
    }
    if (status != 200) {
      const bool auth = status == 401 || status == 403;
      throw Error("teacher",
                  redact(fmt::format("HTTP {} from {} ({}): {}", status, ep.url,
                                     auth ? "authentication failed" : "request rejected", snippet)),
                  auth ? fmt::format("check the key in ${} and teacher.provider", cfg_.api_key_env)
                       : "check teacher.model_name, max_tokens and base_url");
    }
    int64_t in = 0, out = 0;
    try {
      parse_response_body(cfg_.provider, t.response, &r.text, &in, &out);
    } catch (const Error& e) {
      fail_attempt(i, FailureKind::kMalformedResponse, e.what(), -1);
      return;
    }
    stats_.input_tokens += in;
    stats_.output_tokens += out;
    r.input_tokens += in;
    r.output_tokens += out;
    if (requests[i].validate) {
      const std::string why = requests[i].validate(r.text);
      if (!why.empty()) {
        fail_attempt(i, FailureKind::kUnparseableAnswer, "answer unusable: " + why, -1);
        return;
      }
    }
    r.ok = true;
    r.failure = FailureKind::kNone;
    r.message.clear();
    stats_.succeeded++;
  };

  try {
    while (!waiting.empty() || !active.empty()) {
      auto now = Clock::now();
      Clock::time_point wake = now + std::chrono::milliseconds(200);
      while (static_cast<int>(active.size()) < cfg_.max_concurrency && !waiting.empty()) {
        const Waiting w = waiting.top();
        if (w.not_before > now) {
          wake = std::min(wake, w.not_before);
          break;
        }
        const auto allowed = limiter_.next_allowed(cost[w.index], now);
        if (allowed > now) {
          wake = std::min(wake, allowed);
          break;
        }
        waiting.pop();
        limiter_.record(cost[w.index], now);
        start_transfer(w.index);
      }
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wake - now).count();
      int running = 0;
      RLAIF_CURLM(curl_multi_perform(multi, &running));
      RLAIF_CURLM(curl_multi_poll(multi, nullptr, 0, static_cast<int>(std::clamp<int64_t>(ms, 0, 200)), nullptr));
      RLAIF_CURLM(curl_multi_perform(multi, &running));
      int left = 0;
      while (CURLMsg* m = curl_multi_info_read(multi, &left)) {
        if (m->msg != CURLMSG_DONE) continue;
        const CURLcode code = m->data.result;  // read before remove_handle invalidates the message
        auto it = active.find(m->easy_handle);
        RLAIF_CHECK(it != active.end(), "finished transfer not in the active set");
        std::unique_ptr<Transfer> t = std::move(it->second);
        active.erase(it);
        RLAIF_CURLM(curl_multi_remove_handle(multi, t->easy));
        finish(*t, code);
      }
    }
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
  return results;
}

}  // namespace rlaif::teacher
