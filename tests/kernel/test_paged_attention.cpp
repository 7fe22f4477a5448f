// Paged decode attention: the CPU reference equals the engine's gather + models/layers.h attention on the same
// cache; the CUDA kernels equal the CPU reference for GQA/MHA, context lengths 1, 7, 300, 2049, block size 16 with
// shuffled block tables, strided q, padding rows, and a max_context larger than every length (graph replay).
#include <gtest/gtest.h>

#include <cmath>

#include "kernel_test.h"
#include "kernels/cpu/paged_attention.h"
#include "models/layers.h"

using namespace rlaif;

namespace {

constexpr int64_t kBlock = 16;

// Sequences of the given lengths over a cache whose blocks are handed out in shuffled order. Unused table entries
// point at a block of NaN, so reading past a sequence's length poisons its output instead of passing silently.
struct PagedCase {
  int64_t S, H, KV, hd, max_blocks, nan_block;
  std::vector<int64_t> lens;
  at::Tensor q_full, q, k_cache, v_cache, block_tables, context_lens;

  PagedCase(std::vector<int64_t> lens_, int64_t H_, int64_t KV_, int64_t hd_, at::ScalarType dt)
      : S(static_cast<int64_t>(lens_.size())), H(H_), KV(KV_), hd(hd_), lens(std::move(lens_)) {
    int64_t used = 0, longest = 0;
    for (int64_t n : lens) {
      used += (n + kBlock - 1) / kBlock;
      longest = std::max(longest, n);
    }
    max_blocks = (longest + kBlock - 1) / kBlock + 1;
    const int64_t num_blocks = used + 5;
    nan_block = num_blocks - 1;
    k_cache = at::randn({num_blocks * kBlock, KV, hd}).to(dt);
    v_cache = at::randn({num_blocks * kBlock, KV, hd}).to(dt);
    k_cache.narrow(0, nan_block * kBlock, kBlock).fill_(NAN);
    v_cache.narrow(0, nan_block * kBlock, kBlock).fill_(NAN);
    const at::Tensor perm = at::randperm(num_blocks - 1, at::kLong);
    block_tables = at::full({S, max_blocks}, nan_block, at::kInt);
    int64_t next = 0;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < (lens[s] + kBlock - 1) / kBlock; ++b)
        block_tables[s][b] = perm[next++].item<int64_t>();
    context_lens = at::tensor(std::vector<int32_t>(lens.begin(), lens.end()), at::kInt);
    // q as a view with a row stride (a slice of a fused qkv projection), scaled so the softmax is not flat.
    q_full = (at::randn({S, H * hd + 3 * 8}) * 2).to(dt);
    q = q_full.narrow(1, 8, H * hd).view({S, H, hd});
  }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(hd)); }

  at::Tensor cpu_reference(int64_t max_context) const {
    at::Tensor out = at::empty({S, H, hd}, q.options());
    test::poison(out);
    kernels::paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, kBlock, max_context, scale(),
                                        out);
    return out;
  }
  at::Tensor cuda(int64_t max_context) const {
    const at::Tensor qf = q_full.cuda(), qd = qf.narrow(1, 8, H * hd).view({S, H, hd});
    at::Tensor out = at::empty({S, H, hd}, qd.options());
    test::poison(out);
    kernels::paged_attention_decode(qd, k_cache.cuda(), v_cache.cuda(), block_tables.cuda(), context_lens.cuda(),
                                    kBlock, max_context, scale(), out);
    return out.cpu();
  }
  // The engine's ATen path for sequence s: gather its rows, repeat KV heads, layers::attention.
  at::Tensor engine_math(int64_t s) const {
    std::vector<int64_t> rows;
    for (int64_t t = 0; t < lens[s]; ++t) rows.push_back(block_tables[s][t / kBlock].item<int64_t>() * kBlock + t % kBlock);
    const at::Tensor idx = at::tensor(rows, at::kLong);
    at::Tensor K = k_cache.index_select(0, idx).transpose(0, 1).unsqueeze(0);  // [1, KV, n, hd]
    at::Tensor V = v_cache.index_select(0, idx).transpose(0, 1).unsqueeze(0);
    K = K.repeat_interleave(H / KV, 1);
    V = V.repeat_interleave(H / KV, 1);
    const at::Tensor qs = q[s].unsqueeze(0).unsqueeze(2);                       // [1, H, 1, hd]
    const at::Tensor allowed = at::ones({1, 1, 1, lens[s]}, at::kBool);
    return layers::attention(qs, K, V, allowed).view({H, hd});
  }
};

struct Heads { int64_t H, KV, hd; };

}  // namespace

TEST(PagedAttentionKernel, CpuReferenceEqualsEngineAttention) {
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (const Heads& h : {Heads{8, 2, 64}, Heads{4, 4, 16}}) {
      SCOPED_TRACE(fmt::format("{} H={} KV={} hd={}", c10::toString(dt), h.H, h.KV, h.hd));
      const PagedCase c({1, 7, 300, 2049}, h.H, h.KV, h.hd, dt);
      const at::Tensor out = c.cpu_reference(2049);
      for (int64_t s = 0; s < c.S; ++s)
        EXPECT_LE(test::rel_err(out[s], c.engine_math(s)), test::tolerance(dt)) << "length " << c.lens[s];
    }
  }
}

