"""Single-stream speed: LlamaCppBackend vs llama-cpp-python's own create_completion.

Same GGUF (bundled SmolLM2 Q4_1), same prompt, 128 greedy tokens, same threads,
context size and attention kernel; each side runs ``--repeat`` times,
interleaved so background load hits both alike, and the best run counts.

    PYTHONPATH=src python benchmarks/llamacpp_single.py [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

from llama_cpp import Llama

from lanner.backends.llamacpp import LlamaCppBackend
from lanner.engine.registry import bundled_path
from lanner.engine.types import Request, collect

PROMPT = "Once upon a time, in a small village by the sea,"
N_TOKENS = 128


def time_ours(backend: LlamaCppBackend) -> tuple[float, int]:
    start = time.perf_counter()
    out = collect(backend.stream(Request(PROMPT, max_tokens=N_TOKENS, temperature=0)))
    assert out.finish is not None
    return time.perf_counter() - start, out.finish.usage.completion_tokens


def time_reference(llm: Llama) -> tuple[float, int]:
    llm.reset()  # no prompt cache: both sides decode the prompt
    start = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=N_TOKENS, temperature=0)
    return time.perf_counter() - start, out["usage"]["completion_tokens"]  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    path = bundled_path("smollm2")
    if path is None:
        raise SystemExit("the bundled smollm2 model is not installed")
    ours = LlamaCppBackend(path, n_ctx=2048, n_threads=args.threads)
    ref = Llama(str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                flash_attn=True, verbose=False)
    time_ours(ours), time_reference(ref)  # warm up (page in the weights)
    best_ours = best_ref = 0.0
    for i in range(args.repeat):
        dt, n = time_ours(ours)
        best_ours = max(best_ours, n / dt)
        dt_ref, n_ref = time_reference(ref)
        best_ref = max(best_ref, n_ref / dt_ref)
        print(f"run {i + 1}: lanner {n / dt:7.1f} tok/s ({n} tokens)   "
              f"llama-cpp-python {n_ref / dt_ref:7.1f} tok/s ({n_ref} tokens)")
    print(f"best: lanner {best_ours:.1f} tok/s, llama-cpp-python {best_ref:.1f} tok/s, "
          f"ratio {best_ours / best_ref:.3f} (threads={args.threads})")
    ours.close()
    ref.close()


if __name__ == "__main__":
    main()
