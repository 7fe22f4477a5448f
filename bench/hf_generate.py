#!/usr/bin/env python3
"""Baseline for bench_generate: transformers' generate() on random-weight Qwen2.5-0.5B / 3B-shaped models
(vocab 151936, tied embeddings), bf16 on the GPU, prompt 128 tokens, 128 new tokens, sampling. Saves each
model (save_pretrained) so rlaif's benchmark loads the identical weights, and writes tokens/s as JSON.
Usage: hf_generate.py --models-dir DIR --out FILE.json [--batches 1,16,64] [--shapes 0.5b,3b] [--save-only]"""
import argparse
import json
import os
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2),
    # SmolLM2-135M's dimensions (vocab 49152) for the CPU comparison.
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--shapes", default="0.5b,3b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--save-only", action="store_true", help="only save the models (for rlaif's benchmark)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    results = []
    for shape in a.shapes.split(","):
        dims = {"vocab_size": 151936, **SHAPES[shape]}
        cfg = Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, torch_dtype=a.dtype, **dims)
        torch.manual_seed(0)
        with torch.device(a.device):
            model = Qwen2ForCausalLM(cfg).to(dtype).eval()
        d = os.path.join(a.models_dir, f"qwen2.5-{shape}-random")
        if not os.path.exists(os.path.join(d, "config.json")):
            model.save_pretrained(d)
        if a.save_only:
            del model
            continue
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(0, dims["vocab_size"], (b, a.prompt), device=a.device)
            kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.new,
                      min_new_tokens=a.new, pad_token_id=0, eos_token_id=None)
            model.generate(ids, attention_mask=torch.ones_like(ids), **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
            sync()
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            sync()
            dt = time.perf_counter() - t0
            n = (out.shape[1] - a.prompt) * b
            results.append({"impl": "transformers", "shape": shape, "batch": b, "new_tokens": n, "seconds": dt,
                            "tokens_per_s": n / dt, "device": a.device, "dtype": a.dtype})
            print(f"transformers {shape} batch {b}: {n / dt:.1f} tok/s", flush=True)
        del model
        if a.device == "cuda":
            torch.cuda.empty_cache()
    import transformers
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "results": results},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
