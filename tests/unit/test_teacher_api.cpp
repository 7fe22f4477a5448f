// Teacher API clients against a fault-injecting local server (test_teacher_fake_server.h): every sample scored
// exactly once with the reward the server meant, faults retried or counted, concurrency and rate limits held,
// the cache never paying twice, and the API key never leaking.
#include <gtest/gtest.h>

#include <sqlite3.h>

#include <cstdlib>
#include <fstream>
#include <set>

#include "core/error.h"
#include "core/logging.h"
#include "teacher/scorer.h"
#include "test_teacher_fake_server.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;
using namespace rlaif::teacher;
using rlaif::test::FakeTeacher;
using rlaif::test::Fault;

namespace {

constexpr const char* kKeyEnv = "RLAIF_TEST_TEACHER_KEY";
constexpr const char* kKey = "sk-test-5ecret-Zq81x";
// No rubric keyword appears here, so the weights stay at the original's 0.3/0.3/0.2/0.2.
constexpr const char* kPrompt = "Write a function f that returns its argument unchanged.";

TeacherConfig config_for(FakeTeacher& server, const std::string& provider) {
  ::setenv(kKeyEnv, kKey, 1);
  server.key = kKey;
  TeacherConfig c;
  c.provider = provider;
  c.model_name = "fake-judge";
  c.api_key_env = kKeyEnv;
  c.base_url = server.base_url();
  c.max_concurrency = 8;
  c.requests_per_minute = 0;
  c.tokens_per_minute = 0;
  c.timeout_s = 0.5;
  c.max_retries = 4;
  c.backoff_base_s = 0.01;
  c.backoff_max_s = 0.1;
  c.max_tokens = 64;
  c.cache_path = "";
  c.mode = ScoringMode::kAbsolute;
  c.verifiers.syntax = false;
  c.verifiers.tests = false;
  return c;
}

std::vector<ScoreRequest> rows(int n, const std::string& prompt = kPrompt, const std::string& lang = "python",
                               int first = 0) {
  std::vector<ScoreRequest> out;
  for (int i = first; i < first + n; ++i)
    out.push_back({fmt::format("s{}", i), prompt, fmt::format("def f(x):\n    return x  # sample-id: {}\n", i), lang});
  return out;
}

// The reward the server meant: the rubric's weighted sum of its intended scores, clamped like any answer.
double expected(int id, const std::array<double, 4>& w = {0.3, 0.3, 0.2, 0.2}, bool clamp_case = false) {
  auto d = test::intended_dims(id);
  if (clamp_case) d[0] = 1.0, d[1] = 0.0;
  return w[0] * d[0] + w[1] * d[1] + w[2] * d[2] + w[3] * d[3];
}

int id_of(const std::string& sid) { return std::stoi(sid.substr(1)); }

// Faults for the first three attempts of each sample; poison samples never get a usable answer.
Fault fault_plan(int id, int attempt) {
  if (id % 97 == 13) return Fault::kNoScores;
  if (attempt >= 3) return Fault::kNone;
  const int h = (id * 7919 + attempt * 104729) % 100;
  if (h < 10) return attempt == 0 ? Fault::k429RetryAfter : Fault::k429;
  if (h < 30) return Fault::k429;
  if (h < 33) return Fault::k500;
  if (h < 36) return Fault::k503;
  if (h < 38) return Fault::kDelay;
  if (h < 41) return Fault::kDrop;
  if (h < 44) return Fault::kMalformed;
  if (h < 54) return Fault::kProse;
  if (h < 61) return Fault::kFence;
  return Fault::kNone;
}

void fault_suite(const std::string& provider, int n) {
  FakeTeacher server;
  server.fault = fault_plan;
  server.clamp_id = [](int id) { return id % 10 == 3; };
  server.latency_s = [](int) { return 0.03; };  // long enough for answers to overlap up to the limit
  Scorer scorer(config_for(server, provider));
  auto input = rows(n);
  std::reverse(input.begin(), input.end());  // answers arrive in another order than asked anyway
  const auto results = scorer.score(input);
  ASSERT_EQ(results.size(), input.size());

  int poison = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const ScoreResult& r = results[i];
    ASSERT_EQ(r.id, input[i].id);
    const int id = id_of(r.id);
    if (id % 97 == 13) {
      ++poison;
      EXPECT_FALSE(r.reward.has_value()) << r.id;
      EXPECT_NE(r.failure.find("unparseable_answer"), std::string::npos) << r.failure;
      continue;
    }
    ASSERT_TRUE(r.reward.has_value()) << r.id << ": " << r.failure;
    EXPECT_NEAR(*r.reward, expected(id, {0.3, 0.3, 0.2, 0.2}, id % 10 == 3), 1e-12) << r.id;
  }

