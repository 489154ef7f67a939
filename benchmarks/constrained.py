"""Constrained vs unconstrained JSON from the bundled model, in one run: for each
of 5 schemas, N sampled answers to the same prompts with and without the
schema constraint; how many parse and validate, and decode tokens/s of each.

Usage: python benchmarks/constrained.py [--n 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jsonschema

import lanner
from lanner.engine import constrain

CASES = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())


def valid(text: str, schema: dict[str, object]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def run(model: lanner.Model, n: int, constrained: bool) -> tuple[int, int, float]:
    """(valid outputs, outputs, tokens/s) over every schema and seed."""
    ok = total = tokens = 0
    seconds = 0.0
    for case in CASES.values():
        options = {"constraint": constrain.json_schema(case["schema"])} if constrained else {}
        messages = [{"role": "user", "content": case["prompt"] + " Answer in JSON."}]
        for seed in range(n):
            start = time.perf_counter()
            events = list(model.chat_stream(messages, seed=seed, temperature=1.0,
                                            max_tokens=300, **options))
            seconds += time.perf_counter() - start
            text = "".join(getattr(e, "text", "") for e in events)
            tokens += events[-1].usage.completion_tokens  # type: ignore[union-attr]
            ok += valid(text, case["schema"])
            total += 1
    return ok, total, tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="answers per schema")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        model = lanner.load("smollm2", home=home)
        model.generate("warm up", max_tokens=4)
        print(f"constrained decoding, smollm2, 5 schemas x {args.n} sampled answers")
        rates = {}
        for constrained in (False, True):
            ok, total, rate = run(model, args.n, constrained)
            rates[constrained] = rate
            label = "with schema" if constrained else "unconstrained"
            print(f"  {label:<14} valid {ok}/{total}   {rate:6.1f} tok/s")
        print(f"  constrained / unconstrained tokens/s = {rates[True] / rates[False]:.2f}")


if __name__ == "__main__":
    main()
