// The per-token objective is built from inputs whose masked positions are replaced by 0 first (at::where), so
// masked tokens get exactly zero gradient and no inf/NaN at a padding position can leak into the loss.
#include "train/losses.h"

#include <ATen/core/grad_mode.h>

#include <limits>

#include "core/error.h"

namespace rlaif::train {

namespace {

void check_bt(const at::Tensor& t, const at::Tensor& like, const char* name) {
  RLAIF_CHECK(t.sizes() == like.sizes(), "{} has shape {} but new_logprobs has {}", name, t.sizes(), like.sizes());
}

}  // namespace

at::Tensor kl_estimate(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, LossOptions::KlEstimator est) {
  if (est == LossOptions::KlEstimator::kK1) return logprobs - ref_logprobs;
  // k3 = r - log r - 1 with r = p_ref / p: unbiased, always >= 0, lower variance than k1 (Schulman 2020).
  const at::Tensor d = ref_logprobs - logprobs;
  return at::exp(d) - d - 1;
}

double loss_denominator(const at::Tensor& mask, const LossOptions& o) {
  RLAIF_CHECK(mask.dim() == 2, "mask must be [B, T], got {}", mask.sizes());
  const at::Tensor m = mask != 0;
  const at::Tensor per_seq = m.sum(1);
  switch (o.norm) {
    case LossOptions::Norm::kToken:
      return static_cast<double>(per_seq.sum().item<int64_t>());
    case LossOptions::Norm::kSequence:
      return static_cast<double>((per_seq > 0).sum().item<int64_t>());
    case LossOptions::Norm::kConstant: {
      const double len = o.max_len_norm > 0 ? o.max_len_norm : static_cast<double>(mask.size(1));
      return static_cast<double>((per_seq > 0).sum().item<int64_t>()) * len;
    }
  }
  return 0;
}

LossResult policy_loss(const LossInputs& in, const LossOptions& o, double denominator) {
  const at::Tensor& nl = in.new_logprobs;
  RLAIF_CHECK(nl.defined() && nl.dim() == 2, "new_logprobs must be [B, T]");
  RLAIF_CHECK(in.mask.defined() && in.advantages.defined(), "mask and advantages are required");
  check_bt(in.mask, nl, "mask");
  RLAIF_CHECK(in.advantages.dim() == 1 && in.advantages.size(0) == nl.size(0), "advantages {} for batch {}",
              in.advantages.sizes(), nl.size(0));
  RLAIF_CHECK(o.clip_low >= 0 && o.clip_low < 1 && o.clip_high >= 0, "clip range [{}, {}]", o.clip_low, o.clip_high);
  RLAIF_CHECK(!o.is_truncation || *o.is_truncation > 0, "is_truncation {}", *o.is_truncation);
  const auto fopt = nl.options();
  const at::Tensor m = (in.mask != 0).to(nl.device());
  const at::Tensor mf = m.to(fopt.dtype());
  // Masked positions become 0 before any arithmetic: where's backward sends them a gradient of exactly 0.
  const auto clean = [&](const at::Tensor& x, const char* name) {
    check_bt(x, nl, name);
    return at::where(m, x.detach().to(fopt), 0.0);
  };
  const at::Tensor lp = at::where(m, nl, 0.0);
  const at::Tensor old = in.old_logprobs.defined() ? clean(in.old_logprobs, "old_logprobs") : lp.detach();
  const at::Tensor adv = in.advantages.detach().to(fopt).unsqueeze(1);  // [B, 1]

  const at::Tensor ratio = at::exp(lp - old);
  at::Tensor obj, clipped;
  if (o.kind == LossOptions::Kind::kReinforce) {
    obj = adv * lp;  // gradient A * grad log p
  } else {
    const at::Tensor surr = ratio * adv;
    const at::Tensor surr_clip = at::clamp(ratio, 1 - o.clip_low, 1 + o.clip_high) * adv;
    obj = at::minimum(surr, surr_clip);
    clipped = ((adv > 0) & (ratio > 1 + o.clip_high)) | ((adv < 0) & (ratio < 1 - o.clip_low));
  }
  at::Tensor is_w;
  if (o.is_truncation && in.sampler_logprobs.defined()) {
    // Truncated IS (Yao et al. 2025): corrects for sampling from pi_sampler, capped to bound the variance.
    is_w = at::clamp_max(at::exp(old - clean(in.sampler_logprobs, "sampler_logprobs")), *o.is_truncation).detach();
    obj = obj * is_w;
  }

  const at::Tensor seq_len = mf.sum(1, /*keepdim=*/true);  // [B, 1]
  const at::Tensor c = o.norm == LossOptions::Norm::kSequence ? mf / at::clamp_min(seq_len, 1) : mf;
  const double D = denominator > 0 ? denominator : loss_denominator(in.mask, o);
  const double inv_d = D > 0 ? 1.0 / D : 0.0;  // an empty batch gives a zero loss that still has a graph

  const at::Tensor pg = (-obj * c).sum() * inv_d;
  at::Tensor kl_term = at::zeros({}, fopt), kl_tok;
  if (in.ref_logprobs.defined()) {
    kl_tok = kl_estimate(lp, clean(in.ref_logprobs, "ref_logprobs"), o.kl_estimator);
    kl_term = (kl_tok * c).sum() * inv_d;
  }
  LossResult res;
  res.loss = (o.kl_in_reward || o.kl_beta == 0) ? pg : pg + o.kl_beta * kl_term;

  // Statistics: stacked into one tensor so reading them costs one device sync.
  at::NoGradGuard no_grad;
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor n_tok = mf.sum();
  const at::Tensor safe_n = at::clamp_min(n_tok, 1);
  const auto masked_mean = [&](const at::Tensor& x) { return (x * mf).sum() / safe_n; };
  const at::Tensor zero = at::zeros({}, fopt), one = at::ones({}, fopt);
  std::vector<at::Tensor> stats = {
      pg.detach(), kl_term.detach(), kl_tok.defined() ? masked_mean(kl_tok) : zero,
      clipped.defined() ? masked_mean(clipped.to(fopt.dtype())) : zero, masked_mean(ratio),
      at::where(m, ratio, inf).min(), at::where(m, ratio, -inf).max(),
      is_w.defined() ? masked_mean(is_w) : one, is_w.defined() ? at::where(m, is_w, inf).min() : one,
      is_w.defined() ? at::where(m, is_w, -inf).max() : one,
      is_w.defined() ? masked_mean((is_w >= *o.is_truncation).to(fopt.dtype())) : zero, n_tok,
      (seq_len > 0).sum().to(fopt.dtype())};
  const at::Tensor s = at::stack(stats).to(at::kCPU, at::kDouble);
  const double* v = s.data_ptr<double>();
  res.policy_loss = v[0];
  res.kl_loss = v[1];
  res.kl_mean = v[2];
  res.clip_fraction = v[3];
  res.tokens = static_cast<int64_t>(v[11]);
  res.sequences = static_cast<int64_t>(v[12]);
  if (res.tokens > 0) {
    res.ratio_mean = v[4], res.ratio_min = v[5], res.ratio_max = v[6];
    res.is_weight_mean = v[7], res.is_weight_min = v[8], res.is_weight_max = v[9];
    res.is_truncated_fraction = v[10];
  }
  return res;
}

KlRewardResult apply_kl_to_rewards(const std::vector<double>& rewards, const at::Tensor& logprobs,
                                   const at::Tensor& ref_logprobs, const at::Tensor& mask, double beta,
                                   LossOptions::KlEstimator est) {
  RLAIF_CHECK(logprobs.dim() == 2 && logprobs.size(0) == static_cast<int64_t>(rewards.size()),
              "logprobs {} for {} rewards", logprobs.sizes(), rewards.size());
  RLAIF_CHECK(ref_logprobs.sizes() == logprobs.sizes() && mask.sizes() == logprobs.sizes(),
              "ref_logprobs {} / mask {} vs logprobs {}", ref_logprobs.sizes(), mask.sizes(), logprobs.sizes());
  at::NoGradGuard no_grad;
  const at::Tensor m = (mask != 0).to(logprobs.device());
  const at::Tensor lp = at::where(m, logprobs.to(at::kDouble), 0.0);
  const at::Tensor ref = at::where(m, ref_logprobs.to(logprobs.device(), at::kDouble), 0.0);
  const at::Tensor sums = (kl_estimate(lp, ref, est) * m).sum(1).to(at::kCPU).contiguous();
  KlRewardResult out;
  out.kl_sum.assign(sums.data_ptr<double>(), sums.data_ptr<double>() + sums.numel());
  out.rewards.resize(rewards.size());
  for (size_t i = 0; i < rewards.size(); ++i) out.rewards[i] = rewards[i] - beta * out.kl_sum[i];
  return out;
}

}  // namespace rlaif::train
