#!/usr/bin/env python3
"""PEFT/transformers side of the interop test (nothing here uses rlaif code).

Usage: peft_interop.py MODEL_DIR RUN_DIR
  RUN_DIR/adapter   an adapter rlaif trained and saved (PEFT format)
  RUN_DIR/merged    rlaif's merged HF export of the same adapter
  RUN_DIR/ours.safetensors  rlaif's target-token log-probs with the adapter ("logprobs") and without ("base")
Loads the adapter with PeftModel.from_pretrained and the merged folder with AutoModelForCausalLM.from_pretrained,
computes the target-token log-probs on the model's reference batch, and exits 1 unless both match rlaif's to 1e-4
on the real tokens. Also checks the adapter really changes the model (so the match is not the trivial one)."""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def token_logprobs(model, t):
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       position_ids=t["position_ids"]).logits.float()
    return torch.log_softmax(logits, -1).gather(-1, t["targets"].unsqueeze(-1)).squeeze(-1)


def main():
    model_dir, run = sys.argv[1], sys.argv[2]
    batch = load_file(f"{model_dir}/expected_fp32.safetensors")
    ours = load_file(f"{run}/ours.safetensors")
    real = batch["attention_mask"].bool()

    def gap(a, b):
        return (a.double() - b.double()).abs()[real].max().item()

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    base_lp = token_logprobs(base, batch)
    peft = PeftModel.from_pretrained(base, f"{run}/adapter").eval()
    peft_lp = token_logprobs(peft, batch)
    merged = AutoModelForCausalLM.from_pretrained(f"{run}/merged", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    merged_lp = token_logprobs(merged, batch)
    result = {"peft_vs_ours": gap(peft_lp, ours["logprobs"]), "merged_vs_ours": gap(merged_lp, ours["logprobs"]),
              "base_vs_ours_base": gap(base_lp, ours["base"]), "adapter_effect": gap(peft_lp, base_lp)}
    print(result)
    ok = (result["peft_vs_ours"] <= 1e-4 and result["merged_vs_ours"] <= 1e-4 and result["base_vs_ours_base"] <= 1e-4
          and result["adapter_effect"] > 1e-3)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
