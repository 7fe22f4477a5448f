// Rewards land on the right samples when the teacher's answers arrive out of order (issue 7's proof): `rlaif train`
// with the teacher tier only, against a local judge whose score is a pure function of the completion text it was
// sent and which answers after random delays (and fails some first attempts with 500, so retries reorder further).
// Every sample in samples.jsonl must carry exactly the score of its own text.
#include <gtest/gtest.h>

#include <httplib.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

// The score the judge means for a completion: FNV-1a of its text, mapped onto [0, 1].
double intended(const std::string& text) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  return static_cast<double>(h % 997) / 996.0;
}

// Extracts the completion from the judge prompt ("Response to score:\n```<lang>\n<completion>\n```\n\nAnswer ...").
std::string completion_of(const std::string& user) {
  const auto open = user.find("Response to score:\n```");
  const auto start = user.find('\n', open + 20) + 1;
  const auto end = user.rfind("\n```\n\nAnswer with the JSON scores only.");
  if (open == std::string::npos || end == std::string::npos || end < start) return "<unparsed>";
  return user.substr(start, end - start);
}

class Judge {
 public:
  Judge() {
    server_.new_task_queue = [] { return new httplib::ThreadPool(32); };
    server_.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) {
      const int n = arrivals_++;
      const auto body = nlohmann::json::parse(q.body);
      const std::string text = completion_of(body.at("messages").at(1).at("content").get<std::string>());
      double delay;
      {
        std::lock_guard<std::mutex> l(m_);
        delay = std::uniform_real_distribution<double>(0.0, 0.08)(rng_);
        if (n % 5 == 2 && !failed_.count(text)) {  // a 500 on some first attempts: the retry comes back later
          failed_.insert(text);
          r.status = 500;
          r.set_content("overloaded", "text/plain");
          return;
        }
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(delay));
      const double v = intended(text);
      const std::string scores = fmt::format(
          R"({{"correctness": {0}, "code_quality": {0}, "efficiency": {0}, "documentation": {0}}})", v);
      const nlohmann::json reply = {{"choices", {{{"message", {{"role", "assistant"}, {"content", scores}}}}}},
                                    {"usage", {{"prompt_tokens", 50}, {"completion_tokens", 20}}}};
      r.set_content(reply.dump(), "application/json");
      std::lock_guard<std::mutex> l(m_);
      answer_order_.push_back(n);
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~Judge() {
    server_.stop();
    thread_.join();
  }
  std::string base_url() const { return fmt::format("http://127.0.0.1:{}", port_); }
  // True when some request was answered before one that arrived earlier.
  bool answered_out_of_order() {
    std::lock_guard<std::mutex> l(m_);
    return !std::is_sorted(answer_order_.begin(), answer_order_.end());
  }

 private:
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<int> arrivals_{0};
  std::mutex m_;
  std::mt19937_64 rng_{12345};
  std::set<std::string> failed_;
  std::vector<int> answer_order_;
};

}  // namespace

TEST(TeacherOrder, EveryRewardBelongsToItsOwnCompletion) {
  const fs::path model = test::source_dir() / "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  ASSERT_TRUE(fs::exists(model)) << "run scripts/setup.sh";
  Judge judge;
  const fs::path dir = test::temp_dir("teacher_order");
  {
    // Open prompts without reference answers: the teacher tier scores them.
    std::ofstream rows(dir / "prompts.jsonl");
    for (const char* p : {"Name a fruit.", "Say hello in French.", "Name a colour.", "Give a word that rhymes with cat."})
      rows << nlohmann::json{{"prompt", p}}.dump() << "\n";
  }
  std::ofstream(dir / "cfg.yaml") << fmt::format(R"(model:
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
  batch_size: 2
  max_steps: 2
  save_steps: 0
  seed: 3
rlaif:
  num_samples_per_prompt: 6
  temperature: 1.0
  max_new_tokens: 8
data:
  train_file: {}
logging:
  output_dir: {}
)",
                                                 model.string(), judge.base_url(),
                                                 (dir / "prompts.jsonl").string(),
                                                 (dir / "run").string());
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
}
