// Times the decode-step CUDA kernels (src/kernels) at Qwen2.5-3B decode shapes (H=16, KV=2, hd=128, D=2048,
// F=11008; S = 1, 16, 64; contexts 512 and 2048) against the engine's ATen ops for the same step, and reports the
// achieved GB/s over the fewest bytes each must move. GPU time from CUDA events around the replay of a CUDA graph
// of launches over rotating input sets (so the 50 MB L2 cannot hold them all), median of 50 replays. The fused
// RoPE + attention op is compared with our two unfused kernels. The few-row GEMVs (small_linear) are timed at the
// 0.5B and 3B decode projections for each kernel, warp split and programmatic launch, against cuBLAS (at::linear
// with ATen's norm/add/SwiGLU) in the same run. CPU builds print "no CUDA".
// The decode GEMMs above the few-row batch (S = 16, 64) through tuned cuBLASLt algorithms against at::linear.
// Usage: bench_kernels [--out results.json] [--batch S (one batch size only, e.g. under ncu)] [--few-row-only]
//   [--gemm-only]
#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/cpu/paged_attention.h"
#include "kernels/cpu/registry.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope_kv_write.h"
#include "kernels/cpu/silu_mul.h"
#include "kernels/cpu/small_linear.h"
#include "kernels/cpu/tuned_linear.h"
#include "models/layers.h"

