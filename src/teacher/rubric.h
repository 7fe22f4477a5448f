// The original system's rubric: four dimensions with weights, adapted to what a prompt asks for (keyword demand
// per dimension) and a language difficulty multiplier; the teacher's prompts; tolerant parsing of its JSON.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "teacher/teacher_config.h"

namespace rlaif::teacher {

inline constexpr int kNumDimensions = 4;
inline constexpr std::array<const char*, kNumDimensions> kDimensionNames = {"correctness", "code_quality",
                                                                          "efficiency", "documentation"};
using DimScores = std::array<double, kNumDimensions>;

// "python"/"py", "cpp"/"c++"/"cxx", "rust"/"rs" -> "python", "cpp", "rust"; anything else lower-cased.
std::string normalize_language(const std::string& language);
double language_multiplier(const RubricConfig& rubric, const std::string& language);

// Base weights, or, with adapt_to_prompt, each base weight times (1 + 0.25 * keyword hits of its dimension in
// the prompt, at most 4 hits), renormalized to sum 1. A prompt asking for speed weighs efficiency more.
DimScores rubric_weights(const RubricConfig& rubric, const std::string& prompt);
double weighted_score(const DimScores& weights, const DimScores& scores);

struct TeacherPrompt {
  std::string system, user;
};
TeacherPrompt scoring_prompt(const std::string& prompt, const std::string& completion, const std::string& language);
TeacherPrompt reference_prompt(const std::string& prompt, const std::string& language);
TeacherPrompt ranked_prompt(const std::string& prompt, const std::vector<std::string>& completions,
                            const std::string& language);

// Finds the JSON in an answer (code fences or prose around it are fine), reads the four scores and clamps them to
// [0, 1]. Returns nullopt with `why` set when no usable scores are there.
std::optional<DimScores> parse_scores(const std::string& answer, std::string* why);
// The ranked answer: {"scores": [{"index": i, <four scores>}, ...]} with every index 0..n-1 exactly once.
std::optional<std::vector<DimScores>> parse_ranked_scores(const std::string& answer, size_t n, std::string* why);
// A reference solution's code: the first fenced block, else the whole answer; empty means unusable.
std::string extract_code(const std::string& answer);

}  // namespace rlaif::teacher
