// Exact resume through the real binary (CPU, fp32, fixed seeds, one thread, LoRA dropout on: the dropout generator
// is seeded from training.seed and saved in every checkpoint): 4 steps straight vs a run killed with SIGKILL after
// its step-2 checkpoint appears, then
// `--resume latest` to 4 — identical per-step losses and byte-identical final adapter. A crash during a
// checkpoint write (test hook) leaves the previous checkpoint loadable and the half-written one is removed;
// missing or corrupt checkpoints fail with the file named.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>
#include <nlohmann/json.hpp>

#include "core/io.h"
#include "models/weights.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

// Easy sums: SmolLM2 gets some right at temperature 1, so every step has groups with a learning signal.
const fs::path& train_file() {
  static const fs::path p = [] {
    const fs::path f = test::temp_dir("resume_data") / "sums.jsonl";
    std::ofstream out(f);
    for (int a = 1; a <= 8; ++a)
      for (int b = 1; b <= 3; ++b)
        out << fmt::format(R"({{"prompt": "What is {} + {}? Reply with the number only.", "answer": "#### {}"}})", a, b,
                           a + b) << "\n";
    return f;
  }();
  return p;
}

std::string config(const fs::path& out) {
  const fs::path src = test::source_dir();
  return fmt::format(R"(model:
  name_or_path: {}
  use_lora: true
  lora_r: 4
  lora_alpha: 8
  lora_dropout: 0.1
teacher:
  provider: local
  cache_path: ""
  verifiers: {{heuristic: false, syntax: false, tests: false, exact_answer: true, teacher: false}}
training:
  learning_rate: 5.0e-4
  batch_size: 2
  max_steps: 4
  save_steps: 1
  save_total_limit: 2
  lr_scheduler: cosine
  seed: 7
rlaif:
  num_samples_per_prompt: 4
  temperature: 1.0
  max_new_tokens: 8
  kl_coef: 0.02
data:
  train_file: {}
logging:
  output_dir: {}
)",
                     (src / "models/SmolLM2-135M-Instruct.Q4_1.gguf").string(),
                     train_file().string(), out.string());
}

// The per-step records (type "step") of a run's metrics.jsonl.
std::vector<nlohmann::json> steps(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.value("type", "") == "step") out.push_back(j);
  }
  return out;
}

std::string cmd(const fs::path& yaml, const std::string& extra) {
  return "env OMP_NUM_THREADS=1 " + (test::binary_dir() / "apps" / "rlaif").string() + " train --config " + yaml.string() +
         " " + extra;
}

int train(const fs::path& yaml, const std::string& extra, std::string* log) { return test::run_command(cmd(yaml, extra), log); }

void expect_same_steps(const fs::path& straight, const fs::path& resumed) {
  const auto a = steps(straight / "metrics.jsonl"), b = steps(resumed / "metrics.jsonl");
  ASSERT_EQ(a.size(), 4u);
  ASSERT_EQ(b.size(), 4u) << "each step once: records after the checkpoint are dropped on resume";
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "step " << b[i]["step"];
    EXPECT_EQ(a[i]["reward/mean"].get<double>(), b[i]["reward/mean"].get<double>()) << "step " << b[i]["step"];
    EXPECT_EQ(a[i]["generated_tokens"], b[i]["generated_tokens"]);
  }
  const fs::path fa = straight / "checkpoint-final-gs4" / "adapter_model.safetensors";
  const fs::path fb = resumed / "checkpoint-final-gs4" / "adapter_model.safetensors";
  auto wa = load_safetensors(fa), wb = load_safetensors(fb);
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, t] : wa) EXPECT_TRUE(at::equal(t, wb.at(name))) << name;
  EXPECT_TRUE(read_file(fa) == read_file(fb)) << "adapter files differ in bytes";
  for (const auto& s : a) EXPECT_GT(s["kept"].get<int64_t>(), 0) << "step " << s["step"] << " had no learning signal";
  // The adapter was trained (B starts at zero): the equality above is not the trivial one.
  bool nonzero = false;
  for (const auto& [name, t] : wa)
    if (name.find("lora_B") != std::string::npos && t.abs().max().item<double>() > 0) nonzero = true;
  EXPECT_TRUE(nonzero);
}

// The uninterrupted reference run, made once for both tests.
const fs::path& straight_run() {
  static const fs::path dir = [] {
    const fs::path d = test::temp_dir("resume_straight");
    std::ofstream(d / "straight.yaml") << config(d / "straight");
    std::string log;
    EXPECT_EQ(train(d / "straight.yaml", "", &log), 0) << log;
    return d / "straight";
  }();
  return dir;
}

}  // namespace

