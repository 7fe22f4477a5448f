// The adaptive KL controller against hand-computed updates (TRL's AdaptiveKLController formula): beta grows when
// the KL is above target and shrinks below it, the proportional error is clipped, bounds hold, a fixed controller
// never moves, and the state round-trips through JSON for resume.
#include <gtest/gtest.h>

#include <cmath>

#include "train/kl_controller.h"

using namespace rlaif::train;

TEST(KlController, MovesTowardTargetWithClippedError) {
  KlControllerOptions o;
  o.init_beta = 0.1;
  o.target_kl = 6.0;
  o.horizon = 10000;
  KlControllerState s = kl_controller_init(o);
  // kl 6.6: error 6.6/6 - 1 = 0.1 (inside the clip); n = 256: beta *= 1 + 0.1 * 256/10000 = 1.00256.
  EXPECT_NEAR(kl_controller_update(s, o, 6.6, 256), 0.1 * 1.00256, 1e-15);
  // kl 60: error 9 clipped to 0.2: beta *= 1 + 0.2 * 256/10000 = 1.00512.
  EXPECT_NEAR(kl_controller_update(s, o, 60, 256), 0.1 * 1.00256 * 1.00512, 1e-15);
  // kl 0: error -1 clipped to -0.2: beta *= 1 - 0.00512 (down: the policy is too close to the reference).
  const double before = s.beta;
  EXPECT_NEAR(kl_controller_update(s, o, 0, 256), before * (1 - 0.00512), 1e-15);
  EXPECT_EQ(s.updates, 3);
  EXPECT_EQ(s.last_kl, 0);
}

TEST(KlController, GainBoundsAndFixedBeta) {
  KlControllerOptions o;
  o.init_beta = 0.1;
  o.target_kl = 1.0;
  o.horizon = 1;
  o.kl_gain = 0.1;  // Ziegler et al.'s K_beta with one step per update: beta *= 1 + 0.1 * e
  KlControllerState s = kl_controller_init(o);
  EXPECT_NEAR(kl_controller_update(s, o, 1.1, 1), 0.1 * 1.01, 1e-15);  // e = 0.1
  // Bounds: far above target for many steps saturates at beta_max; far below at beta_min.
  o.kl_gain = 1.0;
  o.beta_max = 0.2;
  o.beta_min = 0.05;
  for (int i = 0; i < 50; ++i) kl_controller_update(s, o, 100, 1);
  EXPECT_EQ(s.beta, 0.2);
  for (int i = 0; i < 50; ++i) kl_controller_update(s, o, 0, 1);
  EXPECT_EQ(s.beta, 0.05);
  // Non-finite KL leaves beta alone.
  EXPECT_EQ(kl_controller_update(s, o, std::nan(""), 1), 0.05);
  // target_kl <= 0: a fixed coefficient.
  KlControllerOptions fixed;
  fixed.init_beta = 0.03;
  KlControllerState f = kl_controller_init(fixed);
  EXPECT_EQ(kl_controller_update(f, fixed, 100, 1000), 0.03);
  // init_beta outside the bounds starts clamped.
  KlControllerOptions hi;
  hi.init_beta = 50;
  EXPECT_EQ(kl_controller_init(hi).beta, hi.beta_max);
}

TEST(KlController, StateRoundTripsThroughJson) {
  KlControllerState s{0.0123, 7, 4.5};
  const nlohmann::json j = s;
  const auto back = j.get<KlControllerState>();
  EXPECT_EQ(back.beta, 0.0123);
  EXPECT_EQ(back.updates, 7);
  EXPECT_EQ(back.last_kl, 4.5);
  EXPECT_EQ(j.at("beta").get<double>(), 0.0123);
}
