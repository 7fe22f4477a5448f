// PEFT interop of what training writes: an adapter trained by a few AdamW steps (so B is not zero) is saved by
// save_peft_adapter and merged by save_merged_model; PEFT's PeftModel.from_pretrained and transformers'
// AutoModelForCausalLM.from_pretrained (on the merged folder) give our token log-probs (fp32 CPU, 1e-4).
#include <gtest/gtest.h>

#include "models/lora.h"
#include "models/weights.h"
#include "rl/export.h"
#include "test_util.h"
#include "train/optim.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

void check_model(const std::string& name) {
  const fs::path model_dir = test::reference_dir() / name;
  const fs::path dir = test::temp_dir("peft_interop_" + name);
  auto model = DecoderModel::load(model_dir);
  auto batch = load_safetensors(model_dir / "expected_fp32.safetensors");
  const at::Tensor &ids = batch["input_ids"], &mask = batch["attention_mask"], &targets = batch["targets"];
  LoraConfig cfg;
  cfg.r = 4;
  cfg.alpha = 8;
  cfg.dropout = 0.0;
  attach_lora(*model, cfg, 5);
  // Three AdamW steps raising the targets' log-probs: a trained, non-zero adapter.
  train::AdamW opt(lora_parameters(*model), train::AdamWOptions{0.9, 0.999, 1e-8, 0.0});
  for (int s = 0; s < 3; ++s) {
    const at::Tensor lp = model->token_logprobs(ids, mask, targets);
    (-(lp * mask).sum() / mask.sum()).backward();
    opt.step(2e-2);
    opt.zero_grad();
  }
  for (const auto& [n, t] : lora_parameters(*model))
    if (n.find("lora_B") != std::string::npos) ASSERT_GT(t.abs().max().item<double>(), 0) << n;

  save_peft_adapter(*model, cfg, dir / "adapter", model_dir.string());
  save_merged_model(*model, model_dir, dir / "merged");
  at::Tensor ours, base;
  {
    at::NoGradGuard ng;
    ours = model->token_logprobs(ids, mask, targets).contiguous();
    AdaptersOff off(*model);
    base = model->token_logprobs(ids, mask, targets).contiguous();
  }
  save_safetensors(dir / "ours.safetensors", {{"logprobs", ours}, {"base", base}});
  std::string log;
  EXPECT_EQ(test::run_command(test::python() + " " + (test::source_dir() / "tests/reference/peft_interop.py").string() +
                                  " " + model_dir.string() + " " + dir.string(), &log), 0)
      << log;
  std::printf("[peft_interop %s] %s", name.c_str(), log.c_str());
}

}  // namespace

TEST(PeftInterop, TrainedAdapterLoadsInPeftAndMergedModelInTransformers_Llama3) { check_model("llama3_gqa"); }
TEST(PeftInterop, TrainedAdapterLoadsInPeftAndMergedModelInTransformers_Qwen2Tied) { check_model("qwen2_tied_sharded"); }