  // Exactly one usable answer per sample on the server's side; poison samples got 1 + max_retries tries.
  const auto faults = server.attempt_faults();
  const auto times = server.attempt_times();
  std::map<Fault, int> seen;
  ASSERT_EQ(static_cast<int>(faults.size()), n);
  for (const auto& [id, fs] : faults) {
    int usable = 0;
    for (Fault f : fs) {
      seen[f]++;
      usable += f == Fault::kNone || f == Fault::kProse || f == Fault::kFence;
    }
    if (id % 97 == 13) EXPECT_EQ(fs.size(), 5u) << id;
    else EXPECT_EQ(usable, 1) << "sample " << id << " answered " << usable << " times";
    for (size_t k = 0; k + 1 < fs.size(); ++k)
      if (fs[k] == Fault::k429RetryAfter)
        EXPECT_GE(times.at(id)[k + 1] - times.at(id)[k], 1.0) << "Retry-After: 1 not honoured for " << id;
  }
  EXPECT_GT(seen[Fault::k429RetryAfter], 0);
  EXPECT_GT(seen[Fault::kDelay], 0);
  EXPECT_GT(seen[Fault::kDrop], 0);

  // Every fault counted by kind, every failure reported.
  const ScoringStats& st = scorer.step_stats();
  EXPECT_EQ(st.samples, n);
  EXPECT_EQ(st.unscored, poison);
  EXPECT_EQ(st.rewarded, n - poison);
  EXPECT_EQ(st.api.failures.at("unparseable_answer"), poison);
  EXPECT_EQ(st.api.faults.at("rate_limited"), seen[Fault::k429] + seen[Fault::k429RetryAfter]);
  EXPECT_EQ(st.api.faults.at("server_error"), seen[Fault::k500] + seen[Fault::k503]);
  // A request can also time out or lose its connection before the server sees it (a loaded machine, a
  // keep-alive connection closing): every request the server missed must be counted as one of those.
  const int64_t unseen_timeouts = st.api.faults.at("timeout") - seen[Fault::kDelay];
  const int64_t unseen_drops = st.api.faults.count("connection") ? st.api.faults.at("connection") - seen[Fault::kDrop] : -1;
  EXPECT_GE(unseen_timeouts, 0);
  EXPECT_GE(unseen_drops, 0);
  EXPECT_EQ(st.api.calls - server.calls(), unseen_timeouts + unseen_drops);
  EXPECT_LE(st.api.calls - server.calls(), n / 50) << "the fake server should see nearly every request";
  EXPECT_EQ(st.api.faults.at("malformed_response"), seen[Fault::kMalformed]);
  EXPECT_EQ(st.api.faults.at("unparseable_answer"), seen[Fault::kNoScores]);

  // In flight, as the server measured it: reached the limit, never above it.
  EXPECT_EQ(server.max_in_flight(), 8);
  EXPECT_LE(st.api.max_in_flight, 8);
}

