"""Quantised loading in the transformers backend: closeness, memory, speed.

GPU mode (the default; an NVIDIA GPU with CUDA and bitsandbytes): the bundled
SmolLM2 loaded by Lanner's transformers backend in bfloat16, ``--quant int8``
(bitsandbytes LLM.int8()) and ``--quant int4`` (bitsandbytes NF4), compared
with bfloat16 in one run:

- closeness: mean KL(bf16 || quantised) of the next-token distributions over a
  fixed text, top-1 agreement, and greedy answers identical to bf16's;
- memory: what loading added to GPU memory (``torch.cuda.memory_allocated``;
  the variants stay loaded side by side, so each is measured alone);
- speed: greedy tokens/s through ``backend.stream``.

Without CUDA it exits with status 2 and says what it needs (``--quant`` is
refused on a CPU). ``--cpu-dynamic`` measures the CPU alternative that was
tried and dropped: float32 against PyTorch's dynamic int8 of the linear
layers, applied to the loaded backend's model, the same measures, the two
interleaved prompt by prompt so that load from other processes hits both alike.

    .venv/bin/python benchmarks/quantised_loading.py                 # GPU
    .venv/bin/python benchmarks/quantised_loading.py --cpu-dynamic   # CPU
    ... --quick                                                       # fewer prompts/tokens
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "To make a cup of tea, first",
    "The main difference between a list and a tuple in Python is",
    "Photosynthesis is the process by which",
    "SELECT name FROM users WHERE",
]
DYNAMIC = "torch_dynamic_int8"
TEXT = ("Lanner is a workbench for open-weight language models. It runs models on your "
        "own hardware, logs every answer with its provenance, answers questions from your "
        "documents with citations, evaluates models on standard tasks and fine-tunes them "
        "with LoRA. The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein "
        "published four papers that changed physics: on the photoelectric effect, Brownian "
        "motion, special relativity and the equivalence of mass and energy.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dynamic", action="store_true",
                        help="CPU: float32 vs torch dynamic int8 (the dropped alternative)")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 32 tokens each")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt")
    parser.add_argument("--model", default="smollm2", help="model name or path")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    import torch

    prompts = PROMPTS[:4] if args.quick else PROMPTS
    n_tokens = args.tokens or (32 if args.quick else 96)
    if args.cpu_dynamic:
        variants = [("float32", {"dtype": "float32", "device": "cpu"}),
                    ("int8 (torch dynamic)", {"dtype": "float32", "device": "cpu",
                                              DYNAMIC: True})]
    else:
        if not torch.cuda.is_available():
            print("quantised_loading: needs an NVIDIA GPU with CUDA and bitsandbytes; this "
                  f"machine has no CUDA device (torch {torch.__version__}), and --quant is "
                  "refused on a CPU. --cpu-dynamic measures the CPU alternative instead.",
                  file=sys.stderr)
            return 2
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            print("quantised_loading: pip install bitsandbytes first", file=sys.stderr)
            return 2
        variants = [("bfloat16", {"dtype": "bfloat16", "device": "cuda"}),
                    ("int8 (bnb)", {"dtype": "bfloat16", "device": "cuda", "quant": "int8"}),
                    ("int4 (bnb nf4)", {"dtype": "bfloat16", "device": "cuda", "quant": "int4"})]
    results = run(args.model, variants, prompts, n_tokens, gpu=not args.cpu_dynamic)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run(model: str, variants: list[tuple[str, dict[str, Any]]], prompts: list[str],
        n_tokens: int, *, gpu: bool) -> list[dict[str, Any]]:
    import torch

    from lanner import paths
    from lanner.backends.transformers import TransformersBackend
    from lanner.engine.registry import resolve

    spec = resolve(model, paths.home())
    backends, results = [], []
    for label, options in variants:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        dynamic = options.pop(DYNAMIC, False)
        backend = TransformersBackend(spec.path, cache_dir=paths.home() / "converted", **options)
        if dynamic:  # in place: the backend's adapters and scheduler hold this model object
            torch.ao.quantization.quantize_dynamic(backend.model, {torch.nn.Linear},
                                                   dtype=torch.qint8, inplace=True)
        loaded_s = time.perf_counter() - start
        memory = (torch.cuda.memory_allocated() - before) if gpu else weight_bytes(backend.model)
        backends.append(backend)
        results.append({"variant": label, "load_s": round(loaded_s, 2),
                        "weights_mb": round(memory / 1e6, 1), "seconds": 0.0, "tokens": 0,
                        "answers": []})
    # Interleaved: each prompt runs on every variant before the next prompt.
    for prompt in prompts:
        for backend, result in zip(backends, results, strict=True):
            text, n, seconds = greedy(backend, prompt, n_tokens)
            result["answers"].append(text)
            result["tokens"] += n
            result["seconds"] += seconds
    reference = logprobs(backends[0], TEXT)
    for backend, result in zip(backends, results, strict=True):
        result["tok_s"] = round(result["tokens"] / result["seconds"], 1)
        other = logprobs(backend, TEXT)
        result["kl"] = round(kl(reference, other), 5)
        result["top1"] = round(float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
                               4)
        result["same_answers"] = sum(a == b for a, b in zip(result["answers"],
                                                            results[0]["answers"], strict=True))
        result["prompts"] = len(prompts)
    for r in results:
        r["speed_vs_first"] = round(r["tok_s"] / results[0]["tok_s"], 3)
    return results


def greedy(backend: Any, prompt: str, n_tokens: int) -> tuple[str, int, float]:
    from lanner.engine.types import Request, collect

    ids = backend.tokenize(prompt)
    request = Request(ids, max_tokens=n_tokens, temperature=0.0)
    start = time.perf_counter()
    result = collect(backend.stream(request))
    seconds = time.perf_counter() - start
    assert result.finish is not None
    return result.text, result.finish.usage.completion_tokens, seconds


def logprobs(backend: Any, text: str) -> Any:
    """(T, V) next-token log-probabilities over ``text``, float32 on the CPU."""
    import torch

    ids = torch.tensor([backend.tokenize(text)], device=backend.device)
    with torch.inference_mode():
        logits = backend.model(ids).logits[0].float()
    return logits.log_softmax(-1).cpu()


def kl(p_log: Any, q_log: Any) -> float:
    value = float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    return value if math.isfinite(value) else float("nan")


def weight_bytes(model: Any) -> int:
    """Bytes of the serialized state dict (dynamic int8 weights sit in packed
    params that ``parameters()`` does not list)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| variant | weights MB | tok/s | vs first | KL vs first | top-1 agree | "
            "same greedy answers | load s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['variant']} | {r['weights_mb']} | {r['tok_s']} | "
                    f"{r['speed_vs_first']}x | {r['kl']} | {r['top1']} | "
                    f"{r['same_answers']}/{r['prompts']} | {r['load_s']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
