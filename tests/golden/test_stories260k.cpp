// stories260K.gguf (karpathy/tinyllamas via llama.cpp): greedy decoding from BOS must give the published 30
// golden ids (../shared/data/README.md), both with the plain libtorch forward and with the engine.
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "models/gguf_model.h"
#include "test_util.h"

using namespace rlaif;

namespace {
const std::vector<int32_t> kGolden = {403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426,
                                      338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433};
}

TEST(Stories260K, GreedyFromBosWithPlainForward) {
  auto model = load_model(test::shared_data() / "models" / "stories260K.gguf");
  EXPECT_EQ(model->config().vocab_size, 512);
  EXPECT_EQ(model->config().num_layers, 5);
  std::vector<int64_t> ids = {1};
  at::NoGradGuard g;
  for (size_t i = 0; i < kGolden.size(); ++i) {
    at::Tensor t = at::tensor(ids, at::kLong).view({1, -1});
    ids.push_back(model->forward(t, at::ones_like(t))[0][-1].argmax().item<int64_t>());
  }
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), kGolden);
}

TEST(Stories260K, GreedyFromBosWithEngine) {
  auto model = load_model(test::shared_data() / "models" / "stories260K.gguf");
  Engine engine(model, {});
  GenerationRequest r;
  r.prompt = {1};
  r.params.temperature = 0;
  r.params.max_new_tokens = 30;
  auto out = engine.generate({r});
  EXPECT_EQ(out[0].tokens, kGolden);
}