// Largest count and token sum the server saw in any window of `window` seconds.
std::pair<int, double> worst_window(const std::vector<FakeTeacher::Arrival>& a, double window) {
  int worst_n = 0;
  double worst_tokens = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    int n = 0;
    double tok = 0;
    for (size_t j = 0; j < a.size(); ++j)
      if (a[j].t >= a[i].t && a[j].t < a[i].t + window) ++n, tok += a[j].tokens;
    worst_n = std::max(worst_n, n);
    worst_tokens = std::max(worst_tokens, tok);
  }
  return {worst_n, worst_tokens};
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST(TeacherApi, OpenAiThousandSamplesUnderFaultsScoredExactlyOnce) { fault_suite("openai", 1000); }

TEST(TeacherApi, AnthropicSchemaUnderFaults) { fault_suite("anthropic", 300); }

TEST(TeacherApi, RequestsPerMinuteNeverExceeded) {
  FakeTeacher server;
  TeacherConfig c = config_for(server, "openai");
  c.rate_window_s = 0.5;
  c.requests_per_minute = 6 * 60 / 0.5;  // 6 per half-second window
  Scorer scorer(c);
  const auto t0 = std::chrono::steady_clock::now();
  const auto res = scorer.score(rows(24));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const auto& r : res) ASSERT_TRUE(r.reward) << r.failure;
  const auto [n, tok] = worst_window(server.arrivals(), 0.5);
  EXPECT_LE(n, 6);
  EXPECT_EQ(n, 6) << "the limit should bind";
  EXPECT_GE(took, 1.5) << "24 requests at 6 per 0.5 s need at least three windows";
}

TEST(TeacherApi, TokensPerMinuteNeverExceeded) {
  FakeTeacher server;
  server.reported_completion_tokens = 64;  // the server bills the worst case, like a long answer would
  TeacherConfig c = config_for(server, "anthropic");
  c.rate_window_s = 0.5;
  c.tokens_per_minute = 1000 * 60 / 0.5;  // 1000 tokens per half-second window: ~3 requests
  Scorer scorer(c);
  const auto res = scorer.score(rows(15));
  for (const auto& r : res) ASSERT_TRUE(r.reward) << r.failure;
  const auto arrivals = server.arrivals();
  const auto [n, tok] = worst_window(arrivals, 0.5);
  EXPECT_LE(tok, 1000.0);
  EXPECT_GE(tok + arrivals[0].tokens, 1000.0) << "the limit should bind";
  EXPECT_GE(arrivals.back().t - arrivals.front().t, 1.5);
}

TEST(TeacherApi, CacheSecondRunMakesNoCallsAndExpiredEntriesAreRefetched) {
  FakeTeacher server;
  const fs::path dir = test::temp_dir("teacher_cache");
  TeacherConfig c = config_for(server, "openai");
  c.cache_path = (dir / "cache.sqlite").string();
  c.teacher_score_cache_max_age_seconds = 3600;
  const auto input = rows(40);
  std::vector<double> first;
  {
    Scorer s(c);
    for (const auto& r : s.score(input)) first.push_back(r.reward.value());
  }
  EXPECT_EQ(server.calls(), 40);
  {
    Scorer s(c);
    const auto again = s.score(input);
    EXPECT_EQ(server.calls(), 40) << "a rerun must not pay twice";
    EXPECT_EQ(s.step_stats().cache_hits, 40);
    EXPECT_DOUBLE_EQ(s.step_stats().cache_hit_rate(), 1.0);
    for (size_t i = 0; i < again.size(); ++i) {
      EXPECT_EQ(again[i].reward.value(), first[i]);
      EXPECT_TRUE(again[i].cache_hit);
    }
  }
  // Age a quarter of the entries past the TTL, straight in the database.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(c.cache_path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE entries SET created_at = created_at - 7200 WHERE rowid % 4 = 0", nullptr, nullptr,
                         nullptr), SQLITE_OK);
  const int aged = sqlite3_changes(db);
  sqlite3_close(db);
  ASSERT_GT(aged, 0);
  Scorer s(c);
  const auto third = s.score(input);
  EXPECT_EQ(server.calls(), 40 + aged);
  EXPECT_EQ(s.step_stats().cache_hits, 40 - aged);
  for (size_t i = 0; i < third.size(); ++i) EXPECT_EQ(third[i].reward.value(), first[i]);
}

