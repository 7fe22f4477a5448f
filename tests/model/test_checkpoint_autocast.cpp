// Gradient checkpointing and bf16 autocast of the training forward on the tiny transformers-made models:
// checkpointing must not change the loss or any gradient (full fine-tuning and LoRA with dropout, whose masks
// the recompute must replay) while the graph retains far fewer bytes; autocast must stay close to fp32 while
// visibly computing in bf16, with float32 parameters and gradients.
#include <gtest/gtest.h>
#include <malloc.h>

#include <ATen/autocast_mode.h>

#include <cstdio>

#include "models/decoder.h"
#include "models/lora.h"
#include "model_test.h"
#include "test_util.h"
#include "train/losses.h"

using namespace rlaif;

namespace {

using Params = std::vector<std::pair<std::string, at::Tensor>>;

struct Batch {
  at::Tensor tokens, attn, targets, completion;  // [B, T]
};

// Right-padded random sequences; the last quarter of each row is padding, the first quarter prompt.
Batch make_batch(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  at::manual_seed(seed);
  Batch b;
  b.tokens = at::randint(1, vocab, {B, T}, at::kLong);
  b.attn = at::ones({B, T}, at::kLong);
  b.completion = at::zeros({B, T}, at::kFloat);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t len = T - (i % 2) * (T / 4), prompt = 1 + T / 4;
    b.attn[i].narrow(0, len, T - len).fill_(0);
    b.completion[i].narrow(0, prompt - 1, len - prompt).fill_(1);
  }
  b.targets = at::cat({b.tokens.narrow(1, 1, T - 1), at::zeros({B, 1}, at::kLong)}, 1);
  for (at::Tensor* t : {&b.tokens, &b.attn, &b.targets, &b.completion}) *t = t->to(test::test_device());
  return b;
}

std::shared_ptr<DecoderModel> load(const std::string& name) {
  return DecoderModel::load(test::reference_dir() / name, {at::kFloat, test::test_device()});
}

Params full_params(DecoderModel& m) {
  Params p = m.named_weights();
  for (auto& [n, w] : p) w.requires_grad_(true);
  return p;
}

// LoRA on every projection with dropout; B randomised so A gets gradient too (PEFT starts B at zero).
Params lora_params(DecoderModel& m, double dropout) {
  LoraConfig cfg;
  cfg.r = 4;
  cfg.dropout = dropout;
  attach_lora(m, cfg, 11);
  Params p = lora_parameters(m);
  at::NoGradGuard ng;
  for (auto& [n, w] : p)
    if (n.find("lora_B") != std::string::npos) w.normal_(0, 0.05);
  return p;
}

// The loop's loss on one batch (PPO-clip against a slightly shifted old policy, with a KL term against the
// adapters-off model when LoRA is attached); returns the loss value and leaves gradients on the parameters.
double loss_and_backward(DecoderModel& m, const Batch& b, bool autocast = false) {
  train::LossInputs in;
  {
    AutocastScope ac(test::test_device().type(), at::kBFloat16, autocast);
    in.new_logprobs = m.token_logprobs(b.tokens, b.attn, b.targets, /*chunk_rows=*/64);
    if (has_lora(m)) {
      at::NoGradGuard ng;
      AdaptersOff off(m);
      in.ref_logprobs = m.token_logprobs(b.tokens, b.attn, b.targets, 64);
    }
  }
  in.old_logprobs = in.new_logprobs.detach() + 0.01;
  in.mask = b.completion;
  in.advantages = at::linspace(-1, 1, b.tokens.size(0), at::kFloat).to(b.tokens.device());
  train::LossOptions o;
  o.kl_beta = 0.1;
  const train::LossResult r = train::policy_loss(in, o);
  r.loss.backward();  // outside the autocast scope, as torch.autocast advises
  return r.loss.item<double>();
}

std::vector<at::Tensor> take_grads(const Params& p) {
  std::vector<at::Tensor> g;
  for (const auto& [n, w] : p) {
    EXPECT_TRUE(w.grad().defined()) << n << " got no gradient";
    g.push_back(w.grad().defined() ? w.grad().clone() : at::Tensor());
    w.mutable_grad() = at::Tensor();
  }
  return g;
}

