// Overlapped scoring changes nothing but time: the quickstart (SmolLM2-135M, exact-answer reward: a deterministic
// scorer), shortened to 2 steps, run with rlaif.overlap_scoring on and off gives the same completions, the same
// reward on each, and the same losses, step by step.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

// Runs the shortened quickstart into `dir`/run; returns its (type "step") metrics and samples.jsonl lines.
void run_quickstart(const fs::path& dir, bool overlap, std::vector<nlohmann::json>& steps,
                    std::vector<nlohmann::json>& samples) {
  std::string yaml = read_file(test::source_dir() / "examples" / "quickstart.yaml");
  auto set = [&](const std::string& from, const std::string& to) {
    const auto p = yaml.find(from);
    ASSERT_NE(p, std::string::npos) << from;
    yaml.replace(p, from.size(), to);
  };
  set("models/SmolLM2-135M-Instruct.Q4_1.gguf", (test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf").string());
  set("examples/data/arith_train.jsonl", (test::source_dir() / "examples/data/arith_train.jsonl").string());
  set("examples/data/arith_eval.jsonl", (test::source_dir() / "examples/data/arith_eval.jsonl").string());
  set("eval_steps: 6", "eval_steps: 0");
  set("save_steps: 6", "save_steps: 0");
  set("max_steps: 12", "max_steps: 2");
  set("batch_size: 8", "batch_size: 3");
  set("max_new_tokens: 16", fmt::format("max_new_tokens: 10\n  overlap_scoring: {}", overlap));
  set("runs/quickstart", (dir / "run").string());
  std::ofstream(dir / "quick.yaml") << yaml;
  std::string out;
  ASSERT_EQ(test::run_command("OMP_NUM_THREADS=1 " + (test::binary_dir() / "apps" / "rlaif").string() +
                                  " train --config " + (dir / "quick.yaml").string(), &out), 0) << out;
  std::ifstream metrics(dir / "run" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("type", "") == "step") steps.push_back(j);
  }
  std::ifstream in(dir / "run" / "samples.jsonl");
  for (std::string line; std::getline(in, line);) samples.push_back(nlohmann::json::parse(line));
}

}  // namespace

TEST(ScoringOverlap, SameRewardsAndLossesWithAndWithoutOverlap) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  std::vector<nlohmann::json> on_steps, on_samples, off_steps, off_samples;
  run_quickstart(test::temp_dir("scoring_overlap_on"), true, on_steps, on_samples);
  run_quickstart(test::temp_dir("scoring_overlap_off"), false, off_steps, off_samples);
  ASSERT_EQ(on_steps.size(), 2u);
  ASSERT_EQ(off_steps.size(), 2u);
  ASSERT_EQ(on_samples.size(), 2u * 3 * 6);
  ASSERT_EQ(off_samples.size(), on_samples.size());
  std::set<double> distinct;
  for (size_t i = 0; i < on_samples.size(); ++i) {
    const auto &a = on_samples[i], &b = off_samples[i];
    EXPECT_EQ(a.at("completion"), b.at("completion")) << i;
    EXPECT_EQ(a.at("reward"), b.at("reward")) << a.dump() << "\n" << b.dump();
    EXPECT_EQ(a.at("group"), b.at("group"));
    EXPECT_EQ(a.at("sample"), b.at("sample"));
    if (a.at("reward").is_number()) distinct.insert(a.at("reward").get<double>());
  }
  EXPECT_EQ(distinct.size(), 2u) << "right and wrong answers both occur, so a misplaced reward would show";
  for (size_t s = 0; s < 2; ++s) {
    for (const char* k : {"loss", "policy_loss", "reward/mean", "accuracy", "grad_norm", "kl"})
      EXPECT_EQ(on_steps[s].at(k).get<double>(), off_steps[s].at(k).get<double>()) << k << " at step " << s + 1;
    EXPECT_EQ(on_steps[s].at("kept"), off_steps[s].at("kept"));
    EXPECT_EQ(off_steps[s].at("time/score_overlap_s").get<double>(), 0.0);
    EXPECT_GE(on_steps[s].at("time/score_overlap_s").get<double>(), 0.0);
  }
}