namespace {

using namespace rlaif;

constexpr int64_t kH = 16, kKV = 2, kHd = 128, kD = 2048, kF = 11008, kBlock = 16;
constexpr int kSamples = 50, kReps = 10, kWarmup = 20;
constexpr int64_t kRotateBytes = int64_t{256} << 20;  // input sets cycled per kernel: well past L2

// Median over kSamples of the GPU time (µs) of one launch(set). The launches (every set in turn, so the L2 holds
// few of them) are captured once into a CUDA graph that is then replayed, as the engine replays its decode step:
// host-side launch cost, which the step's graph does not pay, stays out of the figure.
double median_us(const std::function<void(int)>& launch, int sets) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream stream = impl.getStream(c10::Device(c10::DeviceType::CUDA, 0));
  for (int i = 0; i < kWarmup; ++i) launch(i % sets);
  const int n = std::max(sets, kReps);
  const auto& reg = kernels::kernel_registry();
  void* graph = reg.graph_capture([&] {
    for (int i = 0; i < n; ++i) launch(i % sets);
  });
  reg.graph_replay(graph);
  std::vector<double> samples;
  for (int s = 0; s < kSamples; ++s) {
    c10::Event start(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    c10::Event stop(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    start.record(stream);
    reg.graph_replay(graph);
    stop.record(stream);
    stop.synchronize();
    samples.push_back(start.elapsedTime(stop) * 1000.0 / n);
  }
  reg.graph_destroy(graph);
  std::nth_element(samples.begin(), samples.begin() + kSamples / 2, samples.end());
  return samples[kSamples / 2];
}

int sets_for(int64_t bytes_per_set, int most) {
  return static_cast<int>(std::clamp<int64_t>(kRotateBytes / std::max<int64_t>(bytes_per_set, 1), 1, most));
}

at::Tensor randn(std::vector<int64_t> shape) {
  return at::randn(shape, at::TensorOptions().device(at::kCUDA)).to(at::kBFloat16);
}

struct Row {
  std::string kernel;
  int64_t S, context;
  double bytes, us, aten_us;
  std::string baseline = "aten";  // what aten_us timed
};

std::vector<Row> bench_pointwise(int64_t S) {
  std::vector<Row> rows;
  const double eps = 1e-6;
  {  // rms_norm: read x and w, write out
    const double bytes = 2.0 * (2 * S * kD + kD);
    const int sets = sets_for(static_cast<int64_t>(bytes), 64);
    std::vector<at::Tensor> x, out;
    for (int i = 0; i < sets; ++i) x.push_back(randn({S, kD})), out.push_back(at::empty_like(x.back()));
    const at::Tensor w = randn({kD});
    const double us = median_us([&](int i) { kernels::rms_norm(x[i], w, eps, out[i]); }, sets);
    const double aten = median_us([&](int i) { layers::rms_norm(x[i], w, eps); }, sets);
    rows.push_back({"rms_norm", S, 0, bytes, us, aten});
  }
  {  // add_rms_norm: read h, delta, w; write h, out
    const double bytes = 2.0 * (4 * S * kD + kD);
    const int sets = sets_for(static_cast<int64_t>(bytes), 64);
    std::vector<at::Tensor> h, d, out;
    for (int i = 0; i < sets; ++i) h.push_back(randn({S, kD})), d.push_back(randn({S, kD})), out.push_back(at::empty_like(h.back()));
    const at::Tensor w = randn({kD});
    const double us = median_us([&](int i) { kernels::add_rms_norm(h[i], d[i], w, eps, out[i]); }, sets);
    const double aten = median_us([&](int i) { layers::rms_norm(h[i] + d[i], w, eps); }, sets);
    rows.push_back({"add_rms_norm", S, 0, bytes, us, aten});
  }
  {  // silu_mul: read [S, 2F], write [S, F]
    const double bytes = 2.0 * 3 * S * kF;
    const int sets = sets_for(static_cast<int64_t>(bytes), 64);
    std::vector<at::Tensor> gu, out;
    for (int i = 0; i < sets; ++i) gu.push_back(randn({S, 2 * kF})), out.push_back(randn({S, kF}));
    const double us = median_us([&](int i) { kernels::silu_mul(gu[i].narrow(1, 0, kF), gu[i].narrow(1, kF, kF), out[i]); }, sets);
    const double aten = median_us([&](int i) { at::silu(gu[i].narrow(1, 0, kF)) * gu[i].narrow(1, kF, kF); }, sets);
    rows.push_back({"silu_mul", S, 0, bytes, us, aten});
  }
  {  // rope_kv_write: read q, k, v, positions, slots, inv_freq; write q and the k/v cache rows
    const double bytes = 2.0 * (S * (kH + 2 * kKV) * kHd + S * (kH + 2 * kKV) * kHd) + 16.0 * S + 2.0 * kHd;
    const int sets = sets_for(static_cast<int64_t>(bytes), 64);
    const int64_t slots_total = 4096;
    const at::Tensor kc = randn({slots_total, kKV, kHd}), vc = randn({slots_total, kKV, kHd});
    const at::Tensor inv_freq = (1.0 / at::pow(1e6, at::arange(0, kHd, 2).to(at::kFloat) / kHd)).to(at::kCUDA);
    std::vector<at::Tensor> qkv, pos, slots;
    for (int i = 0; i < sets; ++i) {
      qkv.push_back(randn({S, (kH + 2 * kKV) * kHd}));
      pos.push_back(at::randint(0, 2048, {S}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA)));
      slots.push_back(at::randperm(slots_total, at::TensorOptions().dtype(at::kLong).device(at::kCUDA)).narrow(0, 0, S).clone());
    }
    auto view = [&](int i, int64_t off, int64_t heads) { return qkv[i].narrow(1, off * kHd, heads * kHd).view({S, heads, kHd}); };
    const double us = median_us([&](int i) {
      kernels::rope_kv_write(view(i, 0, kH), view(i, kH, kKV), view(i, kH + kKV, kKV), pos[i], inv_freq, kc, vc, slots[i]);
    }, sets);
    const double aten = median_us([&](int i) {  // the engine's ops: tables, two apply_rope, two index_copy_
      auto [cos, sin] = layers::rope_tables(pos[i], inv_freq, at::kBFloat16);
      cos = cos.unsqueeze(1);
      sin = sin.unsqueeze(1);
      at::Tensor q = layers::apply_rope(view(i, 0, kH), cos, sin);
      kc.index_copy_(0, slots[i], layers::apply_rope(view(i, kH, kKV), cos, sin));
      vc.index_copy_(0, slots[i], view(i, kH + kKV, kKV));
    }, sets);
    rows.push_back({"rope_kv_write", S, 0, bytes, us, aten});
  }
  return rows;
}

void bench_attention(int64_t S, int64_t ctx, std::vector<Row>& rows) {
  const int64_t blocks_per_seq = (ctx + kBlock - 1) / kBlock;
  const double kv_bytes = 2.0 * 2 * S * ctx * kKV * kHd;
  const double bytes = kv_bytes + 2.0 * 2 * S * kH * kHd + 4.0 * S * (blocks_per_seq + 1);
  const int sets = sets_for(static_cast<int64_t>(kv_bytes), 32);
  const int64_t num_blocks = sets * S * blocks_per_seq;
  const at::Tensor kc = randn({num_blocks * kBlock, kKV, kHd}), vc = randn({num_blocks * kBlock, kKV, kHd});
  const at::Tensor perm = at::randperm(num_blocks, at::kInt);
  const at::Tensor lens = at::full({S}, ctx, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  std::vector<at::Tensor> q, tables, out, ctx_rows;
  for (int i = 0; i < sets; ++i) {
    q.push_back(randn({S, kH, kHd}));
    out.push_back(at::empty_like(q.back()));
    const at::Tensor t = perm.narrow(0, i * S * blocks_per_seq, S * blocks_per_seq).view({S, blocks_per_seq});
    tables.push_back(t.to(at::kCUDA));
    // The engine's gather rows for the same tables (ATen baseline).
    const at::Tensor pos = at::arange(ctx, at::kInt);
    ctx_rows.push_back((t.to(at::kLong).index_select(1, (pos / kBlock).to(at::kLong)) * kBlock + (pos % kBlock))
                           .view({-1}).to(at::kCUDA));
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHd));
  const double us = median_us([&](int i) {
    kernels::paged_attention_decode(q[i], kc, vc, tables[i], lens, kBlock, ctx, scale, out[i]);
  }, sets);
  const at::Tensor allowed = at::ones({1, 1, 1, ctx}, at::TensorOptions().dtype(at::kBool).device(at::kCUDA));
  const double aten = median_us([&](int i) {  // the engine's ops: gather, repeat KV heads, layers::attention
    at::Tensor K = kc.index_select(0, ctx_rows[i]).view({S, ctx, kKV, kHd}).transpose(1, 2).repeat_interleave(kH / kKV, 1);
    at::Tensor V = vc.index_select(0, ctx_rows[i]).view({S, ctx, kKV, kHd}).transpose(1, 2).repeat_interleave(kH / kKV, 1);
    layers::attention(q[i].view({S, kH, 1, kHd}), K, V, allowed);
  }, sets);
  rows.push_back({"paged_attention_decode", S, ctx, bytes, us, aten});
  // The default (tensor-core) kernel against the SIMT one on the same inputs (kernels/cpu/registry.h).
  kernels::set_attention_kernel(kernels::AttentionKernel::kSimt);
  const double simt = median_us([&](int i) {
    kernels::paged_attention_decode(q[i], kc, vc, tables[i], lens, kBlock, ctx, scale, out[i]);
  }, sets);
  kernels::set_attention_kernel(kernels::AttentionKernel::kTensorCore);
  rows.push_back({"paged_attention_decode", S, ctx, bytes, us, simt, "simt kernel"});

  // The decode step's RoPE + KV write fused into attention, against rope_kv_write then attention.
  std::vector<at::Tensor> kv_new, pos, slots;
  for (int i = 0; i < sets; ++i) {
    kv_new.push_back(randn({S, 2 * kKV * kHd}));
    pos.push_back(at::full({S}, ctx - 1, at::TensorOptions().dtype(at::kLong).device(at::kCUDA)));
    const at::Tensor last = tables[i].select(1, blocks_per_seq - 1).to(at::kLong) * kBlock + (ctx - 1) % kBlock;
    slots.push_back(last.contiguous());
  }
  const at::Tensor inv_freq = (1.0 / at::pow(1e6, at::arange(0, kHd, 2).to(at::kFloat) / kHd)).to(at::kCUDA);
  auto k_of = [&](int i) { return kv_new[i].narrow(1, 0, kKV * kHd).view({S, kKV, kHd}); };
  auto v_of = [&](int i) { return kv_new[i].narrow(1, kKV * kHd, kKV * kHd).view({S, kKV, kHd}); };
  const double fused = median_us([&](int i) {
    kernels::paged_attention_decode_rope(q[i], {k_of(i), v_of(i), pos[i], inv_freq, slots[i]}, kc, vc, tables[i], lens,
                                         kBlock, ctx, scale, out[i]);
  }, sets);
  const double pair = median_us([&](int i) {
    kernels::rope_kv_write(q[i], k_of(i), v_of(i), pos[i], inv_freq, kc, vc, slots[i]);
    kernels::paged_attention_decode(q[i], kc, vc, tables[i], lens, kBlock, ctx, scale, out[i]);
  }, sets);
  rows.push_back({"paged_attention_decode_rope", S, ctx, bytes, fused, pair, "rope_kv_write + paged_attention_decode"});
}

// A decode projection at batch N: q/k/v (three weights, biases, the input norm fused), o and down (the residual
// add fused), gate/up (SwiGLU and the norm fused), the LM head (the final norm fused).
struct FewRowShape {
  std::string model, proj;
  int64_t K;
  std::vector<int64_t> rows;  // one per weight; gate/up: {F, F}
  bool norm, residual, bias, silu;
};

std::vector<FewRowShape> few_row_shapes() {
  return {{"3b", "qkv", 2048, {2048, 256, 256}, true, false, true, false},
          {"3b", "o", 2048, {2048}, false, true, false, false},
          {"3b", "gate_up", 2048, {11008, 11008}, true, false, false, true},
          {"3b", "down", 11008, {2048}, false, true, false, false},
          {"3b", "lm_head", 2048, {151936}, true, false, false, false},
          {"0.5b", "qkv", 896, {896, 128, 128}, true, false, true, false},
          {"0.5b", "o", 896, {896}, false, true, false, false},
          {"0.5b", "gate_up", 896, {4864, 4864}, true, false, false, true},
          {"0.5b", "down", 4864, {896}, false, true, false, false},
          {"0.5b", "lm_head", 896, {151936}, true, false, false, false}};
}

// One shape's weights over rotating sets, timed for every few-row variant and for cuBLAS.
void bench_few_row(const FewRowShape& sh, int64_t N, std::vector<Row>& rows) {
  int64_t wrows = 0;
  for (int64_t r : sh.rows) wrows += r;
  const double bytes = 2.0 * (wrows * sh.K + N * sh.K + N * (sh.silu ? wrows / 2 : wrows) * (sh.residual ? 2 : 1));
  const int sets = sets_for(static_cast<int64_t>(bytes), 64);
  struct Set {
    at::Tensor x, h, packed_w, packed_b, act;
    std::vector<at::Tensor> w, b, out;
  };
  std::vector<Set> data(sets);
  const at::Tensor norm_w = randn({sh.K});
  for (Set& d : data) {
    d.x = randn({N, sh.K});
    for (int64_t r : sh.rows) {
      d.w.push_back(randn({r, sh.K}) * 0.02);
      d.b.push_back(sh.bias ? randn({r}) : at::Tensor());
      d.out.push_back(randn({N, r}));
    }
    if (sh.residual) d.h = randn({N, sh.rows[0]});
    if (d.w.size() > 1) {  // the engine's cuBLAS path runs a group as one GEMM over consecutive rows
      d.packed_w = at::cat(d.w);
      if (sh.bias) d.packed_b = at::cat(d.b);
    }
  }
  const double eps = 1e-6;
  auto ours = [&](int i) {
    Set& d = data[i];
    const kernels::InputNorm norm = sh.norm ? kernels::InputNorm{norm_w, eps, {}} : kernels::InputNorm{};
    if (sh.silu) kernels::small_linear_silu_mul(d.x, d.w[0], d.w[1], d.out[0], norm);
    else if (sh.residual) kernels::small_linear(d.x, d.w, d.b, d.h, {d.h}, norm);
    else kernels::small_linear(d.x, d.w, d.b, at::Tensor(), d.out, norm);
  };
  auto cublas = [&](int i) {  // what the engine runs for this projection when it does not take the few-row GEMV
    Set& d = data[i];
    const at::Tensor x = sh.norm ? kernels::rms_norm(d.x, norm_w, eps) : d.x;
    if (sh.silu) {
      const at::Tensor gu = at::linear(x, d.packed_w);
      const int64_t F = sh.rows[0];
      kernels::silu_mul(gu.narrow(1, 0, F), gu.narrow(1, F, F), d.out[0]);
    } else if (sh.residual) {
      d.h.addmm_(x, d.w[0].t());
    } else if (d.packed_w.defined()) {
      at::linear(x, d.packed_w, d.packed_b);  // outputs are column slices of the result: no copies
    } else {
      at::linear(x, d.w[0]);
    }
  };
  const double base = median_us(cublas, sets);
  const std::string name = "few_row " + sh.model + " " + sh.proj;
  auto run = [&](kernels::FewRowKernel k, int split, bool pdl, const std::string& variant) {
    kernels::set_few_row_kernel(k);
    kernels::set_few_row_split(split);
    kernels::set_programmatic_launch(pdl);
    const double us = median_us(ours, sets);
    rows.push_back({name + " " + variant, N, 0, bytes, us, base, "cublas"});
  };
  using FK = kernels::FewRowKernel;
  for (bool pdl : {false, true}) {
    const std::string p = pdl ? " pdl" : "";
    run(FK::kStreaming, 0, pdl, "streaming" + p);
    run(FK::kStaged, 0, pdl, "staged" + p);
    if (!sh.silu && !pdl && (N == 1 || N == 8))  // gate/up ignores the split override
      for (int split : {1, 2, 4, 8}) run(FK::kStreaming, split, pdl, fmt::format("streaming split{}", split));
  }
  kernels::set_few_row_kernel(FK::kStreaming);
  kernels::set_few_row_split(0);
  kernels::set_programmatic_launch(false);
}

}  // namespace

