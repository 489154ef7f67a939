"""Decode speed on the bundled model, 128 new tokens, greedy, in one run:

  llama-cpp-python direct  vs  Lanner's llama.cpp path (what `lanner run` does),
  HF generate fp32 / bf16  vs  Lanner's transformers path.

Each figure is the best of --repeats runs (the machines are shared and noisy);
tokens/s = completion tokens / wall time of the whole request (prompt included,
the same prompt for every path). Usage: python benchmarks/decode_speed.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lanner
from lanner.chat.session import ChatSession
from lanner.engine.registry import bundled_path
from lanner.store import Store

QUESTION = "Write a long, detailed essay about the history of the Roman Empire."
MESSAGES = [{"role": "user", "content": QUESTION}]


def best_rate(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    """(best tokens/s, tokens) over ``repeats`` timed runs after one warm-up."""
    run()
    best, tokens = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        best, tokens = max(best, n / (time.perf_counter() - start)), n
    return best, tokens


def measure_llama_cpp(side: str, name: str, n: int, repeats: int, home: Path) -> tuple[float, int]:
    """One side ("lanner" or "direct") on the GGUF file Lanner runs for ``name``."""
    model = lanner.load(name, home=str(home))
    ids = list(model.chat_request(MESSAGES, temperature=0, max_tokens=n).prompt)
    if side == "lanner":
        session = ChatSession(model, Store(home / "logs.db"),
                              options={"temperature": 0, "max_tokens": n})

        def run_lanner() -> int:
            session.reset()
            finish = list(session.send(QUESTION))[-1]
            return finish.usage.completion_tokens  # type: ignore[union-attr]

        return best_rate(run_lanner, repeats)
    from llama_cpp import Llama

    path, n_ctx = model.spec.path, model.backend.n_ctx
    model.close()
    direct = Llama(str(path), n_ctx=n_ctx, flash_attn=True, n_threads=os.cpu_count(),
                   n_batch=512, verbose=False)

    def run_direct() -> int:
        direct.reset()  # no prompt cache: both sides decode the prompt
        out = direct.create_completion(ids, max_tokens=n, temperature=0)
        return int(out["usage"]["completion_tokens"])  # type: ignore[index]

    return best_rate(run_direct, repeats)


def llama_cpp_paths(name: str, n: int, repeats: int, home: Path) -> dict[str, tuple[float, int]]:
    """Both sides on the same file, each in a fresh process: two llama.cpp thread
    pools in one process slow each other down (measured ~1.7x), which would
    measure the pools, not the paths."""
    label = f"{name} ({'f16' if name == 'smollm2' else 'Q4_1'})"
    spawn = multiprocessing.get_context("spawn")
    results = {}
    sides = (("lanner", "lanner, llama.cpp path"), ("direct", "llama-cpp-python direct"))
    for side, title in sides:
        with spawn.Pool(1) as pool:
            results[f"{title}, {label}"] = pool.apply(measure_llama_cpp,
                                                      (side, name, n, repeats, home))
    return results


def transformers_paths(n: int, repeats: int, home: Path) -> dict[str, tuple[float, int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lanner.backends.gguf_convert import converted_folder

    folder = converted_folder(bundled_path("smollm2"), home / "converted")  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    results = {}
    for dtype in ("float32", "bfloat16"):
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))

        def run_hf(hf: object = hf) -> int:
            with torch.inference_mode():
                out = hf.generate(ids, max_new_tokens=n, do_sample=False)  # type: ignore[attr-defined]
            return int(out.shape[1] - ids.shape[1])

        results[f"HF generate {dtype}"] = best_rate(run_hf, repeats)
        model = lanner.load(str(folder), home=str(home), dtype=dtype)

        def run_lanner(model: lanner.Model = model) -> int:
            events = list(model.chat_stream(MESSAGES, temperature=0, max_tokens=n))
            return events[-1].usage.completion_tokens  # type: ignore[union-attr]

        results[f"lanner, transformers path {dtype}"] = best_rate(run_lanner, repeats)
        model.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        results = llama_cpp_paths("smollm2-q4_1", args.tokens, args.repeats, home)
        results |= llama_cpp_paths("smollm2", args.tokens, args.repeats, home)
        if not args.skip_transformers:
            results |= transformers_paths(args.tokens, args.repeats, home)
    print(f"decode speed, SmolLM2-135M-Instruct, {args.tokens} new tokens, greedy, "
          f"{os.cpu_count()} cores, best of {args.repeats}")
    for name, (rate, tokens) in results.items():
        print(f"  {name:<50} {rate:8.1f} tok/s  ({tokens} tokens)")
    for label in [k.split("direct, ")[1] for k in results if "direct, " in k]:
        ratio = (results[f"lanner, llama.cpp path, {label}"][0]
                 / results[f"llama-cpp-python direct, {label}"][0])
        print(f"  lanner llama.cpp / llama-cpp-python direct, {label} = {ratio:.3f}"
              " (target >= 0.95)")
    for dtype in ("float32", "bfloat16"):
        if f"HF generate {dtype}" in results:
            ours = results[f"lanner, transformers path {dtype}"][0]
            r = ours / results[f"HF generate {dtype}"][0]
            print(f"  lanner transformers / HF generate ({dtype}) = {r:.3f}")


if __name__ == "__main__":
    main()
