// Policy losses on tiny tensors against hand-derived values and gradients: REINFORCE, PPO-clip with the clip
// active and inactive (both advantage signs, asymmetric ranges), token / sequence / constant normalisation, KL in
// the loss and in the reward, truncated importance sampling (capped, detached), masked positions that are inf, and
// gradient accumulation through a shared denominator. Derivations sit beside the numbers.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "train/losses.h"

using namespace rlaif::train;
using Opt = LossOptions;

namespace {

at::Tensor t2(std::vector<std::vector<double>> rows) {
  const int64_t B = rows.size(), T = rows[0].size();
  at::Tensor out = at::empty({B, T}, at::kDouble);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) out[b][t] = rows[b][t];
  return out;
}
at::Tensor t1(std::vector<double> v) { return at::tensor(v, at::kDouble); }

void expect_tensor(const at::Tensor& got, const at::Tensor& want, double tol = 1e-12) {
  ASSERT_EQ(got.sizes(), want.sizes());
  EXPECT_LE((got - want).abs().max().item<double>(), tol) << "got\n" << got << "\nwant\n" << want;
}

// A leaf [B, T] with grad; returns (loss result, d loss / d new_logprobs).
std::pair<LossResult, at::Tensor> run(LossInputs in, const Opt& o, double denominator = 0) {
  in.new_logprobs = in.new_logprobs.detach().clone().requires_grad_(true);
  LossResult r = policy_loss(in, o, denominator);
  r.loss.backward();
  return {r, in.new_logprobs.grad()};
}

// Two sequences of 3 positions: row 0 has 2 completion tokens, row 1 has 1 (prompt at t=0, padding at row 1 t=2).
LossInputs reinforce_batch() {
  LossInputs in;
  in.new_logprobs = t2({{-1, -2, -3}, {-0.5, -1.5, -2.5}});
  in.mask = t2({{0, 1, 1}, {0, 1, 0}});
  in.advantages = t1({2, -1});
  return in;
}

}  // namespace

TEST(Losses, ReinforceTokenSequenceConstantNormalisation) {
  // Per-token objective A * logp on the mask: row 0: 2*-2 = -4, 2*-3 = -6; row 1: -1*-1.5 = 1.5. Loss = -objective.
  Opt o;
  o.kind = Opt::Kind::kReinforce;
  o.norm = Opt::Norm::kToken;  // D = 3 tokens: loss (4 + 6 - 1.5) / 3; dL/dlogp = -A / 3
  auto [r, g] = run(reinforce_batch(), o);
  EXPECT_NEAR(r.loss.item<double>(), 8.5 / 3, 1e-12);
  EXPECT_NEAR(r.policy_loss, 8.5 / 3, 1e-12);
  EXPECT_EQ(r.tokens, 3);
  EXPECT_EQ(r.sequences, 2);
  expect_tensor(g, t2({{0, -2.0 / 3, -2.0 / 3}, {0, 1.0 / 3, 0}}));

  o.norm = Opt::Norm::kSequence;  // row means -5 and 1.5, averaged over 2 rows: -(-5 + 1.5)/2 = 1.75
  std::tie(r, g) = run(reinforce_batch(), o);
  EXPECT_NEAR(r.loss.item<double>(), 1.75, 1e-12);
  expect_tensor(g, t2({{0, -0.5, -0.5}, {0, 0.5, 0}}));  // -A / (len_b * 2)

  o.norm = Opt::Norm::kConstant;  // dr_grpo: D = 2 rows * 4 = 8 -> 8.5 / 8
  o.max_len_norm = 4;
  std::tie(r, g) = run(reinforce_batch(), o);
  EXPECT_NEAR(r.loss.item<double>(), 8.5 / 8, 1e-12);
  expect_tensor(g, t2({{0, -0.25, -0.25}, {0, 0.125, 0}}));
  o.max_len_norm = 0;  // the batch's T = 3: D = 6
  std::tie(r, g) = run(reinforce_batch(), o);
  EXPECT_NEAR(r.loss.item<double>(), 8.5 / 6, 1e-12);
}

