// `rlaif score --config X.yaml --samples S.jsonl --out scores.jsonl`: scores (prompt, completion[, language,
// answer, tests]) rows with the configured tiers and teacher, one JSON line per row, in the input's order.
#include <fstream>

#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "core/io.h"
#include "core/logging.h"
#include "rl/config.h"
#include "teacher/scorer.h"

namespace rlaif::app {
namespace {

std::vector<teacher::ScoreRequest> read_samples(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("score", fmt::format("cannot open samples file {}", path));
  std::vector<teacher::ScoreRequest> rows;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    const auto where = fmt::format("{}:{}", path, n);
    if (j.is_discarded() || !j.is_object()) throw Error("score", where + ": not a JSON object");
    auto str = [&](const char* key, bool required) -> std::string {
      if (!j.contains(key) || j[key].is_null()) {
        if (required) throw Error("score", fmt::format("{}: missing '{}'", where, key), "rows need prompt and completion");
        return "";
      }
      if (j[key].is_string()) return j[key].get<std::string>();
      if (j[key].is_number()) return j[key].dump();
      throw Error("score", fmt::format("{}: '{}' must be a string", where, key));
    };
    teacher::ScoreRequest r;
    r.id = j.contains("id") ? str("id", false) : std::to_string(rows.size());
    r.prompt = str("prompt", true);
    r.completion = str("completion", true);
    r.language = str("language", false);
    r.answer = str("answer", false);
    if (j.contains("tests")) {
      if (j["tests"].is_string()) r.tests = {j["tests"].get<std::string>()};
      else if (j["tests"].is_array())
        for (const auto& t : j["tests"]) {
          if (!t.is_string()) throw Error("score", where + ": 'tests' must be a string or a list of strings");
          r.tests.push_back(t.get<std::string>());
        }
      else if (!j["tests"].is_null()) throw Error("score", where + ": 'tests' must be a string or a list of strings");
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

int run_score(const std::string& config_path, const std::string& samples_path, const std::string& out_path) {
  const RunConfig cfg = load_run_config(config_path);
  const auto rows = read_samples(samples_path);
  log_info("[score] {} samples from {}; teacher {} ({}, {} mode)", rows.size(), samples_path, cfg.teacher.model_name,
           cfg.teacher.provider, teacher::scoring_mode_name(cfg.teacher.mode));
  teacher::Scorer scorer(cfg.teacher);
  std::string out;
  const auto results = scorer.score(rows);
  for (size_t i = 0; i < results.size(); ++i) {
    nlohmann::json j = results[i].to_json();
    j["prompt"] = rows[i].prompt;
    j["completion"] = rows[i].completion;
    if (!rows[i].language.empty()) j["language"] = rows[i].language;
    out += j.dump() + "\n";
  }
  write_file_atomic(out_path, out);
  const auto& st = scorer.run_stats();
  log_info("[score] wrote {}: {} rewarded, {} unscored; {} API calls, {} tokens in, {} out; cache hit rate {:.1f}%",
           out_path, st.rewarded, st.unscored, st.api.calls, st.api.input_tokens, st.api.output_tokens,
           100 * st.cache_hit_rate());
  log_info("[score] stats {}", st.to_json().dump());
  return 0;
}

const RegisterCommand kRegister{{"score", "score samples with the verifier tiers and the teacher API",
                                 [](CLI::App& sub) -> std::function<int()> {
                                   auto config = std::make_shared<std::string>();
                                   auto samples = std::make_shared<std::string>();
                                   auto out = std::make_shared<std::string>();
                                   sub.add_option("--config", *config, "run config YAML")->required();
                                   sub.add_option("--samples", *samples, "JSONL rows: id?, prompt, completion, "
                                                                         "language?, answer?, tests?")->required();
                                   sub.add_option("--out", *out, "output JSONL, one line per row")->required();
                                   return [=] { return run_score(*config, *samples, *out); };
                                 }}};

}  // namespace
}  // namespace rlaif::app
