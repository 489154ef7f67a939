"""What a llama.cpp step of n tokens costs on this machine, and how far a
token's logits in a batched step are from the same token decoded alone: the
two numbers that bound speculative decoding (each draft token adds a row to a
step; a row of a batch may round differently from a one-token step; with
BF16 weights packed (AVX512_BF16 CPUs) it does not).

For each GGUF file: one sequence with a 60-token context (--context: the
cells each row attends to), then a step of n tokens (n = 1, 2, 3, 4, 6, 8,
12, 16) repeated (median of --repeats), its cost against n = 1; and the
largest logit difference between a 30-token prompt decoded in one batch and
the same tokens decoded one at a time.
Plain llama-cpp-python (no Lanner code), the same thread count as Lanner.

Usage: python benchmarks/step_costs.py [--models smollm2 smollm2-q4_1 ...] [--repeats 15]
                                       [--context 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

from lanner.engine.engine import Engine
from lanner.errors import ModelNotFound

TEXT = (b"The Thames is a river that flows through southern England, including London. At "
        b"346 kilometres, it is the longest river entirely in England and the second-longest")
SIZES = (1, 2, 3, 4, 6, 8, 12, 16)


def gguf_of(engine: Engine, name: str) -> Path | None:
    """The file `lanner run NAME` runs (the BF16 or F16 re-encoding for `smollm2`)."""
    try:
        model = engine.load(name, n_ctx=256)
    except ModelNotFound as e:
        print(f"skipped {name}: {e}")
        return None
    path = Path(getattr(model.backend, "path", model.spec.path))
    engine.close()
    return path


def costs(path: Path, repeats: int, context_length: int = 60) -> dict[int, float]:
    llm = llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, n_threads=os.cpu_count() or 1,
                          logits_all=True, flash_attn=True, verbose=False)
    tokens = llm.tokenize(TEXT)
    context = (tokens * (context_length // len(tokens) + 1))[:context_length]
    llm.eval(context)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    seconds: dict[int, list[float]] = {n: [] for n in SIZES}
    for _ in range(repeats + 1):  # the first round builds each shape's graph
        for n in SIZES:
            llm.n_tokens = len(context)
            llama_cpp.llama_memory_seq_rm(memory, -1, len(context), -1)
            start = time.perf_counter()
            llm.eval(tokens[:n])
            seconds[n].append(time.perf_counter() - start)
    return {n: statistics.median(s[1:]) for n, s in seconds.items()}


def rounding(path: Path) -> float:
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_threads=os.cpu_count() or 1,
                          logits_all=True, flash_attn=True, verbose=False)
    tokens = llm.tokenize(TEXT)[:30]
    llm.eval(tokens)
    batched = np.array(llm.scores[:len(tokens)])
    llm.reset()
    for token in tokens:
        llm.eval([token])
    alone = np.array(llm.scores[:len(tokens)])
    return float(np.abs(batched - alone).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "smollm2-q4_1"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--context", type=int, default=60,
                        help="tokens already in the cache before each step")
    args = parser.parse_args()
    engine = Engine()
    print(llama_cpp.llama_print_system_info().decode().strip())
    for name in args.models:
        path = gguf_of(engine, name)
        if path is None:
            continue
        got = costs(path, args.repeats, args.context)
        line = "  ".join(f"{n}: {got[n] * 1000:.1f} ms ({got[n] / got[1]:.2f}x)" for n in SIZES)
        print(f"{name} ({path.name}), {args.context} tokens of context\n  step of n tokens: {line}")
        print(f"  largest logit difference, batched against one at a time: "
              f"{rounding(path):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