// The decode step's dense GEMMs above the few-row batch (3B shapes: packed q/k/v with its bias, o and down adding
// into h, packed gate/up) through the cuBLASLt algorithm timed fastest for the shape (kernels::linear_tuned, tuned
// in the warm-up launches before the capture) against ATen's at::linear / addmm_ (the heuristic's first choice).
void bench_gemm(int64_t S, std::vector<Row>& rows) {
  struct Gemm {
    const char* name;
    int64_t N, K;
    bool bias, accumulate;
  };
  for (const Gemm& g : {Gemm{"gemm qkv", 2560, kD, true, false}, Gemm{"gemm o (+h)", kD, kD, false, true},
                        Gemm{"gemm gate_up", 2 * kF, kD, false, false}, Gemm{"gemm down (+h)", kD, kF, false, true}}) {
    const double bytes = 2.0 * (g.N * g.K + S * g.K + S * g.N * (g.accumulate ? 2 : 1));
    const int sets = sets_for(static_cast<int64_t>(bytes), 32);
    std::vector<at::Tensor> x, w, b, out;
    for (int i = 0; i < sets; ++i) {
      x.push_back(randn({S, g.K}));
      w.push_back(randn({g.N, g.K}) * 0.02);
      b.push_back(g.bias ? randn({g.N}) : at::Tensor());
      out.push_back(randn({S, g.N}));
    }
    const double tuned = median_us([&](int i) { kernels::linear_tuned(x[i], w[i], b[i], out[i], g.accumulate); }, sets);
    const double aten = median_us([&](int i) {
      if (g.accumulate) out[i].addmm_(x[i], w[i].t());
      else out[i] = at::linear(x[i], w[i], b[i]);
    }, sets);
    rows.push_back({std::string(g.name) + " tuned", S, 0, bytes, tuned, aten, "at::linear / addmm_"});
  }
}