TEST(Losses, PpoClipActiveAndInactive) {
  // old = 0, new = log(ratio). Row 0 (A=+1) ratios 1.1, 1.5, 0.5; row 1 (A=-1) ratios 0.9, 0.5, 1.5; clip 0.2.
  // min(rA, clip(r)A): row 0: 1.1 (free), 1.2 (clipped above, grad 0), 0.5 (r<0.8 but A>0: unclipped branch is
  // smaller, grad rA = 0.5); row 1: -0.9 (free), -0.8 (clipped below, grad 0), -1.5 (r>1.2 but A<0: unclipped).
  // Sum = 1.1+1.2+0.5-0.9-0.8-1.5 = -0.4; token loss = 0.4/6. d obj/d logp = rA where unclipped.
  LossInputs in;
  in.new_logprobs = at::log(t2({{1.1, 1.5, 0.5}, {0.9, 0.5, 1.5}}));
  in.old_logprobs = at::zeros({2, 3}, at::kDouble);
  in.mask = at::ones({2, 3}, at::kDouble);
  in.advantages = t1({1, -1});
  Opt o;  // kPpoClip, token norm
  auto [r, g] = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), 0.4 / 6, 1e-12);
  expect_tensor(g, t2({{-1.1 / 6, 0, -0.5 / 6}, {0.9 / 6, 0, 1.5 / 6}}));
  EXPECT_NEAR(r.clip_fraction, 2.0 / 6, 1e-12);
  EXPECT_NEAR(r.ratio_mean, 1.0, 1e-12);  // (1.1+1.5+.5+.9+.5+1.5)/6
  EXPECT_NEAR(r.ratio_min, 0.5, 1e-12);
  EXPECT_NEAR(r.ratio_max, 1.5, 1e-12);
}

TEST(Losses, PpoAsymmetricClip) {
  // Row 0 A=+1 ratio 1.25; row 1 A=-1 ratio 0.75. Symmetric 0.2: both clipped (1.2 and -0.8), no gradient.
  // DAPO clip-higher (0.2, 0.28): row 0 free (1.25, grad 1.25), row 1 still clipped. (0.3, 0.2): the reverse.
  LossInputs in;
  in.new_logprobs = at::log(t2({{1.25}, {0.75}}));
  in.old_logprobs = at::zeros({2, 1}, at::kDouble);
  in.mask = at::ones({2, 1}, at::kDouble);
  in.advantages = t1({1, -1});
  Opt o;
  auto [r, g] = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), -(1.2 - 0.8) / 2, 1e-12);
  expect_tensor(g, t2({{0}, {0}}));
  EXPECT_NEAR(r.clip_fraction, 1.0, 1e-12);
  o.clip_high = 0.28;
  std::tie(r, g) = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), -(1.25 - 0.8) / 2, 1e-12);
  expect_tensor(g, t2({{-1.25 / 2}, {0}}));
  o.clip_high = 0.2;
  o.clip_low = 0.3;
  std::tie(r, g) = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), -(1.2 - 0.75) / 2, 1e-12);
  expect_tensor(g, t2({{0}, {0.75 / 2}}));  // d(-(-r))/dlogp / 2 = r / 2
}

TEST(Losses, PpoOnPolicyGradientEqualsReinforce) {
  // Without old log-probs the ratio is exp(logp - logp.detach()) = 1: same gradient as REINFORCE, loss -mean(A).
  Opt ppo, rf;
  rf.kind = Opt::Kind::kReinforce;
  auto [a, ga] = run(reinforce_batch(), ppo);
  auto [b, gb] = run(reinforce_batch(), rf);
  expect_tensor(ga, gb);
  EXPECT_NEAR(a.loss.item<double>(), -(2 + 2 - 1) / 3.0, 1e-12);
  EXPECT_EQ(a.clip_fraction, 0);
}

