// Optimizer pieces: AdamW against a hand-computed 2-step update and against torch.optim.AdamW run at test time
// (tests/reference/adamw_reference.py), in-place updates (same storage), state save/restore, clipping against
// torch's clip_grad_norm_, learning-rate schedules at warmup end, midpoint and end, and the accumulation counter.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "core/error.h"
#include "models/weights.h"
#include "test_util.h"
#include "train/optim.h"

using namespace rlaif;
using namespace rlaif::train;

namespace {

at::Tensor leaf(at::Tensor t) { return t.clone().requires_grad_(true); }

void set_grad(at::Tensor& p, const at::Tensor& g) { p.mutable_grad() = g.clone(); }

std::map<std::string, at::Tensor> torch_reference() {
  static const auto ref = [] {
    const auto dir = test::temp_dir("adamw_ref");
    std::string out;
    const int rc = test::run_command(test::python() + " " + (test::source_dir() / "tests/reference/adamw_reference.py").string() +
                                         " " + (dir / "ref.safetensors").string(), &out);
    EXPECT_EQ(rc, 0) << out;
    return load_safetensors(dir / "ref.safetensors");
  }();
  return ref;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST(AdamW, HandComputedTwoSteps) {
  // p0 = 1, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01; grads 0.5 then -0.25.
  // Step 1: p = 1 * (1 - 0.1*0.01) = 0.999; m = 0.1*0.5 = 0.05; v = 0.001*0.25 = 0.00025;
  //   bias corrections 1-0.9 = 0.1, 1-0.999 = 0.001; p -= 0.1/0.1 * 0.05 / (sqrt(0.00025/0.001) + 1e-8).
  // Step 2: p *= 0.999; m = 0.9*0.05 + 0.1*-0.25 = 0.02; v = 0.999*0.00025 + 0.001*0.0625 = 0.00031225;
  //   corrections 1-0.81 = 0.19, 1-0.998001 = 0.001999; p -= 0.1/0.19 * 0.02 / (sqrt(0.00031225/0.001999) + 1e-8).
  const double p1 = 0.999 - 1.0 * 0.05 / (0.5 + 1e-8);
  const double p2 = p1 * 0.999 - 0.1 / 0.19 * 0.02 / (std::sqrt(0.00031225 / 0.001999) + 1e-8);
  at::Tensor p = leaf(at::ones({2, 1}));  // 2-D so it is decayed
  AdamWOptions o;
  o.weight_decay = 0.01;
  AdamW opt({{"p", p}}, o);
  set_grad(p, at::full({2, 1}, 0.5));
  opt.step(0.1);
  EXPECT_NEAR(p[0][0].item<double>(), p1, 1e-6);
  set_grad(p, at::full({2, 1}, -0.25));
  opt.step(0.1);
  EXPECT_NEAR(p[1][0].item<double>(), p2, 1e-6);
  EXPECT_NEAR(opt.state_dict().at("p.step").item<double>(), 2, 0);
}

TEST(AdamW, MatchesTorchAdamWInPlace) {
  const auto ref = torch_reference();
  at::Tensor w = leaf(ref.at("w0")), b = leaf(ref.at("b0"));
  const void* w_storage = w.data_ptr();
  AdamWOptions o;
  o.beta1 = 0.9, o.beta2 = 0.95, o.eps = 1e-6, o.weight_decay = 0.1;  // decay_1d false: b is not decayed
  AdamW opt({{"w", w}, {"b", b}}, o);
  for (int k = 0; k < 3; ++k) {
    set_grad(w, ref.at(fmt::format("gw{}", k)));
    set_grad(b, ref.at(fmt::format("gb{}", k)));
    opt.step(1e-2);
  }
  EXPECT_LE(max_diff(w, ref.at("w3")), 1e-6);
  EXPECT_LE(max_diff(b, ref.at("b3")), 1e-6);
  EXPECT_EQ(w.data_ptr(), w_storage);  // updated in place: the engine sees it with no copy
  const auto st = opt.state_dict();
  EXPECT_LE(max_diff(st.at("w.exp_avg"), ref.at("w3_exp_avg")), 1e-7);
  EXPECT_LE(max_diff(st.at("w.exp_avg_sq"), ref.at("w3_exp_avg_sq")), 1e-7);
}

TEST(AdamW, StateRestoresAndResumesIdentically) {
  at::manual_seed(1);
  at::Tensor a = leaf(at::randn({3, 2})), a2 = leaf(a.detach());
  AdamW opt({{"a", a}}, {});
  for (int k = 0; k < 2; ++k) {
    set_grad(a, at::randn({3, 2}));
    opt.step(1e-2);
  }
  at::NoGradGuard ng;
  a2.copy_(a);
  AdamW resumed({{"a", a2}}, {});
  resumed.load_state_dict(opt.state_dict());
  const at::Tensor g = at::randn({3, 2});
  set_grad(a, g);
  set_grad(a2, g);
  opt.step(1e-2);
  resumed.step(1e-2);
  EXPECT_TRUE(at::equal(a, a2));
  // A state of another shape is an Error naming the tensor.
  auto bad = opt.state_dict();
  bad["a.exp_avg"] = at::zeros({5});
  try {
    resumed.load_state_dict(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a.exp_avg"), std::string::npos) << e.what();
  }
}

TEST(AdamW, SkipsParametersWithoutGradAndUpdatesBf16) {
  at::Tensor frozen = leaf(at::ones({2})), h = leaf(at::ones({4}, at::kBFloat16));
  AdamW opt({{"frozen", frozen}, {"h", h}}, {});
  set_grad(h, at::ones({4}, at::kBFloat16));
  opt.step(0.125);  // first Adam step moves by lr * sign(g): 1 - 0.125 = 0.875, exact in bf16
  EXPECT_TRUE(at::equal(frozen, at::ones({2})));
  EXPECT_NEAR(h[0].item<double>(), 0.875, 1e-3);
  EXPECT_EQ(opt.state_dict().count("frozen.step"), 0u);
  opt.zero_grad();
  EXPECT_FALSE(h.grad().defined());
}

TEST(ClipGradNorm, MatchesTorchAndReturnsPreClipNorm) {
  const auto ref = torch_reference();
  at::Tensor a = leaf(at::zeros({5, 2})), c = leaf(at::zeros({7}));
  set_grad(a, ref.at("clip_in_a"));
  set_grad(c, ref.at("clip_in_b"));
  const double norm = clip_grad_norm({{"a", a}, {"c", c}}, 1.5);
  EXPECT_NEAR(norm, ref.at("clip_norm")[0].item<double>(), 1e-5);
  EXPECT_LE(max_diff(a.grad(), ref.at("clip_out_a")), 1e-6);
  EXPECT_LE(max_diff(c.grad(), ref.at("clip_out_b")), 1e-6);
  // Hand case: grads (3, 4) and (12): norm 13; under a max of 20 nothing changes.
  at::Tensor x = leaf(at::zeros({2})), y = leaf(at::zeros({1}));
  set_grad(x, at::tensor({3.0f, 4.0f}));
  set_grad(y, at::tensor({12.0f}));
  EXPECT_NEAR(clip_grad_norm({{"x", x}, {"y", y}}, 20), 13, 1e-5);
  EXPECT_EQ(x.grad()[1].item<float>(), 4.0f);
  EXPECT_NEAR(clip_grad_norm({{"x", x}, {"y", y}}, 6.5), 13, 1e-5);  // scaled by 6.5/13 = 0.5
  EXPECT_NEAR(y.grad()[0].item<double>(), 6.0, 1e-5);
}

TEST(LrSchedule, WarmupMidpointAndEnd) {
  // base 1, warmup 10, total 110: warmup gives step/10; the decay runs over 100 steps from step 10.
  LrSchedule s;
  s.base_lr = 1.0, s.warmup_steps = 10, s.total_steps = 110;
  for (auto kind : {LrSchedule::Kind::kConstant, LrSchedule::Kind::kLinear, LrSchedule::Kind::kCosine}) {
    s.kind = kind;
    EXPECT_EQ(s.lr_at(0), 0.0);
    EXPECT_DOUBLE_EQ(s.lr_at(5), 0.5);
    EXPECT_DOUBLE_EQ(s.lr_at(10), 1.0);  // warmup end: full learning rate
  }
  s.kind = LrSchedule::Kind::kConstant;
  EXPECT_EQ(s.lr_at(110), 1.0);
  s.kind = LrSchedule::Kind::kLinear;
  EXPECT_DOUBLE_EQ(s.lr_at(60), 0.5);  // 1 - 50/100
  EXPECT_EQ(s.lr_at(110), 0.0);
  EXPECT_EQ(s.lr_at(200), 0.0);
  s.kind = LrSchedule::Kind::kCosine;
  EXPECT_NEAR(s.lr_at(60), 0.5, 1e-15);                              // 0.5 (1 + cos(pi/2))
  EXPECT_NEAR(s.lr_at(35), 0.5 * (1 + std::sqrt(0.5)), 1e-15);        // progress 1/4: 0.5 (1 + cos(pi/4))
  EXPECT_NEAR(s.lr_at(110), 0.0, 1e-15);
  s.min_lr_ratio = 0.1;  // floor: 0.1 + 0.9 * factor
  EXPECT_NEAR(s.lr_at(60), 0.55, 1e-15);
  EXPECT_NEAR(s.lr_at(110), 0.1, 1e-15);
  EXPECT_EQ(parse_lr_schedule("linear"), LrSchedule::Kind::kLinear);
  EXPECT_THROW(parse_lr_schedule("cosine_with_restarts"), Error);
}

TEST(GradAccumulator, StepsEveryNthMicroBatch) {
  GradAccumulator acc(3);
  std::vector<bool> steps;
  for (int i = 0; i < 7; ++i) steps.push_back(acc.micro_batch_done());
  EXPECT_EQ(steps, (std::vector<bool>{false, false, true, false, false, true, false}));
  EXPECT_EQ(acc.pending(), 1);
}
