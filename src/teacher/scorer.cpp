// Scoring pipeline implementation (see scorer.h).
#include "teacher/scorer.h"

#include <atomic>
#include <thread>

#include <fmt/format.h>

#include "core/error.h"
#include "core/logging.h"

namespace rlaif::teacher {

using nlohmann::json;

namespace {

json dims_json(const DimScores& d) {
  json j = json::object();
  for (int k = 0; k < kNumDimensions; ++k) j[kDimensionNames[k]] = d[k];
  return j;
}

std::string dims_value(const DimScores& d) { return json(std::vector<double>(d.begin(), d.end())).dump(); }

std::optional<DimScores> dims_from_value(const std::string& v) {
  const json j = json::parse(v, nullptr, false);
  if (!j.is_array() || j.size() != kNumDimensions) return std::nullopt;
  DimScores d{};
  for (int k = 0; k < kNumDimensions; ++k) {
    if (!j[k].is_number()) return std::nullopt;
    d[k] = j[k].get<double>();
  }
  return d;
}

std::string api_failure(const ApiResult& r) {
  return fmt::format("teacher: {} after {} attempts ({})", failure_kind_name(r.failure), r.attempts, r.message);
}

}  // namespace

json ScoreResult::to_json() const {
  json j = {{"id", id}, {"reward", reward ? json(*reward) : json(nullptr)},
            {"failure", failure.empty() ? json(nullptr) : json(failure)}, {"cache_hit", cache_hit}};
  if (dims) j["scores"] = dims_json(*dims);
  if (student_score) j["student_score"] = *student_score;
  if (reference_score) j["reference_score"] = *reference_score;
  json tiers_j = json::object();
  for (const auto& t : tiers) tiers_j[t.name] = {{"score", t.score}, {"passed", t.passed}, {"detail", t.detail}};
  j["tiers"] = tiers_j;
  return j;
}

double ScoringStats::cache_hit_rate() const {
  const int64_t n = cache_hits + cache_misses;
  return n ? static_cast<double>(cache_hits) / static_cast<double>(n) : 0.0;
}

void ScoringStats::add(const ScoringStats& o) {
  samples += o.samples;
  rewarded += o.rewarded;
  unscored += o.unscored;
  heuristic_rejects += o.heuristic_rejects;
  sandbox_runs += o.sandbox_runs;
  cache_hits += o.cache_hits;
  cache_misses += o.cache_misses;
  for (const auto& [k, v] : o.failures) failures[k] += v;
  api.add(o.api);
}

json ScoringStats::to_json() const {
  return {{"samples", samples}, {"rewarded", rewarded}, {"unscored", unscored},
          {"heuristic_rejects", heuristic_rejects}, {"sandbox_runs", sandbox_runs}, {"cache_hits", cache_hits},
          {"cache_misses", cache_misses}, {"cache_hit_rate", cache_hit_rate()}, {"failures", failures},
          {"api", {{"calls", api.calls}, {"input_tokens", api.input_tokens}, {"output_tokens", api.output_tokens},
                   {"succeeded", api.succeeded}, {"failed", api.failed}, {"faults", api.faults},
                   {"failures", api.failures}, {"max_in_flight", api.max_in_flight}}}};
}

Scorer::Scorer(TeacherConfig cfg) : cfg_(std::move(cfg)) {
  // Fail fast on a bad provider or a missing key, but only when the teacher will actually be asked.
  if (cfg_.verifiers.teacher) client();
}

Scorer::~Scorer() = default;

ApiClient& Scorer::client() {
  if (!client_) client_ = std::make_unique<ApiClient>(cfg_);
  return *client_;
}

std::optional<std::string> Scorer::cache_get(const std::string& key) {
  if (cfg_.cache_path.empty()) return std::nullopt;
  if (!cache_) cache_ = std::make_unique<ScoreCache>(cfg_.cache_path, cfg_.teacher_score_cache_max_age_seconds);
  return cache_->get(key);
}

void Scorer::cache_put(const std::string& key, const std::string& value) {
  if (cfg_.cache_path.empty()) return;
  if (!cache_) cache_ = std::make_unique<ScoreCache>(cfg_.cache_path, cfg_.teacher_score_cache_max_age_seconds);
  cache_->put(key, value);
}

void Scorer::cheap_tiers(const std::vector<ScoreRequest>& rows, std::vector<ScoreResult>& out,
                         std::vector<bool>& wants_teacher) {
  const VerifierConfig& v = cfg_.verifiers;
  // One byte per row: std::vector<bool> packs bits, so threads setting neighbouring rows would race.
  std::vector<char> wants(rows.size(), 0);
  std::atomic<size_t> next{0};
  std::atomic<int64_t> sandbox_runs{0}, rejects{0};
  auto work = [&] {
    for (size_t i; (i = next++) < rows.size();) {
      const ScoreRequest& row = rows[i];
      ScoreResult& r = out[i];
      if (v.heuristic) {
        if (auto why = heuristic_reject(row.completion, row.language)) {
          r.tiers.push_back({"heuristic", v.heuristic_fail_score, false, *why});
          r.reward = v.heuristic_fail_score;
          r.failure = "heuristic: " + *why;
          rejects++;
          continue;
        }
        r.tiers.push_back({"heuristic", 1.0, true, "ok"});
      }
      const bool code = is_code_language(row.language);
      const std::string src = code ? code_of(row.completion, row.language) : "";
      bool failed = false;
      if (v.syntax && code) {
        if (auto t = syntax_check(v.sandbox, src, row.language)) {
          sandbox_runs++;
          failed |= !t->passed;
          r.tiers.push_back(*t);
        }
      }
      if (v.tests && code && !row.tests.empty() && !failed) {
        if (auto t = run_tests(v.sandbox, src, row.language, row.tests)) {
          sandbox_runs++;
          failed |= !t->passed;
          r.tiers.push_back(*t);
        }
      }
      if (v.exact_answer && !row.answer.empty()) r.tiers.push_back(exact_answer(row.completion, row.answer));
      wants[i] = v.teacher && (code || row.answer.empty()) && !(failed && v.skip_teacher_on_failure);
    }
  };
  const int n = std::max(1, std::min<int>(v.sandbox.max_parallel, static_cast<int>(rows.size())));
  std::vector<std::thread> threads;
  for (int t = 1; t < n; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < rows.size(); ++i) wants_teacher[i] = wants[i] != 0;
  step_.sandbox_runs += sandbox_runs;
  step_.heuristic_rejects += rejects;
}

void Scorer::teacher_tier(const std::vector<ScoreRequest>& rows, std::vector<ScoreResult>& out,
                          const std::vector<bool>& wants_teacher) {
  const std::string mode_tag = cfg_.mode == ScoringMode::kBatchedRanked ? "ranked" : "single";
  auto score_key = [&](const std::string& prompt, const std::string& language, const std::string& completion) {
    return cache_key({"score", cfg_.model_name, cfg_.rubric.version, mode_tag, normalize_language(language), prompt,
                      completion});
  };
  std::map<std::string, DimScores> known;           // score key -> dims (cache or API)
  std::map<std::string, std::string> failed_key;    // score key -> why it could not be scored
  std::vector<std::string> row_key(rows.size());
  std::vector<ApiRequest> requests;
  std::map<std::string, std::string> request_key;   // request id -> score key
  auto validate_single = [](const std::string& text) {
    std::string why;
    return parse_scores(text, &why) ? std::string() : why;
  };
  auto lookup = [&](const std::string& key, bool count) -> bool {
    if (known.count(key)) return true;
    if (auto v = cache_get(key)) {
      if (auto d = dims_from_value(*v)) {
        known[key] = *d;
        if (count) step_.cache_hits++;
        return true;
      }
    }
    if (count) step_.cache_misses++;
    return false;
  };
  // Queues a single-completion scoring call unless the key is known or already queued.
  auto queue_single = [&](const std::string& id, const std::string& key, const ScoreRequest& row,
                          const std::string& completion) {
    for (const auto& [rid, k] : request_key)
      if (k == key) return;
    const TeacherPrompt p = scoring_prompt(row.prompt, completion, row.language);
    requests.push_back({id, p.system, p.user, validate_single});
    request_key[id] = key;
  };

  // Relative mode: the teacher's own reference solution per prompt, made once and cached. A failed reference is
  // never cached: its samples are reported unscored and the next run asks again.
  std::map<std::string, std::string> group_ref_key;  // group -> score key of the reference solution
  std::map<std::string, std::string> group_failure;
  auto group_of = [](const ScoreRequest& row) { return normalize_language(row.language) + '\n' + row.prompt; };
  if (cfg_.mode == ScoringMode::kRelative) {
    std::map<std::string, size_t> first_row;
    for (size_t i = 0; i < rows.size(); ++i)
      if (wants_teacher[i]) first_row.emplace(group_of(rows[i]), i);
    std::vector<ApiRequest> ref_requests;
    std::map<std::string, std::string> ref_group;  // request id -> group
    std::map<std::string, std::string> ref_code;   // group -> code
    int n = 0;
    for (const auto& [group, i] : first_row) {
      const std::string rkey =
          cache_key({"reference", cfg_.model_name, cfg_.rubric.version, normalize_language(rows[i].language), rows[i].prompt});
      if (auto v = cache_get(rkey)) {
        ref_code[group] = *v;
        continue;
      }
      const TeacherPrompt p = reference_prompt(rows[i].prompt, rows[i].language);
      const std::string id = fmt::format("reference:{}", n++);
      ref_requests.push_back({id, p.system, p.user, [](const std::string& text) {
                                return extract_code(text).empty() ? std::string("empty reference solution") : "";
                              }});
      ref_group[id] = group;
    }
    if (!ref_requests.empty()) {
      for (const ApiResult& r : client().run(ref_requests)) {
        const std::string& group = ref_group.at(r.id);
        if (!r.ok) {
          group_failure[group] = "reference solution failed: " + api_failure(r);
          continue;
        }
        const size_t i = first_row.at(group);
        ref_code[group] = extract_code(r.text);
        cache_put(cache_key({"reference", cfg_.model_name, cfg_.rubric.version, normalize_language(rows[i].language),
                             rows[i].prompt}),
                  ref_code[group]);
      }
    }
    n = 0;
    for (const auto& [group, code] : ref_code) {
      const ScoreRequest& row = rows[first_row.at(group)];
      const std::string key = score_key(row.prompt, row.language, code);
      group_ref_key[group] = key;
      if (!lookup(key, false)) queue_single(fmt::format("reference-score:{}", n++), key, row, code);
    }
  }

  if (cfg_.mode == ScoringMode::kBatchedRanked) {
    // One call per prompt with every uncached completion of it; each completion's scores cached on their own.
    std::map<std::string, std::vector<size_t>> groups;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!wants_teacher[i]) continue;
      row_key[i] = score_key(rows[i].prompt, rows[i].language, rows[i].completion);
      out[i].cache_hit = lookup(row_key[i], true);
      if (!out[i].cache_hit) groups[group_of(rows[i])].push_back(i);
    }
    int n = 0;
    for (const auto& [group, idx] : groups) {
      std::vector<std::string> completions, keys;
      for (size_t i : idx) {
        if (std::find(keys.begin(), keys.end(), row_key[i]) != keys.end()) continue;
        keys.push_back(row_key[i]);
        completions.push_back(rows[i].completion);
      }
      const TeacherPrompt p = ranked_prompt(rows[idx[0]].prompt, completions, rows[idx[0]].language);
      const size_t count = completions.size();
      const std::string id = fmt::format("ranked:{}", n++);
      requests.push_back({id, p.system, p.user, [count](const std::string& text) {
                            std::string why;
                            return parse_ranked_scores(text, count, &why) ? std::string() : why;
                          }});
      for (size_t k = 0; k < keys.size(); ++k) request_key[fmt::format("{}#{}", id, k)] = keys[k];
    }
  } else {
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!wants_teacher[i]) continue;
      if (group_failure.count(group_of(rows[i]))) continue;
      row_key[i] = score_key(rows[i].prompt, rows[i].language, rows[i].completion);
      out[i].cache_hit = lookup(row_key[i], true);
      if (!out[i].cache_hit) queue_single(rows[i].id, row_key[i], rows[i], rows[i].completion);
    }
  }

  if (!requests.empty()) {
    for (const ApiResult& r : client().run(requests)) {
      if (cfg_.mode == ScoringMode::kBatchedRanked) {
        std::vector<std::string> keys;
        for (size_t k = 0; request_key.count(fmt::format("{}#{}", r.id, k)); ++k)
          keys.push_back(request_key.at(fmt::format("{}#{}", r.id, k)));
        if (!r.ok) {
          for (const auto& k : keys) failed_key[k] = api_failure(r);
          continue;
        }
        std::string why;
        const auto all = parse_ranked_scores(r.text, keys.size(), &why);
        RLAIF_CHECK(all.has_value(), "validated answer no longer parses");
        for (size_t k = 0; k < keys.size(); ++k) {
          known[keys[k]] = (*all)[k];
          cache_put(keys[k], dims_value((*all)[k]));
        }
        continue;
      }
      const std::string& key = request_key.at(r.id);
      if (!r.ok) {
        failed_key[key] = api_failure(r);
        continue;
      }
      std::string why;
      const auto d = parse_scores(r.text, &why);
      RLAIF_CHECK(d.has_value(), "validated answer no longer parses");
      known[key] = *d;
      cache_put(key, dims_value(*d));
    }
  }

  for (size_t i = 0; i < rows.size(); ++i) {
    if (!wants_teacher[i]) continue;
    ScoreResult& res = out[i];
    const std::string group = group_of(rows[i]);
    std::string fail;
    if (group_failure.count(group)) fail = group_failure[group];
    else if (failed_key.count(row_key[i])) fail = failed_key[row_key[i]];
    if (fail.empty() && cfg_.mode == ScoringMode::kRelative) {
      const std::string& rk = group_ref_key.at(group);
      if (failed_key.count(rk)) fail = "scoring the reference solution failed: " + failed_key[rk];
    }
    if (!fail.empty()) {
      res.failure = fail;
      continue;
    }
    const DimScores& d = known.at(row_key[i]);
    const DimScores w = rubric_weights(cfg_.rubric, rows[i].prompt);
    res.dims = d;
    res.student_score = weighted_score(w, d) * language_multiplier(cfg_.rubric, rows[i].language);
    double s = *res.student_score;
    if (cfg_.mode == ScoringMode::kRelative) {
      res.reference_score = weighted_score(w, known.at(group_ref_key.at(group)));
      s = *res.student_score / (*res.reference_score + cfg_.relative_eps);
    }
    res.tiers.push_back({"teacher", s, true, scoring_mode_name(cfg_.mode)});
  }
}

