// Plain configuration structs of the teacher layer, with the defaults documented in docs/TEACHER.md.
// YAML lives only in rl/config.cpp; this layer sees filled-in structs, so tests can build configs in code.
#pragma once

#include <cstdint>
#include <string>

namespace rlaif::teacher {

// How a completion's teacher score becomes a reward.
enum class ScoringMode {
  kRelative,      // the original: student score / (score of the teacher's own reference solution + eps)
  kAbsolute,      // the weighted rubric score itself
  kBatchedRanked  // all N samples of a prompt in one call, ranked and scored together (cheaper)
};

// The rubric of the original system: four dimensions, weights summing to 1.
struct RubricConfig {
  double correctness = 0.3;
  double code_quality = 0.3;
  double efficiency = 0.2;
  double documentation = 0.2;
  std::string version = "v1";  // part of the cache key: change it when the rubric prompt changes
  bool adapt_to_prompt = true;  // prompt-difficulty adaptation (keyword demand per dimension)
  double cpp_multiplier = 1.10;
  double rust_multiplier = 1.15;
  double python_multiplier = 1.00;
};

// Sandbox limits for the compile/test tiers (docs/TEACHER.md explains each).
struct SandboxConfig {
  double cpu_seconds = 5;        // RLIMIT_CPU of the child
  double wall_seconds = 10;      // wall-clock limit; the process group is killed after it
  int64_t memory_mb = 1024;      // RLIMIT_AS
  int64_t max_processes = 32;    // RLIMIT_NPROC (counted for the sandbox user only)
  int64_t max_file_mb = 16;      // RLIMIT_FSIZE
  int64_t max_output_kb = 256;   // stdout+stderr kept; more is cut and counted as failure
  bool isolate_network = true;   // new user+network+mount namespace where the kernel allows
  int max_parallel = 2;          // sandboxes running at once
  std::string scratch_dir;       // where sandbox directories are made; empty = system temp dir
};

// The cheap tiers run before the API, in this order; the reward is the weighted mean of the tiers that apply.
struct VerifierConfig {
  bool heuristic = true;     // empty / truncated / not code -> low score, no API call
  bool syntax = true;        // parse or compile the completion (python3, g++, rustc where installed)
  bool tests = true;         // run the row's tests in the sandbox
  bool exact_answer = true;  // GSM8K-style '#### N' answers
  bool teacher = true;       // the API rubric score
  bool skip_teacher_on_failure = true;  // a failed compile or test makes the API call pointless
  double heuristic_fail_score = 0.0;    // reward of a completion the heuristic rejects
  double weight_syntax = 0.2;
  double weight_tests = 1.0;
  double weight_exact_answer = 1.0;
  double weight_teacher = 1.0;
  SandboxConfig sandbox;
};

struct TeacherConfig {
  std::string provider = "openai";  // "openai" (any /v1/chat/completions server), "anthropic", or "local"
  std::string model_name = "gpt-4o-mini";
  std::string api_key_env = "OPENAI_API_KEY";  // name of the environment variable, never the key itself
  std::string base_url;                        // empty: the provider's public endpoint
  int max_concurrency = 8;
  double requests_per_minute = 500;
  double tokens_per_minute = 200000;
  double timeout_s = 60;
  int max_retries = 5;
  double backoff_base_s = 1.0;  // first retry delay; doubles per attempt, with full jitter
  double backoff_max_s = 60.0;
  double temperature = 0.0;
  int max_tokens = 1024;
  std::string cache_path = "teacher_cache.sqlite";  // empty: no cache
  int64_t teacher_score_cache_max_age_seconds = 7 * 24 * 3600;  // 0 = never expires
  ScoringMode mode = ScoringMode::kRelative;
  double relative_eps = 1e-6;
  RubricConfig rubric;
  VerifierConfig verifiers;
  // Length of the rate limiter's window: 60 s in production; tests shrink it so limits show in seconds.
  double rate_window_s = 60.0;
};

ScoringMode parse_scoring_mode(const std::string& name);  // "relative", "absolute", "batched_ranked"
const char* scoring_mode_name(ScoringMode mode);

}  // namespace rlaif::teacher
