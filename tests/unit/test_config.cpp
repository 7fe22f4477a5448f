// Run-config parser: every key lands in its struct, unknown keys and wrong types are errors naming the file,
// key path and line (with a did-you-mean hint), and keys that do not apply are warnings naming them.
#include <gtest/gtest.h>

#include "core/error.h"
#include "rl/config.h"
#include "test_util.h"

using namespace rlaif;

namespace {

std::string error_of(const std::string& yaml) {
  try {
    parse_run_config(yaml, "x.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Config, ParsesEverySection) {
  const auto c = parse_run_config(R"(
model:
  name_or_path: Qwen/Qwen2.5-Coder-0.5B-Instruct
  dtype: float32
teacher:
  provider: anthropic
  model_name: claude-3-5-haiku
  api_key_env: ANTHROPIC_API_KEY
  base_url: http://127.0.0.1:9999
  max_concurrency: 3
  requests_per_minute: 50
  tokens_per_minute: 40000
  timeout_s: 12.5
  max_retries: 7
  temperature: 0.2
  max_tokens: 300
  cache_path: c.sqlite
  teacher_score_cache_max_age_seconds: 99
  scoring_mode: batched_ranked
  rubric:
    correctness: 0.4
    version: v2
    language_multipliers: {rust: 1.3}
  verifiers:
    syntax: false
    weights: {tests: 2.0}
    sandbox: {cpu_seconds: 3, max_processes: 16}
training: {learning_rate: 2.0e-5, batch_size: 4, num_epochs: 3}
rlaif: {num_samples_per_prompt: 8, reward_threshold: 0.1, top_samples_per_prompt: 2, kl_coef: 0.02}
data: {train_file: train.jsonl, eval_file: eval.jsonl}
logging: {output_dir: out, log_level: debug}
hardware: {device: cpu}
)",
                                  "x.yaml");
  EXPECT_EQ(c.model.name_or_path, "Qwen/Qwen2.5-Coder-0.5B-Instruct");
  EXPECT_EQ(c.model.dtype, "float32");
  EXPECT_EQ(c.teacher.provider, "anthropic");
  EXPECT_EQ(c.teacher.model_name, "claude-3-5-haiku");
  EXPECT_EQ(c.teacher.api_key_env, "ANTHROPIC_API_KEY");
  EXPECT_EQ(c.teacher.base_url, "http://127.0.0.1:9999");
  EXPECT_EQ(c.teacher.max_concurrency, 3);
  EXPECT_EQ(c.teacher.requests_per_minute, 50);
  EXPECT_EQ(c.teacher.tokens_per_minute, 40000);
  EXPECT_EQ(c.teacher.timeout_s, 12.5);
  EXPECT_EQ(c.teacher.max_retries, 7);
  EXPECT_EQ(c.teacher.temperature, 0.2);
  EXPECT_EQ(c.teacher.max_tokens, 300);
  EXPECT_EQ(c.teacher.cache_path, "c.sqlite");
  EXPECT_EQ(c.teacher.teacher_score_cache_max_age_seconds, 99);
  EXPECT_EQ(c.teacher.mode, teacher::ScoringMode::kBatchedRanked);
  EXPECT_EQ(c.teacher.rubric.correctness, 0.4);
  EXPECT_EQ(c.teacher.rubric.code_quality, 0.3) << "default kept";
  EXPECT_EQ(c.teacher.rubric.version, "v2");
  EXPECT_EQ(c.teacher.rubric.rust_multiplier, 1.3);
  EXPECT_EQ(c.teacher.rubric.cpp_multiplier, 1.10);
  EXPECT_FALSE(c.teacher.verifiers.syntax);
  EXPECT_EQ(c.teacher.verifiers.weight_tests, 2.0);
  EXPECT_EQ(c.teacher.verifiers.sandbox.cpu_seconds, 3);
  EXPECT_EQ(c.teacher.verifiers.sandbox.max_processes, 16);
  EXPECT_EQ(c.training.learning_rate, 2.0e-5);
  EXPECT_EQ(c.training.batch_size, 4);
  EXPECT_EQ(c.training.num_epochs, 3);
  EXPECT_EQ(c.rlaif.num_samples_per_prompt, 8);
  EXPECT_EQ(c.rlaif.reward_threshold, 0.1);
  EXPECT_EQ(c.rlaif.top_samples_per_prompt, 2);
  EXPECT_EQ(c.rlaif.kl_coef, 0.02);
  EXPECT_EQ(c.data.train_file, "train.jsonl");
  EXPECT_EQ(c.data.eval_file, "eval.jsonl");
  EXPECT_EQ(c.logging.output_dir, "out");
  EXPECT_EQ(c.logging.log_level, "debug");
  EXPECT_EQ(c.hardware.device, "cpu");
  EXPECT_TRUE(c.warnings.empty());
}

TEST(Config, UnknownKeyNamesPathLineAndSuggestion) {
  const std::string e = error_of("teacher:\n  provider: openai\n\n  modle_name: gpt\n");
  EXPECT_NE(e.find("x.yaml: unknown key 'teacher.modle_name' (line 4)"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'model_name'?"), std::string::npos) << e;
  const std::string deep = error_of("teacher:\n  verifiers:\n    sandbox:\n      cpu_secs: 1\n");
  EXPECT_NE(deep.find("'teacher.verifiers.sandbox.cpu_secs' (line 4)"), std::string::npos) << deep;
  EXPECT_NE(error_of("trainer:\n  x: 1\n").find("unknown key 'trainer' (line 1)"), std::string::npos);
}

TEST(Config, WrongTypesNameKeyAndLine) {
  const std::string e = error_of("teacher:\n  max_concurrency: many\n");
  EXPECT_NE(e.find("'teacher.max_concurrency' (line 2) must be a integer, got 'many'"), std::string::npos) << e;
  const std::string m = error_of("training:\n  batch_size: [1, 2]\n");
  EXPECT_NE(m.find("'training.batch_size' (line 2)"), std::string::npos) << m;
  EXPECT_NE(error_of("teacher: 5\n").find("'teacher' must be a mapping"), std::string::npos);
  EXPECT_NE(error_of("teacher:\n  scoring_mode: best\n").find("unknown scoring mode 'best'"), std::string::npos);
  EXPECT_NE(error_of("teacher:\n  provider: azure\n").find("teacher.provider"), std::string::npos);
  EXPECT_NE(error_of("a: [1,\n").find("YAML syntax error"), std::string::npos);
}

TEST(Config, KeysThatDoNotApplyAreWarnings) {
  const auto c = parse_run_config("hardware:\n  device: cpu\n  use_mps: true\n", "x.yaml");
  ASSERT_EQ(c.warnings.size(), 1u);
  EXPECT_NE(c.warnings[0].find("'hardware.use_mps' (line 3)"), std::string::npos) << c.warnings[0];
}

TEST(Config, MissingFileIsAnError) {
  EXPECT_THROW(load_run_config("/nonexistent/rlaif.yaml"), Error);
}

TEST(Config, ShippedScoreExampleParses) {
  const auto c = load_run_config(test::source_dir() / "examples" / "score_example.yaml");
  EXPECT_EQ(c.teacher.mode, teacher::ScoringMode::kRelative);
  EXPECT_EQ(c.teacher.rubric.rust_multiplier, 1.15);
  EXPECT_TRUE(c.warnings.empty());
}
