#!/usr/bin/env python3
"""Independent check of rlaif's MLX affine quantization (docs/FORMATS.md), written from the spec with numpy only:
reads a safetensors file (parsed here by hand: 8-byte header length, JSON header, data) holding, per case <c>,
  <c>.w        the original weights [O, K] (float32, bfloat16 or float16)
  <c>.weight   our packed uint32 words [O, K*bits/32]
  <c>.scales, <c>.biases   our [O, K/group] in the model dtype
  <c>.dequant  our dequantize_affine output [O, K] in the model dtype
and the metadata key "<c>" = "bits,group_size". Quantizes <c>.w itself and requires the packed words, scales and
biases to match bit for bit, and our dequantized weights to equal scale*q + bias exactly.

Usage: mlx_quant_reference.py FILE.safetensors   (prints "ok N cases" or fails with the first mismatch)
"""
import json
import struct
import sys

import numpy as np

F32_MAX = np.float32(np.finfo(np.float32).max)


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        raw = np.frombuffer(body[a:b], dtype=np.uint8)
        tensors[name] = (info["dtype"], info["shape"], raw)
    return tensors, meta


def as_f32(entry):
    """float32 values of an F32/BF16/F16 tensor (bfloat16 = the high half of a float32)."""
    dtype, shape, raw = entry
    if dtype == "F32":
        return raw.view("<f4").reshape(shape).astype(np.float32)
    if dtype == "F16":
        return raw.view("<f2").reshape(shape).astype(np.float32)
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    raise ValueError(f"unexpected dtype {dtype}")


def round_to(x, dtype):
    """float32 → the model dtype with round-to-nearest-even, returned as the stored bits (uint16/uint32)."""
    x = x.astype(np.float32)
    if dtype == "F32":
        return x.view(np.uint32)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def stored_bits(entry):
    dtype, shape, raw = entry
    return raw.view("<u4" if dtype == "F32" else "<u2").reshape(shape)


def round_half_away(x):
    """Metal/CUDA round(): halves away from zero. In float64 so adding 0.5 is exact for float32 inputs."""
    x = x.astype(np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.float32)


def quantize(w, bits, group):
    """The spec: returns (q [O, K] integers, scale, bias [O, K/group] float32 before rounding to the dtype)."""
    O, K = w.shape
    g = w.reshape(O, K // group, group)
    n_bins = np.float32(2 ** bits - 1)
    w_min = np.minimum(g.min(axis=2), F32_MAX)
    w_max = np.maximum(g.max(axis=2), np.float32(0))  # the GPU kernels start w_max at 0
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = round_half_away(edge / scale)
    at_zero = q0 == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(at_zero, scale, edge / np.where(at_zero, np.float32(1), q0)).astype(np.float32)
    bias = np.where(at_zero, np.float32(0), edge).astype(np.float32)
    q = round_half_away((g - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, n_bins).astype(np.uint32).reshape(O, K)
    return q, scale, bias


def pack(q, bits):
    """Little-endian packing: value j of each word in bits [j*bits, (j+1)*bits)."""
    O, K = q.shape
    per = 32 // bits
    q = q.reshape(O, K // per, per).astype(np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * bits)[None, None, :]
    return (q << shifts).sum(axis=2).astype(np.uint32)


def unpack(words, bits):
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    q = (words[..., None] >> shifts) & np.uint32(2 ** bits - 1)
    return q.reshape(words.shape[0], -1)


def main():
    tensors, meta = read_safetensors(sys.argv[1])
    cases = sorted(k for k in meta if k != "format")
    assert cases, "no cases in the file"
    for c in cases:
        bits, group = (int(v) for v in meta[c].split(","))
        w = as_f32(tensors[c + ".w"])
        dtype = tensors[c + ".scales"][0]
        q, scale, bias = quantize(w, bits, group)
        ours_words = tensors[c + ".weight"][2].view("<u4").reshape(tensors[c + ".weight"][1])
        words = pack(q, bits)
        bad = np.argwhere(words != ours_words)
        assert bad.size == 0, f"{c}: packed words differ at {bad[:5].tolist()}: ours {ours_words[tuple(bad[0])]:#010x} " \
                              f"spec {words[tuple(bad[0])]:#010x}"
        for name, ref in (("scales", scale), ("biases", bias)):
            ours = stored_bits(tensors[f"{c}.{name}"])
            spec = round_to(ref, dtype)
            bad = np.argwhere(ours != spec)
            assert bad.size == 0, f"{c}: {name} differ at {bad[:5].tolist()}"
        # Dequantization from the stored (rounded) scales and biases: product and sum each in float32.
        s = as_f32(tensors[c + ".scales"])
        b = as_f32(tensors[c + ".biases"])
        O, K = w.shape
        qs = unpack(ours_words, bits).astype(np.float32).reshape(O, K // group, group)
        deq = ((s[..., None] * qs).astype(np.float32) + b[..., None]).astype(np.float32).reshape(O, K)
        ours = stored_bits(tensors[c + ".dequant"])
        spec = round_to(deq, tensors[c + ".dequant"][0])
        bad = np.argwhere(ours != spec)
        assert bad.size == 0, f"{c}: dequantized weights differ at {bad[:5].tolist()}"
    print(f"ok {len(cases)} cases")


if __name__ == "__main__":
    main()
