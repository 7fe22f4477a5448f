// RoPE + KV-cache write: the CPU reference equals models/layers.h rope_tables + apply_rope followed by the engine's
// index_copy_ into the cache; the CUDA kernel equals the CPU reference (q in place, cache rows, untouched rows).
#include <gtest/gtest.h>

#include "kernel_test.h"
#include "kernels/cpu/rope_kv_write.h"
#include "models/layers.h"

using namespace rlaif;

namespace {

// Inputs for S tokens as the engine has them after the projections: q/k/v are views into one fused [S, qkv] row
// (strided, not contiguous), caches filled with random values so untouched rows can be checked.
struct RopeCase {
  int64_t S, H, KV, hd, num_slots;
  at::Tensor qkv, q, k, v, positions, inv_freq, k_cache, v_cache, slots;

  RopeCase(int64_t S_, int64_t H_, int64_t KV_, int64_t hd_, at::ScalarType dt, at::ScalarType index_dt)
      : S(S_), H(H_), KV(KV_), hd(hd_), num_slots(4 * S_ + 3) {
    qkv = at::randn({S, (H + 2 * KV) * hd}).to(dt);
    q = qkv.narrow(1, 0, H * hd).view({S, H, hd});
    k = qkv.narrow(1, H * hd, KV * hd).view({S, KV, hd});
    v = qkv.narrow(1, (H + KV) * hd, KV * hd).view({S, KV, hd});
    positions = at::randint(0, 8192, {S}, at::kLong).to(index_dt);
    inv_freq = 1.0 / at::pow(1e6, at::arange(0, hd, 2, at::kLong).to(at::kFloat) / static_cast<double>(hd));
    k_cache = at::randn({num_slots, KV, hd}).to(dt);
    v_cache = at::randn({num_slots, KV, hd}).to(dt);
    slots = at::randperm(num_slots, at::kLong).narrow(0, 0, S).clone();
    if (S > 1) slots[S - 1] = -1;  // a padding token: rotated q, no cache write
    slots = slots.to(index_dt);
  }
  void run(at::Device dev, at::Tensor& q_out, at::Tensor& kc, at::Tensor& vc) const {
    at::Tensor qkv_d = qkv.to(dev).clone();
    at::Tensor qd = qkv_d.narrow(1, 0, H * hd).view({S, H, hd});
    at::Tensor kd = qkv_d.narrow(1, H * hd, KV * hd).view({S, KV, hd});
    at::Tensor vd = qkv_d.narrow(1, (H + KV) * hd, KV * hd).view({S, KV, hd});
    kc = k_cache.to(dev).clone();
    vc = v_cache.to(dev).clone();
    kernels::rope_kv_write(qd, kd, vd, positions.to(dev), inv_freq.to(dev), kc, vc, slots.to(dev));
    EXPECT_TRUE(kd.cpu().equal(k)) << "k itself is left unchanged";
    q_out = qd.cpu();
    kc = kc.cpu();
    vc = vc.cpu();
  }
};

}  // namespace

TEST(RopeKvWriteKernel, CpuReferenceEqualsLayersRopeAndCacheWrite) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (at::ScalarType idx : {at::kLong, at::kInt}) {
      SCOPED_TRACE(c10::toString(dt));
      const RopeCase c(9, 8, 2, 64, dt, idx);
      at::Tensor q, kc, vc;
      c.run(at::kCPU, q, kc, vc);
      // The engine's math: tables [S, hd] broadcast over heads, then index_copy_ of the rows with a slot.
      auto [cos, sin] = layers::rope_tables(c.positions.to(at::kLong), c.inv_freq, dt);
      cos = cos.unsqueeze(1);
      sin = sin.unsqueeze(1);
      EXPECT_LE(test::rel_err(q, layers::apply_rope(c.q, cos, sin)), test::tolerance(dt));
      const at::Tensor k_rot = layers::apply_rope(c.k, cos, sin);
      const at::Tensor keep = c.slots.to(at::kLong) >= 0;
      const at::Tensor rows = c.slots.to(at::kLong).masked_select(keep);
      at::Tensor k_ref = c.k_cache.clone(), v_ref = c.v_cache.clone();
      k_ref.index_copy_(0, rows, k_rot.index_select(0, keep.nonzero().view(-1)));
      v_ref.index_copy_(0, rows, c.v.index_select(0, keep.nonzero().view(-1)));
      EXPECT_LE(test::rel_err(kc, k_ref), test::tolerance(dt));
      EXPECT_TRUE(vc.equal(v_ref)) << "v is copied bit for bit; other rows untouched";
      const at::Tensor untouched = at::ones({c.num_slots}, at::kBool).index_fill_(0, rows, false);
      EXPECT_TRUE(kc.index_select(0, untouched.nonzero().view(-1)).equal(
          c.k_cache.index_select(0, untouched.nonzero().view(-1))));
    }
  }
}

TEST(RopeKvWriteKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  struct Shape { int64_t S, H, KV, hd; };
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (at::ScalarType idx : {at::kLong, at::kInt}) {
      for (const Shape& s : {Shape{1, 16, 2, 128}, Shape{64, 16, 2, 128}, Shape{5, 4, 2, 16}, Shape{3, 8, 4, 8}}) {
        SCOPED_TRACE(fmt::format("{} S={} H={} KV={} hd={}", c10::toString(dt), s.S, s.H, s.KV, s.hd));
        const RopeCase c(s.S, s.H, s.KV, s.hd, dt, idx);
        at::Tensor q_ref, kc_ref, vc_ref, q, kc, vc;
        c.run(at::kCPU, q_ref, kc_ref, vc_ref);
        c.run(at::kCUDA, q, kc, vc);
        EXPECT_LE(test::rel_err(q, q_ref), test::tolerance(dt));
        EXPECT_LE(test::rel_err(kc, kc_ref), test::tolerance(dt));
        EXPECT_TRUE(vc.equal(vc_ref));
      }
    }
  }
}
