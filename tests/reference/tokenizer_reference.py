#!/usr/bin/env python3
"""Reference token ids from Hugging Face `tokenizers` (and transformers) for the tokenizer tests; rlaif's
own code never produces an expected value.

  tokenizer_reference.py corpus OUT.json              the test corpus: datasets + generated edge cases
  tokenizer_reference.py chars OUT.json               one short string per assigned code point (Unicode of
      Python's unicodedata), so every character's class (letter, number, White_Space, NFC) is checked
  tokenizer_reference.py qwen_gguf SRC_DIR OUT.gguf     a tokenizer-only GGUF of SRC_DIR/tokenizer.json written by
      gguf-py's GGUFWriter as llama.cpp's converter does it (model "gpt2", pre "qwen2", special added tokens
      CONTROL, other added tokens USER_DEFINED)
  tokenizer_reference.py strip_variant SRC_DIR OUT_DIR  SRC_DIR's tokenizer.json with lstrip/rstrip set on some
      added tokens (Qwen's own have none), to check those flags against tokenizers
  tokenizer_reference.py encode KIND SRC CORPUS OUT   ids, decode and round-trip flag per corpus string
      KIND qwen_dir:   transformers AutoTokenizer on a vocab.json + merges.txt folder (its slow->fast conversion)
           json:       tokenizers.Tokenizer.from_file(SRC/tokenizer.json)
           gguf_bpe:   a tokenizers.Tokenizer built from the GGUF's tokens + merges (read by gguf-py) with
                       the SmolLM2 pre-tokenizer: Digits(individual_digits) + ByteLevel(GPT-2 regex), which is
                       what llama.cpp's "smollm" pre-type and SmolLM2's own tokenizer.json do; tokens of GGUF
                       type CONTROL are added as special tokens.
"""
import gzip
import json
import os
import random
import sys
import unicodedata

DATA = os.environ.get("RLAIF_SHARED_DATA", os.path.join(os.path.dirname(__file__), "../../../shared/data"))


