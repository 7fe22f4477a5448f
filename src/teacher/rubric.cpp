// Rubric weights, teacher prompts and tolerant JSON parsing (see rubric.h).
#include "teacher/rubric.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace rlaif::teacher {

using nlohmann::json;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// Words by which a prompt demands more of one dimension (the original's keyword lists, per dimension).
const std::array<std::vector<std::string>, kNumDimensions> kDemandKeywords = {{
    {"correct", "edge case", "handle", "valid", "robust", "error", "exception", "test"},
    {"clean", "readable", "maintainable", "idiomatic", "best practice", "modular", "refactor", "design"},
    {"efficient", "fast", "optimi", "performance", "complexity", "o(n", "o(log", "memory", "scalab"},
    {"document", "comment", "docstring", "explain", "annotat", "type hint", "readme"},
}};

const char* kJudgeSystem =
    "You are an expert code reviewer. Score the response to the programming task on four dimensions, each a "
    "number from 0 to 1: correctness, code_quality, efficiency, documentation. Answer with JSON only, e.g. "
    "{\"correctness\": 0.8, \"code_quality\": 0.7, \"efficiency\": 0.6, \"documentation\": 0.5}.";

// The outermost balanced {...} starting at `from`, honouring strings; npos if none.
std::pair<size_t, size_t> balanced_object(const std::string& s, size_t from) {
  const size_t b = s.find('{', from);
  if (b == std::string::npos) return {std::string::npos, 0};
  int depth = 0;
  bool in_str = false, esc = false;
  for (size_t i = b; i < s.size(); ++i) {
    const char c = s[i];
    if (in_str) {
      if (esc) esc = false;
      else if (c == '\\') esc = true;
      else if (c == '"') in_str = false;
      continue;
    }
    if (c == '"') in_str = true;
    else if (c == '{') ++depth;
    else if (c == '}' && --depth == 0) return {b, i + 1 - b};
  }
  return {std::string::npos, 0};
}

// Every JSON object in the text that parses, outermost first.
std::vector<json> json_objects(const std::string& text) {
  std::vector<json> out;
  for (size_t from = 0;;) {
    const auto [b, n] = balanced_object(text, from);
    if (b == std::string::npos) break;
    json j = json::parse(text.substr(b, n), nullptr, false);
    const bool ok = !j.is_discarded();
    if (ok) out.push_back(std::move(j));
    from = ok ? b + n : b + 1;
  }
  return out;
}

std::optional<double> number(const json& v) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    try {
      return std::stod(v.get<std::string>());
    } catch (...) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

std::optional<DimScores> scores_of(const json& obj, std::string* why) {
  DimScores s{};
  for (int d = 0; d < kNumDimensions; ++d) {
    const auto it = obj.find(kDimensionNames[d]);
    const auto v = it == obj.end() ? std::nullopt : number(*it);
    if (!v || !std::isfinite(*v)) {
      *why = fmt::format("no numeric '{}' in the JSON", kDimensionNames[d]);
      return std::nullopt;
    }
    s[d] = std::clamp(*v, 0.0, 1.0);
  }
  return s;
}

std::string fence(const std::string& language) {
  const std::string l = normalize_language(language);
  return l.empty() ? "" : l;
}

}  // namespace

std::string normalize_language(const std::string& language) {
  const std::string l = lower(language);
  if (l == "c++" || l == "cpp" || l == "cxx" || l == "cc") return "cpp";
  if (l == "rs" || l == "rust") return "rust";
  if (l == "py" || l == "python" || l == "python3") return "python";
  return l;
}

double language_multiplier(const RubricConfig& rubric, const std::string& language) {
  const std::string l = normalize_language(language);
  if (l == "cpp") return rubric.cpp_multiplier;
  if (l == "rust") return rubric.rust_multiplier;
  if (l == "python") return rubric.python_multiplier;
  return 1.0;
}

DimScores rubric_weights(const RubricConfig& rubric, const std::string& prompt) {
  DimScores w = {rubric.correctness, rubric.code_quality, rubric.efficiency, rubric.documentation};
  if (rubric.adapt_to_prompt) {
    const std::string p = lower(prompt);
    for (int d = 0; d < kNumDimensions; ++d) {
      int hits = 0;
      for (const auto& k : kDemandKeywords[d])
        for (size_t pos = p.find(k); pos != std::string::npos; pos = p.find(k, pos + k.size())) ++hits;
      w[d] *= 1.0 + 0.25 * std::min(hits, 4);
    }
  }
  double sum = 0;
  for (double x : w) sum += x;
  if (sum > 0)
    for (double& x : w) x /= sum;
  return w;
}

