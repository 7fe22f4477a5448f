// LoRA against PEFT: an adapter saved by PEFT loads into our model and gives PEFT's logits with adapters on,
// the base model's with them off (the KL reference, same weights); an adapter we save loads in
// PeftModel.from_pretrained with the same logits; the engine samples with the adapter.
#include <gtest/gtest.h>

#include "core/error.h"
#include "engine/engine.h"
#include "models/lora.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

double max_abs_on(const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask) {
  at::Tensor d = (a.to(at::kCPU, at::kDouble) - b.to(at::kDouble)).abs().amax(-1);
  return d.masked_select(mask.to(at::kBool)).max().item<double>();
}

std::string script() { return (test::source_dir() / "tests/reference/lora_reference.py").string(); }

}  // namespace

TEST(Lora, PeftAdapterGivesPeftLogitsOnAndBaseLogitsOff) {
  const fs::path model_dir = test::reference_dir() / "llama3_gqa";
  const fs::path dir = test::temp_dir("lora_peft");
  std::string log;
  ASSERT_EQ(test::run_command(test::python() + " " + script() + " make " + model_dir.string() + " " + dir.string(), &log), 0)
      << log;
  auto ref = load_safetensors(dir / "expected_lora.safetensors");
  auto batch = load_safetensors(model_dir / "expected_fp32.safetensors");
  const at::Tensor &ids = batch["input_ids"], &mask = batch["attention_mask"];

  auto model = DecoderModel::load(model_dir);
  const LoraConfig cfg = load_peft_adapter(*model, dir / "adapter");
  EXPECT_EQ(cfg.r, 4);
  EXPECT_TRUE(has_lora(*model));
  EXPECT_LE(max_abs_on(model->forward(ids, mask), ref["on"], mask), 1e-4);
  {
    AdaptersOff off(*model);
    EXPECT_LE(max_abs_on(model->forward(ids, mask), ref["off"], mask), 1e-4);
    EXPECT_LE(max_abs_on(model->forward(ids, mask), batch["logits"], mask), 1e-4);
  }
  // The adapter really changes the model (so the checks above are not vacuous).
  EXPECT_GT(max_abs_on(ref["on"], ref["off"], mask), 1e-2);

  // Our save → PEFT load → same logits.
  save_peft_adapter(*model, cfg, dir / "ours", model_dir.string());
  save_safetensors(dir / "our_logits.safetensors", {{"logits", model->forward(ids, mask).detach()}});
  ASSERT_EQ(test::run_command(test::python() + " " + script() + " check " + model_dir.string() + " " +
                                  (dir / "ours").string() + " " + (dir / "our_logits.safetensors").string(), &log), 0)
      << log;

  // The engine samples the adapted policy: greedy tokens follow the adapted logits.
  Engine engine(model, {});
  GenerationRequest r;
  r.prompt = {3, 4, 5};
  r.params.temperature = 0;
  r.params.max_new_tokens = 1;
  const auto out = engine.generate({r});
  at::Tensor t = at::tensor(std::vector<int64_t>{3, 4, 5}).view({1, 3});
  EXPECT_EQ(out[0].tokens[0], model->forward(t, at::ones_like(t))[0][-1].argmax().item<int64_t>());
}

TEST(Lora, FreshAdapterIsIdentityAndOnlyAdaptersGetGradients) {
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied");
  auto batch = load_safetensors(test::reference_dir() / "qwen2_untied" / "expected_fp32.safetensors");
  LoraConfig cfg;
  cfg.r = 2;
  cfg.target_modules = {"q_proj", "v_proj"};
  attach_lora(*model, cfg, 1);
  const at::Tensor &ids = batch["input_ids"], &mask = batch["attention_mask"];
  EXPECT_LE(max_abs_on(model->forward(ids, mask), batch["logits"], mask), 1e-5);  // B = 0 at init
  const auto params = lora_parameters(*model);
  EXPECT_EQ(params.size(), 3u * 2 * 2);  // 3 layers × {q, v} × {A, B}
  model->token_logprobs(ids, mask, batch["targets"]).sum().backward();
  for (const auto& [name, t] : params) EXPECT_TRUE(t.grad().defined()) << name;
  EXPECT_FALSE(model->weights().layers[0].wq.grad().defined());
  try {
    LoraConfig bad;
    bad.target_modules = {"qkv"};
    attach_lora(*model, bad, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("qkv"), std::string::npos);
  }
}

// The engine's shrink inside the base GEMM lays each fully adapted group out as [W; A] in one buffer: the weights
// and biases keep their values (the forward's logits are unchanged), A follows the group's rows (zeros after its
// biases), only complete groups are laid out, a second call moves nothing, and it copies A again after an update.
TEST(Lora, PackLoraRowsLaysAOutAfterTheGroupsWeights) {
  auto model = DecoderModel::load(test::reference_dir() / "qwen2_untied");  // q/k/v with biases
  auto batch = load_safetensors(test::reference_dir() / "qwen2_untied" / "expected_fp32.safetensors");
  const at::Tensor &ids = batch["input_ids"], &mask = batch["attention_mask"];
  LoraConfig cfg{4, 8, 0.0};
  cfg.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"};  // no up_proj
  attach_lora(*model, cfg, 3);
  {
    at::NoGradGuard ng;
    for (auto& [name, t] : lora_parameters(*model))
      if (name.find("lora_B") != std::string::npos) t.copy_(at::randn(t.sizes()) * 0.05);
  }
  at::NoGradGuard ng;
  const at::Tensor before = model->forward(ids, mask);
  LayerWeights& L = model->weights().layers[1];
  const at::Tensor wq = L.wq.clone(), bv = L.bv.clone(), wo = L.wo.clone(), wd = L.w_down.clone();
  // q/k/v, o and down in each of the 3 layers; gate/up lacks up's adapter.
  EXPECT_EQ(pack_lora_rows(model->weights()), 3 * 3);
  EXPECT_TRUE(L.wq.equal(wq) && L.bv.equal(bv) && L.wo.equal(wo) && L.w_down.equal(wd));
  EXPECT_TRUE(model->forward(ids, mask).equal(before));
  const int qkv = static_cast<int>(ProjGroup::kQkv), o = static_cast<int>(ProjGroup::kO);
  const at::Tensor a_qkv = at::cat({L.lora[0].a, L.lora[1].a, L.lora[2].a}, 0);
  EXPECT_TRUE(L.lora_rows[qkv].equal(a_qkv));
  EXPECT_TRUE(packed_rows({&L.wq, &L.wk, &L.wv, &L.lora_rows[qkv]}).defined()) << "A right after v's rows";
  EXPECT_TRUE(packed_rows({&L.bq, &L.bk, &L.bv, &L.lora_bias_rows[qkv]}).defined());
  EXPECT_TRUE(L.lora_bias_rows[qkv].eq(0).all().item<bool>());
  EXPECT_TRUE(packed_rows({&L.wo, &L.lora_rows[o]}).defined());
  EXPECT_FALSE(L.lora_bias_rows[o].defined()) << "o has no bias";
  EXPECT_FALSE(L.lora_rows[static_cast<int>(ProjGroup::kGateUp)].defined());
  // An optimizer step updates A in place: the next call copies it, moving nothing.
  L.lora[static_cast<int>(Proj::kO)].a.add_(1.0);
  EXPECT_EQ(pack_lora_rows(model->weights()), 0);
  EXPECT_TRUE(L.lora_rows[o].equal(L.lora[static_cast<int>(Proj::kO)].a));
}