TEST(PagedAttentionKernel, CpuReferenceZeroesEmptyContexts) {
  SCOPED_TRACE(test::seed_fresh());
  const PagedCase c({0, 5}, 4, 2, 16, at::kFloat);
  const at::Tensor out = c.cpu_reference(16);
  EXPECT_TRUE(out[0].eq(0).all().item<bool>());
  EXPECT_LE(test::rel_err(out[1], c.engine_math(1)), test::tolerance(at::kFloat));
}

TEST(PagedAttentionKernel, CudaEqualsCpuReference) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  // GQA 8:1 (Qwen2.5-3B), 7:1 (Qwen2.5-0.5B/7B, a group that does not fill its template), MHA with a tiny head.
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (const Heads& h : {Heads{16, 2, 128}, Heads{14, 2, 64}, Heads{4, 4, 16}, Heads{8, 4, 8}}) {
      if (dt == at::kFloat && h.hd > 128) continue;
      SCOPED_TRACE(fmt::format("{} H={} KV={} hd={}", c10::toString(dt), h.H, h.KV, h.hd));
      const PagedCase c({1, 7, 300, 2049, 0, 256}, h.H, h.KV, h.hd, dt);
      const at::Tensor ref = c.cpu_reference(2049);
      for (int64_t max_context : {int64_t{2049}, int64_t{4096}, kBlock * c.max_blocks}) {
        const at::Tensor out = c.cuda(max_context);
        for (int64_t s = 0; s < c.S; ++s)
          EXPECT_LE(test::rel_err(out[s], ref[s]), test::tolerance(dt)) << "length " << c.lens[s] << " max_context "
                                                                        << max_context;
        EXPECT_TRUE(out[4].eq(0).all().item<bool>()) << "an empty context gives zeros";
      }
    }
  }
}

TEST(PagedAttentionKernel, CudaBatchOfOneLongContext) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  const PagedCase c({2049}, 16, 2, 128, at::kBFloat16);
  EXPECT_LE(test::rel_err(c.cuda(2049), c.cpu_reference(2049)), test::tolerance(at::kBFloat16));
}

// The partitions' arrival counters persist across launches (each launch's last blocks reset them): repeated
// launches, with other grids between them, give the same output bit for bit.
TEST(PagedAttentionKernel, CudaRepeatedLaunchesGiveTheSameOutput) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  const PagedCase big({2049, 700, 33}, 16, 2, 128, at::kBFloat16), small({300}, 14, 2, 64, at::kBFloat16);
  const at::Tensor first = big.cuda(2049), ref = big.cpu_reference(2049);
  EXPECT_LE(test::rel_err(first, ref), test::tolerance(at::kBFloat16));
  for (int i = 0; i < 4; ++i) {
    small.cuda(4096);
    EXPECT_TRUE(big.cuda(2049).equal(first)) << "launch " << i + 2;
  }
}

namespace {

// The fused RoPE + KV write + attention op against the CPU composition (rope_kv_write, then attention): the new
// token of every sequence is its last one; its k/v arrive as strided views of a fused projection.
void check_fused_rope(const PagedCase& c, int64_t max_context) {
  const int64_t S = c.S, KV = c.KV, hd = c.hd;
  const at::Tensor kv_full = (at::randn({S, 2 * KV * hd + 8}) * 2).to(c.q.scalar_type());
  const at::Tensor k = kv_full.narrow(1, 0, KV * hd).view({S, KV, hd});
  const at::Tensor v = kv_full.narrow(1, KV * hd, KV * hd).view({S, KV, hd});
  std::vector<int64_t> pos, slot;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = c.lens[s] - 1;
    pos.push_back(t >= 0 ? t + 3 : 0);  // positions need not equal the index (e.g. a left-padded prompt)
    slot.push_back(t >= 0 ? c.block_tables[s][t / kBlock].item<int64_t>() * kBlock + t % kBlock : -1);
  }
  const at::Tensor positions = at::tensor(pos, at::kLong), slots = at::tensor(slot, at::kLong);
  const at::Tensor inv_freq = 1.0 / at::pow(10000.0, at::arange(0, hd, 2, at::kFloat) / static_cast<double>(hd));
  const at::Tensor kc = c.k_cache.clone(), vc = c.v_cache.clone();
  at::Tensor ref = at::empty({S, c.H, hd}, c.q.options());
  kernels::paged_attention_decode_rope_cpu(c.q, {k, v, positions, inv_freq, slots}, kc, vc, c.block_tables,
                                           c.context_lens, kBlock, max_context, c.scale(), ref);

