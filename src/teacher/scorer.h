// The scoring pipeline: cheap tiers (heuristic, sandboxed syntax and tests, exact answers), then the teacher rubric
// through the cache and the API client, combined by configured weights. Rewards are keyed to sample ids, so
// they are exact whatever order answers arrive in; a sample that cannot be scored says why and gets no reward.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "teacher/api_client.h"
#include "teacher/rubric.h"
#include "teacher/score_cache.h"
#include "teacher/teacher_config.h"
#include "teacher/verifiers.h"

namespace rlaif::teacher {

struct ScoreRequest {
  std::string id;
  std::string prompt;  // sent in full
  std::string completion;
  std::string language;  // python, cpp (or c++), rust; empty for non-code tasks
  std::string answer;    // GSM8K-style reference ending in '#### N'; empty if none
  std::vector<std::string> tests;
};

struct ScoreResult {
  std::string id;
  std::optional<double> reward;  // nullopt: not scored (failure says why); never a silent default
  std::string failure;           // first failing tier ("tests: timeout") or why it could not be scored
  std::vector<TierResult> tiers;
  std::optional<DimScores> dims;          // the teacher's per-dimension scores of this completion
  std::optional<double> student_score;    // weighted rubric score (times the language multiplier)
  std::optional<double> reference_score;  // relative mode: weighted score of the teacher's reference solution
  bool cache_hit = false;
  nlohmann::json to_json() const;
};

struct ScoringStats {
  int64_t samples = 0, rewarded = 0, unscored = 0;
  int64_t heuristic_rejects = 0, sandbox_runs = 0;
  int64_t cache_hits = 0, cache_misses = 0;
  std::map<std::string, int64_t> failures;  // unscored samples by kind
  ApiStats api;
  double cache_hit_rate() const;
  void add(const ScoringStats& o);
  nlohmann::json to_json() const;
};

class Scorer {
 public:
  explicit Scorer(TeacherConfig cfg);
  ~Scorer();
  // Scores one step's samples; results in the order of `rows`, each carrying its row's id.
  std::vector<ScoreResult> score(const std::vector<ScoreRequest>& rows);
  // Stats of the last score() call (a step scored in several calls sums them: ScoringPipeline::stats()).
  const ScoringStats& step_stats() const { return step_; }
  const ScoringStats& run_stats() const { return run_; }
  const TeacherConfig& config() const { return cfg_; }

 private:
  void cheap_tiers(const std::vector<ScoreRequest>& rows, std::vector<ScoreResult>& out, std::vector<bool>& wants_teacher);
  void teacher_tier(const std::vector<ScoreRequest>& rows, std::vector<ScoreResult>& out,
                    const std::vector<bool>& wants_teacher);
  ApiClient& client();
  std::optional<std::string> cache_get(const std::string& key);
  void cache_put(const std::string& key, const std::string& value);

  TeacherConfig cfg_;
  std::unique_ptr<ApiClient> client_;
  std::unique_ptr<ScoreCache> cache_;
  ScoringStats step_, run_;
};

}  // namespace rlaif::teacher
