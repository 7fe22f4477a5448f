#!/usr/bin/env python3
"""Baseline for bench_train's training phase: transformers + peft, eager PyTorch, the same update rlaif makes.
LoRA (r 16, alpha 32, dropout 0.05, all 7 projections; adapters float32 as PEFT keeps them) on the same model
folder, P prompts x S samples of prompt_len + new tokens (random ids: the training cost does not depend on the
content), group advantages (mean/std per prompt), per-token log-probs through TRL's selective log-softmax on the
completion positions, PPO-clip with token normalisation + beta * k3 KL to the adapters-off model, backward,
grad-norm clip 1.0, AdamW step; micro-batches accumulate into one step. bf16 autocast as bench_train.
Timed from a synchronized device, after one warm-up step; writes JSON (training tokens/s, peak GPU memory).
Usage: hf_train_step.py --model DIR [--device cuda] [--prompts 8] [--samples 8] [--new 512] [--out FILE.json]"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def selective_log_softmax(logits, index):
    """log_softmax(logits)[index] row by row (TRL's memory-saving helper): logits [B, T, V], index [B, T]."""
    out = []
    for row_logits, row_index in zip(logits, index):
        lp = row_logits.float().log_softmax(-1)
        out.append(lp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def completion_logprobs(model, ids, n_new):
    """log p(completion token t | tokens < t) for the last n_new tokens of each row: [B, n_new]."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=n_new + 1).logits
    return selective_log_softmax(logits[:, :-1], ids[:, -n_new:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--kl-beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa: its default; eager)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=DTYPES[a.dtype], attn_implementation=a.attn).to(dev)
    cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    vocab = model.config.vocab_size
    n = a.prompts * a.samples
    gen = torch.Generator().manual_seed(0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        ids = torch.randint(0, vocab, (n, a.prompt_len + a.new), generator=gen).to(dev)
        rewards = torch.rand(a.prompts, a.samples, generator=gen)
        sync()
        t0 = time.perf_counter()
        adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten().to(dev)
        denom = n * a.new  # token normalisation over the whole batch, shared by the micro-batches
        model.train()
        total = 0.0
        for s in range(0, n, a.micro_batch):
            x = ids[s:s + a.micro_batch]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not a.no_autocast):
                new = completion_logprobs(model, x, a.new)
                ref = None
                if a.kl_beta > 0:
                    with torch.no_grad(), model.disable_adapter():
                        ref = completion_logprobs(model, x, a.new)
            old = new.detach()  # one PPO epoch: the trainer's own log-probs at rollout time (no IS correction)
            ratio = torch.exp(new - old)
            A = adv[s:s + a.micro_batch].unsqueeze(1)
            pg = -torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A)
            if ref is not None:
                d = ref - new
                pg = pg + a.kl_beta * (torch.exp(d) - d - 1)
            loss = pg.sum() / denom
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, total

    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.steps):
        dt, loss = step()
        times.append(dt)
        print(f"step {i}: train {dt:.2f} s, {n * a.new / dt:.0f} tok/s (loss tokens), loss {loss:.4g}", flush=True)
    train_s = sum(times) / len(times)
    import peft
    import transformers
    res = {"impl": "transformers+peft", "transformers": transformers.__version__, "peft": peft.__version__,
           "torch": torch.__version__, "model": a.model, "device": a.device, "attn_implementation": a.attn,
           "prompts": a.prompts, "samples": a.samples, "prompt_len": a.prompt_len, "new_tokens": a.new,
           "micro_batch": a.micro_batch, "lora_r": a.lora_r, "kl_beta": a.kl_beta, "autocast_bf16": not a.no_autocast,
           "gradient_checkpointing": a.checkpointing, "steps": a.steps, "train_s": train_s, "per_step_s": times,
           "train_tokens_per_s": n * a.new / train_s,
           "train_forward_tokens_per_s": n * (a.prompt_len + a.new) / train_s,
           "peak_gpu_bytes_train": torch.cuda.max_memory_allocated() if cuda else 0}
    print(json.dumps(res, indent=1))
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