  const at::Tensor qf = c.q_full.cuda(), q = qf.narrow(1, 8, c.H * hd).view({S, c.H, hd});
  const at::Tensor q_before = q.clone();
  const at::Tensor kvd = kv_full.cuda();
  const at::Tensor kd = kvd.narrow(1, 0, KV * hd).view({S, KV, hd}), vd = kvd.narrow(1, KV * hd, KV * hd).view({S, KV, hd});
  const at::Tensor kcd = c.k_cache.cuda(), vcd = c.v_cache.cuda();
  at::Tensor out = at::empty({S, c.H, hd}, q.options());
  test::poison(out);
  kernels::paged_attention_decode_rope(q, {kd, vd, positions.cuda(), inv_freq.cuda(), slots.cuda()}, kcd, vcd,
                                       c.block_tables.cuda(), c.context_lens.cuda(), kBlock, max_context, c.scale(),
                                       out);
  const double tol = test::tolerance(c.q.scalar_type());
  for (int64_t s = 0; s < S; ++s) {
    EXPECT_LE(test::rel_err(out[s], ref[s]), tol) << "length " << c.lens[s] << " max_context " << max_context;
    if (slot[s] < 0) continue;
    EXPECT_LE(test::rel_err(kcd[slot[s]], kc[slot[s]]), tol) << "rotated k of sequence " << s;
    EXPECT_TRUE(vcd[slot[s]].cpu().equal(vc[slot[s]])) << "v of sequence " << s;
  }
  EXPECT_TRUE(q.equal(q_before)) << "q is not modified";
  // Nothing but the slots changed in the caches (the NaN block included: compare with NaN equal).
  for (int64_t s = 0; s < S; ++s)
    if (slot[s] >= 0) {
      kcd[slot[s]].copy_(c.k_cache[slot[s]].cuda());  // back to the original contents
      vcd[slot[s]].copy_(c.v_cache[slot[s]].cuda());
    }
  EXPECT_TRUE(at::allclose(kcd.cpu().to(at::kFloat), c.k_cache.to(at::kFloat), 0, 0, /*equal_nan=*/true));
  EXPECT_TRUE(at::allclose(vcd.cpu().to(at::kFloat), c.v_cache.to(at::kFloat), 0, 0, /*equal_nan=*/true));
}

}  // namespace

TEST(PagedAttentionKernel, CudaFusedRopeEqualsCpuComposition) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  for (at::ScalarType dt : test::activation_dtypes()) {
    for (const Heads& h : {Heads{16, 2, 128}, Heads{14, 2, 64}, Heads{4, 4, 16}, Heads{8, 4, 8}}) {
      SCOPED_TRACE(fmt::format("{} H={} KV={} hd={}", c10::toString(dt), h.H, h.KV, h.hd));
      const PagedCase c({1, 7, 300, 2049, 0, 256, 33}, h.H, h.KV, h.hd, dt);
      for (int64_t max_context : {int64_t{2049}, kBlock * c.max_blocks}) check_fused_rope(c, max_context);
    }
  }
}

// bf16 with head_dim 64 or 128 and up to 16 query heads per KV head takes the tensor-core kernel by default; the
// SIMT kernel stays selectable (kernels/cpu/registry.h). Both equal the CPU reference, plain and with the fused
// RoPE, at batch 64 where partitions of 128 and 64 tokens serve (the batches above take 32), for 16, 8, 7, 4 and
// 1 query heads per KV head, lengths ending anywhere in a partition, and a padding row.
TEST(PagedAttentionKernel, CudaTensorCoreAndSimtKernelsAtBatch64) {
  RLAIF_REQUIRE_CUDA_KERNELS();
  SCOPED_TRACE(test::seed_fresh());
  std::vector<int64_t> lens;
  for (int64_t i = 0; i < 64; ++i) lens.push_back(i * 37 % 601);  // 0 (padding), 1 … 600
  const kernels::AttentionKernel before = kernels::attention_kernel();
  for (kernels::AttentionKernel k : {kernels::AttentionKernel::kTensorCore, kernels::AttentionKernel::kSimt}) {
    kernels::set_attention_kernel(k);
    for (const Heads& h : {Heads{16, 1, 128}, Heads{16, 2, 128}, Heads{14, 2, 64}, Heads{32, 8, 128}, Heads{4, 4, 64}}) {
      SCOPED_TRACE(fmt::format("{} H={} KV={} hd={}", k == kernels::AttentionKernel::kSimt ? "simt" : "tensor core",
                               h.H, h.KV, h.hd));
      const PagedCase c(lens, h.H, h.KV, h.hd, at::kBFloat16);
      for (int64_t max_context : {int64_t{600}, int64_t{1100}}) {
        const at::Tensor ref = c.cpu_reference(max_context), out = c.cuda(max_context);
        for (int64_t s = 0; s < c.S; ++s)
          EXPECT_LE(test::rel_err(out[s], ref[s]), test::tolerance(at::kBFloat16))
              << "length " << c.lens[s] << " max_context " << max_context;
        EXPECT_TRUE(out[0].eq(0).all().item<bool>()) << "an empty context gives zeros";
        check_fused_rope(c, max_context);
      }
    }
  }
  kernels::set_attention_kernel(before);
}
