// AdamW, clipping and schedules written against torch's and HF's definitions (docs/ALGORITHMS.md gives the
// formulas); updates run under NoGradGuard, in place, so parameter storage (data_ptr) never changes.
#include "train/optim.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <numbers>

#include "core/error.h"

namespace rlaif::train {

AdamW::AdamW(NamedParams params, AdamWOptions options)
    : params_(std::move(params)), options_(options), state_(params_.size()) {
  RLAIF_CHECK(options_.beta1 >= 0 && options_.beta1 < 1 && options_.beta2 >= 0 && options_.beta2 < 1,
              "betas ({}, {})", options_.beta1, options_.beta2);
  for (const auto& [name, p] : params_) RLAIF_CHECK(p.defined() && p.is_floating_point(), "parameter {}", name);
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  const auto& o = options_;
  // Float32 parameters (LoRA adapters, fp32 masters) update together through ATen's _foreach kernels (torch's
  // foreach AdamW: a handful of launches for all tensors instead of ~10 per tensor, which for LoRA's 2 x 7 x
  // layers small tensors is the whole cost); others (bf16 weights under full fine-tuning) one by one in float32.
  // Same element-wise formulas in the same order either way.
  std::vector<at::Tensor> ws, gs, ms, vs, decayed;
  std::vector<at::Scalar> step_size, bc2_sqrt;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    const at::Tensor& g_raw = p.grad();
    if (!g_raw.defined()) continue;
    Slot& s = state_[i];
    if (!s.exp_avg.defined()) {
      s.exp_avg = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
      s.exp_avg_sq = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
    }
    ++s.step;
    const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(s.step));
    const double bc2 = 1 - std::pow(o.beta2, static_cast<double>(s.step));
    const double wd = (o.decay_1d || p.dim() > 1) ? o.weight_decay : 0.0;
    if (p.scalar_type() == at::kFloat) {
      ws.push_back(p);
      gs.push_back(g_raw.to(at::kFloat));
      ms.push_back(s.exp_avg);
      vs.push_back(s.exp_avg_sq);
      if (wd != 0) decayed.push_back(p);
      step_size.emplace_back(-lr / bc1);
      bc2_sqrt.emplace_back(std::sqrt(bc2));
      continue;
    }
    const at::Tensor g = g_raw.to(at::kFloat);
    at::Tensor w = p.to(at::kFloat);
    if (wd != 0) w.mul_(1 - lr * wd);  // decoupled: decay the weight, not the gradient (Loshchilov & Hutter)
    s.exp_avg.lerp_(g, 1 - o.beta1);
    s.exp_avg_sq.mul_(o.beta2).addcmul_(g, g, 1 - o.beta2);
    const at::Tensor denom = (s.exp_avg_sq.sqrt() / std::sqrt(bc2)).add_(o.eps);
    w.addcdiv_(s.exp_avg, denom, -lr / bc1);
    p.copy_(w);
  }
  if (ws.empty()) return;
  if (!decayed.empty()) at::_foreach_mul_(decayed, 1 - lr * o.weight_decay);
  at::_foreach_lerp_(ms, gs, 1 - o.beta1);
  at::_foreach_mul_(vs, o.beta2);
  at::_foreach_addcmul_(vs, gs, gs, 1 - o.beta2);
  std::vector<at::Tensor> denom = at::_foreach_sqrt(vs);
  at::_foreach_div_(denom, bc2_sqrt);
  at::_foreach_add_(denom, o.eps);
  at::_foreach_addcdiv_(ws, ms, denom, step_size);
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) p.mutable_grad() = at::Tensor();
}

std::map<std::string, at::Tensor> AdamW::state_dict() const {
  std::map<std::string, at::Tensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Slot& s = state_[i];
    if (!s.exp_avg.defined()) continue;
    const std::string& n = params_[i].first;
    out[n + ".exp_avg"] = s.exp_avg;
    out[n + ".exp_avg_sq"] = s.exp_avg_sq;
    out[n + ".step"] = at::scalar_tensor(static_cast<double>(s.step), at::kFloat);
  }
  return out;
}

void AdamW::load_state_dict(const std::map<std::string, at::Tensor>& state) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [n, p] = params_[i];
    const auto step = state.find(n + ".step");
    if (step == state.end()) {
      state_[i] = Slot{};  // never stepped when saved
      continue;
    }
    Slot s;
    s.step = static_cast<int64_t>(std::llround(step->second.item<double>()));
    for (auto [key, dst] : {std::pair{".exp_avg", &s.exp_avg}, std::pair{".exp_avg_sq", &s.exp_avg_sq}}) {
      const auto it = state.find(n + key);
      if (it == state.end())
        throw Error("optim", fmt::format("optimizer state has '{}.step' but no '{}{}'", n, n, key),
                    "the checkpoint's optimizer file is incomplete");
      if (it->second.sizes() != p.sizes())
        throw Error("optim", fmt::format("optimizer state '{}{}' has shape {} but the parameter has {}", n, key,
                                         it->second.sizes(), p.sizes()),
                    "the checkpoint belongs to another model or adapter shape");
      *dst = it->second.to(p.device(), at::kFloat).clone();
    }
    state_[i] = std::move(s);
  }
}

double clip_grad_norm(const NamedParams& params, double max_norm) {
  RLAIF_CHECK(max_norm > 0, "max_norm {}", max_norm);
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& [n, p] : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return 0;
  // Per-tensor norms in float32 by one _foreach kernel family, combined on the device: one sync in all.
  std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2, at::kFloat);
  const double norm = at::linalg_vector_norm(at::stack(norms), 2).item<double>();  // as torch.nn.utils
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1) at::_foreach_mul_(grads, coef);
  return norm;
}

double LrSchedule::lr_at(int64_t step) const {
  RLAIF_CHECK(step >= 0 && warmup_steps >= 0 && total_steps >= 1, "step {} warmup {} total {}", step, warmup_steps,
              total_steps);
  if (step < warmup_steps) return base_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  const double progress = static_cast<double>(step - warmup_steps) /
                          static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  double f = 1;
  if (kind == Kind::kLinear) f = std::max(0.0, 1 - progress);
  if (kind == Kind::kCosine) f = std::max(0.0, 0.5 * (1 + std::cos(std::numbers::pi * progress)));
  if (kind != Kind::kConstant) f = min_lr_ratio + (1 - min_lr_ratio) * f;
  return base_lr * f;
}

LrSchedule::Kind parse_lr_schedule(const std::string& name) {
  if (name == "constant") return LrSchedule::Kind::kConstant;
  if (name == "linear") return LrSchedule::Kind::kLinear;
  if (name == "cosine") return LrSchedule::Kind::kCosine;
  throw Error("optim", fmt::format("unknown learning-rate schedule '{}'", name), "use constant, linear or cosine");
}

GradAccumulator::GradAccumulator(int64_t n) : n_(n) { RLAIF_CHECK(n >= 1, "micro_batches_per_step {}", n); }

bool GradAccumulator::micro_batch_done() {
  if (++done_ < n_) return false;
  done_ = 0;
  return true;
}

}  // namespace rlaif::train
