// The training math on a real tiny model (transformers-made Qwen2, tests/reference/make_tiny_models.py):
// prompt and padding positions get exactly zero gradient through token_logprobs' autograd, their values cannot
// change the loss, and one rollout-free step (fabricated completions and rewards -> advantages -> PPO loss ->
// backward -> clip -> AdamW) updates the weights in place and improves the objective on the same data. Engine
// rollouts packed for the trainer score the same log-probs the sampler reported (sampler vs trainer, fp32).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "engine/engine.h"
#include "models/decoder.h"
#include "model_test.h"
#include "test_util.h"
#include "train/advantages.h"
#include "train/batch.h"
#include "train/losses.h"
#include "train/optim.h"

using namespace rlaif;
using namespace rlaif::train;

namespace {

// Four right-padded sequences of length T = 12: prompt lengths P, total lengths L (prompt + completion, EOS last).
struct Batch {
  at::Tensor tokens, attn, targets, completion;  // [B, T]
};

Batch make_batch() {
  const std::vector<int64_t> P = {4, 3, 5, 4}, L = {12, 9, 8, 10};
  const int64_t B = 4, T = 12, V = 320;
  at::manual_seed(7);
  Batch b;
  b.tokens = at::randint(1, V, {B, T}, at::kLong);
  b.attn = at::zeros({B, T}, at::kLong);
  b.completion = at::zeros({B, T}, at::kFloat);
  for (int64_t i = 0; i < B; ++i) {
    b.attn[i].narrow(0, 0, L[i]).fill_(1);
    b.tokens[i].narrow(0, L[i], T - L[i]).fill_(0);  // pad id 0
    // Column t scores token t+1: completion tokens are t+1 in [P, L), i.e. t in [P-1, L-2].
    b.completion[i].narrow(0, P[i] - 1, L[i] - P[i]).fill_(1);
  }
  b.targets = at::cat({b.tokens.narrow(1, 1, T - 1), at::zeros({B, 1}, at::kLong)}, 1);
  for (at::Tensor* t : {&b.tokens, &b.attn, &b.targets, &b.completion}) *t = t->to(test::test_device());
  return b;
}

std::shared_ptr<DecoderModel> load_trainable() {
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied", {at::kFloat, test::test_device()});
  for (auto& [name, w] : model->named_weights()) w.requires_grad_(true);
  return model;
}

LossInputs inputs(const at::Tensor& lp, const Batch& b, const at::Tensor& adv) {
  LossInputs in;
  in.new_logprobs = lp;
  in.mask = b.completion;
  in.advantages = adv;
  return in;
}

}  // namespace