int main(int argc, char** argv) {
  std::string out_path;
  std::vector<int64_t> batches = {1, 16, 64};
  bool few_row_only = false, gemm_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--batch" && i + 1 < argc) batches = {std::stoll(argv[++i])};
    else if (a == "--few-row-only") few_row_only = true;
    else if (a == "--gemm-only") gemm_only = true;
    else {
      fmt::print(stderr, "usage: bench_kernels [--out results.json] [--batch S] [--few-row-only] [--gemm-only]\n");
      return 2;
    }
  }
  if (!rlaif::kernels::cuda_kernels_available() || !at::hasCUDA()) {
    fmt::print("no CUDA (kernels built: {}, device: {})\n", rlaif::kernels::cuda_kernels_available(), at::hasCUDA());
    return 0;
  }
  at::manual_seed(0);
  std::vector<Row> rows;
  for (int64_t S : batches) {
    if (few_row_only || gemm_only) break;
    for (Row& r : bench_pointwise(S)) rows.push_back(r);
    for (int64_t ctx : {512, 2048}) bench_attention(S, ctx, rows);
  }
  if (!gemm_only)
    for (const FewRowShape& sh : few_row_shapes())
      for (int64_t N : {1, 2, 4, 8}) bench_few_row(sh, N, rows);
  if (!few_row_only)
    for (int64_t S : {16, 64}) bench_gemm(S, rows);
  nlohmann::json j = nlohmann::json::array();
  fmt::print("{:<40} {:>4} {:>6} {:>10} {:>9} {:>8} {:>10} {:>8}\n", "kernel (bf16)", "S", "ctx", "MB moved", "us", "GB/s",
             "base us", "speedup");
  fmt::print("(base: the engine's ATen ops for the same step, for the fused row our two unfused kernels, for few_row\n"
             " cuBLAS at::linear with the ATen norm/add/SwiGLU)\n");
  for (const Row& r : rows) {
    const double gbps = r.bytes / (r.us * 1e3);
    const std::string name = r.baseline == "aten" ? r.kernel : fmt::format("{} (base: {})", r.kernel, r.baseline);
    fmt::print("{:<40} {:>4} {:>6} {:>10.3f} {:>9.2f} {:>8.1f} {:>10.2f} {:>7.1f}x\n", name, r.S, r.context,
               r.bytes / 1e6, r.us, gbps, r.aten_us, r.aten_us / r.us);
    j.push_back({{"kernel", r.kernel}, {"S", r.S}, {"context", r.context}, {"bytes", r.bytes}, {"us", r.us},
                 {"gbps", gbps}, {"baseline_us", r.aten_us}, {"baseline", r.baseline}, {"dtype", "bfloat16"}});
  }
  if (!out_path.empty()) {
    std::ofstream(out_path) << nlohmann::json{{"bench", "bench_kernels"}, {"results", j}}.dump(2) << "\n";
    fmt::print("wrote {}\n", out_path);
  }
  return 0;
}
