#!/usr/bin/env python3
"""Reference for tests/unit/test_gguf.cpp, computed by gguf-py (the PyPI `gguf` package, llama.cpp's own
Python reader), never by rlaif.

  gguf_reference.py dump FILE OUT.json   metadata, tensor infos and a checksum of every dequantized tensor
  gguf_reference.py quants OUTDIR        random blocks of every quant type gguf-py dequantizes + its floats
  gguf_reference.py types OUT.json       gguf-py's (block size, type size) table

Checksum of a float32 array x (n elements): sum over i of bits(x[i]) * (i + 1) modulo 2**64, plus the first
64 values' bit patterns; one changed bit anywhere changes it, so equality means bit-identical output.
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES, GGUFValueType as V


def checksum(x):
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    idx = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        wsum = int(np.sum(bits * idx, dtype=np.uint64))
    return {"n": int(bits.size), "wsum": str(wsum), "head": [int(b) for b in bits[:64]]}


def field_json(f):
    t = f.types[0]
    if t == V.ARRAY:
        return {"type": "array", "elem": f.types[1].name.lower() if len(f.types) > 1 else "?",
                "len": len(f.data), "value": f.contents() if len(f.types) > 1 and f.types[1] != V.ARRAY else None}
    v = f.contents()
    if t in (V.FLOAT32, V.FLOAT64):
        v = float(v)
    return {"type": t.name.lower(), "value": v}


def dump(path, out):
    r = GGUFReader(path)
    meta = {k: field_json(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = []
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape],
                        "nbytes": int(t.n_bytes), "data_offset": int(t.data_offset), "checksum": checksum(deq)})
    doc = {"version": int(r.fields["GGUF.version"].contents()), "alignment": int(r.alignment),
           "metadata": meta, "tensors": tensors}
    with open(out, "w") as fh:
        json.dump(doc, fh)


def quants(outdir):
    rng = np.random.default_rng(1234)
    types = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    names = []
    for q in types:
        block, size = GGML_QUANT_SIZES[q]
        n_blocks = 64
        raw = rng.integers(0, 256, size=n_blocks * size, dtype=np.uint8)
        # Random bytes, except the fp16 scale fields get a high byte below 0x40 so scales are finite (|d| < 2):
        # inf/nan scales would only test nan propagation.
        if q not in (Q.F16, Q.BF16):
            blocks = raw.reshape(n_blocks, size)
            for off in {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
                        Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[q]:
                blocks[:, off + 1] &= 0x3F  # exponent < 31 -> finite, |scale| < 2
        deq = gguf.quants.dequantize(raw, q).astype(np.float32)
        raw.tofile(f"{outdir}/{q.name}.bin")
        deq.reshape(-1).tofile(f"{outdir}/{q.name}.f32")
        names.append({"type": q.name, "id": int(q), "n": int(deq.size)})
    with open(f"{outdir}/quants.json", "w") as fh:
        json.dump(names, fh)


def types(out):
    with open(out, "w") as fh:
        json.dump({q.name: {"id": int(q), "block": b, "size": s} for q, (b, s) in GGML_QUANT_SIZES.items()}, fh)


if __name__ == "__main__":
    {"dump": dump, "quants": quants, "types": types}[sys.argv[1]](*sys.argv[2:])
