# Checks, without a GPU, the fragment bookkeeping of quant_small_linear.cu's tensor-core few-row kernel
# (mma_few): x staged as the bf16 pairs (x0, x4), (x1, x5), ..., each word's nibbles paired by the 0x4300 LOP3, the
# PTX ISA's m16n8k16 A/B/D fragment layouts, and acc += s·Σ + (b − 128·s)·Σx — emulated lane by lane in float64 and
# compared with x · (s·q + b)ᵀ. A design aid for changing that kernel (e.g. a q8 variant), not a CI test: the GPU
# parity test QuantSmallLinearKernel.CudaTensorCorePathEqualsCpuReference is. Usage: mma_few_layout.py [K G R]
import sys

import numpy as np

K, G, R = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (256, 64, 2)
rng = np.random.default_rng(0)
WPT = G // 32
groups = K // G
x = rng.standard_normal((R, K)).astype(np.float64)
q = rng.integers(0, 16, size=(8, K))
s = rng.standard_normal((8, groups)) * 0.1
b = rng.standard_normal((8, groups)) * 0.1
# MLX packing: word k//8, value at bits 4*(k%8)
words = np.zeros((8, K // 8), dtype=np.uint64)
for r in range(8):
    for k in range(K):
        words[r, k // 8] |= np.uint64(q[r, k]) << np.uint64(4 * (k % 8))
words = words.astype(np.uint32)
# staging
xs = {}
sums = np.zeros((R, groups))
for n in range(R):
    for gi in range(groups):
        for tq in range(4):
            for j in range(WPT):
                k0 = gi * G + tq * (G // 4) + j * 8
                v = x[n, k0:k0 + 8]
                xs[(gi, j, n, tq)] = [(v[0], v[4]), (v[1], v[5]), (v[2], v[6]), (v[3], v[7])]
        sums[n, gi] = x[n, gi * G:(gi + 1) * G].sum()
def halves(u):
    u = int(u)
    lo, hi = u & 0xFFFF, (u >> 16) & 0xFFFF
    # bf16 0x43 00 | v -> 128 + v (v < 16)
    def bf(h):
        assert (h & 0xFFF0) == 0x4300, hex(h)
        return 128 + (h & 0xF)
    return bf(lo), bf(hi)
def mma(c, afrag, bfrag):
    # afrag[lane] = (a0, a2) as pairs; bfrag[lane] = (b0, b1) as pairs. Build A (16x16), B (16x8).
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, tq = lane // 4, lane % 4
        (a0, a2), (b0, b1) = afrag[lane], bfrag[lane]
        A[g, 2 * tq], A[g, 2 * tq + 1] = a0
        A[g, 2 * tq + 8], A[g, 2 * tq + 9] = a2
        B[2 * tq, g], B[2 * tq + 1, g] = b0
        B[2 * tq + 8, g], B[2 * tq + 9, g] = b1
    D = A @ B
    for lane in range(32):
        g, tq = lane // 4, lane % 4
        c[lane][0] += D[g, 2 * tq]; c[lane][1] += D[g, 2 * tq + 1]
        c[lane][2] += D[g + 8, 2 * tq]; c[lane][3] += D[g + 8, 2 * tq + 1]
mask, magic = 0x000F000F, 0x43004300
acc = np.zeros((32, 2))
for gi in range(groups):
    c = [[0.0] * 4 for _ in range(32)]
    for j in range(WPT):
        A1, B1, A2, B2 = {}, {}, {}, {}
        for lane in range(32):
            g, tq = lane // 4, lane % 4
            w = int(words[g, gi * 4 * WPT + tq * WPT + j])
            a = xs[(gi, j, g, tq)] if g < R else [(0, 0)] * 4
            A1[lane] = (a[0], a[1]); B1[lane] = (halves((w & mask) | magic), halves(((w >> 4) & mask) | magic))
            A2[lane] = (a[2], a[3]); B2[lane] = (halves(((w >> 8) & mask) | magic), halves(((w >> 12) & mask) | magic))
        mma(c, A1, B1); mma(c, A2, B2)
    for lane in range(32):
        g, tq = lane // 4, lane % 4
        xsum = sums[g, gi] if g < R else 0.0
        for e in range(2):
            r = 2 * tq + e
            acc[lane][e] += s[r, gi] * c[lane][e] + (b[r, gi] - 128 * s[r, gi]) * xsum
W = np.repeat(s, G, axis=1) * q + np.repeat(b, G, axis=1)
ref = x @ W.T  # [R, 8]
err = 0
for lane in range(32):
    g, tq = lane // 4, lane % 4
    if g < R:
        for e in range(2):
            err = max(err, abs(acc[lane][e] - ref[g, 2 * tq + e]))
print(f"K {K} group {G} rows {R}: max abs error {err:.3g} (outputs up to {np.abs(ref).max():.3g})")
sys.exit(0 if err < 1e-9 * np.abs(ref).max() else 1)
