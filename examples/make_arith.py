#!/usr/bin/env python3
"""Writes the quickstart's verifiable task: small additions and subtractions whose reference answer ends in
'#### N' (GSM8K's convention, checked by rlaif's exact-answer verifier). Deterministic (seeded)."""
import json
import random

rng = random.Random(2026)
for name, n in (("arith_train.jsonl", 400), ("arith_eval.jsonl", 64)):
    with open(f"examples/data/{name}", "w") as f:
        for _ in range(n):
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            op = rng.choice(["+", "-"])
            if op == "-" and b > a:
                a, b = b, a
            ans = a + b if op == "+" else a - b
            f.write(json.dumps({"prompt": f"What is {a} {op} {b}? Reply with just the number.",
                                "answer": f"{a} {op} {b} = {ans}\n#### {ans}"}) + "\n")
