// The training forward's fast paths against the paths the transformers/PEFT parity tests pin down: SDPA
// attention (AttentionKernel::kSdpa) against the eager float32-score path — same log-probs and gradients on
// every real position, for right padding (causal-only SDPA), left padding (boolean mask) and grouped K/V; the
// fused LoRA update (set_fused_lora) against layers::project's PEFT op sequence; the fused RMSNorm
// (NormKernel::kFused) against layers::rms_norm; and the LM head restricted to the scored positions
// (token_logprobs' score_mask) against the full head.
#include <gtest/gtest.h>

#include <cstdio>

#include "models/decoder.h"
#include "models/lora.h"
#include "model_test.h"
#include "test_util.h"

using namespace rlaif;

namespace {

struct Batch {
  at::Tensor tokens, attn, targets, scored;  // [B, T]; scored: real positions whose target is real
};

// B random rows of length T; row i has (i % 3) * T / 4 padding slots, on the left or on the right.
Batch make_batch(int64_t B, int64_t T, int64_t vocab, bool left_padding, uint64_t seed) {
  at::manual_seed(seed);
  Batch b;
  b.tokens = at::randint(1, vocab, {B, T}, at::kLong);
  b.attn = at::ones({B, T}, at::kLong);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t pad = (i % 3) * (T / 4);
    b.attn[i].narrow(0, left_padding ? 0 : T - pad, pad).fill_(0);
  }
  b.tokens.masked_fill_(b.attn.eq(0), 0);
  b.targets = at::cat({b.tokens.narrow(1, 1, T - 1), at::zeros({B, 1}, at::kLong)}, 1);
  const at::Tensor next_real = at::cat({b.attn.narrow(1, 1, T - 1), at::zeros({B, 1}, at::kLong)}, 1);
  b.scored = (b.attn * next_real).to(at::kFloat);
  for (at::Tensor* t : {&b.tokens, &b.attn, &b.targets, &b.scored}) *t = t->to(test::test_device());
  return b;
}

using Params = std::vector<std::pair<std::string, at::Tensor>>;

// LoRA (r 4, no dropout) with B randomised so every adapter tensor gets a gradient; or every weight trainable.
Params trainable(DecoderModel& m, bool lora, double dropout = 0) {
  if (!lora) {
    Params p = m.named_weights();
    for (auto& [n, w] : p) w.requires_grad_(true);
    return p;
  }
  LoraConfig cfg;
  cfg.r = 4;
  cfg.dropout = dropout;
  attach_lora(m, cfg, 3);
  Params p = lora_parameters(m);
  at::NoGradGuard ng;
  for (auto& [n, w] : p)
    if (n.find("lora_B") != std::string::npos) w.normal_(0, 0.05);
  return p;
}

struct Result {
  at::Tensor logprobs;             // [B, T], detached
  std::vector<at::Tensor> grads;   // one per parameter
};

// Log-probs and the gradients of a weighted sum over the scored positions (weights vary so that every
// position's gradient counts with a different sign and size).
Result run(DecoderModel& m, const Params& p, const Batch& b, AttentionKernel k, bool autocast = false,
        const at::Tensor& score_mask = {}) {
  m.set_attention(k);
  at::Tensor lp;
  {
    AutocastScope ac(test::test_device().type(), at::kBFloat16, autocast);
    lp = m.token_logprobs(b.tokens, b.attn, b.targets, /*chunk_rows=*/16, score_mask);
  }
  const at::Tensor w = at::linspace(-1, 2, b.scored.numel(), at::kFloat).to(b.scored.device()).view_as(b.scored);
  (lp * b.scored * w).sum().backward();
  Result r{lp.detach(), {}};
  for (const auto& [n, t] : p) {
    r.grads.push_back(t.grad().defined() ? t.grad().clone() : at::Tensor());
    t.mutable_grad() = at::Tensor();
  }
  m.set_attention(AttentionKernel::kAuto);
  return r;
}

double max_scored_diff(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scored) {
  return ((a - b).abs() * scored).max().item<double>();
}

