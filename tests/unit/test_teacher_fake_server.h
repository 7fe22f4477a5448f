// A fake teacher API for tests: cpp-httplib on 127.0.0.1 (random port) speaking the OpenAI and Anthropic schemas.
// The score it means for a sample is a pure function of the sample id written in the completion, so a test can
// check every reward independently; faults (429, 5xx, timeouts, dropped connections, bad JSON) are injected per
// (sample id, attempt) and every arrival is recorded for the rate-limit and concurrency checks. A model's own
// completions carry no id: `id_of_completion` gives them one from their text (e2e tests of `rlaif train`).
#pragma once

#include <httplib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace rlaif::test {

enum class Fault { kNone, k429, k429RetryAfter, k500, k503, kDelay, kDrop, kMalformed, kProse, kFence, kNoScores,
                   kClamp, kEchoKey400 };

// Scores the server means for a sample id (the test recomputes them independently of the client).
inline std::array<double, 4> intended_dims(int id) {
  return {(id * 37 % 101) / 100.0, (id * 53 % 101) / 100.0, (id * 71 % 101) / 100.0, (id * 89 % 101) / 100.0};
}

// The completion a scoring prompt asks about (rubric.cpp's "Response to score:\n```<lang>\n...\n```\n\nAnswer ...").
inline std::string judged_completion(const std::string& user) {
  const auto open = user.find("Response to score:\n```");
  if (open == std::string::npos) return "<unparsed>";
  const auto start = user.find('\n', open + 20) + 1;
  const auto end = user.rfind("\n```\n\nAnswer with the JSON scores only.");
  if (end == std::string::npos || end < start) return "<unparsed>";
  return user.substr(start, end - start);
}

class FakeTeacher {
 public:
  struct Arrival {
    double t;      // seconds since server start (steady clock)
    double tokens; // usage it reported: prompt + completion tokens
    std::string path;
  };
  std::function<Fault(int id, int attempt)> fault = [](int, int) { return Fault::kNone; };
  std::function<Fault(const std::string& prompt, int attempt)> reference_fault = [](const std::string&, int) {
    return Fault::kNone;
  };
  std::string key = "sk-test-key";
  double delay_s = 0.8;            // kDelay sleeps this long
  double client_timeout_s = 0.5;   // for the in-flight count: a delayed request stops counting before this
  std::function<double(int id)> latency_s = [](int) { return 0.005; };
  int reported_completion_tokens = 20;
  std::function<bool(int id)> clamp_id = [](int) { return false; };  // answers 1.7 and -0.4 for this id
  // For a completion without "sample-id: N": its id from its text (unset: such requests get id-free defaults).
  std::function<std::optional<int>(const std::string& completion)> id_of_completion;
  bool uniform_dims = false;  // every dimension answers intended_dims(id)[0], so any weighted score equals it

