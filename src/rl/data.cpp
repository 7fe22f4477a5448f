// JSONL prompt loading and the seeded epoch sampler.
#include "rl/data.h"

#include <algorithm>
#include <fstream>
#include <numeric>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace rlaif {

std::vector<PromptRow> load_prompt_rows(const std::filesystem::path& path, const std::string& prompt_field,
                                        int64_t max_rows) {
  std::ifstream in(path);
  if (!in) throw Error("data", fmt::format("cannot read '{}'", path.string()), "check data.train_file / data.eval_file");
  std::vector<PromptRow> rows;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    const std::string where = fmt::format("{}:{}", path.string(), n);
    if (j.is_discarded() || !j.is_object()) throw Error("data", where + ": not a JSON object");
    auto str = [&](const char* key, bool required) -> std::string {
      if (!j.contains(key) || j[key].is_null()) {
        if (required) throw Error("data", fmt::format("{}: missing field '{}'", where, key), "set data.prompt_field");
        return "";
      }
      if (!j[key].is_string()) throw Error("data", fmt::format("{}: field '{}' must be a string", where, key));
      return j[key].get<std::string>();
    };
    PromptRow r;
    r.prompt = str(prompt_field.c_str(), true);
    r.language = str("language", false);
    r.answer = str("answer", false);
    if (j.contains("tests") && !j["tests"].is_null()) {
      if (!j["tests"].is_array()) throw Error("data", fmt::format("{}: field 'tests' must be a list of strings", where));
      for (const auto& t : j["tests"]) {
        if (!t.is_string()) throw Error("data", fmt::format("{}: field 'tests' must be a list of strings", where));
        r.tests.push_back(t.get<std::string>());
      }
    }
    rows.push_back(std::move(r));
    if (max_rows > 0 && static_cast<int64_t>(rows.size()) >= max_rows) break;
  }
  if (rows.empty()) throw Error("data", fmt::format("'{}' holds no prompts", path.string()));
  return rows;
}

PromptSampler::PromptSampler(int64_t size, uint64_t seed, bool shuffle) : size_(size), seed_(seed), shuffle_(shuffle) {
  reshuffle();
}

void PromptSampler::reshuffle() {
  order_.resize(size_);
  std::iota(order_.begin(), order_.end(), 0);
  if (shuffle_) {
    std::mt19937_64 g(seed_ * 1000003ULL + static_cast<uint64_t>(epoch_));
    std::shuffle(order_.begin(), order_.end(), g);
  }
}

std::vector<int64_t> PromptSampler::next_batch(int64_t batch_size) {
  std::vector<int64_t> out;
  while (static_cast<int64_t>(out.size()) < batch_size) {
    if (index_ >= size_) {
      ++epoch_;
      index_ = 0;
      reshuffle();
    }
    out.push_back(order_[index_++]);
  }
  return out;
}

void PromptSampler::seek(int64_t epoch, int64_t index) {
  epoch_ = epoch;
  index_ = index;
  reshuffle();
}

}  // namespace rlaif
