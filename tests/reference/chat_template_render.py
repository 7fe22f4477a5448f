#!/usr/bin/env python3
"""Reference renderings of chat templates by transformers itself (render_jinja_template, i.e. jinja2 with
HF's sandbox, trim_blocks/lstrip_blocks, tojson override, raise_exception and strftime_now).

  conversations --cases FILE --template NAME=PATH [--template ...] --out FILE
      PATH is a .jinja file or a HF tokenizer directory (chat_template.jinja first, else tokenizer_config's
      "chat_template"; special tokens from tokenizer_config as tokenizer.special_tokens_map would give).
      Each case renders with and without add_generation_prompt, once with the case's key order and once
      with every object's keys sorted (what a C++ nlohmann::json caller passes).
  snippets --in FILE --out FILE
      FILE holds [{"template": str, "vars": {...}}]; each renders with the same environment.
Errors are recorded as {"error": "Type: message"} so the C++ side can check it fails the same way.
"""
import argparse
import json
import os
import sys

from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

# Special tokens of the tokenizers whose templates are single files (their tokenizer_config.json values).
FILE_TOKENS = {
    "llama3.1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
}


def load_template(name, path):
    if os.path.isdir(path):
        config_path = os.path.join(path, "tokenizer_config.json")
        config = json.load(open(config_path, encoding="utf-8")) if os.path.exists(config_path) else {}
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):
            source = open(jinja_path, encoding="utf-8").read()
        else:
            source = config["chat_template"]
            if isinstance(source, list):
                source = next(t["template"] for t in source if t["name"] == "default")
        tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                tokens[key] = value
        return source, tokens
    return open(path, encoding="utf-8").read(), FILE_TOKENS.get(name, {})


def sort_keys(x):
    if isinstance(x, dict):
        return {k: sort_keys(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [sort_keys(v) for v in x]
    return x


def render(source, tokens, case, add_generation_prompt, sorted_keys):
    messages, tools, extra = case["messages"], case.get("tools"), case.get("extra_context", {})
    if sorted_keys:
        messages, tools, extra = sort_keys(messages), sort_keys(tools), sort_keys(extra)
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=source,
            add_generation_prompt=add_generation_prompt, **{**tokens, **extra})
        return {"text": rendered[0]}
    except Exception as e:  # the C++ side must fail too
        return {"error": f"{type(e).__name__}: {e}"}


def conversations(args):
    cases = json.load(open(args.cases, encoding="utf-8"))
    out = []
    for spec in args.template:
        name, path = spec.split("=", 1)
        source, tokens = load_template(name, path)
        for case in cases:
            for agp in (False, True):
                out.append({"template": name, "case": case["name"], "add_generation_prompt": agp,
                            "ordered": render(source, tokens, case, agp, False),
                            "sorted": render(source, tokens, case, agp, True)})
    json.dump(out, open(args.out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)


def snippets(args):
    out = []
    for item in json.load(open(args.inp, encoding="utf-8")):
        try:
            out.append({"text": _compile_jinja_template(item["template"]).render(**item.get("vars", {}))})
        except Exception as e:
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, open(args.out, "w", encoding="utf-8"), ensure_ascii=False, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("conversations")
    c.add_argument("--cases", required=True)
    c.add_argument("--template", action="append", required=True)
    c.add_argument("--out", required=True)
    s = sub.add_parser("snippets")
    s.add_argument("--in", dest="inp", required=True)
    s.add_argument("--out", required=True)
    args = p.parse_args()
    conversations(args) if args.mode == "conversations" else snippets(args)


if __name__ == "__main__":
    sys.exit(main())
