// Scoring during `rlaif train` against the fault-injecting fake teacher (test_teacher_fake_server.h), whose score of
// a completion is a pure function of its text: (1) with scoring overlapped with generation (the default), rewards
// land on their own samples when answers come back out of order after scrambled delays and failed first attempts;
// (2) the teacher receives the first prompt's samples while the engine is still decoding the others (overlap on),
// and nothing before generation ends (overlap off).
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <set>
#include <thread>
#include <nlohmann/json.hpp>

#include "../unit/test_teacher_fake_server.h"
#include "rl/config.h"
#include "rl/loop.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

// The id the judge gives a completion: FNV-1a of its text (mod 997), so equal texts share one score.
int text_id(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  return static_cast<int>(h % 997);
}

// The judge's score of a completion, recomputed here from intended_dims (uniform dims: any rubric weighting gives it).
double intended(const std::string& text) { return test::intended_dims(text_id(text))[0]; }

// A judge scoring by text; `latency` gives each request's delay from its id.
void judge_by_text(test::FakeTeacher& t, std::function<double(int)> latency) {
  t.uniform_dims = true;
  t.id_of_completion = [](const std::string& c) { return std::optional<int>(text_id(c)); };
  t.latency_s = std::move(latency);
}

// Open prompts without reference answers, so the teacher tier scores every sample.
fs::path write_prompts(const fs::path& dir, const std::vector<std::string>& prompts) {
  std::ofstream rows(dir / "prompts.jsonl");
  for (const auto& p : prompts) rows << nlohmann::json{{"prompt", p}}.dump() << "\n";
  return dir / "prompts.jsonl";
}

// The run config: SmolLM2-135M (Q4_1), teacher tier only, against `teacher`.
std::string config(const test::FakeTeacher& teacher, const fs::path& prompts, const fs::path& out, int batch_size,
                   int samples, int steps, int max_new_tokens, double temperature, bool overlap) {
  const fs::path model = test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  return fmt::format(R"(model:
  name_or_path: {}
  lora_r: 4
  lora_alpha: 8
  lora_dropout: 0.0
teacher:
  provider: openai
  model_name: fake-judge
  api_key_env: RLAIF_ORDER_KEY
  base_url: {}
  max_concurrency: 8
  timeout_s: 10
  backoff_base_s: 0.05
  cache_path: ""
  scoring_mode: absolute
  verifiers: {{heuristic: false, syntax: false, tests: false, exact_answer: false, teacher: true}}
training:
  learning_rate: 5.0e-4
  batch_size: {}
  max_steps: {}
  save_steps: 0
  seed: 3
rlaif:
  num_samples_per_prompt: {}
  temperature: {}
  max_new_tokens: {}
  overlap_scoring: {}
data:
  train_file: {}
  shuffle: false
logging:
  output_dir: {}
)",
                     model.string(), teacher.base_url(), batch_size, steps, samples, temperature, max_new_tokens,
                     overlap ? "true" : "false", prompts.string(), out.string());
}

}  // namespace

TEST(TeacherOrder, EveryRewardBelongsToItsOwnCompletion) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  test::FakeTeacher judge;
  judge.key = "sk-order-test";
  // Scrambled delays up to 80 ms, and a 500 on the first attempt of every fifth text: its retry comes back later.
  judge_by_text(judge, [](int id) { return (id * 7919 % 81) / 1000.0; });
  judge.fault = [](int id, int attempt) { return attempt == 0 && id % 5 == 2 ? test::Fault::k500 : test::Fault::kNone; };
  const fs::path dir = test::temp_dir("teacher_order");
  const fs::path prompts =
      write_prompts(dir, {"Name a fruit.", "Say hello in French.", "Name a colour.", "Give a word that rhymes with cat."});
  std::ofstream(dir / "cfg.yaml") << config(judge, prompts, dir / "run", 2, 6, 2, 8, 1.0, /*overlap=*/true);
  std::string log;
  ASSERT_EQ(test::run_command("RLAIF_ORDER_KEY=sk-order-test OMP_NUM_THREADS=1 " +
                                  (test::binary_dir() / "apps" / "rlaif").string() + " train --config " +
                                  (dir / "cfg.yaml").string(), &log), 0) << log;
  std::ifstream in(dir / "run" / "samples.jsonl");
  int n = 0;
  std::set<double> distinct;
  for (std::string line; std::getline(in, line); ++n) {
    const auto j = nlohmann::json::parse(line);
    const std::string text = j.at("completion");
    ASSERT_FALSE(j.at("reward").is_null()) << line;
    EXPECT_NEAR(j.at("reward").get<double>(), intended(text), 1e-9) << line;
    distinct.insert(j.at("reward").get<double>());
  }
  EXPECT_EQ(n, 2 * 2 * 6);
  EXPECT_GT(distinct.size(), 3u) << "the check is only meaningful when completions (and so scores) differ";
  EXPECT_TRUE(judge.answered_out_of_order());
  bool faulted = false;
  for (const auto& [id, faults] : judge.attempt_faults()) faulted |= faults.front() == test::Fault::k500;
  EXPECT_TRUE(faulted) << "no first attempt failed: the retry path was not exercised";
}