void expect_same_grads(const Params& p, const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                       double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].defined() || !b[i].defined()) continue;
    const double scale = a[i].abs().max().item<double>();
    EXPECT_GT(scale, 0) << p[i].first << " has an all-zero gradient: the comparison would prove nothing";
    EXPECT_LE((a[i] - b[i]).abs().max().item<double>(), tol * scale) << p[i].first;
  }
}

// Heap bytes in use (glibc: small-bin allocations + mmapped chunks, where large tensors live).
size_t heap_in_use() {
  const struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

}  // namespace

TEST(GradientCheckpointing, FullFineTuningLossAndEveryGradientUnchanged) {
  // Both attention kernels: the recompute must replay the forward's (SDPA keeps no score matrix to reuse).
  for (const auto& [name, attention] : {std::pair{"qwen2_untied", AttentionKernel::kEager},
                                        std::pair{"llama3_gqa", AttentionKernel::kEager},
                                        std::pair{"llama3_gqa", AttentionKernel::kSdpa}}) {
    SCOPED_TRACE(fmt::format("{} {}", name, attention == AttentionKernel::kSdpa ? "sdpa" : "eager"));
    auto model = load(name);
    model->set_attention(attention);
    const Params p = full_params(*model);
    const Batch b = make_batch(3, 24, model->config().vocab_size, 5);
    model->set_training(true);
    const double plain = loss_and_backward(*model, b);
    const auto g_plain = take_grads(p);
    model->set_gradient_checkpointing(true);
    const double ckpt = loss_and_backward(*model, b);
    const auto g_ckpt = take_grads(p);
    EXPECT_EQ(plain, ckpt) << "the checkpointed forward is the same computation";
    expect_same_grads(p, g_plain, g_ckpt, 1e-5);
  }
}

TEST(GradientCheckpointing, LoraWithDropoutReplaysTheSameMasks) {
  auto model = load("qwen2_untied");
  const Params p = lora_params(*model, /*dropout=*/0.3);
  const Batch b = make_batch(3, 24, model->config().vocab_size, 6);
  model->set_training(true);
  const auto run = [&](bool ckpt, double* next_random) {
    model->set_gradient_checkpointing(ckpt);
    at::manual_seed(1234);
    const double loss = loss_and_backward(*model, b);
    // The recompute restores the generator afterwards: the run's random stream continues as without it.
    *next_random = at::rand({1}, at::TensorOptions().device(test::test_device())).item<double>();
    return loss;
  };
  double r_plain = 0, r_ckpt = 0;
  const double plain = run(false, &r_plain);
  const auto g_plain = take_grads(p);
  const double ckpt = run(true, &r_ckpt);
  const auto g_ckpt = take_grads(p);
  EXPECT_EQ(plain, ckpt);
  EXPECT_EQ(r_plain, r_ckpt) << "checkpointing shifted the random stream";
  expect_same_grads(p, g_plain, g_ckpt, 1e-5);

  // Control: other dropout masks give other gradients, so the equality above is the masks being replayed.
  model->set_gradient_checkpointing(false);
  at::manual_seed(99);
  loss_and_backward(*model, b);
  const auto g_other = take_grads(p);
  EXPECT_GT((g_other[0] - g_plain[0]).abs().max().item<double>(), 1e-4);
}

TEST(GradientCheckpointing, GraphRetainsFarFewerBytes) {
  if (test::test_device().is_cuda()) GTEST_SKIP() << "host-heap measurement; the GPU figure is bench_train's";
  auto model = load("qwen2_untied");
  const Params p = full_params(*model);
  const Batch b = make_batch(4, 96, model->config().vocab_size, 8);
  const auto retained = [&](bool ckpt) {
    model->set_gradient_checkpointing(ckpt);
    const size_t before = heap_in_use();
    at::Tensor loss = (model->token_logprobs(b.tokens, b.attn, b.targets, 256) * b.completion).sum();
    const size_t after = heap_in_use();  // the graph's saved activations are what stays allocated
    loss.backward();
    take_grads(p);
    return static_cast<double>(after) - static_cast<double>(before);
  };
  retained(false);  // warm-up: one-time allocations (thread pools, caches) out of the measurement
  const double plain = retained(false), ckpt = retained(true);
  const ModelConfig& c = model->config();
  const double layer_inputs = static_cast<double>(c.num_layers) * 4 * 96 * c.hidden_size * sizeof(float);
  std::printf("retained by the graph: %.2f MB plain, %.2f MB checkpointed (layer inputs %.2f MB)\n", plain / 1e6,
              ckpt / 1e6, layer_inputs / 1e6);
  EXPECT_LT(ckpt, plain / 4) << "checkpointing should keep only each layer's input";
  EXPECT_GE(ckpt, layer_inputs) << "the layer inputs must still be kept";
}

