// Optimizer pieces of the trainer: AdamW updating parameters IN PLACE (the engine reads the same tensors, so the
// next rollout sees the new weights with no copy), global-norm gradient clipping, learning-rate schedules with
// warmup (HF transformers' constant/linear/cosine), and a gradient-accumulation counter.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace rlaif::train {

using NamedParams = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decay_1d = false;  // false: biases and norm scales (dim <= 1) get no weight decay (HF Trainer's rule)
};

// torch.optim.AdamW (amsgrad off) step for step: per-parameter step counts, bias correction, decoupled decay.
// State (exp_avg, exp_avg_sq) is float32 whatever the parameter dtype; a non-float32 parameter is updated in
// float32 and written back (no master copy: tiny updates to a bf16 weight can round away).
class AdamW {
 public:
  AdamW(NamedParams params, AdamWOptions options);

  // Applies one update with learning rate lr to every parameter that has a gradient; others are untouched.
  void step(double lr);
  // Drops the gradients (set undefined, as torch's set_to_none).
  void zero_grad();

  const NamedParams& params() const { return params_; }
  const AdamWOptions& options() const { return options_; }
  // "<name>.exp_avg", "<name>.exp_avg_sq", "<name>.step" (float32 scalar) for each parameter stepped so far.
  std::map<std::string, at::Tensor> state_dict() const;
  // Restores a state_dict; an Error names a missing entry or a shape that does not match the parameter.
  void load_state_dict(const std::map<std::string, at::Tensor>& state);

 private:
  struct Slot {
    at::Tensor exp_avg, exp_avg_sq;
    int64_t step = 0;
  };
  NamedParams params_;
  AdamWOptions options_;
  std::vector<Slot> state_;
};

// Scales all gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_: coefficient
// max_norm / (norm + 1e-6), applied only when below 1). Returns the norm BEFORE clipping; a non-finite norm is
// returned with gradients untouched so the caller can skip the step.
double clip_grad_norm(const NamedParams& params, double max_norm);

struct LrSchedule {
  enum class Kind { kConstant, kLinear, kCosine };
  Kind kind = Kind::kCosine;
  double base_lr = 1e-5;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;  // optimizer steps of the whole run
  double min_lr_ratio = 0;  // floor of the decay, as a fraction of base_lr

  // Learning rate of the update made after `step` earlier updates (step = 0 is the first update), as HF's
  // LambdaLR schedules: warmup base_lr * step / warmup_steps, then constant, linear to 0 at total_steps, or
  // half a cosine to 0 at total_steps; the decay part is floored at min_lr_ratio.
  double lr_at(int64_t step) const;
};
// "constant", "linear", "cosine"; an Error naming the value otherwise.
LrSchedule::Kind parse_lr_schedule(const std::string& name);

// Gradient accumulation: counts micro-batches and says when one completes an optimizer step.
class GradAccumulator {
 public:
  explicit GradAccumulator(int64_t micro_batches_per_step);
  // Call after each micro-batch's backward; true when the optimizer should step now (the counter restarts).
  bool micro_batch_done();
  int64_t micro_batches_per_step() const { return n_; }
  int64_t pending() const { return done_; }

 private:
  int64_t n_, done_ = 0;
};

}  // namespace rlaif::train
