// The KL coefficient beta: fixed, or adapted toward a target KL (Ziegler et al. 2019, as TRL's
// AdaptiveKLController): e = clip(kl / target - 1, -error_clip, error_clip); beta *= 1 + kl_gain * e * n / horizon;
// beta then clamped to [beta_min, beta_max]. The state is a plain struct so a checkpoint can save and restore it.
#pragma once

#include <cstdint>

#include <nlohmann/json.hpp>

namespace rlaif::train {

struct KlControllerOptions {
  double init_beta = 0.05;
  double target_kl = 0;      // <= 0: beta stays fixed
  double horizon = 10000;    // TRL's default; n_steps / horizon is the step size of the multiplicative update
  double kl_gain = 1.0;      // multiplies the step: 1 reproduces TRL; with horizon = n_steps = 1 it is Ziegler's K_beta
  double error_clip = 0.2;   // bound on the proportional error (Ziegler et al.)
  double beta_min = 0.0;
  double beta_max = 10.0;
};

struct KlControllerState {
  double beta = 0;
  int64_t updates = 0;
  double last_kl = 0;
};
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(KlControllerState, beta, updates, last_kl)

KlControllerState kl_controller_init(const KlControllerOptions& options);
// One update from the KL measured over the last step; n_steps: samples (or steps) that KL covers, as in TRL.
// Returns the new beta. A non-finite KL leaves beta unchanged (a logged warning).
double kl_controller_update(KlControllerState& state, const KlControllerOptions& options, double kl, int64_t n_steps);

}  // namespace rlaif::train
