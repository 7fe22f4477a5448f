// Policy-gradient losses over completion tokens: REINFORCE and PPO-clip (symmetric or DAPO's asymmetric clip),
// token / sequence / constant normalisation (dapo / grpo / dr_grpo), KL to a frozen reference with the k1 or k3
// estimator (in the loss, or folded into the rewards), and truncated importance sampling for a sampler that
// differs from the trainer (a quantized generator). Masked tokens (prompt, padding) get exactly zero gradient.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace rlaif::train {

struct LossOptions {
  enum class Kind { kReinforce, kPpoClip };
  // Per-token losses l[b, t] are combined as sum_b sum_t m * l * c_b / D:
  //   kToken (dapo):      c_b = 1,          D = total completion tokens
  //   kSequence (grpo):   c_b = 1 / len_b,  D = sequences with at least one token
  //   kConstant (dr_grpo): c_b = 1,         D = sequences * max_len_norm (0: the batch's T)
  enum class Norm { kToken, kSequence, kConstant };
  enum class KlEstimator { kK1, kK3 };
  Kind kind = Kind::kPpoClip;
  double clip_low = 0.2;   // ratio floor 1 - clip_low
  double clip_high = 0.2;  // ratio ceiling 1 + clip_high (DAPO: 0.28)
  Norm norm = Norm::kToken;
  double max_len_norm = 0;
  double kl_beta = 0;      // weight of the KL term in the loss (ignored when kl_in_reward)
  KlEstimator kl_estimator = KlEstimator::kK3;
  bool kl_in_reward = false;            // the KL went into the rewards (apply_kl_to_rewards), not the loss
  std::optional<double> is_truncation;  // cap C of the truncated IS weight min(pi_old / pi_sampler, C)
};

// All [B, T] tensors are aligned with token_logprobs' output: column t holds log p(token t+1 | tokens <= t).
struct LossInputs {
  at::Tensor new_logprobs;      // [B, T] the trainer's, with grad (DecoderModel::token_logprobs)
  at::Tensor old_logprobs;      // [B, T] the trainer's at rollout time, no grad; undefined: new_logprobs.detach()
  at::Tensor sampler_logprobs;  // [B, T] the generator's (engine raw log-probs); undefined: same as old
  at::Tensor ref_logprobs;      // [B, T] the frozen reference's; undefined: no KL
  at::Tensor advantages;        // [B]
  at::Tensor mask;              // [B, T] 1 on completion tokens (EOS included), 0 on prompt and padding
};

struct LossResult {
  at::Tensor loss;  // scalar with grad: policy term + kl_beta * KL term (both normalised as options.norm)
  // Detached statistics over masked-in tokens (one device sync for all of them).
  double policy_loss = 0;
  double kl_loss = 0;           // the normalised KL term before kl_beta (0 without a reference)
  double kl_mean = 0;           // mean per-token KL estimate (the chosen estimator; 0 without a reference)
  double clip_fraction = 0;     // tokens where the clipped branch set the objective (PPO only)
  double ratio_mean = 1, ratio_min = 1, ratio_max = 1;
  double is_weight_mean = 1, is_weight_min = 1, is_weight_max = 1;
  double is_truncated_fraction = 0;  // tokens whose IS weight hit the cap
  int64_t tokens = 0;
  int64_t sequences = 0;
};

// The divisor D of options.norm for this mask. With gradient accumulation, sum it over the micro-batches of
// one optimizer step and pass the sum to policy_loss: the micro-batch losses then add up to the full batch's.
double loss_denominator(const at::Tensor& mask, const LossOptions& options);

// denominator 0: loss_denominator(inputs.mask, options).
LossResult policy_loss(const LossInputs& inputs, const LossOptions& options, double denominator = 0);

// Per-token KL estimate of log-probs against the reference's (same shape, no masking):
// k1 = logp - ref; k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman, "Approximating KL divergence").
at::Tensor kl_estimate(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, LossOptions::KlEstimator est);

struct KlRewardResult {
  std::vector<double> rewards;  // reward - beta * kl_sum per sample
  std::vector<double> kl_sum;   // per-sample sum of the per-token estimate over the mask
};
// KL in the reward (Ziegler et al.): r' = r - beta * sum_t m * k(logp_t, ref_t), with the sampling policy's
// log-probs (no grad), applied before compute_advantages.
KlRewardResult apply_kl_to_rewards(const std::vector<double>& rewards, const at::Tensor& logprobs,
                                   const at::Tensor& ref_logprobs, const at::Tensor& mask, double beta,
                                   LossOptions::KlEstimator est);

}  // namespace rlaif::train
