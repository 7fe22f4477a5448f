// `rlaif score` end to end: the real binary against the fake teacher on 127.0.0.1 — a JSON line per row with the
// reward the server meant, tier results and failure reasons; bad config keys fail with the key named; the API
// key is in no output.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "../unit/test_teacher_fake_server.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

constexpr const char* kKey = "sk-e2e-Secret-9911";

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string rlaif_bin() { return (test::binary_dir() / "apps" / "rlaif").string(); }

}  // namespace

TEST(ScoreCli, ScoresRowsWithTiersAndTeacher) {
  test::FakeTeacher server;
  server.key = kKey;
  const fs::path dir = test::temp_dir("score_cli");
  std::ofstream(dir / "cfg.yaml") << fmt::format(R"(teacher:
  provider: openai
  model_name: fake-judge
  api_key_env: RLAIF_E2E_KEY
  base_url: {}
  max_concurrency: 4
  timeout_s: 5
  cache_path: {}
  scoring_mode: absolute
  verifiers:
    syntax: false
    skip_teacher_on_failure: false
    weights: {{tests: 1.0, teacher: 1.0}}
    sandbox: {{cpu_seconds: 1, wall_seconds: 3, memory_mb: 256, max_processes: 8}}
hardware:
  use_mps: false
)",
                                                 server.base_url(), (dir / "cache.sqlite").string());
  std::ofstream s(dir / "samples.jsonl");
  s << R"({"id": "a", "prompt": "Return x.", "completion": "def f(x):\n    return x  # sample-id: 11\n", "language": "python"})" "\n";
  s << R"({"id": 7, "prompt": "Add.", "completion": "def add(a, b):\n    return a + b  # sample-id: 12\n", "language": "python", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 1"]})" "\n";
  s << R"({"prompt": "Sum.", "completion": "", "language": "c++"})" "\n";
  s << R"({"id": "g", "prompt": "Natalia sold...", "completion": "So 72.\n#### 72", "answer": "#### 72"})" "\n";
  s.close();
  std::string out;
  const int rc = test::run_command(fmt::format("RLAIF_E2E_KEY={} {} --log-level debug score --config {} --samples {} --out {}",
                                               kKey, rlaif_bin(), (dir / "cfg.yaml").string(),
                                               (dir / "samples.jsonl").string(), (dir / "scores.jsonl").string()),
                                   &out);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("hardware.use_mps"), std::string::npos) << "warning names the key";
  std::vector<nlohmann::json> rows;
  std::ifstream in(dir / "scores.jsonl");
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 4u);
  const auto want = [](int id) {
    const auto d = test::intended_dims(id);
    return 0.3 * d[0] + 0.3 * d[1] + 0.2 * d[2] + 0.2 * d[3];
  };
  EXPECT_EQ(rows[0]["id"], "a");
  EXPECT_NEAR(rows[0]["reward"].get<double>(), want(11), 1e-12);
  EXPECT_NEAR(rows[0]["scores"]["correctness"].get<double>(), test::intended_dims(11)[0], 1e-12);
  // One of two tests passes (weight 1) and the teacher (weight 1): the mean.
  EXPECT_EQ(rows[1]["id"], "7");
  EXPECT_NEAR(rows[1]["tiers"]["tests"]["score"].get<double>(), 0.5, 1e-12);
  EXPECT_NEAR(rows[1]["reward"].get<double>(), (0.5 + want(12)) / 2, 1e-12);
  EXPECT_EQ(rows[2]["id"], "2");
  EXPECT_EQ(rows[2]["reward"].get<double>(), 0.0);
  EXPECT_EQ(rows[2]["failure"], "heuristic: empty");
  EXPECT_EQ(rows[3]["reward"].get<double>(), 1.0);
  EXPECT_EQ(server.calls(), 2);
  for (const auto& text : {out, slurp(dir / "scores.jsonl"), slurp(dir / "cache.sqlite")})
    EXPECT_EQ(text.find(kKey), std::string::npos) << "key leaked";
}

TEST(ScoreCli, UnknownConfigKeyFailsNamingIt) {
  const fs::path dir = test::temp_dir("score_cli_bad");
  std::ofstream(dir / "cfg.yaml") << "teacher:\n  provider: openai\n  modle_name: x\n";
  std::ofstream(dir / "s.jsonl") << "{\"prompt\": \"p\", \"completion\": \"c\"}\n";
  std::string out;
  const int rc = test::run_command(fmt::format("{} score --config {} --samples {} --out {}", rlaif_bin(),
                                               (dir / "cfg.yaml").string(), (dir / "s.jsonl").string(),
                                               (dir / "o.jsonl").string()),
                                   &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("unknown key 'teacher.modle_name' (line 3)"), std::string::npos) << out;
  EXPECT_NE(out.find("did you mean 'model_name'?"), std::string::npos) << out;
}