TEST(Autocast, Bf16LossCloseToFp32WithFloat32MastersAndGradients) {
  auto model = load("qwen2_untied");
  const Params p = full_params(*model);
  const Batch b = make_batch(3, 24, model->config().vocab_size, 9);
  const at::DeviceType dt = test::test_device().type();

  at::Tensor lp32, lp16;
  {
    at::NoGradGuard ng;
    lp32 = model->token_logprobs(b.tokens, b.attn, b.targets);
    AutocastScope ac(dt);
    EXPECT_TRUE(at::autocast::is_autocast_enabled(dt));
    lp16 = model->token_logprobs(b.tokens, b.attn, b.targets);
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(dt)) << "the scope restores the previous state";
  EXPECT_EQ(lp16.scalar_type(), at::kFloat);
  const double nll32 = -(lp32 * b.completion).sum().item<double>() / b.completion.sum().item<double>();
  const double nll16 = -(lp16 * b.completion).sum().item<double>() / b.completion.sum().item<double>();
  const double max_diff = ((lp32 - lp16).abs() * b.completion).max().item<double>();
  std::printf("NLL fp32 %.6f, bf16 autocast %.6f; max |dlogp| %.3g\n", nll32, nll16, max_diff);
  EXPECT_GT(max_diff, 1e-5) << "autocast changed nothing: the matmuls did not run in bf16";
  EXPECT_LT(std::abs(nll16 - nll32) / nll32, 1e-2);
  EXPECT_LT(max_diff, 0.1);

  const double l32 = loss_and_backward(*model, b, false);
  const auto g32 = take_grads(p);
  const double l16 = loss_and_backward(*model, b, true);
  for (const auto& [n, w] : p) {
    EXPECT_EQ(w.scalar_type(), at::kFloat) << n;
    ASSERT_TRUE(w.grad().defined()) << n;
    EXPECT_EQ(w.grad().scalar_type(), at::kFloat) << n << ": the gradient reaches the float32 master";
    EXPECT_TRUE(w.grad().isfinite().all().item<bool>()) << n;
  }
  const auto g16 = take_grads(p);
  EXPECT_NEAR(l16, l32, 2e-2 * std::max(1.0, std::abs(l32)));
  // Direction of the whole update: cosine similarity of the concatenated gradients.
  std::vector<at::Tensor> f32, f16;
  for (size_t i = 0; i < g32.size(); ++i) f32.push_back(g32[i].flatten()), f16.push_back(g16[i].flatten());
  const at::Tensor a = at::cat(f32), c = at::cat(f16);
  const double cosine = (a * c).sum().item<double>() / (a.norm().item<double>() * c.norm().item<double>());
  std::printf("gradient cosine similarity bf16 vs fp32: %.6f\n", cosine);
  EXPECT_GT(cosine, 0.99);
}

TEST(Autocast, CheckpointedRecomputeUsesTheForwardsPrecision) {
  // Backward runs outside the autocast scope; the recomputed layers must still multiply in bf16, or their
  // activations (and so the gradients) would differ from the forward's.
  auto model = load("qwen2_untied");
  const Params p = lora_params(*model, /*dropout=*/0.0);
  const Batch b = make_batch(3, 24, model->config().vocab_size, 10);
  const double plain = loss_and_backward(*model, b, true);
  const auto g_plain = take_grads(p);
  model->set_gradient_checkpointing(true);
  const double ckpt = loss_and_backward(*model, b, true);
  const auto g_ckpt = take_grads(p);
  EXPECT_EQ(plain, ckpt);
  expect_same_grads(p, g_plain, g_ckpt, 1e-5);
  model->set_gradient_checkpointing(false);
  loss_and_backward(*model, b, false);  // control: fp32 gradients differ from the bf16 ones beyond 1e-5
  const auto g32 = take_grads(p);
  double worst = 0;
  for (size_t i = 0; i < g32.size(); ++i)
    worst = std::max(worst, ((g32[i] - g_plain[i]).abs().max() / g_plain[i].abs().max()).item<double>());
  EXPECT_GT(worst, 1e-5);
}
