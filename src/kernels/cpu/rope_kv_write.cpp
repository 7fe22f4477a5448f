// RoPE + KV-cache write: CPU reference (plain loops, the spec) and the device dispatcher.
#include "kernels/cpu/rope_kv_write.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/common.h"

namespace rlaif::kernels {

namespace {

constexpr const char* kOp = "rope_kv_write";

void check_rows(const at::Tensor& t, const at::Tensor& q, int64_t S, int64_t heads, int64_t hd, const char* name) {
  check_same(t, q, kOp, name);
  RLAIF_CHECK(t.dim() == 3 && t.size(0) == S && t.size(2) == hd && (heads < 0 || t.size(1) == heads) &&
                  t.stride(2) == 1 && t.stride(1) == hd,
              "{}: {} must be [{}, heads, {}] with contiguous [heads, hd] rows, got {} strides {}", kOp, name, S, hd,
              t.sizes(), t.strides());
}

}  // namespace

void check_rope_kv_write_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots) {
  check_activation(q, kOp, "q");
  RLAIF_CHECK(q.dim() == 3 && q.size(2) % 2 == 0, "{}: q must be [S, H, hd] with even hd, got {}", kOp, q.sizes());
  const int64_t S = q.size(0), hd = q.size(2);
  check_rows(q, q, S, -1, hd, "q");
  check_rows(k, q, S, -1, hd, "k");
  check_rows(v, q, S, k.size(1), hd, "v");
  const int64_t KV = k.size(1);
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    check_same(*c, q, kOp, "k_cache/v_cache");
    RLAIF_CHECK(c->dim() == 3 && c->size(1) == KV && c->size(2) == hd && c->is_contiguous(),
                "{}: caches must be contiguous [num_slots, {}, {}], got {}", kOp, KV, hd, c->sizes());
  }
  RLAIF_CHECK(v_cache.size(0) == k_cache.size(0), "{}: k_cache and v_cache differ in size", kOp);
  check_index(positions, q, S, kOp, "positions");
  check_index(slots, q, S, kOp, "slots");
  RLAIF_CHECK(inv_freq.defined() && inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 &&
                  inv_freq.size(0) == hd / 2 && inv_freq.is_contiguous() && inv_freq.device() == q.device(),
              "{}: inv_freq must be contiguous float32 [{}] on {}", kOp, hd / 2, q.device().str());
}

namespace {

// Rotates one [hd] row: src → dst (may alias) with this token's rounded cos/sin tables.
template <typename T>
void rotate(const T* src, T* dst, const std::vector<T>& cos, const std::vector<T>& sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(src[i]), x2 = static_cast<float>(src[i + half]);
    const float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
    const T a1 = static_cast<T>(x1 * c), b1 = static_cast<T>(-x2 * s);
    const T a2 = static_cast<T>(x2 * c), b2 = static_cast<T>(x1 * s);
    dst[i] = static_cast<T>(static_cast<float>(a1) + static_cast<float>(b1));
    dst[i + half] = static_cast<T>(static_cast<float>(a2) + static_cast<float>(b2));
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
         const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots) {
  const int64_t S = q.size(0), H = q.size(1), KV = k.size(1), hd = q.size(2), half = hd / 2;
  const int64_t num_slots = k_cache.size(0);
  const float* freq = inv_freq.data_ptr<float>();
  std::vector<T> cos(half), sin(half);
  for (int64_t s = 0; s < S; ++s) {
    const float pos = static_cast<float>(index_at(positions, s));
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * freq[i];
      cos[i] = static_cast<T>(std::cos(angle));
      sin[i] = static_cast<T>(std::sin(angle));
    }
    T* qs = q.data_ptr<T>() + s * q.stride(0);
    for (int64_t h = 0; h < H; ++h) rotate<T>(qs + h * hd, qs + h * hd, cos, sin, half);
    const int64_t slot = index_at(slots, s);
    if (slot < 0) continue;
    RLAIF_CHECK(slot < num_slots, "{}: slot {} of token {} is outside the cache ({} slots)", kOp, slot, s, num_slots);
    const T* ks = k.data_ptr<T>() + s * k.stride(0);
    const T* vs = v.data_ptr<T>() + s * v.stride(0);
    T* kc = k_cache.data_ptr<T>() + slot * KV * hd;
    T* vc = v_cache.data_ptr<T>() + slot * KV * hd;
    for (int64_t h = 0; h < KV; ++h) rotate<T>(ks + h * hd, kc + h * hd, cos, sin, half);
    std::copy(vs, vs + KV * hd, vc);
  }
}

}  // namespace

void rope_kv_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                       const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& slots) {
  check_rope_kv_write_args(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
  RLAIF_CHECK(q.is_cpu(), "rope_kv_write_cpu: tensors must be on the CPU");
  if (q.scalar_type() == at::kFloat) run<float>(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
  else run<at::BFloat16>(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
}

void rope_kv_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                   const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& slots) {
  if (!q.is_cuda()) return rope_kv_write_cpu(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
  check_rope_kv_write_args(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
  cuda_kernel(&KernelRegistry::rope_kv_write_cuda, kOp)(q, k, v, positions, inv_freq, k_cache, v_cache, slots);
}

}  // namespace rlaif::kernels