void expect_same(const Params& p, const Result& a, const Result& b, const at::Tensor& scored, double tol) {
  const double d = max_scored_diff(a.logprobs, b.logprobs, scored);
  EXPECT_LE(d, tol) << "log-probs differ on a real position";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    ASSERT_TRUE(a.grads[i].defined() && b.grads[i].defined()) << p[i].first << " got no gradient";
    const double scale = a.grads[i].abs().max().item<double>();
    EXPECT_GT(scale, 0) << p[i].first << ": an all-zero gradient would prove nothing";
    EXPECT_LE((a.grads[i] - b.grads[i]).abs().max().item<double>(), tol * std::max(1.0, scale)) << p[i].first;
  }
}

// Under bf16 autocast `candidate` must stay as close to the fp32 run `ref` as the established path `baseline`
// (within 2x, bf16 noise being random), yet visibly differ from fp32 (it did compute in bf16).
void expect_bf16_no_worse(const Result& ref, const Result& baseline, const Result& candidate, const at::Tensor& scored,
                          const char* baseline_name, const char* candidate_name) {
  const double e = max_scored_diff(ref.logprobs, baseline.logprobs, scored);
  const double c = max_scored_diff(ref.logprobs, candidate.logprobs, scored);
  std::printf("bf16 autocast vs fp32, max |dlogp|: %s %.3g, %s %.3g\n", baseline_name, e, candidate_name, c);
  EXPECT_GT(c, 1e-5) << "autocast changed nothing: " << candidate_name << " did not run in bf16";
  EXPECT_LE(c, 2 * e + 1e-3);
}

std::shared_ptr<DecoderModel> load(const std::string& name) {
  return DecoderModel::load(test::reference_dir() / name, {at::kFloat, test::test_device()});
}

}  // namespace

TEST(TrainingAttention, SdpaEqualsEagerFp32WithRightAndLeftPadding) {
  // llama3_gqa has grouped K/V (enable_gqa or repeated K/V), qwen2 projection biases; LoRA and full fine-tuning.
  for (const char* name : {"qwen2_untied", "llama3_gqa"}) {
    for (const bool left : {false, true}) {
      for (const bool lora : {true, false}) {
        SCOPED_TRACE(fmt::format("{} {} padding, {}", name, left ? "left" : "right", lora ? "LoRA" : "full"));
        auto model = load(name);
        const Params p = trainable(*model, lora);
        const Batch b = make_batch(3, 20, model->config().vocab_size, left, 21);
        const Result eager = run(*model, p, b, AttentionKernel::kEager);
        const Result sdpa = run(*model, p, b, AttentionKernel::kSdpa);
        expect_same(p, eager, sdpa, b.scored, 1e-5);
      }
    }
  }
}

TEST(TrainingAttention, SdpaRespectsThePaddingControl) {
  // Control for the test above: a query that could see a padded key would change; with the padding unmasked
  // (all-ones attention mask on a left-padded batch) the log-probs must differ, on both paths.
  auto model = load("qwen2_untied");
  const Params p = trainable(*model, true);
  Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/true, 22);
  const Result masked = run(*model, p, b, AttentionKernel::kSdpa);
  Batch unmasked = b;
  unmasked.attn = at::ones_like(b.attn);
  const Result sdpa = run(*model, p, unmasked, AttentionKernel::kSdpa);
  const Result eager = run(*model, p, unmasked, AttentionKernel::kEager);
  EXPECT_GT(max_scored_diff(masked.logprobs, sdpa.logprobs, b.scored), 1e-3);
  EXPECT_LE(max_scored_diff(eager.logprobs, sdpa.logprobs, b.scored), 1e-5);
}

TEST(TrainingAttention, SdpaUnderBf16AutocastAsCloseToFp32AsEager) {
  auto model = load("llama3_gqa");
  const Params p = trainable(*model, true);
  const Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/false, 23);
  const Result ref = run(*model, p, b, AttentionKernel::kEager);
  const Result eager16 = run(*model, p, b, AttentionKernel::kEager, /*autocast=*/true);
  const Result sdpa16 = run(*model, p, b, AttentionKernel::kSdpa, true);
  expect_bf16_no_worse(ref, eager16, sdpa16, b.scored, "eager attention", "sdpa");
}