namespace {

// One step in this process: a prompt answered in a word and one that runs to max_new_tokens. `at_token` sees
// every sampled token with the count so far of that sample.
StepMetrics overlap_step(const std::string& name, test::FakeTeacher& judge, bool overlap,
                         const std::function<void(int64_t group, int64_t count)>& at_token) {
  const fs::path dir = test::temp_dir(name);
  const fs::path prompts =
      write_prompts(dir, {"What is 2 + 3? Reply with the number only.", "Write a long story about a dragon and a king."});
  std::ofstream(dir / "cfg.yaml") << config(judge, prompts, dir / "run", 2, 2, 1, 28, 0.3, overlap);
  setenv("RLAIF_ORDER_KEY", judge.key.c_str(), 1);
  const RunConfig cfg = load_run_config(dir / "cfg.yaml");
  std::map<std::pair<int64_t, int64_t>, int64_t> counts;
  TrainHooks hooks;
  hooks.on_rollout_token = [&](int64_t group, int64_t sample, int32_t) { at_token(group, ++counts[{group, sample}]); };
  const TrainResult res = run_training(cfg, hooks);
  EXPECT_EQ(res.steps.size(), 1u);
  return res.steps.empty() ? StepMetrics{} : res.steps[0];
}

}  // namespace

// Overlap happens: when the long story reaches its 16th token (the one-word answers are long done), decoding pauses
// until the teacher has received a scoring request, so with overlap the request must come while generation is still
// running (a 30 s bound only stops a broken build from hanging). Without overlap no request may arrive before
// generation ends. Orderings, not durations, are asserted.
TEST(TeacherOrder, ScoringStartsWhileOtherPromptsStillDecode) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  test::FakeTeacher judge;
  judge_by_text(judge, [](int) { return 0.2; });  // a fixed delay per request
  bool paused = false, seen_while_decoding = false;
  const StepMetrics on = overlap_step("teacher_overlap_on", judge, true, [&](int64_t, int64_t count) {
    if (count != 16 || paused) return;
    paused = true;
    for (int i = 0; i < 3000 && judge.calls() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    seen_while_decoding = judge.calls() > 0;
  });
  ASSERT_TRUE(paused) << "no sample reached 16 tokens: the test needs one prompt that decodes much longer";
  EXPECT_TRUE(seen_while_decoding) << "the teacher got no request while the story was still decoding";
  EXPECT_GT(on.score_overlap_s, 0.0);
  EXPECT_EQ(on.unscored, 0);

  test::FakeTeacher judge_off;
  judge_by_text(judge_off, [](int) { return 0.2; });
  bool early = false;
  const StepMetrics off = overlap_step("teacher_overlap_off", judge_off, false,
                                       [&](int64_t, int64_t) { early |= judge_off.calls() > 0; });
  EXPECT_FALSE(early) << "without overlap the teacher was asked before generation ended";
  EXPECT_EQ(off.score_overlap_s, 0.0);
  // The same samples either way (one seed); the step's stats count every call of the split scoring.
  EXPECT_GT(off.teacher_calls, 0);
  EXPECT_EQ(on.teacher_calls, off.teacher_calls);
  EXPECT_EQ(on.reward_mean, off.reward_mean);
  EXPECT_GE(off.score_s, 0.2) << "the step waited for the teacher's fixed delay after generation";
}
