// Tokenizer encode throughput, one thread: MB/s of UTF-8 input on code_prompts.jsonl + GSM8K test
// (questions and answers) with the Qwen2.5 tokenizer. bench/bench_tokenizer_hf.py measures HF tokenizers on
// the same corpus. Usage: bench_tokenizer [SHARED_DATA_DIR] [REPEATS]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "text/tokenizer.h"

namespace {

std::vector<std::string> load_corpus(const std::string& data) {
  std::vector<std::string> texts;
  auto read_jsonl = [&](const std::string& path, std::initializer_list<const char*> fields) {
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line);
      for (const char* f : fields) texts.push_back(j.at(f).get<std::string>());
    }
  };
  read_jsonl(data + "/datasets/code_prompts.jsonl", {"prompt"});
  read_jsonl(data + "/datasets/gsm8k_test.jsonl", {"question", "answer"});
  return texts;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string data = argc > 1 ? argv[1] : "../shared/data";
  const int repeats = argc > 2 ? std::stoi(argv[2]) : 5;
  const auto texts = load_corpus(data);
  size_t bytes = 0;
  for (const auto& t : texts) bytes += t.size();
  const auto tok = rlaif::Tokenizer::from_dir(data + "/qwen2.5");
  double best = 1e30;
  size_t n_tokens = 0;
  for (int r = 0; r < repeats; ++r) {
    // The per-word cache stays warm after the first pass, as HF's does; the first pass is printed too.
    const auto t0 = std::chrono::steady_clock::now();
    n_tokens = 0;
    for (const auto& t : texts) n_tokens += tok.encode(t).size();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == 0) fmt::print("first pass (cold cache): {:.2f} MB/s\n", bytes / s / 1e6);
    best = std::min(best, s);
  }
  fmt::print("rlaif encode, 1 thread: {} texts, {:.2f} MB, {} tokens, best of {}: {:.3f} s = {:.2f} MB/s\n", texts.size(),
             bytes / 1e6, n_tokens, repeats, best, bytes / best / 1e6);
  return 0;
}
