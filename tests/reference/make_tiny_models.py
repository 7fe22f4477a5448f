#!/usr/bin/env python3
"""Builds random tiny Qwen2/Llama models with transformers, saves them with save_pretrained, and writes
transformers' own outputs for a padded batch: logits and target-token log-probs (the reference the C++
model tests compare against). Run at test time; nothing here uses rlaif code.

Usage: make_tiny_models.py --out DIR [--bf16-device cuda]
  DIR/<model>/            HF folder (config.json, model.safetensors or shards)
  DIR/<model>/expected_fp32.safetensors   input_ids, attention_mask, position_ids, targets, logits, logprobs
  DIR/<model>/expected_bf16.safetensors   same, computed by transformers in bf16 on --bf16-device (optional)
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 320


def models():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=512, attn_implementation="eager")
    yield "qwen2_untied", Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **common), None
    yield "qwen2_tied_sharded", Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, rope_theta=1e4, **common), "40KB"
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    yield "llama3_gqa", LlamaForCausalLM, LlamaConfig(tie_word_embeddings=False, rope_theta=5e5,
                                                      rope_scaling=rope, **common), None
    yield "llama_bias_tied", LlamaForCausalLM, LlamaConfig(tie_word_embeddings=True, attention_bias=True,
                                                           mlp_bias=True, rope_theta=1e4, **common), None
    # Head dim 64: the shape the engine's tensor-core paged attention serves (bf16, GPU tests).
    wide = dict(common, hidden_size=256, intermediate_size=128, num_hidden_layers=2)
    yield "qwen2_hd64", Qwen2ForCausalLM, Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, **wide), None


def batch(seed):
    """Three sequences of length 12: full, right-padded (8 real), left-padded (5 real)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 12
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0  # pad id; its value must not matter
    # Positions as transformers' generate derives them from the mask.
    pos = mask.cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    return ids, mask, pos, targets


@torch.no_grad()
def run(model, ids, mask, pos, targets, device):
    model = model.to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))
    logits = out.logits.float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": targets,
            "logits": logits.contiguous(), "logprobs": logprobs.contiguous()}


@torch.no_grad()
def greedy_reference(model, d, seed):
    """transformers' greedy generate, 64 new tokens, for prompts of different lengths (each run alone)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 11, 17, 3):
        prompt = torch.randint(0, VOCAB, (1, n), generator=g)
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=64,
                             min_new_tokens=64, pad_token_id=0, eos_token_id=None)
        out.append({"prompt": prompt[0].tolist(), "tokens": gen[0, n:].tolist()})
    with open(os.path.join(d, "expected_greedy.json"), "w") as f:
        json.dump(out, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16-device", default=os.environ.get("RLAIF_REF_BF16_DEVICE"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for i, (name, cls, cfg, shard) in enumerate(models()):
        torch.manual_seed(1000 + i)
        model = cls(cfg).eval()
        # HF initialises biases to zero and norms to one; randomise everything so each weight matters.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.data.uniform_(0.5, 1.5)
            else:
                p.data.normal_(0.0, 0.08 if p.dim() > 1 else 0.2)
        d = os.path.join(a.out, name)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, **kwargs)
        ids, mask, pos, targets = batch(7 + i)
        save_file(run(model, ids, mask, pos, targets, "cpu"), os.path.join(d, "expected_fp32.safetensors"))
        greedy_reference(model, d, 100 + i)
        if a.bf16_device:
            save_file(run(model.to(torch.bfloat16), ids, mask, pos, targets, a.bf16_device),
                      os.path.join(d, "expected_bf16.safetensors"))
    with open(os.path.join(a.out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
    print("reference models written to", a.out)


if __name__ == "__main__":
    main()
