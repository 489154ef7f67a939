"""Perplexity of the bundled SmolLM2 on a held-out text, for each way of running
its weights: the shipped Q4_1 file in llama.cpp, the same weights re-encoded as
F16 in llama.cpp, and the weights dequantised to fp32 in transformers
(the reference). Lower is better; the text (benchmarks/data/heldout_ppl.txt) was
written for this and is in no training set.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import lanner

TEXT = Path(__file__).parent / "data" / "heldout_ppl.txt"


def perplexity(model: lanner.Model, text: str, window: int = 256) -> tuple[float, int]:
    """Rolling perplexity over paragraphs: each paragraph scored given the previous one."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    total, count, previous = 0.0, 0, ""
    for para in paragraphs:
        logprob, _ = model.backend.loglikelihood(previous, (" " if previous else "") + para)
        total += logprob
        count += len(model.backend.tokenize(para, add_bos=False))
        previous = para[-window:]
    return math.exp(-total / count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    text = TEXT.read_text()
    variants = [("llama.cpp, shipped Q4_1", "smollm2-q4_1", {}),
                ("llama.cpp, re-encoded F16 (default)", "smollm2", {})]
    if not args.skip_transformers:
        variants.append(("transformers fp32 (reference)", "smollm2",
                         {"backend": "transformers", "dtype": "float32"}))
    with tempfile.TemporaryDirectory() as home:
        for label, name, options in variants:
            model = lanner.load(name, home=home, **options)
            ppl, n = perplexity(model, text)
            print(f"  {label:<38} perplexity {ppl:7.3f}  ({n} tokens)")
            model.close()


if __name__ == "__main__":
    main()
