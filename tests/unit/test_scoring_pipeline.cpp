// teacher::ScoringPipeline against the fake teacher (test_teacher_fake_server.h): batches submitted while earlier
// ones are being scored come back each in its own rows' order with the server's intended scores, the stats cover
// every call of the step, a scorer exception reaches finish(), and a pipeline dropped unfinished shuts down cleanly.
// Also the run config's rlaif.overlap_scoring key.
#include <gtest/gtest.h>

#include <thread>

#include "core/error.h"
#include "rl/config.h"
#include "teacher/scoring_pipeline.h"
#include "test_teacher_fake_server.h"

using namespace rlaif;
using namespace rlaif::teacher;

namespace {

constexpr const char* kKeyEnv = "RLAIF_TEST_PIPELINE_KEY";

// Teacher tier only, uniform answers: a sample's reward is intended_dims(id)[0] whatever the rubric weights.
TeacherConfig judge_config(test::FakeTeacher& server) {
  ::setenv(kKeyEnv, server.key.c_str(), 1);
  server.uniform_dims = true;
  TeacherConfig c;
  c.api_key_env = kKeyEnv;
  c.base_url = server.base_url();
  c.cache_path = "";
  c.mode = ScoringMode::kAbsolute;
  c.verifiers.heuristic = c.verifiers.syntax = c.verifiers.tests = c.verifiers.exact_answer = false;
  c.verifiers.teacher = true;
  return c;
}

// One prompt's samples, ids first..first+n-1 (written into the completion, where the server reads them).
std::vector<ScoreRequest> group(int first, int n) {
  std::vector<ScoreRequest> out;
  for (int i = first; i < first + n; ++i)
    out.push_back({fmt::format("g:{}", i), fmt::format("Name thing number {}.", first),
                   fmt::format("A thing. sample-id: {}", i), ""});
  return out;
}

void wait_for_calls(test::FakeTeacher& server, int n) {
  for (int i = 0; i < 3000 && server.calls() < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_GE(server.calls(), n);
}

}  // namespace

TEST(ScoringPipeline, BatchesComeBackInOrderWithTheirOwnScores) {
  test::FakeTeacher server;
  // Later ids answer first within a batch; the first batch is slow, so the next two queue behind it.
  server.latency_s = [](int id) { return id < 10 ? 0.4 - id * 0.02 : (40 - id) * 0.004; };
  Scorer scorer(judge_config(server));
  ScoringPipeline p(scorer);
  EXPECT_EQ(p.submit(group(0, 4)), 0u);
  wait_for_calls(server, 4);  // the worker has the first batch: the next ones make a second call
  EXPECT_EQ(p.submit(group(10, 4)), 1u);
  EXPECT_EQ(p.submit(group(20, 3)), 2u);
  const auto results = p.finish();
  ASSERT_EQ(results.size(), 3u);
  const int firsts[] = {0, 10, 20};
  for (size_t b = 0; b < 3; ++b) {
    ASSERT_EQ(results[b].size(), b == 2 ? 3u : 4u);
    for (size_t k = 0; k < results[b].size(); ++k) {
      const int id = firsts[b] + static_cast<int>(k);
      EXPECT_EQ(results[b][k].id, fmt::format("g:{}", id));
      ASSERT_TRUE(results[b][k].reward) << results[b][k].failure;
      EXPECT_NEAR(*results[b][k].reward, test::intended_dims(id)[0], 1e-9) << id;
    }
  }
  EXPECT_TRUE(server.answered_out_of_order());
  // Two calls (the first batch alone, then the two queued behind it); the stats are the step's, not the last call's.
  ASSERT_EQ(p.calls().size(), 2u);
  EXPECT_EQ(p.calls()[0].batches, std::vector<size_t>{0});
  EXPECT_EQ(p.calls()[1].batches, (std::vector<size_t>{1, 2}));
  EXPECT_LE(p.calls()[0].end, p.calls()[1].start);
  EXPECT_EQ(p.stats().samples, 11);
  EXPECT_EQ(p.stats().rewarded, 11);
  EXPECT_EQ(p.stats().api.calls, 11);
  EXPECT_EQ(scorer.step_stats().samples, 7) << "Scorer::step_stats is the last call's";
  EXPECT_EQ(scorer.run_stats().samples, 11);
}

TEST(ScoringPipeline, ScorerExceptionReachesFinish) {
  test::FakeTeacher server;
  TeacherConfig c = judge_config(server);
  c.cache_path = "/dev/null/not-a-dir/cache.sqlite";  // the cache cannot be created: score() throws
  Scorer scorer(c);
  ScoringPipeline p(scorer);
  p.submit(group(0, 2));
  EXPECT_ANY_THROW(p.finish());
}

TEST(ScoringPipeline, DroppedUnfinishedShutsDownCleanly) {
  test::FakeTeacher server;
  server.latency_s = [](int) { return 0.05; };
  Scorer scorer(judge_config(server));
  {
    ScoringPipeline p(scorer);
    p.submit(group(0, 3));
    p.submit(group(5, 3));
  }  // the destructor stops the worker after its current call and joins it
  ScoringPipeline again(scorer);  // the scorer is usable afterwards
  again.submit(group(30, 2));
  const auto r = again.finish();
  ASSERT_EQ(r.size(), 1u);
  ASSERT_TRUE(r[0][1].reward);
  EXPECT_NEAR(*r[0][1].reward, test::intended_dims(31)[0], 1e-9);
}

TEST(ScoringPipeline, OverlapSecondsClipsCallsToTheWindow) {
  using C = ScoringPipeline::Clock;
  const C::time_point t0{};
  auto at = [&](double s) { return t0 + std::chrono::duration_cast<C::duration>(std::chrono::duration<double>(s)); };
  // Calls [1, 2], [2.5, 4], [5, 6] against the window [1.5, 3]: 0.5 + 0.5 seconds inside.
  const std::vector<ScoringPipeline::Call> calls = {{{0}, at(1), at(2)}, {{1}, at(2.5), at(4)}, {{2}, at(5), at(6)}};
  EXPECT_NEAR(overlap_seconds(calls, at(1.5), at(3)), 1.0, 1e-9);
  EXPECT_EQ(overlap_seconds(calls, at(6.5), at(9)), 0.0);
}

TEST(ScoringPipeline, OverlapScoringConfigKey) {
  EXPECT_TRUE(parse_run_config("", "t.yaml").rlaif.overlap_scoring);
  EXPECT_FALSE(parse_run_config("rlaif: {overlap_scoring: false}", "t.yaml").rlaif.overlap_scoring);
  try {
    parse_run_config("rlaif: {overlap_scoring: sometimes}", "t.yaml");
    FAIL() << "a non-boolean overlap_scoring was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rlaif.overlap_scoring"), std::string::npos) << e.what();
  }
}
