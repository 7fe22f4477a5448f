// The run config's training and rlaif sections: every trainer key (optimizer, schedule, advantages, loss, KL
// controller, IS truncation) lands in its field with the documented defaults, and a value outside what the math
// accepts is an error naming the key and the allowed values.
#include <gtest/gtest.h>

#include "core/error.h"
#include "rl/config.h"

using namespace rlaif;

namespace {

std::string error_of(const std::string& yaml) {
  try {
    parse_run_config(yaml, "t.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ConfigTraining, DefaultsFollowCommonPractice) {
  const auto c = parse_run_config("", "t.yaml");
  EXPECT_EQ(c.training.lr_scheduler, "cosine");
  EXPECT_EQ(c.training.adam_beta1, 0.9);  // torch.optim.AdamW's defaults
  EXPECT_EQ(c.training.adam_beta2, 0.999);
  EXPECT_EQ(c.training.adam_epsilon, 1e-8);
  EXPECT_EQ(c.training.min_lr_ratio, 0.0);
  EXPECT_EQ(c.rlaif.advantage_scheme, "group");
  EXPECT_EQ(c.rlaif.advantage_baseline, "mean");
  EXPECT_TRUE(c.rlaif.normalize_advantage_std);
  EXPECT_TRUE(c.rlaif.drop_zero_variance_groups);
  EXPECT_EQ(c.rlaif.policy_loss, "ppo_clip");
  EXPECT_EQ(c.rlaif.loss_normalization, "token");
  EXPECT_EQ(c.rlaif.clip_low, 0.2);
  EXPECT_EQ(c.rlaif.clip_high, 0.2);
  EXPECT_EQ(c.rlaif.kl_estimator, "k3");
  EXPECT_FALSE(c.rlaif.kl_in_reward);
  EXPECT_EQ(c.rlaif.target_kl, 0.0);  // fixed kl_coef unless asked
  EXPECT_EQ(c.rlaif.kl_horizon, 10000);
  EXPECT_EQ(c.rlaif.is_truncation, 2.0);
}

TEST(ConfigTraining, ParsesEveryTrainerKey) {
  const auto c = parse_run_config(R"(
training:
  lr_scheduler: linear
  min_lr_ratio: 0.1
  adam_beta1: 0.8
  adam_beta2: 0.95
  adam_epsilon: 1.0e-6
  gradient_accumulation_steps: 4
rlaif:
  advantage_scheme: mad_tanh
  advantage_baseline: leave_one_out
  normalize_advantage_std: false
  advantage_eps: 0.001
  drop_zero_variance_groups: false
  policy_loss: reinforce
  loss_normalization: constant
  clip_low: 0.1
  clip_high: 0.28
  max_len_norm: 1024
  kl_estimator: k1
  kl_in_reward: true
  target_kl: 6.0
  kl_horizon: 500
  kl_gain: 0.5
  kl_coef_min: 0.001
  kl_coef_max: 1.0
  is_truncation: 3.5
)",
                                  "t.yaml");
  const auto& t = c.training;
  EXPECT_EQ(t.lr_scheduler, "linear");
  EXPECT_EQ(t.min_lr_ratio, 0.1);
  EXPECT_EQ(t.adam_beta1, 0.8);
  EXPECT_EQ(t.adam_beta2, 0.95);
  EXPECT_EQ(t.adam_epsilon, 1e-6);
  EXPECT_EQ(t.gradient_accumulation_steps, 4);
  const auto& r = c.rlaif;
  EXPECT_EQ(r.advantage_scheme, "mad_tanh");
  EXPECT_EQ(r.advantage_baseline, "leave_one_out");
  EXPECT_FALSE(r.normalize_advantage_std);
  EXPECT_EQ(r.advantage_eps, 0.001);
  EXPECT_FALSE(r.drop_zero_variance_groups);
  EXPECT_EQ(r.policy_loss, "reinforce");
  EXPECT_EQ(r.loss_normalization, "constant");
  EXPECT_EQ(r.clip_low, 0.1);
  EXPECT_EQ(r.clip_high, 0.28);
  EXPECT_EQ(r.max_len_norm, 1024);
  EXPECT_EQ(r.kl_estimator, "k1");
  EXPECT_TRUE(r.kl_in_reward);
  EXPECT_EQ(r.target_kl, 6.0);
  EXPECT_EQ(r.kl_horizon, 500);
  EXPECT_EQ(r.kl_gain, 0.5);
  EXPECT_EQ(r.kl_coef_min, 0.001);
  EXPECT_EQ(r.kl_coef_max, 1.0);
  EXPECT_EQ(r.is_truncation, 3.5);
}

TEST(ConfigTraining, BadValuesNameTheKeyAndChoices) {
  std::string e = error_of("training: {lr_scheduler: cosine_with_restarts}");
  EXPECT_NE(e.find("training.lr_scheduler"), std::string::npos) << e;
  EXPECT_NE(e.find("constant, linear, cosine"), std::string::npos) << e;
  e = error_of("rlaif: {loss_normalization: grpo}");
  EXPECT_NE(e.find("rlaif.loss_normalization"), std::string::npos) << e;
  EXPECT_NE(e.find("token, sequence, constant"), std::string::npos) << e;
  e = error_of("rlaif: {kl_estimator: k2}");
  EXPECT_NE(e.find("rlaif.kl_estimator"), std::string::npos) << e;
  e = error_of("rlaif: {advantage_baseline: median}");
  EXPECT_NE(e.find("rlaif.advantage_baseline"), std::string::npos) << e;
  EXPECT_NE(error_of("rlaif: {clip_low: 1.0}").find("rlaif.clip_low"), std::string::npos);
  EXPECT_NE(error_of("rlaif: {kl_coef_min: 2, kl_coef_max: 1}").find("rlaif.kl_coef_min"), std::string::npos);
  EXPECT_NE(error_of("training: {adam_beta2: 1.0}").find("training.adam_beta2"), std::string::npos);
  EXPECT_NE(error_of("training: {gradient_accumulation_steps: 0}").find("gradient_accumulation_steps"),
            std::string::npos);
  EXPECT_NE(error_of("rlaif: {policy_loss: ppo}").find("ppo_clip, reinforce"), std::string::npos);
  EXPECT_NE(error_of("rlaif: {is_truncation: -1}").find("rlaif.is_truncation"), std::string::npos);
  // Types are checked by the parser too.
  EXPECT_NE(error_of("rlaif: {kl_in_reward: maybe}").find("boolean"), std::string::npos);
}

TEST(ConfigTraining, CheckpointEvalAndLoggingKeys) {
  const auto c = parse_run_config(R"(training:
  save_every_epochs: 2
  save_every_batches: 10
  save_merged: true
  eval_steps: 5
  baseline_eval_batches: 3
data:
  eval_file: e.jsonl
  max_eval_samples: 7
logging:
  save_samples: false
)", "t.yaml");
  EXPECT_EQ(c.training.save_every_epochs, 2);
  EXPECT_EQ(c.training.save_every_batches, 10);
  EXPECT_TRUE(c.training.save_merged);
  EXPECT_EQ(c.training.eval_steps, 5);
  EXPECT_EQ(c.training.baseline_eval_batches, 3);
  EXPECT_EQ(c.data.eval_file, "e.jsonl");
  EXPECT_EQ(c.data.max_eval_samples, 7);
  EXPECT_FALSE(c.logging.save_samples);
  EXPECT_TRUE(parse_run_config("", "t.yaml").logging.save_samples);
  EXPECT_NE(error_of("training:\n  eval_steps: -1\n").find("training.eval_steps"), std::string::npos);
  EXPECT_NE(error_of("logging:\n  save_samples: maybe\n").find("logging.save_samples"), std::string::npos);
}
