// MLX affine quantization, CPU reference: an independent numpy implementation of the spec
// (tests/reference/mlx_quant_reference.py) reads our safetensors output and reproduces our packed words, scales and
// biases bit for bit and our dequantized weights exactly, for bits 4/8, several group sizes, the three model
// dtypes and the edge cases (all-zero, constant, all-negative, one outlier, ties).
#include <gtest/gtest.h>

#include "core/error.h"
#include "kernels/cpu/quant.h"
#include "models/weights.h"
#include "test_util.h"

using namespace rlaif;

namespace {

// Weights whose groups hit the spec's branches: random rows plus rows of special groups.
at::Tensor test_weights(int64_t O, int64_t K, int64_t group) {
  at::Tensor w = at::randn({O, K}) * 0.05;
  w[0].zero_();                                               // all-zero groups: scale = -eps, bias 0
  w[1].fill_(0.3);                                            // constant positive groups
  w[2].copy_(-at::rand({K}) * 0.1 - 0.01);                       // all negative: w_max clamps to 0
  w[3].copy_(at::rand({K}) * 0.1 + 0.5);                         // all positive, min far from 0
  w[4].narrow(0, 0, group).fill_(0.0).narrow(0, 1, 1).fill_(7.0);  // one outlier in a zero group
  w[5].copy_((at::arange(K) % 16).to(at::kFloat) * 0.125 - 1.0); // exact levels: rounding ties
  w[6].fill_(1e-9);                                           // below eps: the at-zero branch
  return w;
}

}  // namespace

TEST(Quant, NumpySpecReproducesOurPackedWordsAndDequantizedWeights) {
  const auto dir = test::temp_dir("quant_spec");
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> meta;
  int n = 0;
  for (at::ScalarType dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t bits : {4, 8}) {
      for (int64_t group : {32, 64, 128}) {
        const int64_t O = 12, K = 256;
        const at::Tensor w = test_weights(O, K, group).to(dt);
        const at::Tensor wq = at::empty({O, K * bits / 32}, at::kUInt32);
        const at::Tensor scales = at::empty({O, K / group}, dt), biases = at::empty({O, K / group}, dt);
        kernels::quantize_affine(w, bits, group, wq, scales, biases);
        const at::Tensor deq = at::empty({O, K}, dt);
        kernels::dequantize_affine(wq, scales, biases, bits, group, deq);
        const std::string c = fmt::format("case{}", n++);
        tensors[c + ".w"] = w;
        tensors[c + ".weight"] = wq;
        tensors[c + ".scales"] = scales;
        tensors[c + ".biases"] = biases;
        tensors[c + ".dequant"] = deq;
        meta[c] = fmt::format("{},{}", bits, group);
        // The round trip is close: at most half a level (plus the model dtype's rounding of scale and bias).
        const double level = (w.to(at::kFloat).abs().max().item<double>() * 2) / ((1 << bits) - 1);
        EXPECT_LE((deq.to(at::kFloat) - w.to(at::kFloat)).abs().max().item<double>(), level)
            << c10::toString(dt) << " bits " << bits << " group " << group;
      }
    }
  }
  const auto file = dir / "quant.safetensors";
  save_safetensors(file, tensors, meta);
  std::string out;
  ASSERT_EQ(test::run_command(test::python() + " " + (test::source_dir() / "tests/reference/mlx_quant_reference.py").string() +
                                  " " + file.string(), &out), 0) << out;
  EXPECT_NE(out.find(fmt::format("ok {} cases", n)), std::string::npos) << out;
}

TEST(Quant, PackingIsLittleEndianFirstValueLowestBits) {
  // One group of 32 values 0..15 repeated lies exactly on the levels of scale 1/15·range: q = value.
  const at::Tensor w = (at::arange(32) % 16).to(at::kFloat).unsqueeze(0);
  const at::Tensor wq = at::empty({1, 4}, at::kUInt32);
  const at::Tensor s = at::empty({1, 1}), b = at::empty({1, 1});
  kernels::quantize_affine(w, 4, 32, wq, s, b);
  // max 15 > |min| 0: the max is the edge, scale = -1, bias = 15, q = 15 - value.
  EXPECT_EQ(s.item<float>(), -1.0f);
  EXPECT_EQ(b.item<float>(), 15.0f);
  EXPECT_EQ(static_cast<uint32_t*>(wq.data_ptr())[0], 0x89ABCDEFu);  // q = 15,14,...,8 from the lowest nibble up
}

TEST(Quant, BadParametersAreRejected) {
  const at::Tensor w = at::randn({4, 96});
  const at::Tensor wq = at::empty({4, 12}, at::kUInt32), s = at::empty({4, 1}), b = at::empty({4, 1});
  EXPECT_THROW(kernels::quantize_affine(w, 3, 96, wq, s, b), InternalError);  // bits
  EXPECT_THROW(kernels::check_quant_params(96, 4, 64), InternalError);        // 64 does not divide 96
}
