#!/usr/bin/env python3
"""Reference for tests/model/test_gguf_repack.cpp: GGUF files and their dequantized floats from gguf-py (the PyPI
`gguf` package, llama.cpp's own Python writer, quantizer and reader), never from rlaif.

  gguf_repack_reference.py write OUTDIR
      writes OUTDIR/quants.gguf: Q8_0, Q4_0 and Q4_1 matrices quantized by gguf.quants.quantize (plus rows that
      hit the edge cases: all zeros, constant, a single large value) and an F32 one; then reads it back with
      GGUFReader and writes each tensor's gguf.quants.dequantize floats as OUTDIR/<name>.f32 (row-major [out, in]).
  gguf_repack_reference.py dequant FILE OUTDIR NAME[:ROWS]...
      the named tensors of an existing GGUF file (their first ROWS rows when given), dequantized by gguf-py, as
      OUTDIR/<name>.f32.
Both write OUTDIR/tensors.json: [{"name", "type", "shape": [out, in]}].
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as Q


def dump(reader, names, outdir):
    """names: {tensor name: rows to keep (None = all)}, or None for every tensor."""
    info = []
    for t in reader.tensors:
        if names is not None and t.name not in names:
            continue
        rows = names.get(t.name) if names is not None else None
        data = t.data if rows is None else t.data[:rows]  # quantized data: one array row per matrix row
        deq = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]  # ne0 first in the file; row-major [out, in] here
        if rows is not None:
            shape[0] = rows
        deq.reshape(-1).tofile(f"{outdir}/{t.name}.f32")
        info.append({"name": t.name, "type": t.tensor_type.name, "shape": shape})
    with open(f"{outdir}/tensors.json", "w") as fh:
        json.dump(info, fh)


def write(outdir):
    rng = np.random.default_rng(7)
    path = f"{outdir}/quants.gguf"
    w = GGUFWriter(path, "llama")
    for qtype, (out, inp) in [(Q.Q8_0, (24, 96)), (Q.Q4_0, (20, 64)), (Q.Q4_1, (18, 128)), (Q.F32, (4, 32))]:
        x = (rng.standard_normal((out, inp)) * 0.05).astype(np.float32)
        x[1] = 0.0                      # an all-zero group: d = 0
        x[2] = 0.03                     # constant rows
        x[3, :] = 0.0
        x[3, 5] = -7.5                  # one large value per block: the negative-d cases of Q4_0
        x[3, 40 % inp] = 3.25
        data = x if qtype == Q.F32 else gguf.quants.quantize(x, qtype)
        w.add_tensor(f"w_{qtype.name.lower()}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dump(GGUFReader(path), None, outdir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        write(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "dequant":
        wanted = {}
        for arg in sys.argv[4:]:
            name, _, rows = arg.partition(":")
            wanted[name] = int(rows) if rows else None
        dump(GGUFReader(sys.argv[2]), wanted, sys.argv[3])
    else:
        sys.exit(__doc__)