TEST(TeacherApi, RelativeModeReferenceOnceRewardIsRatioAndFailedReferenceNeverCached) {
  FakeTeacher server;
  const fs::path dir = test::temp_dir("teacher_relative");
  TeacherConfig c = config_for(server, "openai");
  c.mode = ScoringMode::kRelative;
  c.cache_path = (dir / "cache.sqlite").string();
  c.max_retries = 2;
  // Prompt 3's reference fails on the first run (every attempt 503).
  bool fail_third = true;
  server.reference_fault = [&](const std::string& user, int) {
    return fail_third && user.find("ref-id: 7003") != std::string::npos ? Fault::k503 : Fault::kNone;
  };
  std::vector<ScoreRequest> input;
  const std::vector<std::string> langs = {"python", "c++", "rust", "python"};
  for (int p = 0; p < 4; ++p) {
    const std::string prompt = fmt::format("Task {}: print a number. ref-id: {}", p, 7000 + p);
    for (int k = 0; k < 4; ++k) {
      const int id = 10 * p + k;
      const std::string code = langs[p] == "python" ? fmt::format("print(1)  # sample-id: {}", id)
                                                    : fmt::format("fn main() {{ let x = 1; }} // sample-id: {}", id);
      input.push_back({fmt::format("s{}", id), prompt, code, langs[p]});
    }
  }
  Scorer scorer(c);
  auto res = scorer.score(input);
  EXPECT_EQ(server.reference_calls(), 3 + 3) << "one reference per prompt; the failing one tried 1 + max_retries";
  const std::map<std::string, double> mult = {{"python", 1.0}, {"c++", 1.10}, {"rust", 1.15}};
  for (size_t i = 0; i < res.size(); ++i) {
    const int p = static_cast<int>(i / 4);
    if (p == 3) {
      EXPECT_FALSE(res[i].reward) << "no reward without a reference";
      EXPECT_NE(res[i].failure.find("reference solution failed"), std::string::npos) << res[i].failure;
      continue;
    }
    ASSERT_TRUE(res[i].reward) << res[i].failure;
    const double want = mult.at(langs[p]) * expected(id_of(res[i].id)) / (expected(7000 + p) + 1e-6);
    EXPECT_NEAR(*res[i].reward, want, 1e-9) << res[i].id;
  }
  // Second run: references and scores come from the cache; the failed reference is asked for again.
  fail_third = false;
  const int calls_before = server.calls();
  Scorer again(c);
  res = again.score(input);
  EXPECT_EQ(server.reference_calls(), 7);
  EXPECT_EQ(server.calls() - calls_before, 1 + 1 + 4) << "the new reference, its score and its 4 samples only";
  for (size_t i = 12; i < 16; ++i) {
    ASSERT_TRUE(res[i].reward) << res[i].failure;
    EXPECT_NEAR(*res[i].reward, expected(id_of(res[i].id)) / (expected(7003) + 1e-6), 1e-9);
  }
}

TEST(TeacherApi, BatchedRankedScoresEachPromptInOneCall) {
  FakeTeacher server;
  TeacherConfig c = config_for(server, "anthropic");
  c.mode = ScoringMode::kBatchedRanked;
  auto input = rows(5, "Prompt A, print a value.");
  for (auto& r : rows(5, "Prompt B, print another value.", "python", 100)) input.push_back(r);
  Scorer scorer(c);
  const auto res = scorer.score(input);
  EXPECT_EQ(server.calls(), 2);
  for (const auto& r : res) {
    ASSERT_TRUE(r.reward) << r.failure;
    EXPECT_NEAR(*r.reward, expected(id_of(r.id)), 1e-12) << r.id;
  }
}