TEST(TrainStep, MaskedTokensGetExactlyZeroGradient) {
  auto model = load_trainable();
  const Batch b = make_batch();
  at::Tensor lp = model->token_logprobs(b.tokens, b.attn, b.targets, /*chunk_rows=*/7);
  lp.retain_grad();
  LossOptions o;
  o.kl_beta = 0.05;  // the KL term must respect the mask too
  LossInputs in = inputs(lp, b, at::tensor({1.0f, -0.5f, 2.0f, -1.0f}).to(test::test_device()));
  in.old_logprobs = lp.detach() + 0.05;
  in.ref_logprobs = lp.detach() - 0.1;
  const LossResult r = policy_loss(in, o);
  r.loss.backward();
  const at::Tensor g = lp.grad();
  ASSERT_TRUE(g.defined());
  const at::Tensor masked = b.completion == 0;
  EXPECT_EQ(g.masked_select(masked).abs().max().item<float>(), 0.0f) << "prompt/padding positions got gradient";
  EXPECT_GT(g.masked_select(~masked).abs().min().item<float>(), 0.0f) << "every completion token has gradient";
  // The weights received gradient through the chunked log-softmax.
  EXPECT_GT(model->weights().lm_head.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_GT(model->weights().layers[0].wq.grad().abs().sum().item<float>(), 0.0f);

  // Changing masked log-prob values (or the old/ref values there) leaves the loss bit-for-bit unchanged.
  at::Tensor scrambled = lp.detach().clone();
  scrambled.masked_fill_(masked, -123.0f);
  LossInputs in2 = in;
  in2.new_logprobs = scrambled;
  in2.old_logprobs = in.old_logprobs.masked_fill(masked, 55.0f);
  in2.ref_logprobs = in.ref_logprobs.masked_fill(masked, -7.0f);
  EXPECT_EQ(policy_loss(in2, o).loss.item<float>(), r.loss.item<float>());
}

TEST(TrainStep, MaskedTokenValuesDoNotChangeTheLossThroughTheModel) {
  // Different padding tokens and different targets at prompt positions: the same loss.
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied", {at::kFloat, test::test_device()});
  at::NoGradGuard no_grad;
  const Batch b = make_batch();
  Batch c = b;
  c.tokens = b.tokens.clone();
  c.targets = b.targets.clone();
  c.tokens.masked_fill_(b.attn == 0, 311);                 // another pad id
  c.targets.masked_fill_(b.completion == 0, 17);           // prompt/padding targets changed
  const at::Tensor adv = at::tensor({1.0f, -0.5f, 2.0f, -1.0f}).to(test::test_device());
  const auto loss_of = [&](const Batch& x) {
    LossOptions o;
    o.kind = LossOptions::Kind::kReinforce;
    return policy_loss(inputs(model->token_logprobs(x.tokens, x.attn, x.targets), x, adv), o).loss.item<double>();
  };
  EXPECT_NEAR(loss_of(b), loss_of(c), 1e-6);
}

TEST(TrainStep, OneStepUpdatesWeightsInPlaceAndImprovesTheObjective) {
  auto model = load_trainable();
  const Batch b = make_batch();
  // Two prompts x two samples; rewards -> group advantages (mean baseline, std-normalised): +-0.7071 per group.
  const auto adv_res = compute_advantages({0.9, 0.1, 0.2, 0.6}, {0, 0, 1, 1}, AdvantageOptions{});
  ASSERT_EQ(adv_res.kept, 4);
  std::vector<float> adv_f(adv_res.advantages.begin(), adv_res.advantages.end());
  const at::Tensor adv = at::tensor(adv_f).to(test::test_device());

  at::Tensor lp0 = model->token_logprobs(b.tokens, b.attn, b.targets);
  const at::Tensor old = lp0.detach();
  LossOptions o;  // PPO-clip, token norm
  LossInputs in = inputs(lp0, b, adv);
  in.old_logprobs = old;
  const LossResult r0 = policy_loss(in, o);
  EXPECT_NEAR(r0.ratio_mean, 1.0, 1e-6);
  r0.loss.backward();

  const void* wq_ptr = model->weights().layers[0].wq.data_ptr();
  const at::Tensor wq_before = model->weights().layers[0].wq.detach().clone();
  NamedParams params = model->named_weights();
  std::vector<const void*> ptrs;
  std::vector<at::Tensor> before;
  for (const auto& [n, p] : params) ptrs.push_back(p.data_ptr()), before.push_back(p.detach().clone());
  const double norm = clip_grad_norm(params, 1.0);
  EXPECT_GT(norm, 0);
  AdamW opt(params, {});
  opt.step(1e-3);
  opt.zero_grad();

  int64_t changed = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(params[i].second.data_ptr(), ptrs[i]) << params[i].first << " moved";
    changed += !at::equal(params[i].second, before[i]);
  }
  EXPECT_EQ(changed, static_cast<int64_t>(params.size())) << "every weight had gradient and must have moved";
  // The model's own tensors (what the engine reads) are the updated ones, at the same address.
  EXPECT_EQ(model->weights().layers[0].wq.data_ptr(), wq_ptr);
  EXPECT_FALSE(at::equal(model->weights().layers[0].wq, wq_before));

  // Policy improvement on the fixed data: the surrogate loss drops, and the completions with positive advantage
  // gained log-probability while those with negative advantage lost it.
  at::NoGradGuard no_grad;
  const at::Tensor lp1 = model->token_logprobs(b.tokens, b.attn, b.targets);
  LossInputs in1 = inputs(lp1, b, adv);
  in1.old_logprobs = old;
  const LossResult r1 = policy_loss(in1, o);
  EXPECT_LT(r1.policy_loss, r0.policy_loss - 1e-4) << "before " << r0.policy_loss << " after " << r1.policy_loss;
  const at::Tensor gain = ((lp1 - old) * b.completion).sum(1);  // per-sequence change of log p(completion)
  for (int64_t i = 0; i < 4; ++i) {
    if (adv_f[i] > 0) EXPECT_GT(gain[i].item<float>(), 0) << "sequence " << i;
    else EXPECT_LT(gain[i].item<float>(), 0) << "sequence " << i;
  }
}

