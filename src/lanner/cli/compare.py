"""``lanner compare -m A -m B "prompt"``: several models answer the same prompt,
shown side by side as they stream (one after another when not on a terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner.cli import options
from lanner.cli.columns import Columns
from lanner.engine.types import TextDelta
from lanner.errors import InvalidRequest

if TYPE_CHECKING:
    from lanner.evals.compare import Answer, Comparison


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="answer a prompt with several models, side by side",
                       description="Put one prompt (or each line of a file) to several "
                       "models and show their answers side by side. Every answer is logged.")
    p.add_argument("-m", "--model", dest="models", action="append", metavar="MODEL",
                   help="a model to compare (give two or more)")
    p.add_argument("prompt", nargs="?", help="the prompt; - reads it from standard input")
    p.add_argument("-f", "--file", type=Path, help="one prompt per line (blank lines skipped)")
    p.add_argument("-s", "--system", help="system prompt, the same for every model")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.evals.compare import Comparison, check_names

    prompts = read_prompts(args.prompt, args.file)
    names = args.models or []
    check_names(names, least=2, what="compare")
    sampling = model_options(args, "compare")
    models = [options.load_model(args, name) for name in names]
    store = options.open_store(args)
    for number, prompt in enumerate(prompts, 1):
        if len(prompts) > 1 and not args.json:
            print(f"\n### Prompt {number}/{len(prompts)}: {prompt}\n")
        comparison = Comparison(models, prompt, store=store, system=args.system,
                                options=sampling)
        if args.json:
            print(json.dumps({"prompt": prompt, "answers": [_json(a) for a in comparison.run()]},
                             ensure_ascii=False))
        else:
            show(comparison, [m.name for m in models])
            print(summary(comparison.answers, [m.name for m in models]))
    return 0


def model_options(args: argparse.Namespace, verb: str) -> dict[str, Any]:
    """The sampling flags; token probabilities have no place in columns."""
    if args.show_probs is not None:
        raise InvalidRequest("--show-probs", f"is not supported by `lanner {verb}`")
    return options.sampling_options(args)


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompt, or the file's non-blank lines; exactly one of them."""
    if (prompt is None) == (file is None):
        raise InvalidRequest("prompt", "give a prompt or --file (one prompt per line), not both")
    if file is None:
        return [options.read_prompt(prompt or "")]
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest("--file", f"cannot read {file}: {exc}") from exc
    prompts = [line for line in lines if line]
    if not prompts:
        raise InvalidRequest("--file", f"{file} has no prompts (one per line)")
    return prompts


def show(comparison: Comparison, titles: list[str]) -> None:
    """Stream the answers into columns headed by ``titles``."""
    columns = Columns(titles, sys.stdout)
    try:
        for index, event in comparison.stream():
            if isinstance(event, TextDelta):
                columns.add(index, event.text)
    finally:
        columns.close()


def summary(answers: list[Answer], titles: list[str]) -> str:
    """One line: tokens and speed of each answer."""
    parts = []
    for title, answer in zip(titles, answers, strict=True):
        if answer.finish is None:
            parts.append(f"{title}: cut short")
            continue
        tokens, seconds = answer.finish.usage.completion_tokens, answer.finish.timings.total_s
        speed = f", {tokens / seconds:.1f} tok/s" if seconds > 0 else ""
        parts.append(f"{title}: {tokens} tokens in {seconds:.1f} s{speed}")
    return "(" + "; ".join(parts) + ")"


def _json(answer: Answer) -> dict[str, Any]:
    finish = answer.finish
    return {"model": answer.model, "text": answer.text,
            "finish_reason": finish.reason if finish else "cancelled",
            "completion_tokens": finish.usage.completion_tokens if finish else None,
            "total_s": finish.timings.total_s if finish else None,
            "log_id": answer.log_id, "conversation_id": answer.conversation_id}
