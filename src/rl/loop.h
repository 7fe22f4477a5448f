// The RLAIF loop: rollout (the engine samples N completions per prompt from the trainer's own weights) → score
// (cheap verifiers, then the teacher) → advantages (per-prompt groups) → update (policy-gradient loss with KL
// control, AdamW in place). One process, one set of weights: nothing is copied between phases.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "rl/config.h"

namespace rlaif {

struct StepMetrics {
  int64_t step = 0, epoch = 0;
  double reward_mean = 0, reward_std = 0, reward_min = 0, reward_max = 0;
  double accuracy = -1;  // share of samples whose exact-answer or tests tier passed; -1 when none was checked
  double loss = 0, policy_loss = 0, kl = 0, beta = 0, lr = 0, grad_norm = 0, clip_fraction = 0;
  double sampler_trainer_logprob_mad = 0;  // mean |engine log-prob − trainer log-prob| over completion tokens
  int64_t samples = 0, kept = 0, unscored = 0, zero_variance_groups = 0;
  int64_t generated_tokens = 0, trained_tokens = 0;
  // Wall-clock phases: generate_s + score_s + train_s is the step. score_s is the wait for scoring after generation
  // ended; score_overlap_s is scoring that ran while the engine was still generating (hidden, not in the step).
  double generate_s = 0, score_s = 0, train_s = 0, score_overlap_s = 0;
  int64_t teacher_calls = 0, cache_hits = 0, teacher_tokens = 0;
  double eta_s = 0;  // estimated time to the last step, from this process's mean step time
  nlohmann::json to_json() const;
};

struct TrainResult {
  std::vector<StepMetrics> steps;
  std::filesystem::path output_dir, metrics_path, samples_path, final_checkpoint;
  std::filesystem::path best_checkpoint;  // by eval reward; empty without evaluation
  std::vector<std::pair<int64_t, nlohmann::json>> evals;  // (step, eval summary); step 0 is the baseline
};

struct TrainHooks {
  std::function<void(const StepMetrics&)> on_step;  // after each optimizer step
  // Each token the rollout samples (group = the prompt's index in the batch), on the generating thread.
  std::function<void(int64_t group, int64_t sample, int32_t token)> on_rollout_token;
};

// `resume`: empty (fresh run), a checkpoint directory, or "latest" (the newest complete checkpoint in
// logging.output_dir). A resumed run continues exactly: weights/adapters, optimizer, step, data position,
// KL controller, the dropout RNG and the per-step sampling seeds; records after the checkpoint's step in
// metrics.jsonl / samples.jsonl (from the interrupted run) are dropped, since the resumed run redoes those steps.
TrainResult run_training(const RunConfig& cfg, const TrainHooks& hooks = {}, const std::string& resume = "");

// A plain-text chart of per-step mean reward, for the end of a run.
std::string reward_curve(const std::vector<StepMetrics>& steps, int width = 40);

}  // namespace rlaif
