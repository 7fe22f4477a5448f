#!/usr/bin/env python3
"""What an MLX-quantized copy of a tiny reference model should compute, from transformers and the numpy spec
(mlx_quant_reference.py), with no rlaif code: every nn.Linear / nn.Embedding whose input dim the group size divides
(mlx_lm's rule) gets its weight replaced by dequantize(quantize(w)), then the model's target-token log-probs on the
batch of expected_fp32.safetensors are written.

Usage: quant_model_reference.py MODEL_DIR BITS[,BITS...] GROUP OUT.safetensors
  OUT holds "logprobs_q<bits>" [B, T] float32 for each BITS
"""
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlx_quant_reference import quantize  # noqa: E402


def quantized_logprobs(model_dir, bits, group, batch):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float().eval()
    done = set()  # a tied head shares the embedding's Parameter: quantize it once (QuantizedEmbedding.as_linear)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and mod.weight.shape[1] % group == 0:
            if id(mod.weight) in done:
                continue
            done.add(id(mod.weight))
            w = mod.weight.detach().numpy().astype(np.float32)
            q, scale, bias = quantize(w, bits, group)
            O, K = w.shape
            deq = scale[..., None] * q.reshape(O, K // group, group).astype(np.float32) + bias[..., None]
            mod.weight.data = torch.from_numpy(deq.reshape(O, K).astype(np.float32))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits.float()
    return torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1).contiguous()


def main():
    model_dir, bits_list, group, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    batch = load_file(os.path.join(model_dir, "expected_fp32.safetensors"))
    save_file({f"logprobs_q{b}": quantized_logprobs(model_dir, int(b), group, batch) for b in bits_list.split(",")}, out)
    print("ok")


if __name__ == "__main__":
    main()
