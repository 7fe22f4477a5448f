// Prompt datasets for training and evaluation: JSONL rows {prompt, language?, answer?, tests?}, read once,
// validated line by line, and served in seeded shuffled order epoch after epoch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace rlaif {

struct PromptRow {
  std::string prompt;
  std::string language;  // python, cpp (or c++), rust; empty for non-code tasks
  std::string answer;    // GSM8K-style '#### N' reference, if any
  std::vector<std::string> tests;
};

// Errors name the file and line (not JSON, missing or mistyped field).
std::vector<PromptRow> load_prompt_rows(const std::filesystem::path& path, const std::string& prompt_field,
                                        int64_t max_rows = 0);

// Epoch-ordered batches: a fresh seeded permutation per epoch; position (epoch, index) is resumable.
class PromptSampler {
 public:
  PromptSampler(int64_t size, uint64_t seed, bool shuffle);
  std::vector<int64_t> next_batch(int64_t batch_size);  // wraps into the next epoch
  int64_t epoch() const { return epoch_; }
  int64_t index() const { return index_; }
  void seek(int64_t epoch, int64_t index);

 private:
  void reshuffle();
  int64_t size_;
  uint64_t seed_;
  bool shuffle_;
  int64_t epoch_ = 0, index_ = 0;
  std::vector<int64_t> order_;
};

}  // namespace rlaif