TEST(TrainStep, PackPutsOnlyCompletionTokensInTheMask) {
  // Prompt 5 6 7 + completion 8 9 (9 = EOS); prompt 1 2 + completion 3 4 5 6. T = 6, pad 0.
  const std::vector<int32_t> p0 = {5, 6, 7}, c0 = {8, 9}, p1 = {1, 2}, c1 = {3, 4, 5, 6};
  const std::vector<float> l0 = {-0.5f, -0.25f}, l1 = {-1, -2, -3, -4};
  const PackedBatch pb = pack_sequences({{&p0, &c0, &l0}, {&p1, &c1, &l1}}, 0);
  EXPECT_TRUE(at::equal(pb.tokens, at::tensor({5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6}, at::kLong).view({2, 6})));
  EXPECT_TRUE(at::equal(pb.attention_mask, at::tensor({1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1}, at::kLong).view({2, 6})));
  EXPECT_TRUE(at::equal(pb.targets, at::tensor({6, 7, 8, 9, 0, 0, 2, 3, 4, 5, 6, 0}, at::kLong).view({2, 6})));
  // Column t scores token t+1: completion tokens 8, 9 at positions 3, 4 -> columns 2, 3 (the EOS included).
  EXPECT_TRUE(at::equal(pb.completion_mask, at::tensor({0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0}, at::kFloat).view({2, 6})));
  EXPECT_TRUE(at::equal(pb.sampler_logprobs,
                        at::tensor(std::vector<float>{0, 0, -0.5f, -0.25f, 0, 0, 0, -1, -2, -3, -4, 0}).view({2, 6})));
}

TEST(TrainStep, SamplerAndTrainerLogprobsAgreeOnPackedRollouts) {
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied", {at::kFloat, test::test_device()});
  Engine engine(model, EngineOptions{});
  std::vector<GenerationRequest> reqs(2);
  reqs[0].prompt = {11, 12, 13, 14, 15};
  reqs[1].prompt = {21, 22};
  for (int i = 0; i < 2; ++i) {
    reqs[i].num_samples = 2;
    reqs[i].params.temperature = 1.0;
    reqs[i].params.seed = 3;
    reqs[i].params.max_new_tokens = 6 + 3 * i;  // completions of different lengths
  }
  const auto out = engine.generate(reqs);
  ASSERT_EQ(out.size(), 4u);
  std::vector<SequenceView> views;
  for (const auto& s : out) views.push_back({&reqs[s.request].prompt, &s.tokens, &s.logprobs});
  const PackedBatch pb = pack_sequences(views, 0, test::test_device());
  at::NoGradGuard no_grad;
  const at::Tensor lp = model->token_logprobs(pb.tokens, pb.attention_mask, pb.targets);
  const at::Tensor diff = ((lp - pb.sampler_logprobs).abs() * pb.completion_mask).max();
  EXPECT_LE(diff.item<double>(), 1e-5) << "sampler vs trainer log-probs on the same tokens";
  std::printf("[fp32] sampler vs trainer log-probs, max |diff| over %d completion tokens: %.3g\n",
              static_cast<int>(pb.completion_mask.sum().item<double>()), diff.item<double>());
  EXPECT_EQ(pb.completion_mask.sum().item<double>(), 2 * 6 + 2 * 9);
  // With the sampler as the old policy the PPO ratio is 1 to fp32 rounding.
  LossInputs in;
  in.new_logprobs = lp;
  in.old_logprobs = pb.sampler_logprobs;
  in.mask = pb.completion_mask;
  in.advantages = at::tensor({1.0f, -1.0f, 0.5f, -0.5f}).to(test::test_device());
  const LossResult r = policy_loss(in, LossOptions{});
  EXPECT_NEAR(r.ratio_min, 1.0, 2e-5);
  EXPECT_NEAR(r.ratio_max, 1.0, 2e-5);
  EXPECT_EQ(r.clip_fraction, 0.0);
}
