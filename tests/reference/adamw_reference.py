#!/usr/bin/env python3
"""torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ as the reference for rlaif's optimizer (tests/unit/
test_optim.cpp). Makes seeded parameters and per-step gradients, runs torch's AdamW (weight decay on the 2-D
parameter only, as HF Trainer's no-decay rule for biases) and writes inputs and expected results.

Usage: adamw_reference.py OUT.safetensors
  w0, b0: initial parameters; gw{k}, gb{k}: gradients of step k (k = 0..2); w3, b3: parameters after 3 steps;
  w3_exp_avg, w3_exp_avg_sq: torch's state for w; clip_in_{a,b}: gradients; clip_out_{a,b}, clip_norm: clipped.
"""
import sys

import torch
from safetensors.torch import save_file

torch.manual_seed(5)
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-6, 0.1
out = {}
w = torch.randn(4, 3)
b = torch.randn(3)
out["w0"], out["b0"] = w.clone(), b.clone()
w.requires_grad_(True)
b.requires_grad_(True)
opt = torch.optim.AdamW([{"params": [w], "weight_decay": WD}, {"params": [b], "weight_decay": 0.0}],
                        lr=LR, betas=BETAS, eps=EPS, foreach=False)
for k in range(3):
    gw, gb = torch.randn(4, 3), torch.randn(3)
    out[f"gw{k}"], out[f"gb{k}"] = gw, gb
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
out["w3"], out["b3"] = w.detach().clone(), b.detach().clone()
out["w3_exp_avg"] = opt.state[w]["exp_avg"].clone()
out["w3_exp_avg_sq"] = opt.state[w]["exp_avg_sq"].clone()

a, c = torch.randn(5, 2).requires_grad_(True), torch.randn(7).requires_grad_(True)
a.grad, c.grad = torch.randn(5, 2) * 3, torch.randn(7) * 3
out["clip_in_a"], out["clip_in_b"] = a.grad.clone(), c.grad.clone()
norm = torch.nn.utils.clip_grad_norm_([a, c], max_norm=1.5)
out["clip_out_a"], out["clip_out_b"], out["clip_norm"] = a.grad.clone(), c.grad.clone(), norm.reshape(1).clone()
save_file(out, sys.argv[1])