TEST(Losses, KlTermInTheLossK1AndK3) {
  // A = 0 isolates the KL term. logp = -1, -2 on the mask, ref = -1.5, -1.
  // k1 = logp - ref = 0.5, -1 -> mean -0.25; d/dlogp = 1.  k3 = e^(ref-logp) - (ref-logp) - 1:
  // e^-0.5 + 0.5 - 1 = 0.10653066, e^1 - 1 - 1 = 0.71828183; d/dlogp = 1 - e^(ref-logp).
  LossInputs in;
  in.new_logprobs = t2({{-1, -2, -9}});
  in.ref_logprobs = t2({{-1.5, -1, -9}});
  in.mask = t2({{1, 1, 0}});
  in.advantages = t1({0});
  Opt o;
  o.kind = Opt::Kind::kReinforce;
  o.kl_beta = 0.1;
  o.kl_estimator = Opt::KlEstimator::kK1;
  auto [r, g] = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), 0.1 * (0.5 - 1) / 2, 1e-12);
  EXPECT_NEAR(r.kl_mean, -0.25, 1e-12);
  expect_tensor(g, t2({{0.05, 0.05, 0}}));
  o.kl_estimator = Opt::KlEstimator::kK3;
  std::tie(r, g) = run(in, o);
  const double k3a = std::exp(-0.5) + 0.5 - 1, k3b = std::exp(1.0) - 2;
  EXPECT_NEAR(k3a, 0.10653066, 1e-8);
  EXPECT_NEAR(r.loss.item<double>(), 0.1 * (k3a + k3b) / 2, 1e-12);
  EXPECT_NEAR(r.kl_mean, (k3a + k3b) / 2, 1e-12);
  expect_tensor(g, t2({{0.05 * (1 - std::exp(-0.5)), 0.05 * (1 - std::exp(1.0)), 0}}));
  // KL in the reward instead: the loss has no KL term, the KL is still reported.
  o.kl_in_reward = true;
  std::tie(r, g) = run(in, o);
  EXPECT_EQ(r.loss.item<double>(), 0.0);
  EXPECT_NEAR(r.kl_mean, (k3a + k3b) / 2, 1e-12);
}

TEST(Losses, KlEstimatorsAreUnbiasedForKlOfPolicyToReference) {
  // Sampling x ~ p, the means of k1 and k3 estimate KL(p || q) = sum p log(p/q), computed here exactly.
  at::manual_seed(11);
  const at::Tensor p = t1({0.5, 0.3, 0.2}), q = t1({0.2, 0.3, 0.5});
  const double kl = (p * (p / q).log()).sum().item<double>();  // 0.2749...
  const at::Tensor x = at::multinomial(p, 200000, /*replacement=*/true);
  const at::Tensor lp = p.log().index_select(0, x), lq = q.log().index_select(0, x);
  const double k1 = kl_estimate(lp, lq, Opt::KlEstimator::kK1).mean().item<double>();
  const at::Tensor k3 = kl_estimate(lp, lq, Opt::KlEstimator::kK3);
  EXPECT_NEAR(k1, kl, 0.01);
  EXPECT_NEAR(k3.mean().item<double>(), kl, 0.01);
  EXPECT_GE(k3.min().item<double>(), 0.0);  // k3 is never negative
}

TEST(Losses, KlInRewardAdjustsRewardsBeforeAdvantages) {
  // Row 0: k1 over mask = (-1 - -1.5) + (-2 - -1) = -0.5; row 1: (-0.5 - -1) = 0.5 (t=2 is padding).
  // r' = r - 0.1 * kl_sum: 1 + 0.05, 0.5 - 0.05.
  const at::Tensor lp = t2({{-1, -2, -3}, {-0.5, -7, -7}});
  const at::Tensor ref = t2({{-1.5, -1, -3}, {-1, -1, -1}});
  const at::Tensor mask = t2({{1, 1, 0}, {1, 0, 0}});
  const auto res = apply_kl_to_rewards({1.0, 0.5}, lp, ref, mask, 0.1, Opt::KlEstimator::kK1);
  ASSERT_EQ(res.rewards.size(), 2u);
  EXPECT_NEAR(res.kl_sum[0], -0.5, 1e-12);
  EXPECT_NEAR(res.kl_sum[1], 0.5, 1e-12);
  EXPECT_NEAR(res.rewards[0], 1.05, 1e-12);
  EXPECT_NEAR(res.rewards[1], 0.45, 1e-12);
}

