// Advantages against hand-derived values: mean / leave-one-out / no baseline with and without std scaling, the
// median/MAD/tanh scheme, groups given in any order, zero-variance groups excluded and counted, the reward
// threshold dropping samples (never the batch) and top-k per group. Each expected value's derivation is beside it.
#include <gtest/gtest.h>

#include <cmath>

#include "train/advantages.h"

using namespace rlaif::train;
using Opt = AdvantageOptions;

namespace {

void expect_near(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-12) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "sample " << i;
}

Opt exact() {  // eps 0 so the hand-derived values are exact
  Opt o;
  o.eps = 0;
  return o;
}

}  // namespace

TEST(Advantages, MeanBaselineWithAndWithoutStd) {
  // r = 1,2,3,4: mean 2.5, deviations -1.5,-0.5,0.5,1.5; sample variance (2.25+.25+.25+2.25)/3 = 5/3.
  const std::vector<double> r = {1, 2, 3, 4};
  const std::vector<int64_t> g = {0, 0, 0, 0};
  Opt o = exact();
  o.normalize_std = false;
  expect_near(compute_advantages(r, g, o).advantages, {-1.5, -0.5, 0.5, 1.5});
  o.normalize_std = true;
  const double s = std::sqrt(5.0 / 3.0);
  expect_near(compute_advantages(r, g, o).advantages, {-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s});
  o.eps = 0.1;  // eps joins the std in the denominator
  expect_near(compute_advantages(r, g, o).advantages, {-1.5 / (s + 0.1), -0.5 / (s + 0.1), 0.5 / (s + 0.1), 1.5 / (s + 0.1)});
}

TEST(Advantages, LeaveOneOutAndNoBaseline) {
  // LOO baseline of r_i is (sum - r_i) / 3 with sum 10: 3, 8/3, 7/3, 2 -> advantages -2, -2/3, 2/3, 2.
  const std::vector<double> r = {1, 2, 3, 4};
  const std::vector<int64_t> g = {0, 0, 0, 0};
  Opt o = exact();
  o.normalize_std = false;
  o.baseline = Opt::Baseline::kLeaveOneOut;
  expect_near(compute_advantages(r, g, o).advantages, {-2, -2.0 / 3, 2.0 / 3, 2});
  o.baseline = Opt::Baseline::kNone;  // REINFORCE on raw rewards
  expect_near(compute_advantages(r, g, o).advantages, {1, 2, 3, 4});
  o.normalize_std = true;  // raw rewards over the group std sqrt(5/3)
  const double s = std::sqrt(5.0 / 3.0);
  expect_near(compute_advantages(r, g, o).advantages, {1 / s, 2 / s, 3 / s, 4 / s});
}

TEST(Advantages, MadTanhEvenAndOddGroups) {
  // Even group 0,1,2,10: median (1+2)/2 = 1.5; |r - 1.5| = 1.5,.5,.5,8.5 -> MAD (0.5+1.5)/2 = 1;
  // scale 1.4826 * 1 -> tanh(-1.5/1.4826), tanh(-.5/1.4826), tanh(.5/1.4826), tanh(8.5/1.4826) (outlier saturates).
  // Odd group 3,1,2: median 2; |r - 2| = 1,1,0 -> MAD 1; tanh(1/1.4826), tanh(-1/1.4826), 0.
  const std::vector<double> r = {0, 3, 1, 2, 1, 10, 2};
  const std::vector<int64_t> g = {0, 1, 0, 0, 1, 0, 1};
  Opt o = exact();
  o.scheme = Opt::Scheme::kMadTanh;
  const double k = 1.4826;
  const auto res = compute_advantages(r, g, o);
  expect_near(res.advantages, {std::tanh(-1.5 / k), std::tanh(1 / k), std::tanh(-0.5 / k), std::tanh(0.5 / k),
                               std::tanh(-1 / k), std::tanh(8.5 / k), 0.0});
  EXPECT_GT(res.advantages[5], 0.99);  // bounded: the outlier reward of 10 cannot dominate the batch
  EXPECT_LT(res.advantages[5], 1.0);
  EXPECT_EQ(res.kept, 7);
  EXPECT_EQ(median({4, 1, 3, 2}), 2.5);
  EXPECT_EQ(median({5}), 5);
  // MAD 0 but rewards not all equal (0,0,0,1: median 0, |dev| 0,0,0,1 -> MAD 0): with eps 0 the advantage is
  // sign(r - median), the limit of tanh; with eps 1e-4 it is tanh(1/1e-4) = 1 to double precision.
  const std::vector<int64_t> g4 = {0, 0, 0, 0};
  expect_near(compute_advantages({0, 0, 0, 1}, g4, o).advantages, {0, 0, 0, 1});
  o.eps = 1e-4;
  expect_near(compute_advantages({0, 0, 0, 1}, g4, o).advantages, {0, 0, 0, 1});
  EXPECT_EQ(median({5}), 5);
}

