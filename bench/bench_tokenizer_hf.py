#!/usr/bin/env python3
"""HF tokenizers encode throughput on one thread, same corpus as bench_tokenizer.cpp (code_prompts.jsonl +
GSM8K test questions and answers, Qwen2.5 tokenizer via transformers' fast tokenizer).
Usage: RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python bench/bench_tokenizer_hf.py [SHARED_DATA] [REPEATS]"""
import json
import os
import sys
import time

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from transformers import AutoTokenizer  # noqa: E402

data = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../shared/data")
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
texts = []
for line in open(os.path.join(data, "datasets/code_prompts.jsonl")):
    if line.strip():
        texts.append(json.loads(line)["prompt"])
for line in open(os.path.join(data, "datasets/gsm8k_test.jsonl")):
    if line.strip():
        r = json.loads(line)
        texts += [r["question"], r["answer"]]
nbytes = sum(len(t.encode()) for t in texts)
tok = AutoTokenizer.from_pretrained(os.path.join(data, "qwen2.5"))._tokenizer
best = 1e30
for r in range(repeats):
    t0 = time.perf_counter()
    n = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)  # one call per text, like ours
    s = time.perf_counter() - t0
    if r == 0:
        print(f"first pass (cold cache): {nbytes / s / 1e6:.2f} MB/s")
    best = min(best, s)
t0 = time.perf_counter()
tok.encode_batch(texts, add_special_tokens=False)
sb = time.perf_counter() - t0
print(f"HF tokenizers encode, 1 thread: {len(texts)} texts, {nbytes / 1e6:.2f} MB, {n} tokens, best of {repeats}: "
      f"{best:.3f} s = {nbytes / best / 1e6:.2f} MB/s (encode_batch: {nbytes / sb / 1e6:.2f} MB/s)")