std::vector<ScoreResult> Scorer::score(const std::vector<ScoreRequest>& input) {
  step_ = ScoringStats{};
  std::vector<ScoreRequest> rows = input;
  std::vector<ScoreResult> out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].id.empty()) rows[i].id = std::to_string(i);
    out[i].id = rows[i].id;
  }
  std::vector<bool> wants_teacher(rows.size(), false);
  cheap_tiers(rows, out, wants_teacher);
  const ApiStats before = client_ ? client_->stats() : ApiStats{};
  if (std::find(wants_teacher.begin(), wants_teacher.end(), true) != wants_teacher.end())
    teacher_tier(rows, out, wants_teacher);
  if (client_) {
    const ApiStats& after = client_->stats();
    step_.api.calls = after.calls - before.calls;
    step_.api.input_tokens = after.input_tokens - before.input_tokens;
    step_.api.output_tokens = after.output_tokens - before.output_tokens;
    step_.api.succeeded = after.succeeded - before.succeeded;
    step_.api.failed = after.failed - before.failed;
    for (const auto& [k, v] : after.faults) step_.api.faults[k] = v - (before.faults.count(k) ? before.faults.at(k) : 0);
    for (const auto& [k, v] : after.failures)
      step_.api.failures[k] = v - (before.failures.count(k) ? before.failures.at(k) : 0);
    step_.api.max_in_flight = after.max_in_flight;
  }

  const VerifierConfig& v = cfg_.verifiers;
  for (size_t i = 0; i < rows.size(); ++i) {
    ScoreResult& r = out[i];
    step_.samples++;
    if (r.reward) {  // heuristic rejection: final already
      step_.rewarded++;
      continue;
    }
    if (wants_teacher[i] && !r.failure.empty()) {  // teacher asked but no answer: unscored, never a default
      step_.unscored++;
      const std::string kind = r.failure.substr(0, r.failure.find(" after"));
      step_.failures[kind]++;
      continue;
    }
    double num = 0, den = 0;
    for (const auto& t : r.tiers) {
      const double w = t.name == "syntax" ? v.weight_syntax : t.name == "tests" ? v.weight_tests
                     : t.name == "exact_answer" ? v.weight_exact_answer : t.name == "teacher" ? v.weight_teacher : 0;
      if (w <= 0) continue;
      num += w * t.score;
      den += w;
      if (!t.passed && r.failure.empty()) r.failure = t.name + ": " + t.detail.substr(0, 200);
    }
    if (den <= 0) {
      r.failure = "no verifier tier applies to this sample (enable teacher, or give tests or an answer)";
      step_.unscored++;
      step_.failures["no_tier"]++;
      continue;
    }
    r.reward = num / den;
    step_.rewarded++;
  }
  run_.add(step_);
  return out;
}

}  // namespace rlaif::teacher