TEST(Resume, KilledRunResumedEqualsStraightRun) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  const fs::path dir = test::temp_dir("resume_kill");
  std::string log;
  // save_total_limit 2: steps 2 and 3 kept, step 1 deleted (the final checkpoint is separate).
  EXPECT_FALSE(fs::exists(straight_run() / "checkpoint-e0-b1-gs1"));
  EXPECT_TRUE(fs::exists(straight_run() / "checkpoint-e0-b3-gs3"));

  // The same run, killed with SIGKILL as soon as its step-2 checkpoint is in place (mid step 3).
  std::ofstream(dir / "killed.yaml") << config(dir / "killed");
  const std::string line = "exec " + cmd(dir / "killed.yaml", "") + " > " + (dir / "killed.log").string() + " 2>&1";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", line.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  const auto t0 = std::chrono::steady_clock::now();
  while (!fs::exists(dir / "killed" / "checkpoint-e0-b2-gs2") &&
         std::chrono::steady_clock::now() - t0 < std::chrono::seconds(120))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << read_file(dir / "killed.log");
  ASSERT_FALSE(fs::exists(dir / "killed" / "checkpoint-final-gs4"));
  ASSERT_EQ(train(dir / "killed.yaml", "--resume latest", &log), 0) << log;
  EXPECT_NE(log.find("resumed from"), std::string::npos) << log;
  expect_same_steps(straight_run(), dir / "killed");
}

TEST(Resume, CrashDuringCheckpointWriteLeavesPreviousCheckpoint) {
  ASSERT_TRUE(fs::exists(test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")) << "run scripts/setup.sh";
  const fs::path dir = test::temp_dir("resume_crash");
  std::string log;
  // The second save (step 2) dies after writing the adapter, before the optimizer and trainer state.
  std::ofstream(dir / "crash.yaml") << config(dir / "crash");
  const int rc = test::run_command("RLAIF_TEST_CRASH_DURING_SAVE=2 " + cmd(dir / "crash.yaml", ""), &log);
  ASSERT_NE(rc, 0) << log;
  ASSERT_TRUE(fs::exists(dir / "crash" / "checkpoint-e0-b2-gs2.tmp" / "adapter_model.safetensors")) << log;
  ASSERT_FALSE(fs::exists(dir / "crash" / "checkpoint-e0-b2-gs2"));
  ASSERT_TRUE(fs::exists(dir / "crash" / "checkpoint-e0-b1-gs1" / "trainer_state.json"));
  // The half-written directory is not a checkpoint: passing it explicitly is an error naming what is missing.
  EXPECT_NE(train(dir / "crash.yaml", "--resume " + (dir / "crash" / "checkpoint-e0-b2-gs2.tmp").string(), &log), 0);
  EXPECT_NE(log.find("trainer_state.json"), std::string::npos) << log;
  // `latest` resumes from step 1, removes the half-written one, and reaches the straight run's result.
  ASSERT_EQ(train(dir / "crash.yaml", "--resume latest", &log), 0) << log;
  EXPECT_NE(log.find("resumed from " + (dir / "crash" / "checkpoint-e0-b1-gs1").string()), std::string::npos) << log;
  EXPECT_NE(log.find("save was interrupted"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(dir / "crash" / "checkpoint-e0-b2-gs2.tmp"));
  expect_same_steps(straight_run(), dir / "crash");

  // Missing or corrupt checkpoints: clear errors naming the file.
  EXPECT_NE(train(dir / "crash.yaml", "--resume " + (dir / "nowhere").string(), &log), 0);
  EXPECT_NE(log.find("is not a checkpoint"), std::string::npos) << log;
  const fs::path bad = dir / "bad";
  ASSERT_EQ(test::run_command("cp -r " + (straight_run() / "checkpoint-e0-b3-gs3").string() + " " + bad.string()), 0);
  std::ofstream(bad / "trainer_state.json") << "{\"global_step\": 3,";
  EXPECT_NE(train(dir / "crash.yaml", "--resume " + bad.string(), &log), 0);
  EXPECT_NE(log.find((bad / "trainer_state.json").string() + ": invalid JSON"), std::string::npos) << log;
  ASSERT_EQ(test::run_command("cp " + (straight_run() / "checkpoint-e0-b3-gs3" / "trainer_state.json").string() + " " +
                              bad.string() + "/"), 0);
  std::ofstream(bad / "optimizer.safetensors", std::ios::trunc) << "garbage";
  EXPECT_NE(train(dir / "crash.yaml", "--resume " + bad.string(), &log), 0);
  EXPECT_NE(log.find("optimizer.safetensors"), std::string::npos) << log;
  fs::remove(bad / "adapter_model.safetensors");
  EXPECT_NE(train(dir / "crash.yaml", "--resume " + bad.string(), &log), 0);
  EXPECT_NE(log.find("missing adapter_model.safetensors"), std::string::npos) << log;
}
