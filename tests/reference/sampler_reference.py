#!/usr/bin/env python3
"""Applies transformers' own logits processors (repetition penalty, temperature, top-k, top-p, min-p, in the
order generate() applies them) to logits written by the C++ sampler test, and writes the processed log-probs.
Usage: sampler_reference.py IN.safetensors CASES.json OUT.safetensors"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

logits = load_file(sys.argv[1])["logits"]
cases = json.load(open(sys.argv[2]))
out = {}
for i, c in enumerate(cases):
    x = logits[i:i + 1].clone()
    ids = torch.tensor([c["context"]], dtype=torch.long)
    procs = []
    if c["repetition_penalty"] != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(c["repetition_penalty"]))
    if c["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(c["temperature"]))
    if c["top_k"] > 0:
        procs.append(TopKLogitsWarper(c["top_k"]))
    if c["top_p"] < 1.0:
        procs.append(TopPLogitsWarper(c["top_p"]))
    if c["min_p"] > 0.0:
        procs.append(MinPLogitsWarper(c["min_p"]))
    for p in procs:
        x = p(ids, x)
    out[f"case{i}"] = torch.log_softmax(x.float(), -1)[0].contiguous()
save_file(out, sys.argv[3])
