// MLX-quantized projections on the GPU at Qwen2.5-3B shapes (D=2048, F=11008, KV dim 256, 36 layers, vocab
// 151936): per-layer quant_linear (q4, q8; group 64, bf16 scales) against bf16 at::linear for N = 1 and 64 rows
// (and, at N = 1, against the engine's own bf16 few-row GEMV, kernels::small_linear, one launch per projection),
// the tensor-core path quant_linear_mma at N = 64, the engine's fused quantized decode layer at N ≤ 8
// (quant_small_linear: q/k/v with the input norm, o and down with the residual, gate/up with the norm and SwiGLU;
// beside the bf16 engine layer of small_linear launches), and live re-quantization of all the model's bf16 weights
// (quantize_affine into existing buffers). CUDA events, warm-up, median of 20 samples. CPU builds print "no CUDA".
// `--quant-mma` turns on kernels::quant_few_row_mma (the tensor-core quantized projections at 1-2 rows) for the
// fused layers, to compare with a run without it.
// Usage: bench_quant [--out results.json] [--quant-mma]
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/cpu/quant.h"
#include "kernels/cpu/quant_small_linear.h"
#include "kernels/cpu/registry.h"
#include "kernels/cpu/small_linear.h"

namespace {

using namespace rlaif;

constexpr int64_t kD = 2048, kF = 11008, kKvDim = 256, kLayers = 36, kVocab = 151936, kGroup = 64;
constexpr int kSamples = 20, kWarmup = 5;

double median_ms(const std::function<void()>& fn) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream stream = impl.getStream(c10::Device(c10::DeviceType::CUDA, 0));
  for (int i = 0; i < kWarmup; ++i) fn();
  std::vector<double> s;
  for (int i = 0; i < kSamples; ++i) {
    c10::Event a(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT), b(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    a.record(stream);
    fn();
    b.record(stream);
    b.synchronize();
    s.push_back(a.elapsedTime(b));
  }
  std::nth_element(s.begin(), s.begin() + kSamples / 2, s.end());
  return s[kSamples / 2];
}

struct Packed {
  at::Tensor wq, scales, biases;
};

Packed quantize(const at::Tensor& w, int64_t bits) {
  const auto o = w.options();
  Packed p{at::empty({w.size(0), w.size(1) * bits / 32}, o.dtype(at::kInt)),
           at::empty({w.size(0), w.size(1) / kGroup}, o), at::empty({w.size(0), w.size(1) / kGroup}, o)};
  kernels::quantize_affine(w, bits, kGroup, p.wq, p.scales, p.biases);
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (!at::hasCUDA() || !kernels::cuda_kernels_available()) {
    std::printf("no CUDA\n");
    return 0;
  }
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--out" && i + 1 < argc) out_path = argv[i + 1];
    if (std::string(argv[i]) == "--quant-mma") kernels::set_quant_few_row_mma(true);
  }
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  // One layer's projections (q, k, v, o, gate, up, down) as [out, in].
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{kD, kD}, {kKvDim, kD}, {kKvDim, kD}, {kD, kD},
                                                           {kF, kD}, {kF, kD},     {kD, kF}};
  std::vector<at::Tensor> w;
  for (auto [o, i] : shapes) w.push_back(at::randn({o, i}, opt) * 0.02);
  nlohmann::json results = nlohmann::json::array();
  for (int64_t n : {1, 2, 8, 64}) {
    const at::Tensor x1 = at::randn({n, kD}, opt), x2 = at::randn({n, kF}, opt);
    auto input = [&](size_t p) { return shapes[p].second == kD ? x1 : x2; };
    const double bf16 = median_ms([&] {
      for (size_t p = 0; p < w.size(); ++p) at::linear(input(p), w[p]);
    });
    nlohmann::json row = {{"rows", n}, {"bf16_layer_ms", bf16}};
    if (n <= kernels::kSmallLinearMaxRows) {
      // The bf16 engine's decode layer at few rows (all on the few-row GEMV: norms and residual adds fused).
      const at::Tensor norm_w = at::ones({kD}, opt), act = at::empty({n, kF}, opt);
      at::Tensor h = at::zeros({n, kD}, opt);
      std::vector<at::Tensor> qkv = {at::empty({n, kD}, opt), at::empty({n, kKvDim}, opt), at::empty({n, kKvDim}, opt)};
      row["bf16_fused_layer_ms"] = median_ms([&] {
        kernels::small_linear(x1, {w[0], w[1], w[2]}, {at::Tensor(), at::Tensor(), at::Tensor()}, {}, qkv,
                              {norm_w, 1e-6, at::Tensor()});
        kernels::small_linear(x1, {w[3]}, {at::Tensor()}, h, {h});
        kernels::small_linear_silu_mul(x1, w[4], w[5], act, {norm_w, 1e-6, at::Tensor()});
        kernels::small_linear(act, {w[6]}, {at::Tensor()}, h, {h});
      });
      std::printf("N=%lld: bf16 fused decode layer (small_linear, 4 launches) %.3f ms\n", static_cast<long long>(n),
                  row["bf16_fused_layer_ms"].get<double>());
      std::vector<at::Tensor> gemv_out;
      for (auto [o, i] : shapes) gemv_out.push_back(at::empty({n, o}, opt));
      row["bf16_gemv_layer_ms"] = median_ms([&] {
        for (size_t p = 0; p < w.size(); ++p) kernels::small_linear(input(p), {w[p]}, {at::Tensor()}, {}, {gemv_out[p]});
      });
    }
    for (int64_t bits : {4, 8}) {
      std::vector<Packed> q;
      std::vector<at::Tensor> outs;
      for (size_t p = 0; p < w.size(); ++p) {
        q.push_back(quantize(w[p], bits));
        outs.push_back(at::empty({n, shapes[p].first}, opt));
      }
      const double ms = median_ms([&] {
        for (size_t p = 0; p < w.size(); ++p)
          kernels::quant_linear(input(p), q[p].wq, q[p].scales, q[p].biases, bits, kGroup, outs[p]);
      });
      row[fmt::format("q{}_layer_ms", bits)] = ms;
      row[fmt::format("q{}_speedup", bits)] = bf16 / ms;
      if (n <= kernels::kSmallLinearMaxRows) {
        // The engine's decode layer at few rows: four launches, norms and residual adds fused.
        std::vector<kernels::QuantMatrix> m;
        for (const Packed& pk : q) m.push_back({pk.wq, pk.scales, pk.biases, bits, kGroup});
        const at::Tensor norm_w = at::ones({kD}, opt), act = at::empty({n, kF}, opt);
        at::Tensor h = at::zeros({n, kD}, opt);
        const bool down_fits = kernels::quant_small_linear_takes(m[6], n);
        const double fused = median_ms([&] {
          kernels::quant_small_linear(x1, {m[0], m[1], m[2]}, {at::Tensor(), at::Tensor(), at::Tensor()}, {},
                                      {outs[0], outs[1], outs[2]}, {norm_w, 1e-6, at::Tensor()});
          kernels::quant_small_linear(x1, {m[3]}, {at::Tensor()}, h, {h});
          kernels::quant_small_linear_silu_mul(x1, m[4], m[5], act, {norm_w, 1e-6, at::Tensor()});
          if (down_fits) kernels::quant_small_linear(act, {m[6]}, {at::Tensor()}, h, {h});
          else kernels::quant_linear(act, q[6].wq, q[6].scales, q[6].biases, bits, kGroup, outs[6]);
        });
        row[fmt::format("q{}_fused_layer_ms", bits)] = fused;
        std::printf("N=%lld: q%lld fused decode layer (quant_small_linear, 4 launches%s) %.3f ms (%.2fx bf16 "
                    "at::linear)\n", static_cast<long long>(n), static_cast<long long>(bits),
                    down_fits ? "" : ", down unfused", fused, bf16 / fused);
      }
      if (n > kernels::kSmallLinearMaxRows) {  // quant_linear's path here is quant_linear_mma; the older one beside it
        const double dq = median_ms([&] {
          for (size_t p = 0; p < w.size(); ++p) {
            at::Tensor wd = at::empty({shapes[p].first, shapes[p].second}, opt);
            kernels::dequantize_affine(q[p].wq, q[p].scales, q[p].biases, bits, kGroup, wd);
            at::mm_out(outs[p], input(p), wd.t());
          }
        });
        row[fmt::format("q{}_dequant_cublas_layer_ms", bits)] = dq;
        std::printf("N=%lld: q%lld dequantize + cuBLAS (the previous path) %.3f ms (%.2fx bf16)\n",
                    static_cast<long long>(n), static_cast<long long>(bits), dq, bf16 / dq);
      }
    }
    std::printf("N=%lld: one layer's 7 projections bf16 %.3f ms, q4 %.3f ms (%.2fx), q8 %.3f ms (%.2fx)\n",
                static_cast<long long>(n), bf16, row["q4_layer_ms"].get<double>(), row["q4_speedup"].get<double>(),
                row["q8_layer_ms"].get<double>(), row["q8_speedup"].get<double>());
    if (row.contains("bf16_gemv_layer_ms")) {
      const double g = row["bf16_gemv_layer_ms"].get<double>();
      std::printf("N=%lld: bf16 small_linear GEMV %.3f ms: q4 %.2fx, q8 %.2fx of it\n", static_cast<long long>(n), g,
                  g / row["q4_layer_ms"].get<double>(), g / row["q8_layer_ms"].get<double>());
    }
    results.push_back(row);
  }
  // Live re-quantization of every 3B weight: 36 layers + the (tied) embedding, bf16 → existing q4/q8 buffers.
  std::vector<at::Tensor> all;
  for (int64_t l = 0; l < kLayers; ++l)
    for (auto [o, i] : shapes) all.push_back(at::randn({o, i}, opt) * 0.02);
  all.push_back(at::randn({kVocab, kD}, opt) * 0.02);
  for (int64_t bits : {4, 8}) {
    std::vector<Packed> q;
    for (const auto& t : all) q.push_back(quantize(t, bits));
    const double ms = median_ms([&] {
      for (size_t i = 0; i < all.size(); ++i)
        kernels::quantize_affine(all[i], bits, kGroup, q[i].wq, q[i].scales, q[i].biases);
    });
    std::printf("re-quantize all 3B weights to q%lld: %.2f ms\n", static_cast<long long>(bits), ms);
    results.push_back({{"requantize_bits", bits}, {"ms", ms}});
  }
  if (!out_path.empty()) std::ofstream(out_path) << results.dump(2) << "\n";
  return 0;
}