  FakeTeacher() {
    // Idle keep-alive connections hold a pool thread each: a big pool and a short keep-alive keep new
    // connections from queueing unseen (which the client would count as a timeout the server never saw).
    server_.new_task_queue = [] { return new httplib::ThreadPool(128); };
    server_.set_keep_alive_timeout(1);
    server_.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) { handle(q, r, false); });
    server_.Post("/v1/messages", [this](const httplib::Request& q, httplib::Response& r) { handle(q, r, true); });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeTeacher() {
    server_.stop();
    thread_.join();
  }
  std::string base_url() const { return fmt::format("http://127.0.0.1:{}", port_); }
  int max_in_flight() const { return max_in_flight_; }
  int calls() const { return calls_; }
  std::vector<Arrival> arrivals() {
    std::lock_guard<std::mutex> l(m_);
    return arrivals_;
  }
  std::map<int, std::vector<double>> attempt_times() {
    std::lock_guard<std::mutex> l(m_);
    return attempt_times_;
  }
  std::map<int, std::vector<Fault>> attempt_faults() {
    std::lock_guard<std::mutex> l(m_);
    return attempt_faults_;
  }
  int reference_calls() const { return reference_calls_; }
  // True when some scoring request was answered before one that arrived earlier.
  bool answered_out_of_order() {
    std::lock_guard<std::mutex> l(m_);
    return !std::is_sorted(answer_order_.begin(), answer_order_.end());
  }
  std::vector<std::string> bodies() {
    std::lock_guard<std::mutex> l(m_);
    return bodies_;
  }

 private:
  double now() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }

  std::string dims_json(int id, bool clamp_test) const {
    auto d = intended_dims(id);
    if (uniform_dims) d = {d[0], d[0], d[0], d[0]};
    if (clamp_test) return fmt::format(R"({{"correctness": 1.7, "code_quality": -0.4, "efficiency": {}, "documentation": {}}})", d[2], d[3]);
    return fmt::format(R"({{"correctness": {}, "code_quality": {}, "efficiency": {}, "documentation": {}}})", d[0], d[1], d[2], d[3]);
  }

  void reply(httplib::Response& r, bool anthropic, const std::string& text, double in_tokens) {
    nlohmann::json j;
    if (anthropic)
      j = {{"content", {{{"type", "text"}, {"text", text}}}},
           {"usage", {{"input_tokens", in_tokens}, {"output_tokens", reported_completion_tokens}}}};
    else
      j = {{"choices", {{{"message", {{"role", "assistant"}, {"content", text}}}}}},
           {"usage", {{"prompt_tokens", in_tokens}, {"completion_tokens", reported_completion_tokens}}}};
    r.set_content(j.dump(), "application/json");
  }

  void handle(const httplib::Request& q, httplib::Response& r, bool anthropic) {
    const int now_in = ++in_flight_;
    int prev = max_in_flight_.load();
    while (now_in > prev && !max_in_flight_.compare_exchange_weak(prev, now_in)) {
    }
    bool counted = true;
    auto leave = [&] {
      if (counted) --in_flight_;
      counted = false;
    };
    const int arrival = calls_++;
    const double t = now();
    const bool auth_ok = anthropic ? (q.get_header_value("x-api-key") == key &&
                                      q.get_header_value("anthropic-version") == "2023-06-01")
                                   : q.get_header_value("Authorization") == "Bearer " + key;
    if (!auth_ok) {
      r.status = 401;
      r.set_content(R"({"error": {"message": "invalid api key"}})", "application/json");
      leave();
      return;
    }
    const auto body = nlohmann::json::parse(q.body);
    std::string system, user;
    if (anthropic) {
      system = body.at("system");
      user = body.at("messages").at(0).at("content");
    } else {
      system = body.at("messages").at(0).at("content");
      user = body.at("messages").at(1).at("content");
    }
    const double in_tokens = static_cast<double>(system.size() + user.size()) / 3.0;
    {
      std::lock_guard<std::mutex> l(m_);
      arrivals_.push_back({t, in_tokens + reported_completion_tokens, q.path});
      bodies_.push_back(q.body);
    }
    static const std::regex kId(R"(sample-id: (\d+))");
    std::vector<int> ids;
    for (auto it = std::sregex_iterator(user.begin(), user.end(), kId); it != std::sregex_iterator(); ++it)
      ids.push_back(std::stoi((*it)[1].str()));
    const bool reference = system.find("expert programmer") != std::string::npos;
    if (ids.empty() && !reference && id_of_completion)
      if (const auto id = id_of_completion(judged_completion(user))) ids.push_back(*id);
    Fault f = Fault::kNone;
    if (reference) {
      int attempt;
      {
        std::lock_guard<std::mutex> l(m_);
        attempt = reference_attempts_[user]++;
      }
      ++reference_calls_;
      f = reference_fault(user, attempt);
    } else if (!ids.empty()) {
      std::lock_guard<std::mutex> l(m_);
      const int attempt = static_cast<int>(attempt_times_[ids[0]].size());
      attempt_times_[ids[0]].push_back(t);
      f = fault(ids[0], attempt);
      attempt_faults_[ids[0]].push_back(f);
    }
    const double lat = ids.empty() ? 0.005 : latency_s(ids[0]);
    switch (f) {
      case Fault::k429:
      case Fault::k429RetryAfter:
        if (f == Fault::k429RetryAfter) r.set_header("Retry-After", "1");
        r.status = 429;
        r.set_content(R"({"error": "rate limited"})", "application/json");
        leave();
        return;
      case Fault::k500:
      case Fault::k503:
        r.status = f == Fault::k500 ? 500 : 503;
        r.set_content("oops", "text/plain");
        leave();
        return;
      case Fault::kDelay:
        // Stops counting as in flight just before the client's timeout fires (it has then given up on it).
        std::this_thread::sleep_for(std::chrono::duration<double>(client_timeout_s - 0.03));
        leave();
        std::this_thread::sleep_for(std::chrono::duration<double>(delay_s - client_timeout_s + 0.03));
        r.status = 200;
        r.set_content("{}", "application/json");
        return;
      case Fault::kDrop:
        leave();
        r.set_content_provider(1000, "application/json", [](size_t, size_t, httplib::DataSink& sink) {
          sink.write("{\"choi", 6);
          return false;  // closes the connection mid-body
        });
        return;
      case Fault::kEchoKey400:
        r.status = 400;
        r.set_content("bad request from " + q.get_header_value(anthropic ? "x-api-key" : "Authorization"), "text/plain");
        leave();
        return;
      case Fault::kMalformed:
        leave();
        r.set_content("{\"choices\": [ {\"message\": ", "application/json");
        return;
      default:
        break;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(lat));
    std::string text;
    if (reference) {
      // The reference solution carries an id derived from the prompt, so its scores are known too.
      static const std::regex kRef(R"(ref-id: (\d+))");
      std::smatch m;
      const int ref = std::regex_search(user, m, kRef) ? std::stoi(m[1].str()) : 5000;
      text = fmt::format("Here you go:\n```python\ndef solve():\n    return 42  # sample-id: {}\n```\n", ref);
    } else if (user.find("### Response") != std::string::npos) {
      nlohmann::json arr = nlohmann::json::array();
      for (size_t k = 0; k < ids.size(); ++k) {
        auto e = nlohmann::json::parse(dims_json(ids[k], false));
        e["index"] = k;
        arr.push_back(e);
      }
      std::reverse(arr.begin(), arr.end());  // ranked order differs from the question's order
      text = "Ranking:\n" + nlohmann::json{{"scores", arr}}.dump();
    } else {
      const int id = ids.empty() ? 0 : ids[0];
      const std::string js = dims_json(id, f == Fault::kClamp || clamp_id(id));
      if (f == Fault::kProse) text = "Sure! Here is my assessment {of the code}:\n" + js + "\nHope that helps.";
      else if (f == Fault::kFence) text = "```json\n" + js + "\n```";
      else if (f == Fault::kNoScores) text = "I cannot score this. {\"note\": \"no\"}";
      else text = js;
    }
    reply(r, anthropic, text, in_tokens);
    {
      std::lock_guard<std::mutex> l(m_);
      answer_order_.push_back(arrival);
    }
    leave();
  }

  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  const std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  std::atomic<int> in_flight_{0}, max_in_flight_{0}, calls_{0}, reference_calls_{0};
  std::mutex m_;
  std::vector<Arrival> arrivals_;
  std::vector<std::string> bodies_;
  std::map<int, std::vector<double>> attempt_times_;
  std::map<int, std::vector<Fault>> attempt_faults_;
  std::map<std::string, int> reference_attempts_;
  std::vector<int> answer_order_;  // arrival index of each answered request, in answer order
};

}  // namespace rlaif::test