TEST(Advantages, GroupsInAnyOrderUseOnlyTheirOwnSamples) {
  // Group 7 = {1, 3} (mean 2), group 3 = {10, 30} (mean 20), interleaved.
  Opt o = exact();
  o.normalize_std = false;
  const auto res = compute_advantages({1, 10, 3, 30}, {7, 3, 7, 3}, o);
  expect_near(res.advantages, {-1, -10, 1, 10});
  EXPECT_EQ(res.num_groups, 2);
}

TEST(Advantages, ZeroVarianceGroupsAreExcludedAndCounted) {
  // Group 0 all 0.5 (a prompt every sample solved equally), group 1 varies, group 2 a single sample.
  const std::vector<double> r = {0.5, 0.5, 0.5, 0.0, 1.0, 0.7};
  const std::vector<int64_t> g = {0, 0, 0, 1, 1, 2};
  Opt o = exact();
  const auto res = compute_advantages(r, g, o);
  EXPECT_EQ(res.zero_variance_groups, 2);
  EXPECT_EQ(res.keep, (std::vector<bool>{false, false, false, true, true, false}));
  EXPECT_EQ(res.kept, 2);
  // Group 1: mean 0.5, sample std sqrt(0.5) -> -0.5/sqrt(.5), +0.5/sqrt(.5). Group 0: r - mean = 0, and its zero
  // std (eps 0 here) is not divided by, so 0 rather than 0/0.
  EXPECT_EQ(res.advantages[0], 0.0);
  EXPECT_EQ(res.advantages[5], 0.0);
  EXPECT_NEAR(res.advantages[3], -0.5 / std::sqrt(0.5), 1e-12);
  EXPECT_NEAR(res.advantages[4], 0.5 / std::sqrt(0.5), 1e-12);
  o.drop_zero_variance = false;  // counted but kept
  const auto kept = compute_advantages(r, g, o);
  EXPECT_EQ(kept.zero_variance_groups, 2);
  EXPECT_EQ(kept.kept, 6);
  // Rewards equal up to float noise are still one value.
  EXPECT_EQ(compute_advantages({0.1 + 0.2, 0.3}, {0, 0}, exact()).zero_variance_groups, 1);
}

TEST(Advantages, ThresholdDropsSamplesNotTheBatch) {
  // Group 0 = .1,.5,.9 (mean .5), group 1 = .2,.8 (mean .5); threshold .4 drops only samples 0 and 3.
  const std::vector<double> r = {0.1, 0.5, 0.9, 0.2, 0.8};
  const std::vector<int64_t> g = {0, 0, 0, 1, 1};
  Opt o = exact();
  o.normalize_std = false;
  o.reward_threshold = 0.4;
  const auto res = compute_advantages(r, g, o);
  EXPECT_EQ(res.keep, (std::vector<bool>{false, true, true, false, true}));
  EXPECT_EQ(res.dropped_by_threshold, 2);
  EXPECT_EQ(res.kept, 3);
  // The baseline still comes from the whole group: the kept samples' advantages are 0 and +0.4, +0.3.
  expect_near(res.advantages, {-0.4, 0.0, 0.4, -0.3, 0.3});
  // Reward exactly at the threshold is kept (r < threshold drops).
  o.reward_threshold = 0.5;
  EXPECT_TRUE(compute_advantages(r, g, o).keep[1]);
}

TEST(Advantages, TopKPerGroupKeepsTheBest) {
  // Group 0 = .3,.9,.5,.9 -> k=2 keeps both .9s; group 1 = .1,.2 -> keeps both. k=1: ties keep the earlier sample.
  const std::vector<double> r = {0.3, 0.9, 0.5, 0.9, 0.1, 0.2};
  const std::vector<int64_t> g = {0, 0, 0, 0, 1, 1};
  Opt o = exact();
  o.top_samples_per_prompt = 2;
  auto res = compute_advantages(r, g, o);
  EXPECT_EQ(res.keep, (std::vector<bool>{false, true, false, true, true, true}));
  EXPECT_EQ(res.dropped_by_top_k, 2);
  o.top_samples_per_prompt = 1;
  res = compute_advantages(r, g, o);
  EXPECT_EQ(res.keep, (std::vector<bool>{false, true, false, false, false, true}));
  // With a threshold too: .5 and .3 fall under .6, so top-2 of group 0 drops no further sample than threshold did.
  o.top_samples_per_prompt = 2;
  o.reward_threshold = 0.6;
  res = compute_advantages(r, g, o);
  EXPECT_EQ(res.keep, (std::vector<bool>{false, true, false, true, false, false}));
  EXPECT_EQ(res.dropped_by_threshold, 4);
  EXPECT_EQ(res.dropped_by_top_k, 0);
}