double weighted_score(const DimScores& weights, const DimScores& scores) {
  double s = 0;
  for (int d = 0; d < kNumDimensions; ++d) s += weights[d] * scores[d];
  return s;
}

TeacherPrompt scoring_prompt(const std::string& prompt, const std::string& completion, const std::string& language) {
  return {kJudgeSystem, fmt::format("Task ({}):\n{}\n\nResponse to score:\n```{}\n{}\n```\n\nAnswer with the JSON "
                                    "scores only.",
                                    language.empty() ? "unspecified language" : language, prompt, fence(language),
                                    completion)};
}

TeacherPrompt reference_prompt(const std::string& prompt, const std::string& language) {
  return {"You are an expert programmer. Write a complete, correct, efficient and well-documented solution. "
          "Answer with one fenced code block.",
          fmt::format("Task ({}):\n{}", language.empty() ? "any language" : language, prompt)};
}

TeacherPrompt ranked_prompt(const std::string& prompt, const std::vector<std::string>& completions,
                            const std::string& language) {
  std::string user = fmt::format("Task ({}):\n{}\n\n{} responses follow.\n", language, prompt, completions.size());
  for (size_t i = 0; i < completions.size(); ++i)
    user += fmt::format("\n### Response {}\n```{}\n{}\n```\n", i, fence(language), completions[i]);
  user += "\nRank the responses against each other and score each. Answer with JSON only: {\"scores\": [{\"index\": "
          "0, \"correctness\": ..., \"code_quality\": ..., \"efficiency\": ..., \"documentation\": ...}, ...]} with "
          "one entry per response.";
  return {kJudgeSystem, user};
}

std::optional<DimScores> parse_scores(const std::string& answer, std::string* why) {
  const auto objs = json_objects(answer);
  if (objs.empty()) {
    *why = "no JSON object in the answer";
    return std::nullopt;
  }
  for (const auto& o : objs) {
    if (auto s = scores_of(o, why)) return s;
  }
  return std::nullopt;
}

std::optional<std::vector<DimScores>> parse_ranked_scores(const std::string& answer, size_t n, std::string* why) {
  for (const auto& o : json_objects(answer)) {
    if (!o.contains("scores") || !o["scores"].is_array()) continue;
    const json& arr = o["scores"];
    std::vector<std::optional<DimScores>> got(n);
    bool bad = false;
    for (size_t k = 0; k < arr.size() && !bad; ++k) {
      const json& e = arr[k];
      const auto idx = e.is_object() && e.contains("index") ? number(e["index"]) : std::optional<double>(k);
      if (!idx || *idx < 0 || *idx >= static_cast<double>(n) || got[static_cast<size_t>(*idx)]) {
        *why = fmt::format("entry {} has a bad or repeated index", k);
        bad = true;
        break;
      }
      auto s = e.is_object() ? scores_of(e, why) : std::nullopt;
      if (!s) {
        bad = true;
        break;
      }
      got[static_cast<size_t>(*idx)] = s;
    }
    if (bad) return std::nullopt;
    std::vector<DimScores> out;
    for (size_t i = 0; i < n; ++i) {
      if (!got[i]) {
        *why = fmt::format("no scores for response {}", i);
        return std::nullopt;
      }
      out.push_back(*got[i]);
    }
    return out;
  }
  *why = "no {\"scores\": [...]} object in the answer";
  return std::nullopt;
}

std::string extract_code(const std::string& answer) {
  const size_t b = answer.find("```");
  if (b != std::string::npos) {
    const size_t line = answer.find('\n', b);
    const size_t e = line == std::string::npos ? std::string::npos : answer.find("```", line);
    if (e != std::string::npos) return answer.substr(line + 1, e - line - 1);
  }
  const auto first = answer.find_first_not_of(" \t\r\n");
  return first == std::string::npos ? "" : answer;
}

}  // namespace rlaif::teacher