TEST(TeacherApi, PromptDifficultyAdaptsWeights) {
  FakeTeacher server;
  Scorer scorer(config_for(server, "openai"));
  // Two efficiency keywords: efficiency weight 0.2 * 1.5, then renormalized (sum 1.1).
  const auto res = scorer.score(rows(3, "Write an efficient f with good performance."));
  for (const auto& r : res) {
    const auto d = test::intended_dims(id_of(r.id));
    const double want = (0.3 * d[0] + 0.3 * d[1] + 0.3 * d[2] + 0.2 * d[3]) / 1.1;
    EXPECT_NEAR(r.reward.value(), want, 1e-12);
  }
}

TEST(TeacherApi, AuthenticationErrorStopsWithClearReason) {
  FakeTeacher server;
  const TeacherConfig c = config_for(server, "openai");
  server.key = "a-different-key";
  Scorer scorer(c);
  try {
    scorer.score(rows(20));
    FAIL() << "no error on 401";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("401"), std::string::npos) << m;
    EXPECT_NE(m.find("authentication failed"), std::string::npos) << m;
    EXPECT_NE(m.find(kKeyEnv), std::string::npos) << "names the variable to fix: " << m;
  }
  EXPECT_LE(server.calls(), 8) << "stops at once, not after retrying every sample";
}

TEST(TeacherApi, MissingKeyIsAnErrorNamingTheVariable) {
  FakeTeacher server;
  TeacherConfig c = config_for(server, "openai");
  c.api_key_env = "RLAIF_TEST_NO_SUCH_KEY_VAR";
  ::unsetenv("RLAIF_TEST_NO_SUCH_KEY_VAR");
  EXPECT_THROW(
      {
        try {
          Scorer s(c);
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("RLAIF_TEST_NO_SUCH_KEY_VAR"), std::string::npos);
          throw;
        }
      },
      Error);
}

TEST(TeacherApi, ApiKeyAppearsInNoLogErrorCacheOrOutput) {
  FakeTeacher server;
  const fs::path dir = test::temp_dir("teacher_secret");
  for (const std::string provider : {"openai", "anthropic"}) {
    server.fault = [](int id, int attempt) { return attempt == 0 && id % 3 == 0 ? Fault::k500 : Fault::kNone; };
    TeacherConfig c = config_for(server, provider);
    c.cache_path = (dir / (provider + ".sqlite")).string();
    c.mode = ScoringMode::kRelative;
    set_log_level(LogLevel::kDebug);
    testing::internal::CaptureStderr();
    std::string outputs, error;
    {
      Scorer s(c);
      const int first = provider == "openai" ? 0 : 1000;  // fresh ids: the server's attempt counts are per id
      for (const auto& r : s.score(rows(12, kPrompt, "python", first))) outputs += r.to_json().dump() + "\n";
      outputs += s.run_stats().to_json().dump();
      server.fault = [](int, int) { return Fault::kEchoKey400; };  // a server that echoes the key back
      try {
        s.score(rows(3, kPrompt, "python", 500));
      } catch (const Error& e) {
        error = e.what();
      }
    }
    const std::string logs = testing::internal::GetCapturedStderr();
    set_log_level(LogLevel::kInfo);
    ASSERT_FALSE(error.empty());
    EXPECT_NE(error.find("400"), std::string::npos) << error;
    EXPECT_NE(logs.find("retry"), std::string::npos) << "debug logs were written: " << logs.substr(0, 500);
    std::string cache;
    for (const auto& e : fs::directory_iterator(dir)) cache += slurp(e.path());
    for (const std::string* where : std::vector<const std::string*>{&logs, &error, &outputs, &cache})
      EXPECT_EQ(where->find(kKey), std::string::npos) << "key leaked";
    EXPECT_FALSE(cache.empty());
  }
}
