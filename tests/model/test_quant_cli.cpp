// `rlaif convert` from the command line: the original spellings (--mlx-path, q4_bit) work, the folder holds
// quantized tensors, config.json and the progress/size report, and bad arguments are clear errors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/io.h"
#include "core/safetensors.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace rlaif;

namespace {

std::string rlaif_bin() { return (test::binary_dir() / "apps" / "rlaif").string(); }

}  // namespace

TEST(QuantCli, ConvertsWithTheOriginalSpellings) {
  const fs::path src = test::reference_dir() / "qwen2_tied_sharded";
  const fs::path out = test::temp_dir("quant_cli") / "q4";
  std::string log;
  ASSERT_EQ(test::run_command(rlaif_bin() + " convert --hf-path " + src.string() + " --mlx-path " + out.string() +
                                  " --quantize q4_bit --group-size 32", &log), 0) << log;
  // Progress over the checkpoint's tensors: embedding, final norm, 3 layers × (2 norms, 7 weights, 3 qkv biases).
  EXPECT_NE(log.find("38/38 tensors"), std::string::npos) << "progress bar: " << log;
  EXPECT_NE(log.find("MB of weights"), std::string::npos) << log;
  const auto config = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(config["quantization"], (nlohmann::json{{"group_size", 32}, {"bits", 4}}));
  EXPECT_EQ(config["quantization_config"], config["quantization"]);
  const auto ckpt = Checkpoint::open_dir(out);
  const TensorView* q = ckpt.find("model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(q);
  EXPECT_EQ(q->dtype, DType::kU32);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{64, 64 * 4 / 32}));
  EXPECT_TRUE(ckpt.find("model.embed_tokens.scales"));
  EXPECT_FALSE(ckpt.find("model.layers.0.mlp.down_proj.scales")) << "input dim 112 is not a multiple of 32";
  EXPECT_FALSE(ckpt.find("lm_head.weight")) << "tied";
}

TEST(QuantCli, BadArgumentsAreClearErrors) {
  const fs::path src = test::reference_dir() / "qwen2_untied";
  const fs::path out = test::temp_dir("quant_cli_bad") / "x";
  std::string log;
  EXPECT_NE(test::run_command(rlaif_bin() + " convert --hf-path " + src.string() + " --out " + out.string() +
                                  " --quantize q3", &log), 0);
  EXPECT_NE(log.find("unknown --quantize 'q3'"), std::string::npos) << log;
  EXPECT_NE(test::run_command(rlaif_bin() + " convert --hf-path /nonexistent/model --out " + out.string(), &log), 0);
  EXPECT_NE(log.find("does not exist"), std::string::npos) << log;
  EXPECT_NE(test::run_command(rlaif_bin() + " convert --hf-path " + src.string() + " --out " + out.string() +
                                  " --quantize q4 --group-size 12", &log), 0);
  EXPECT_NE(log.find("--group-size 12"), std::string::npos) << log;
}
