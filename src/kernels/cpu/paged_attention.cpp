// Paged decode attention: CPU reference (plain loops, the spec the CUDA kernels must match) and the dispatcher.
#include "kernels/cpu/paged_attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/common.h"
#include "kernels/cpu/rope_kv_write.h"

namespace rlaif::kernels {

namespace {

constexpr const char* kOp = "paged_attention_decode";

void check_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                int64_t max_context, const at::Tensor& out) {
  check_activation(q, kOp, "q");
  RLAIF_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "{}: q must be [S, H, hd] with contiguous [H, hd] rows, got {} strides {}", kOp, q.sizes(), q.strides());
  const int64_t S = q.size(0), H = q.size(1), hd = q.size(2);
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    check_same(*c, q, kOp, "k_cache/v_cache");
    RLAIF_CHECK(c->dim() == 3 && c->size(2) == hd && c->is_contiguous() && c->size(0) % block_size == 0,
                "{}: caches must be contiguous [num_blocks * {}, KV, {}], got {}", kOp, block_size, hd, c->sizes());
  }
  RLAIF_CHECK(v_cache.sizes() == k_cache.sizes(), "{}: k_cache {} and v_cache {} differ", kOp, k_cache.sizes(),
              v_cache.sizes());
  const int64_t KV = k_cache.size(1);
  RLAIF_CHECK(KV > 0 && H % KV == 0, "{}: {} query heads are not a multiple of {} KV heads", kOp, H, KV);
  RLAIF_CHECK(block_size > 0 && max_context >= 0, "{}: block_size {} / max_context {}", kOp, block_size, max_context);
  RLAIF_CHECK(block_tables.defined() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == S && block_tables.stride(1) == 1 && block_tables.device() == q.device(),
              "{}: block_tables must be int32 [{}, max_blocks] with a contiguous last dim on {}", kOp, S,
              q.device().str());
  RLAIF_CHECK(context_lens.defined() && context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 &&
                  context_lens.size(0) == S && context_lens.is_contiguous() && context_lens.device() == q.device(),
              "{}: context_lens must be contiguous int32 [{}] on {}", kOp, S, q.device().str());
  check_same(out, q, kOp, "out");
  RLAIF_CHECK(out.sizes() == q.sizes() && out.is_contiguous(), "{}: out must be contiguous {}", kOp, q.sizes());
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
         const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale, const at::Tensor& out) {
  const int64_t S = q.size(0), H = q.size(1), hd = q.size(2), KV = k_cache.size(1), group = H / KV;
  const int64_t cache_rows = k_cache.size(0);
  const float fscale = static_cast<float>(scale);
  std::vector<float> score, acc(hd);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = context_lens.data_ptr<int32_t>()[s];
    RLAIF_CHECK(n <= max_context && n <= block_tables.size(1) * block_size, "{}: context_lens[{}] = {} exceeds "
                "max_context {} or the block table ({} blocks)", kOp, s, n, max_context, block_tables.size(1));
    std::vector<int64_t> rows(std::max<int64_t>(n, 0));
    const int32_t* table = block_tables.data_ptr<int32_t>() + s * block_tables.stride(0);
    for (int64_t t = 0; t < n; ++t) {
      rows[t] = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
      RLAIF_CHECK(rows[t] >= 0 && rows[t] < cache_rows, "{}: sequence {} token {} maps to cache row {} of {}", kOp, s,
                  t, rows[t], cache_rows);
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      const T* qh = q.data_ptr<T>() + s * q.stride(0) + h * hd;
      T* oh = out.data_ptr<T>() + (s * H + h) * hd;
      std::fill(acc.begin(), acc.end(), 0.0f);
      score.assign(rows.size(), 0.0f);
      float max = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const T* kt = k_cache.data_ptr<T>() + (rows[t] * KV + g) * hd;
        float dot = 0.0f;
        for (int64_t d = 0; d < hd; ++d) dot += static_cast<float>(qh[d]) * static_cast<float>(kt[d]);
        // q·k and the scaling each round to the dtype, as the eager matmul and `* scale` of layers.h do.
        score[t] = static_cast<float>(static_cast<T>(static_cast<float>(static_cast<T>(dot)) * fscale));
        max = std::max(max, score[t]);
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) sum += (score[t] = std::exp(score[t] - max));
      const float inv_sum = 1.0f / sum;  // ATen's softmax multiplies by the reciprocal of the sum
      for (int64_t t = 0; t < n; ++t) {
        const float p = static_cast<float>(static_cast<T>(score[t] * inv_sum));
        const T* vt = v_cache.data_ptr<T>() + (rows[t] * KV + g) * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] += p * static_cast<float>(vt[d]);
      }
      for (int64_t d = 0; d < hd; ++d) oh[d] = static_cast<T>(acc[d]);
    }
  }
}

}  // namespace

void paged_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                int64_t max_context, double scale, const at::Tensor& out) {
  check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, out);
  RLAIF_CHECK(q.is_cpu(), "paged_attention_decode_cpu: tensors must be on the CPU");
  if (q.scalar_type() == at::kFloat)
    run<float>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
  else
    run<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
}

void paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                            int64_t max_context, double scale, const at::Tensor& out) {
  if (!q.is_cuda())
    return paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale,
                                      out);
  check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, out);
  cuda_kernel(&KernelRegistry::paged_attention_decode_cuda, kOp)(q, k_cache, v_cache, block_tables, context_lens,
                                                                  block_size, max_context, scale, out);
}

void paged_attention_decode_rope_cpu(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                                     const at::Tensor& context_lens, int64_t block_size, int64_t max_context,
                                     double scale, const at::Tensor& out) {
  const at::Tensor rotated = q.clone();
  rope_kv_write_cpu(rotated, rope.k, rope.v, rope.positions, rope.inv_freq, k_cache, v_cache, rope.slots);
  paged_attention_decode_cpu(rotated, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale,
                             out);
}

void paged_attention_decode_rope(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
                                 const at::Tensor& out) {
  if (!q.is_cuda())
    return paged_attention_decode_rope_cpu(q, rope, k_cache, v_cache, block_tables, context_lens, block_size,
                                           max_context, scale, out);
  check_args(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, out);
  check_rope_kv_write_args(q, rope.k, rope.v, rope.positions, rope.inv_freq, k_cache, v_cache, rope.slots);
  cuda_kernel(&KernelRegistry::paged_attention_decode_rope_cuda, "paged_attention_decode_rope")(
      q, rope, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  int64_t max_context, double scale) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, max_context, scale, out);
  return out;
}

}  // namespace rlaif::kernels