TEST(TrainingAttention, ScoreMaskRunsTheHeadOnScoredRowsOnly) {
  auto model = load("qwen2_untied");
  const Params p = trainable(*model, true);
  const Batch b = make_batch(4, 20, model->config().vocab_size, /*left=*/false, 24);
  // Score a strict subset of the real positions (the second half of each row), as a completion mask does.
  at::Tensor mask = b.scored.clone();
  mask.narrow(1, 0, 10).zero_();
  Batch half = b;
  half.scored = mask;
  const Result full = run(*model, p, half, AttentionKernel::kEager);
  const Result picked = run(*model, p, half, AttentionKernel::kEager, false, mask);
  expect_same(p, full, picked, mask, 1e-5);
  EXPECT_EQ(picked.logprobs.masked_select(mask.eq(0)).abs().max().item<float>(), 0.0f)
      << "unscored positions must hold 0";
  EXPECT_GT(full.logprobs.masked_select(mask.eq(0).logical_and(b.scored.ne(0))).abs().min().item<float>(), 0.0f)
      << "control: the full head does score those positions";
}

TEST(TrainingForward, FusedLoraEqualsPeftOpSequence) {
  // fp32 with dropout (both paths draw the same masks from the same seed): equal to rounding.
  for (const char* name : {"qwen2_untied", "llama3_gqa"}) {
    SCOPED_TRACE(name);
    auto model = load(name);
    const Params p = trainable(*model, true, /*dropout=*/0.2);
    const Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/false, 25);
    model->set_training(true);
    const auto pass = [&](bool fused, uint64_t seed) {
      model->set_fused_lora(fused);
      at::manual_seed(seed);
      return run(*model, p, b, AttentionKernel::kEager);
    };
    const Result peft = pass(false, 5), fused = pass(true, 5);
    expect_same(p, peft, fused, b.scored, 1e-5);
    // Control: another seed draws other masks, so the equality above is the same dropout, not no dropout.
    const Result other = pass(true, 6);
    EXPECT_GT(max_scored_diff(other.logprobs, fused.logprobs, b.scored), 1e-4);
  }
}

TEST(TrainingForward, FusedLoraUnderBf16AutocastAsCloseToFp32AsPeftOps) {
  auto model = load("llama3_gqa");
  const Params p = trainable(*model, true);
  const Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/false, 26);
  model->set_fused_lora(false);
  const Result ref = run(*model, p, b, AttentionKernel::kEager);
  const Result peft16 = run(*model, p, b, AttentionKernel::kSdpa, /*autocast=*/true);
  model->set_fused_lora(true);
  const Result fused16 = run(*model, p, b, AttentionKernel::kSdpa, true);
  expect_bf16_no_worse(ref, peft16, fused16, b.scored, "PEFT ops", "fused LoRA");
  // Gradient direction of every adapter tensor against fp32.
  for (size_t i = 0; i < p.size(); ++i) {
    const at::Tensor a = ref.grads[i].flatten(), c = fused16.grads[i].flatten();
    const double cosine = (a * c).sum().item<double>() / (a.norm().item<double>() * c.norm().item<double>());
    EXPECT_GT(cosine, 0.99) << p[i].first;
  }
}

TEST(TrainingForward, FusedRmsNormEqualsTransformersOps) {
  for (const bool lora : {true, false}) {  // full fine-tuning: the norm weights' gradients too
    SCOPED_TRACE(lora ? "LoRA" : "full");
    auto model = load("qwen2_untied");
    const Params p = trainable(*model, lora);
    const Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/false, 27);
    model->set_norm(NormKernel::kEager);
    const Result eager = run(*model, p, b, AttentionKernel::kEager);
    model->set_norm(NormKernel::kFused);
    const Result fused = run(*model, p, b, AttentionKernel::kEager);
    expect_same(p, eager, fused, b.scored, 1e-5);
  }
  // bf16 autocast with every speed path on (what kAuto selects on CUDA) against the transformers/PEFT ops.
  auto model = load("llama3_gqa");
  const Params p = trainable(*model, true);
  const Batch b = make_batch(3, 20, model->config().vocab_size, /*left=*/false, 28);
  model->set_norm(NormKernel::kEager);
  model->set_fused_lora(false);
  const Result ref = run(*model, p, b, AttentionKernel::kEager);
  const Result slow16 = run(*model, p, b, AttentionKernel::kEager, /*autocast=*/true);
  model->set_norm(NormKernel::kFused);
  model->set_fused_lora(true);
  const Result fast16 = run(*model, p, b, AttentionKernel::kSdpa, true);
  expect_bf16_no_worse(ref, slow16, fast16, b.scored, "transformers/PEFT ops", "SDPA + fused LoRA + fused norm");
}
