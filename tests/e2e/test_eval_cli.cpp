// Evaluation through the binary: a baseline before training, greedy evaluation every eval_steps with per-row files,
// the best checkpoint marked and kept, an epoch checkpoint (save_every_epochs) named as the original's, epoch
// records; then `rlaif eval` on the final checkpoint reproduces the in-training evaluation of the same weights.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

std::vector<nlohmann::json> jsonl(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

void write_sums(const fs::path& f, int from, int to) {
  std::ofstream out(f);
  for (int a = from; a <= to; ++a)
    out << fmt::format(R"({{"prompt": "What is {} + 2? Reply with the number only.", "answer": "#### {}"}})", a, a + 2)
        << "\n";
}

}  // namespace

TEST(EvalCli, BaselinePeriodicEvalBestCheckpointAndCompare) {
  const fs::path model = test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  ASSERT_TRUE(fs::exists(model)) << "run scripts/setup.sh";
  const fs::path dir = test::temp_dir("eval_cli");
  write_sums(dir / "train.jsonl", 1, 8);
  write_sums(dir / "eval.jsonl", 2, 7);
  std::ofstream(dir / "cfg.yaml") << fmt::format(R"(model:
  name_or_path: {}
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
  save_steps: 0
  save_every_batches: 2
  save_every_epochs: 1
  eval_steps: 2
  baseline_eval_batches: 1
  seed: 7
rlaif:
  num_samples_per_prompt: 4
  temperature: 1.0
  max_new_tokens: 10
data:
  train_file: {}
  max_train_samples: 6
  eval_file: {}
  max_eval_samples: 4
logging:
  output_dir: {}
)",
                                                 model.string(), (dir / "train.jsonl").string(),
                                                 (dir / "eval.jsonl").string(), (dir / "run").string());
  const std::string bin = "OMP_NUM_THREADS=1 " + (test::binary_dir() / "apps" / "rlaif").string();
  std::string log;
  ASSERT_EQ(test::run_command(bin + " train --config " + (dir / "cfg.yaml").string(), &log), 0) << log;

  std::map<std::string, std::vector<nlohmann::json>> by_type;
  for (auto& j : jsonl(dir / "run" / "metrics.jsonl")) by_type[j.at("type").get<std::string>()].push_back(j);
  ASSERT_EQ(by_type["step"].size(), 4u);
  ASSERT_EQ(by_type["baseline_eval"].size(), 1u);
  EXPECT_EQ(by_type["baseline_eval"][0]["step"], 0);
  EXPECT_EQ(by_type["baseline_eval"][0]["eval/rows"], 2);  // 1 batch of batch_size prompts
  ASSERT_EQ(by_type["eval"].size(), 2u);                   // step 2 (eval_steps) and the last step
  EXPECT_EQ(by_type["eval"][0]["step"], 2);
  EXPECT_EQ(by_type["eval"][1]["step"], 4);
  EXPECT_EQ(by_type["eval"][1]["eval/rows"], 4);           // max_eval_samples
  // 6 training prompts, 2 per step: epoch 0 ends at step 3. save_every_batches 2 saves batch 2 of the epoch
  // (step 2), save_every_epochs 1 the end of epoch 0 (step 3, its batch 3); step 1 is never saved.
  ASSERT_GE(by_type["epoch"].size(), 1u);
  EXPECT_EQ(by_type["epoch"][0]["epoch"], 0);
  EXPECT_EQ(by_type["epoch"][0]["steps"], 3);
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoint-e0-b2-gs2" / "adapter_model.safetensors")) << log;
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoint-e0-b3-gs3" / "adapter_model.safetensors")) << log;
  EXPECT_FALSE(fs::exists(dir / "run" / "checkpoint-e0-b1-gs1"));
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoint-final-gs4" / "adapter_model.safetensors"));
  EXPECT_EQ(jsonl(dir / "run" / "samples.jsonl").size(), 4u * 2 * 4);

  // Per-row results agree with the summary; the best checkpoint is the first with the highest eval reward.
  const auto rows = jsonl(dir / "run" / "eval" / "eval-gs4.jsonl");
  ASSERT_EQ(rows.size(), 4u);
  double sum = 0;
  for (const auto& r : rows) sum += r.at("reward").get<double>();
  EXPECT_DOUBLE_EQ(sum / 4, by_type["eval"][1]["eval/reward_mean"].get<double>());
  const auto best = nlohmann::json::parse(read_file(dir / "run" / "best_checkpoint.json"));
  const double r2 = by_type["eval"][0]["eval/reward_mean"], r4 = by_type["eval"][1]["eval/reward_mean"];
  EXPECT_EQ(best["checkpoint"], r4 > r2 ? "checkpoint-final-gs4" : "checkpoint-e0-b2-gs2");
  EXPECT_TRUE(fs::exists(dir / "run" / best["checkpoint"].get<std::string>()));

  // `rlaif eval`: the base model and the final checkpoint; the checkpoint's line reproduces step 4's evaluation.
  std::string out;
  ASSERT_EQ(test::run_command(bin + " eval --config " + (dir / "cfg.yaml").string() + " --base --checkpoint " +
                                  (dir / "run" / "checkpoint-final-gs4").string() + " --out " +
                                  (dir / "rows.jsonl").string(), &out), 0) << out;
  std::printf("%s", out.c_str());
  EXPECT_NE(out.find("base ("), std::string::npos) << out;
  const auto line_start = out.find((dir / "run" / "checkpoint-final-gs4").string() + " ");
  ASSERT_NE(line_start, std::string::npos) << out;
  const std::string line = out.substr(line_start, out.find('\n', line_start) - line_start);
  EXPECT_NE(line.find(fmt::format(" {:.4f} ", r4)), std::string::npos) << line;
  EXPECT_GT(r2 + r4, 0) << "some eval answers should be right, or the comparison above is vacuous";
  EXPECT_EQ(jsonl(dir / "rows.jsonl").size(), 8u);

  // Without data.eval_file `rlaif eval` says which key is missing.
  std::string yaml = read_file(dir / "cfg.yaml");
  yaml.replace(yaml.find("  eval_file:"), 0, "  # ");
  std::ofstream(dir / "no_eval.yaml") << yaml;
  EXPECT_NE(test::run_command(bin + " eval --config " + (dir / "no_eval.yaml").string(), &out), 0);
  EXPECT_NE(out.find("data.eval_file is not set"), std::string::npos) << out;
}
