# Checks, without a GPU, the fragment bookkeeping of quant_small_linear.cu's tensor-core few-row kernel
# (mma_few): x staged as bf16 pairs ((x0, x4), (x1, x5), ... for q4; (x0, x2), (x1, x3), ... for q8), the LOP3s
# that make each value bf16 (q4: 128 + q by 0x4300; q8: 128 + lo and 2048 + 16·hi by 0x4300 / 0x4500), the PTX
# ISA's m16n8k16 A/B/D fragment layouts, and acc += s·Σ + (b − offset·s)·Σx — emulated lane by lane in float64 and
# compared with x · (s·q + b)ᵀ. A design aid for changing that kernel, not a CI test: the GPU parity test
# QuantSmallLinearKernel.CudaTensorCorePathEqualsCpuReference is. Usage: mma_few_layout.py [K G R [BITS]]
import sys

import numpy as np

K, G, R = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (256, 64, 2)
BITS = int(sys.argv[4]) if len(sys.argv) > 4 else 4
rng = np.random.default_rng(0)
WPT = G // 32  # chunks of 8 values a lane per group: one q4 word, two q8 words
CW = BITS // 4
PER = 32 // BITS  # values a word
OFFSET = 128 if BITS == 4 else 2176
groups = K // G
x = rng.standard_normal((R, K)).astype(np.float64)
q = rng.integers(0, 1 << BITS, size=(8, K))
s = rng.standard_normal((8, groups)) * 0.1
b = rng.standard_normal((8, groups)) * 0.1
# MLX packing: word k // PER, value at bits BITS * (k % PER)
words = np.zeros((8, K // PER), dtype=np.uint64)
for r in range(8):
    for k in range(K):
        words[r, k // PER] |= np.uint64(q[r, k]) << np.uint64(BITS * (k % PER))
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
                st, nx = (4, 2) if BITS == 4 else (2, 4)
                xs[(gi, j, n, tq)] = [(v[0], v[st]), (v[1], v[1 + st]), (v[nx], v[nx + st]), (v[nx + 1], v[nx + 1 + st])]
        sums[n, gi] = x[n, gi * G:(gi + 1) * G].sum()
def halves(u):
    u = int(u)
    lo, hi = u & 0xFFFF, (u >> 16) & 0xFFFF
    # bf16 0x4300 | v -> 128 + v, 0x4500 | v -> 2048 + 16 v (v < 16): decoded from the bits, not assumed
    def bf(h):
        assert (h & 0xFFF0) in (0x4300, 0x4500), hex(h)
        exp = ((h >> 7) & 0xFF) - 127
        return (1 + (h & 0x7F) / 128) * 2.0 ** exp
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
mask, lo_magic, hi_magic = 0x000F000F, 0x43004300, 0x45004500
acc = np.zeros((32, 2))
for gi in range(groups):
    c = [[0.0] * 4 for _ in range(32)]
    for j in range(WPT):
        steps = []  # (A, B) per MMA, in the kernel's order
        for m in range(2 if BITS == 4 else 4):
            A, B = {}, {}
            for lane in range(32):
                g, tq = lane // 4, lane % 4
                base = (gi * 4 + tq) * WPT * CW + j * CW
                a = xs[(gi, j, g, tq)] if g < R else [(0, 0)] * 4
                if BITS == 4:
                    w = int(words[g, base])
                    A[lane] = (a[2 * m], a[2 * m + 1])
                    B[lane] = (halves(((w >> (8 * m)) & mask) | lo_magic), halves(((w >> (8 * m + 4)) & mask) | lo_magic))
                else:
                    h, hi = m // 2, m % 2  # word h of the chunk; low then high nibbles
                    w = int(words[g, base + h])
                    magic = hi_magic if hi else lo_magic
                    A[lane] = (a[2 * h], a[2 * h + 1])
                    B[lane] = (halves(((w >> (4 * hi)) & mask) | magic), halves(((w >> (8 + 4 * hi)) & mask) | magic))
            steps.append((A, B))
        for A, B in steps:
            mma(c, A, B)
    for lane in range(32):
        g, tq = lane // 4, lane % 4
        xsum = sums[g, gi] if g < R else 0.0
        for e in range(2):
            r = 2 * tq + e
            acc[lane][e] += s[r, gi] * c[lane][e] + (b[r, gi] - OFFSET * s[r, gi]) * xsum
W = np.repeat(s, G, axis=1) * q + np.repeat(b, G, axis=1)
ref = x @ W.T  # [R, 8]
err = 0
for lane in range(32):
    g, tq = lane // 4, lane % 4
    if g < R:
        for e in range(2):
            err = max(err, abs(acc[lane][e] - ref[g, 2 * tq + e]))
print(f"q{BITS} K {K} group {G} rows {R}: max abs error {err:.3g} (outputs up to {np.abs(ref).max():.3g})")
sys.exit(0 if err < 1e-9 * np.abs(ref).max() else 1)
