// The cheap tiers that run before the teacher API: a heuristic pre-score, syntax/compile checks and given tests
// in the sandbox, and exact answers for GSM8K-style '#### N' tasks. Each returns a tier result in [0, 1].
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "teacher/teacher_config.h"

namespace rlaif::teacher {

struct TierResult {
  std::string name;  // "heuristic", "syntax", "tests", "exact_answer", "teacher"
  double score = 0;
  bool passed = false;
  std::string detail;  // why it failed, or what it measured
};

// True for the languages whose completions must be code (python, cpp, rust).
bool is_code_language(const std::string& language);
// Why a completion is worthless without asking anyone ("empty", "truncated: ...", "not code"), or nullopt.
std::optional<std::string> heuristic_reject(const std::string& completion, const std::string& language);
// The code in a completion: the first fenced block (preferring one tagged with the language), else all of it.
std::string code_of(const std::string& completion, const std::string& language);

// Parses or compiles the code; nullopt when the language has no checker installed.
std::optional<TierResult> syntax_check(const SandboxConfig& cfg, const std::string& code, const std::string& language);
// Runs the code with the row's tests (python: each test statement counted; cpp/rust: the program with the tests
// appended must exit 0); nullopt when there are no tests or no toolchain.
std::optional<TierResult> run_tests(const SandboxConfig& cfg, const std::string& code, const std::string& language,
                                    const std::vector<std::string>& tests);

// The number after the last '####' (commas and '$' ignored); nullopt if none.
std::optional<double> hash_answer(const std::string& text);
// 1 when the completion's final answer ('#### N', else its last number) equals the reference's '#### N'.
TierResult exact_answer(const std::string& completion, const std::string& answer);

}  // namespace rlaif::teacher
