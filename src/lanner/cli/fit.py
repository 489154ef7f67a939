"""``lanner fit MODEL``: will it fit, before any download. The total first,
then the breakdown, the verdict and what to change."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from lanner import paths

if TYPE_CHECKING:
    from lanner.catalog.fit import FitReport

WONT_FIT_EXIT = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit", help="memory a model needs, and whether it fits here",
        description="Plan a model's memory (weights + KV cache + activations + overhead) "
        "without loading it: a local model from its real config and file sizes, or a "
        "catalog entry (`lanner models --catalog`). Exit status 3 when it won't fit.")
    p.add_argument("model", help="catalog name or Hub id (falcon-40b, tiiuae/falcon-7b), "
                   "or a local model's name or path")
    p.add_argument("--quant", metavar="Q", help="weights: bf16, int8, int4 (bitsandbytes), "
                   "q8_0, q4_k_m, ... (default: bf16, or a local model's own type)")
    p.add_argument("--context", type=int, metavar="N",
                   help="tokens per sequence (default: the model's context length)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="sequences held at once (default 1)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", metavar="SIZE",
                       help="GPU memory, e.g. 80GB or 8x80GB; RAM beyond it counts as offload")
    where.add_argument("--ram", metavar="SIZE",
                       help="run on CPU in this much RAM (default: this machine's)")
    p.add_argument("--kv-dtype", default="f16", metavar="D",
                   help="KV cache type: f16 (default), bf16, fp32, fp8, q8_0, q4_0")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.catalog import fit

    s = fit.subject(args.model, paths.home(args.home))
    report = fit.fit(s, fit.budget(args.gpu, args.ram), quant=args.quant, context=args.context,
                     batch=args.batch, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps(_json(report), indent=2))
    else:
        for line in render(report):
            print(line)
    return WONT_FIT_EXIT if report.verdict == "won't fit" else 0


def render(r: FitReport) -> list[str]:
    """The lines ``lanner fit`` prints (also used by ``lanner serve``'s refusal)."""
    from lanner.catalog.planner import gb, quant

    p, a = r.plan, r.subject.arch
    q = quant(p.quant)
    kept = " (embeddings in 16 bits)" if q.keeps_embeddings else ""
    real = " (file size)" if r.subject.weights == p.weights else ""
    heads = f"{a.kv_heads} KV head{'s' if a.kv_heads > 1 else ''}"
    window = f"; {a.sliding_window}-token window" if a.sliding_window else ""
    lines = [
        f"total: {gb(p.total)}",
        f"  weights      {gb(p.weights):>10}  {p.parameters / 1e9:.2f}B parameters, "
        f"{p.quant}{kept}{real}",
        f"  KV cache     {gb(p.kv_cache):>10}  {p.context} tokens x {p.batch} sequence(s); "
        f"{a.layers} layers x {heads} x {a.head_dim} dims, {p.kv_dtype}{window} "
        f"({p.kv_bytes_per_token / 1e3:,.0f} KB a token)",
        f"  activations  {gb(p.activations):>10}  one forward pass over the prompt",
        f"  overhead     {gb(p.overhead):>10}  20% of the weights (runtime, allocator)",
    ]
    lines.append(f"{r.subject.name} ({r.subject.where}): {r.verdict} {_on(r)}")
    if r.verdict != "fits":
        if 0 < r.largest_context < p.context:
            lines.append(f"  longest context that fits at {p.quant}: {r.largest_context} tokens "
                         f"(--context {r.largest_context})")
        if r.better_quant is not None:
            lines.append(f"  most precise quantisation that fits: --quant "
                         f"{r.better_quant.quant} ({gb(r.better_quant.total)})")
        elif r.shorter is not None:
            lines.append(f"  at this context no quantisation fits; --quant {r.shorter[0]} fits "
                         f"--context {r.shorter[1]}")
        elif r.largest_context == 0:
            lines.append("  no quantisation fits; more memory or more GPUs (e.g. --gpu 8x80GB)")
    return lines


def _on(r: FitReport) -> str:
    b = r.budget
    if b.gpu:
        return f"on {b.gpu_label} of GPU memory (+ {b.ram_label} of RAM for offload)"
    return f"in {b.ram_label} of RAM"


def _json(r: FitReport) -> dict[str, object]:
    return {"model": r.subject.name, "source": r.subject.where, **asdict(r.plan),
            "total": r.plan.total, "verdict": r.verdict, "budget": asdict(r.budget),
            "largest_context": r.largest_context,
            "better_quant": r.better_quant.quant if r.better_quant else None}
