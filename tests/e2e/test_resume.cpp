// Exact resume: 4 steps straight vs 2 steps, stop, `--resume latest`, on to 4 — identical losses, rewards and
// final adapter weights (CPU, fp32, fixed seeds, one thread). Also: save_total_limit prunes old checkpoints,
// a leftover half-written (.tmp) checkpoint is never picked up, and a missing checkpoint is a clear error.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "models/weights.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

std::string config(const fs::path& out, int save_steps) {
  const fs::path src = test::source_dir();
  return fmt::format(R"(model:
  name_or_path: {}
  use_lora: true
  lora_r: 4
  lora_alpha: 8
  lora_dropout: 0.0
teacher:
  provider: local
  cache_path: ""
  verifiers: {{heuristic: false, syntax: false, tests: false, exact_answer: true, teacher: false}}
training:
  learning_rate: 5.0e-4
  batch_size: 2
  max_steps: 4
  save_steps: {}
  save_total_limit: 2
  lr_scheduler: cosine
  seed: 11
rlaif:
  num_samples_per_prompt: 3
  temperature: 1.0
  max_new_tokens: 6
  kl_coef: 0.02
data:
  train_file: {}
logging:
  output_dir: {}
)",
                     (src / "models/SmolLM2-135M-Instruct.Q4_1.gguf").string(), save_steps,
                     (src / "examples/data/arith_train.jsonl").string(), out.string());
}

std::vector<nlohmann::json> metrics(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

int train(const fs::path& yaml, const std::string& extra, std::string* log) {
  return test::run_command("OMP_NUM_THREADS=1 " + (test::binary_dir() / "apps" / "rlaif").string() + " train --config " +
                               yaml.string() + " " + extra, log);
}

}  // namespace

TEST(Resume, StoppedAndResumedRunEqualsStraightRun) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  const fs::path dir = test::temp_dir("resume");
  std::string log;
  // Straight: 4 steps, a checkpoint after every step, at most 2 kept.
  std::ofstream(dir / "straight.yaml") << config(dir / "straight", 1);
  ASSERT_EQ(train(dir / "straight.yaml", "", &log), 0) << log;
  // Interrupted after step 2: a fresh output directory holding only step 2's checkpoint, as a run stopped
  // there would have left it (the schedule still spans 4 steps).
  fs::create_directories(dir / "resumed");
  ASSERT_TRUE(fs::exists(dir / "straight" / "checkpoint-e0-b2-gs2")) << log;
  ASSERT_EQ(test::run_command("cp -r " + (dir / "straight" / "checkpoint-e0-b2-gs2").string() + " " +
                              (dir / "resumed").string() + "/"), 0);
  // A half-written checkpoint from a crash must be ignored by --resume latest.
  fs::create_directories(dir / "resumed" / "checkpoint-e0-b6-gs3.tmp");
  std::ofstream(dir / "resumed.yaml") << config(dir / "resumed", 1);
  ASSERT_EQ(train(dir / "resumed.yaml", "--resume latest", &log), 0) << log;
  EXPECT_NE(log.find("resumed from"), std::string::npos) << log;

  const auto a = metrics(dir / "straight" / "metrics.jsonl"), b = metrics(dir / "resumed" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(a[2 + i]["step"], b[i]["step"]);
    EXPECT_EQ(a[2 + i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "step " << b[i]["step"];
    EXPECT_EQ(a[2 + i]["reward/mean"].get<double>(), b[i]["reward/mean"].get<double>());
    EXPECT_EQ(a[2 + i]["generated_tokens"], b[i]["generated_tokens"]);
  }
  auto wa = load_safetensors(dir / "straight" / "checkpoint-final-gs4" / "adapter_model.safetensors");
  auto wb = load_safetensors(dir / "resumed" / "checkpoint-final-gs4" / "adapter_model.safetensors");
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, t] : wa) EXPECT_TRUE(at::equal(t, wb.at(name))) << name;
  // save_total_limit 2: steps 2 and 3 kept, step 1 deleted (the final checkpoint is separate).
  EXPECT_FALSE(fs::exists(dir / "straight" / "checkpoint-e0-b1-gs1"));
  EXPECT_TRUE(fs::exists(dir / "straight" / "checkpoint-e0-b3-gs3"));

  EXPECT_NE(train(dir / "resumed.yaml", "--resume " + (dir / "nowhere").string(), &log), 0);
  EXPECT_NE(log.find("is not a checkpoint"), std::string::npos) << log;
}
