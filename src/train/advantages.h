// Per-sample advantages from per-sample rewards grouped by prompt (GRPO/RLOO group baselines, or the original
// system's robust median/MAD/tanh scheme), plus the keep mask: reward_threshold and top_samples_per_prompt drop
// SAMPLES (never whole batches) and zero-variance groups, which carry no learning signal, are left out and counted.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace rlaif::train {

struct AdvantageOptions {
  enum class Baseline { kMean, kLeaveOneOut, kNone };
  enum class Scheme { kGroup, kMadTanh };
  Scheme scheme = Scheme::kGroup;
  Baseline baseline = Baseline::kMean;  // kGroup only; kMadTanh always centres on the median
  bool normalize_std = true;            // kGroup only: divide by the group's sample std (n - 1, as TRL's GRPO)
  double eps = 1e-4;                    // added to the scale (std or 1.4826 * MAD) before dividing
  bool drop_zero_variance = true;       // groups whose rewards are all equal get keep = false
  std::optional<int> top_samples_per_prompt;  // keep the k best rewards of each group (ties: earlier sample)
  std::optional<double> reward_threshold;     // drop samples whose reward < threshold
};

struct AdvantageResult {
  std::vector<double> advantages;  // one per sample (also computed for dropped samples; the mask decides)
  std::vector<bool> keep;          // false: leave the sample out of the loss
  int64_t num_groups = 0;
  int64_t zero_variance_groups = 0;  // groups whose rewards were all equal (excluded when drop_zero_variance)
  int64_t dropped_by_threshold = 0;  // samples under reward_threshold
  int64_t dropped_by_top_k = 0;      // samples past the k best of their group (and not already dropped)
  int64_t kept = 0;
};

// Rewards of a group count as equal when max - min <= this (rewards are O(1) scores; float noise is not signal).
inline constexpr double kZeroVarianceTol = 1e-9;
// Consistency constant: 1.4826 * MAD estimates the standard deviation of normally distributed rewards.
inline constexpr double kMadToStd = 1.4826;

// rewards[i] belongs to group group_of_sample[i] (any ids; samples of a group need not be adjacent). Group
// statistics use every sample of the group, before any filter, so a filter never shifts the baseline.
AdvantageResult compute_advantages(const std::vector<double>& rewards, const std::vector<int64_t>& group_of_sample,
                                   const AdvantageOptions& options);

// The median (mean of the two middle values for an even count); RLAIF_CHECK on an empty input.
double median(std::vector<double> values);

}  // namespace rlaif::train