TEST(Losses, TruncatedImportanceSamplingCapsAndIsDetached) {
  // Trainer-old logp -1, -1; sampler -1.5, -0.5 -> weights e^0.5 = 1.6487 capped to 1.2, and e^-0.5 = 0.6065.
  // REINFORCE A=1 at logp -1: loss = -(1.2*-1 + 0.6065*-1)/2; dL/dlogp = -w/2.
  LossInputs in;
  in.new_logprobs = t2({{-1, -1}});
  in.old_logprobs = t2({{-1, -1}});
  at::Tensor sampler = t2({{-1.5, -0.5}}).requires_grad_(true);
  in.sampler_logprobs = sampler;
  in.mask = t2({{1, 1}});
  in.advantages = t1({1});
  Opt o;
  o.kind = Opt::Kind::kReinforce;
  o.is_truncation = 1.2;
  auto [r, g] = run(in, o);
  const double w1 = std::exp(-0.5);
  EXPECT_NEAR(r.loss.item<double>(), (1.2 + w1) / 2, 1e-12);
  expect_tensor(g, t2({{-0.6, -w1 / 2}}));
  EXPECT_FALSE(sampler.grad().defined());  // the weight is a constant of the objective
  EXPECT_NEAR(r.is_weight_max, 1.2, 1e-12);
  EXPECT_NEAR(r.is_weight_min, w1, 1e-12);
  EXPECT_NEAR(r.is_truncated_fraction, 0.5, 1e-12);
  // Without a cap configured there is no correction.
  o.is_truncation.reset();
  std::tie(r, g) = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), 1.0, 1e-12);
  EXPECT_EQ(r.is_weight_mean, 1.0);
}

TEST(Losses, InfAtMaskedPositionsGivesFiniteLossAndZeroGradient) {
  // -inf at a padded position (a log-prob of an impossible pad token) must not poison the loss or gradient.
  const double inf = std::numeric_limits<double>::infinity();
  LossInputs in;
  in.new_logprobs = t2({{-1, -inf}});
  in.old_logprobs = t2({{-1, inf}});
  in.ref_logprobs = t2({{-1, std::nan("")}});
  in.mask = t2({{1, 0}});
  in.advantages = t1({1});
  Opt o;
  o.kl_beta = 0.1;
  auto [r, g] = run(in, o);
  EXPECT_NEAR(r.loss.item<double>(), -1.0, 1e-12);
  EXPECT_EQ(g[0][1].item<double>(), 0.0);
  EXPECT_NEAR(g[0][0].item<double>(), -1.0, 1e-12);
}

TEST(Losses, MicroBatchesWithSharedDenominatorAddUpToTheFullBatch) {
  // Splitting the batch by rows and passing the summed denominator reproduces the full batch's loss and gradient.
  for (auto norm : {Opt::Norm::kToken, Opt::Norm::kSequence, Opt::Norm::kConstant}) {
    Opt o;
    o.norm = norm;
    LossInputs full = reinforce_batch();
    full.old_logprobs = full.new_logprobs - 0.1;
    auto [fr, fg] = run(full, o);
    const double D = loss_denominator(full.mask.narrow(0, 0, 1), o) + loss_denominator(full.mask.narrow(0, 1, 1), o);
    double total = 0;
    std::vector<at::Tensor> grads;
    for (int64_t b = 0; b < 2; ++b) {
      LossInputs part;
      part.new_logprobs = full.new_logprobs.narrow(0, b, 1);
      part.old_logprobs = full.old_logprobs.narrow(0, b, 1);
      part.mask = full.mask.narrow(0, b, 1);
      part.advantages = full.advantages.narrow(0, b, 1);
      auto [pr, pg] = run(part, o, D);
      total += pr.loss.item<double>();
      grads.push_back(pg);
    }
    EXPECT_NEAR(total, fr.loss.item<double>(), 1e-12);
    expect_tensor(at::cat(grads), fg);
  }
}
