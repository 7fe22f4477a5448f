#!/usr/bin/env python3
"""PEFT reference for LoRA. Modes:
  make  MODEL_DIR OUT_DIR   attach a PEFT LoRA (r=4, alpha=8, all 7 projections) with random A and B to the
                            tiny model, save the adapter to OUT_DIR/adapter, and write transformers+PEFT logits
                            with the adapter on and off to OUT_DIR/expected_lora.safetensors
  check MODEL_DIR ADAPTER LOGITS  load ADAPTER (written by rlaif) with PeftModel.from_pretrained and assert its
                            logits equal LOGITS (rlaif's) on the batch stored in LOGITS"""
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def logits(model, t):
    with torch.no_grad():
        return model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                     position_ids=t["position_ids"]).logits.float().contiguous()


def main():
    mode, model_dir = sys.argv[1], sys.argv[2]
    batch = load_file(f"{model_dir}/expected_fp32.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    if mode == "make":
        out = sys.argv[3]
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(base, cfg).eval()
        torch.manual_seed(5)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data.normal_(0.0, 0.1)
        model.save_pretrained(f"{out}/adapter")
        on = logits(model, batch)
        with model.disable_adapter():
            off = logits(model, batch)
        save_file({"on": on, "off": off}, f"{out}/expected_lora.safetensors")
    else:
        ours = load_file(sys.argv[4])
        model = PeftModel.from_pretrained(base, sys.argv[3]).eval()
        theirs = logits(model, batch)
        mask = batch["attention_mask"].bool()
        err = (theirs - ours["logits"]).abs().amax(-1)[mask].max().item()
        print(f"max |PEFT - rlaif| = {err:.3e}")
        assert err <= 1e-4, err


if __name__ == "__main__":
    main()
