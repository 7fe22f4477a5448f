// Adaptive KL coefficient: a proportional controller on log-space beta with a clipped error (see header).
#include "train/kl_controller.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/logging.h"

namespace rlaif::train {

KlControllerState kl_controller_init(const KlControllerOptions& o) {
  RLAIF_CHECK(o.beta_min >= 0 && o.beta_min <= o.beta_max, "beta bounds [{}, {}]", o.beta_min, o.beta_max);
  KlControllerState s;
  s.beta = std::clamp(o.init_beta, o.beta_min, o.beta_max);
  return s;
}

double kl_controller_update(KlControllerState& s, const KlControllerOptions& o, double kl, int64_t n_steps) {
  ++s.updates;
  s.last_kl = kl;
  if (o.target_kl <= 0) return s.beta;
  if (!std::isfinite(kl)) {
    log_warn("[train] KL is {}; the KL coefficient stays {}", kl, s.beta);
    return s.beta;
  }
  RLAIF_CHECK(o.horizon > 0 && n_steps >= 0, "horizon {} n_steps {}", o.horizon, n_steps);
  const double error = std::clamp(kl / o.target_kl - 1.0, -o.error_clip, o.error_clip);
  const double mult = 1.0 + o.kl_gain * error * static_cast<double>(n_steps) / o.horizon;
  s.beta = std::clamp(s.beta * mult, o.beta_min, o.beta_max);
  return s.beta;
}

}  // namespace rlaif::train
