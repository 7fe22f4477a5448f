// The chunked log-prob function against the plain autograd path (full log_softmax + gather): same values,
// same gradients for hidden states and weight, for chunk sizes that do and do not divide the rows.
#include <gtest/gtest.h>

#include <torch/csrc/autograd/autograd.h>

#include "models/decoder.h"

using namespace rlaif;

TEST(ChunkedLogprobs, ValuesAndGradientsMatchFullLogSoftmax) {
  at::manual_seed(3);
  const int64_t N = 37, D = 16, V = 101;
  for (int64_t chunk : {1, 8, 37, 64}) {
    at::Tensor h = at::randn({N, D}, at::kDouble).requires_grad_(true);
    at::Tensor w = at::randn({V, D}, at::kDouble).requires_grad_(true);
    at::Tensor t = at::randint(0, V, {N}, at::kLong);
    at::Tensor go = at::randn({N}, at::kDouble);

    at::Tensor ref = at::log_softmax(at::linear(h, w), -1).gather(1, t.unsqueeze(1)).squeeze(1);
    auto ref_grads = torch::autograd::grad({ref}, {h, w}, {go});
    at::Tensor ours = chunked_target_logprobs(h, w, t, chunk);
    auto our_grads = torch::autograd::grad({ours}, {h, w}, {go.to(at::kFloat)});

    // Outputs are float32 by design (what the loss consumes): values near -log(V) round at ~1e-6.
    EXPECT_LE((ours.to(at::kDouble) - ref).abs().max().item<double>(), 1e-5) << "chunk " << chunk;
    EXPECT_LE((our_grads[0] - ref_grads[0]).abs().max().item<double>(), 1e-5) << "chunk " << chunk;
    EXPECT_LE((our_grads[1] - ref_grads[1]).abs().max().item<double>(), 1e-5) << "chunk " << chunk;
  }
}

TEST(ChunkedLogprobs, FrozenWeightGetsNoGradientWork) {
  at::Tensor h = at::randn({4, 8}).requires_grad_(true);
  at::Tensor w = at::randn({10, 8});  // frozen, as the LM head under LoRA
  at::Tensor t = at::randint(0, 10, {4}, at::kLong);
  at::Tensor lp = chunked_target_logprobs(h, w, t, 3);
  lp.sum().backward();
  ASSERT_TRUE(h.grad().defined());
  EXPECT_FALSE(w.grad().defined());
}
