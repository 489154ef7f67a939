"""Two llama.cpp facts the serving design rests on, measured in one run:

  * KV layout (`--part kv`): llama.cpp's raw batched greedy decode of B
    sequences (default 8), no server, in a split cache (each sequence owns its
    cells), a unified one (all share them), and a unified one that also holds
    2,000 cached cells of an idle sequence (a prefix cache kept for a later
    request). In a unified cache every token's attention scans all cells.
  * Thread pools (`--part threads`): Lanner's single-stream decode in a fresh
    process; in a process where llama-cpp-python's own `Llama` has decoded on
    the main thread first (two threads calling `llama_decode`: two OpenMP teams,
    more threads than cores); and beside a second, idle Lanner backend (Lanner
    runs every `llama_decode` of a process on one thread, so it should cost
    nothing). Each measurement runs in its own process.

The variants alternate in rounds (--rounds, default 3) so that a drift in the
shared machine's speed hits all of them; medians are reported, ratios against
the first variant. The model is the GGUF `smollm2` runs (the shipped weights
re-encoded as BF16 or F16, `registry.half_type`), unless --model names another.

    python benchmarks/llamacpp_layouts.py [--part kv|threads|both] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea,"
IDLE_CELLS = 2000


def model_path(name: str, home: Path) -> Path:
    """The GGUF file Lanner runs for ``name`` (re-encoded once when its entry asks)."""
    from lanner.engine.engine import prepare
    from lanner.engine.registry import resolve

    return prepare(resolve(name, home), "llama.cpp", home).path


# -- KV layouts: raw batched decode ------------------------------------------------


def raw_decode(gguf: Path, layout: str, batch: int, n: int, threads: int, cells: int) -> float:
    """Tokens/s of ``batch`` sequences decoded together, greedy, in ``layout``
    ("split", "unified" or "unified+idle"); ``cells`` per sequence (split) or
    in all (unified)."""
    import llama_cpp
    import numpy as np

    from lanner.backends.llamacpp_native import ContextConfig, create_context, load_model

    model = load_model(gguf)
    seqs = batch + 1  # one more sequence id: the idle prefix cache
    cfg = ContextConfig(n_ctx=cells, n_batch=512, n_ubatch=512, n_seq_max=seqs,
                        n_threads=threads, flash_attn=True, split_kv=layout == "split")
    ctx = create_context(model, cfg, gguf)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    lb = llama_cpp.llama_batch_init(512, 0, 1)

    def run(items: list[tuple[int, int, int, bool]]) -> None:
        for start in range(0, len(items), 512):
            chunk = items[start:start + 512]
            lb.n_tokens = len(chunk)
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, pos, 1
                lb.seq_id[i][0], lb.logits[i] = seq, logits
            if llama_cpp.llama_decode(ctx, lb) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")

    if layout == "unified+idle":
        run([(1000 + p % 5000, p, batch, False) for p in range(IDLE_CELLS)])
    prompt = list(range(1000, 1032))
    start = time.perf_counter()
    run([(t, p, s, p == len(prompt) - 1) for s in range(batch) for p, t in enumerate(prompt)])
    rows = [s * len(prompt) + len(prompt) - 1 for s in range(batch)]
    for step in range(n):
        nxt = [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, r),
                                                   shape=(n_vocab,)))) for r in rows]
        run([(t, len(prompt) + step, s, True) for s, t in enumerate(nxt)])
        rows = list(range(batch))
    rate = batch * n / (time.perf_counter() - start)
    llama_cpp.llama_batch_free(lb)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return rate


# -- thread pools: single stream, each in its own process ---------------------------


def worker(variant: str, gguf: Path, n: int, threads: int) -> float:
    """Lanner's single-stream tok/s in this process, after ``variant``'s set-up."""
    from lanner.backends.llamacpp import LlamaCppBackend
    from lanner.engine.types import Request, collect

    others: list[object] = []
    if variant == "after llama-cpp-python":
        from llama_cpp import Llama

        llm = Llama(str(gguf), n_ctx=512, n_threads=threads, verbose=False)
        llm.create_completion(PROMPT, max_tokens=16, temperature=0)  # decodes on this thread
        others.append(llm)
    if variant == "beside an idle backend":
        others.append(LlamaCppBackend(gguf, n_ctx=512, n_threads=threads, n_seq_max=1))
    backend = LlamaCppBackend(gguf, n_ctx=512, n_threads=threads, n_seq_max=1)
    collect(backend.stream(Request(PROMPT, max_tokens=8, temperature=0)))  # warm-up
    start = time.perf_counter()
    out = collect(backend.stream(Request(PROMPT, max_tokens=n, temperature=0)))
    elapsed = time.perf_counter() - start
    assert out.finish is not None
    return out.finish.usage.completion_tokens / elapsed


def in_process(variant: str, gguf: Path, n: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--worker", variant, "--gguf", str(gguf),
           "--tokens", str(n), "--threads", str(threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["tok_s"])


# -- rounds and report -------------------------------------------------------------


def rounds(title: str, variants: list[str], measure: object, count: int) -> None:
    """Run every variant once per round, in turn; print medians and ratios."""
    results: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(count):
        for v in variants:
            rate = measure(v)  # type: ignore[operator]
            results[v].append(rate)
            print(f"  round {r + 1}  {v:<28} {rate:7.1f} tok/s", flush=True)
    base = variants[0]
    print(f"{title}: medians of {count} round(s)")
    for v in variants:
        ratios = [a / b for a, b in zip(results[v], results[base], strict=True)]
        print(f"  {v:<28} {statistics.median(results[v]):7.1f} tok/s   "
              f"/ {base}: {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("kv", "threads", "both"), default="both")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="32 tokens, one round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tok_s": worker(args.worker, args.gguf, args.tokens, args.threads)}))
        return
    if args.quick:
        args.tokens, args.rounds = 32, 1
    with tempfile.TemporaryDirectory() as home:
        gguf = model_path(args.model, Path(home))
        print(f"{gguf.name}, {args.threads} threads, {args.tokens} new tokens, "
              f"{time.strftime('%Y-%m-%d')}")
        if args.part in ("kv", "both"):
            cells = IDLE_CELLS + args.batch * (32 + args.tokens) + 64
            rounds(f"KV layout, {args.batch} sequences decoded together",
                   ["split", "unified", "unified+idle"],
                   lambda v: raw_decode(gguf, v, args.batch, args.tokens, args.threads, cells),
                   args.rounds)
        if args.part in ("threads", "both"):
            rounds("Lanner single stream, by what else the process holds",
                   ["alone", "after llama-cpp-python", "beside an idle backend"],
                   lambda v: in_process(v, gguf, args.tokens, args.threads), args.rounds)


if __name__ == "__main__":
    main()
