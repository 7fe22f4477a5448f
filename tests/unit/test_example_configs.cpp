// The shipped example configs parse with no unknown keys and say what they claim (quickstart: no teacher call).
#include <gtest/gtest.h>

#include "rl/config.h"
#include "test_util.h"

using namespace rlaif;

TEST(ExampleConfigs, QuickstartNeedsNoApiKey) {
  const RunConfig c = load_run_config(test::source_dir() / "examples" / "quickstart.yaml");
  EXPECT_FALSE(c.teacher.verifiers.teacher);
  EXPECT_TRUE(c.teacher.verifiers.exact_answer);
  EXPECT_TRUE(c.model.use_lora);
  EXPECT_EQ(c.training.max_steps, 12);
  EXPECT_EQ(c.data.eval_file, "examples/data/arith_eval.jsonl");  // `rlaif eval --config examples/quickstart.yaml` works
  EXPECT_GT(c.training.eval_steps, 0);
  EXPECT_TRUE(c.warnings.empty());
}

TEST(ExampleConfigs, QwenCoderWithTeacherParses) {
  const RunConfig c = load_run_config(test::source_dir() / "examples" / "qwen_coder_teacher.yaml");
  EXPECT_TRUE(c.teacher.verifiers.teacher);
  EXPECT_EQ(c.teacher.api_key_env, "OPENAI_API_KEY");
  EXPECT_EQ(c.rlaif.num_samples_per_prompt, 8);
  EXPECT_DOUBLE_EQ(c.rlaif.target_kl, 0.05);
  EXPECT_TRUE(c.warnings.empty());
}