def edge_cases():
    rng = random.Random(20240611)
    assigned = [cp for cp in range(0x20, 0x30000)
                if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")]
    astral = [cp for cp in assigned if cp >= 0x10000]
    out = []
    for _ in range(300):
        n = rng.randint(1, 40)
        pool = astral if rng.random() < 0.3 else assigned
        out.append("".join(chr(rng.choice(pool)) for _ in range(n)))
    for _ in range(100):  # mostly ASCII with spaces, digits, punctuation and newlines: stresses the regex
        out.append("".join(rng.choice("ab  \t\n\r01'sSlLdD.,;:!?-_(){}[]<>\"#é") for _ in range(rng.randint(1, 80))))
    out += [
        " " * 100, "\t" * 17 + "x", "a" + " " * 50 + "b", "\n" * 30, "\r\n" * 10 + "  \r\n x", "   \n\n\n   y   ",
        "x\u3000\u3000y", "a\u00a0b\u00a0\u00a0 c", "\u2003\u2003z", "a\u180e b", "a\u200bb\u200b", "a\u0085b \u0085",
        "\u2028\u2029line", "  \u205f\u202f ", "end   ",
        "Hello Привет 你好 مرحبا שלום नमस्ते こんにちは 안녕하세요 Γειά σου",
        "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽👍🏿", "🧑🏻‍💻 coder", "😀😃😄😁" * 5, "🇩🇪🇫🇷",
        "e\u0301", "A\u030a ngstr\u00f6m", "\u1100\u1161\u11a8", "n\u0303o", "e\u0301\u0327", "\u0065\u0328\u0301",
        "Å Å Å", "ﬁ ﬀ", "\u212b\u2126", "caf\u00e9 cafe\u0301",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|endoftext|>",
        "x<tool_call>y</tool_call>z", "<think>\n\n</think>\n\nok", "<|im_start|", "<|im_end|><|im_end|>a",
        " <|im_start|> ", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
        "12345678901234567890", "３４５ ٣٤٥ ⅫⅣ ½¾ ²³", "3.14159e-10", "1,000,000", "0x7FFF_FFFF",
        "I'M it'S we'LL they'RE you'VE he'D 'ſ 'K", "don't won't can't", "''''", "'s's's",
        "def f(x):\n\treturn x  # comment\n\n\n", "if (a &&b) { return; }\n", "    \n    \n", "a\tb\t\tc",
        "~!@#$%^&*()_+`-=[]\\{}|;':\",./<>?", "...!!!???", "—–‑", "“quotes” ‘single’", "\u00ad soft",
        "\U0001f600\U00010348\U0001d11e\U00020000", "\ufeffBOM", "\ufffd replacement", "a\u0000b", "\x01\x02\x1f\x7f",
        "ZWJ\u200dand\u200cZWNJ", "  <|im_start|>  user <|im_end|>  \n x", "a\u3000<tool_call>\u3000b <tool_call>",
        "\t<|im_end|>\t<|im_start|>\n", "<|im_end|>   ", "   <|im_start|>", "a" * 300, "abc" * 200, "🤗" * 100,
    ]
    return out


def corpus(out):
    texts = []
    with open(os.path.join(DATA, "datasets/code_prompts.jsonl")) as f:
        texts += [json.loads(l)["prompt"] for l in f if l.strip()]
    with open(os.path.join(DATA, "datasets/gsm8k_test.jsonl")) as f:
        for l in f:
            if l.strip():
                r = json.loads(l)
                texts += [r["question"], r["answer"]]
    with gzip.open(os.path.join(DATA, "datasets/HumanEval.jsonl.gz"), "rt") as f:
        for l in f:
            if l.strip():
                r = json.loads(l)
                texts += [r["prompt"], r["prompt"] + r["canonical_solution"]]
    with open(os.path.join(DATA, "datasets/mbpp.jsonl")) as f:
        for l in f:
            if l.strip():
                r = json.loads(l)
                texts += [r["text"], r["code"]]
    texts += edge_cases()
    with open(out, "w") as f:
        json.dump(texts, f)


def chars(out):
    texts = []
    for cp in range(0x80, 0x110000):
        c = chr(cp)
        if unicodedata.category(c) in ("Cn", "Cs", "Co"):
            continue
        texts.append(f"a{c}{c}1 {c}'s x")
    with open(out, "w") as f:
        json.dump(texts, f)


def gguf_bpe(path):
    import gguf
    from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == 3])
    return tok


def qwen_gguf(src, out):
    import gguf
    with open(os.path.join(src, "tokenizer.json")) as f:
        j = json.load(f)
    vocab = j["model"]["vocab"]
    added = {a["id"]: a for a in j["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [""] * n
    types = [1] * n
    for t, i in vocab.items():
        tokens[i] = t
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w = gguf.GGUFWriter(out, "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(151645)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def strip_variant(src, out_dir):
    with open(os.path.join(src, "tokenizer.json")) as f:
        j = json.load(f)
    for a in j["added_tokens"]:
        if a["content"] == "<|im_start|>":
            a["lstrip"] = True
        if a["content"] == "<|im_end|>":
            a["rstrip"] = True
        if a["content"] == "<tool_call>":
            a["lstrip"] = a["rstrip"] = True
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(j, f)


def encode(kind, src, corpus_path, out):
    with open(corpus_path) as f:
        texts = json.load(f)
    if kind == "qwen_dir":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src)._tokenizer
    elif kind == "json":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    else:
        tok = gguf_bpe(src)
    encs = tok.encode_batch(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    decoded = tok.decode_batch(ids, skip_special_tokens=False)
    with open(out, "w") as f:
        json.dump({"vocab_size": tok.get_vocab_size(with_added_tokens=True), "ids": ids, "decoded": decoded,
                   "roundtrip": [d == t for d, t in zip(decoded, texts)]}, f)


if __name__ == "__main__":
    {"corpus": corpus, "chars": chars, "encode": encode, "qwen_gguf": qwen_gguf, "strip_variant": strip_variant}[sys.argv[1]](*sys.argv[2:])
