"""`lanner logs`: show what was asked, what came back, and how it was made."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from lanner import paths

if TYPE_CHECKING:
    from lanner.store import Turn

DEFAULT_COUNT = 3
_SHORT_HASH = 12


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``logs`` verb to the main parser's subcommands."""
    parser = sub.add_parser(
        "logs",
        help="show logged prompts and responses with their provenance",
        description="Show the latest logged turns: prompt, response, model file hash, "
        "backend, chat format, sampling settings, seed, tokens and timings.",
    )
    parser.add_argument(
        "-n", "--count", type=_count, default=None, metavar="N",
        help=f"show the latest N turns; 0 shows all (default {DEFAULT_COUNT}, "
        "or the whole thread with --conversation)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array of full records")
    parser.add_argument(
        "--conversation", "--cid", metavar="ID", default=None,
        help="only this conversation, as a thread in order",
    )
    parser.add_argument("-m", "--model", metavar="NAME", default=None,
                        help="only turns from this model name")
    parser.set_defaults(func=run)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-n/--count: not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"-n/--count: must be 0 (all) or more, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Print the selected turns (oldest first) and return the exit code, 0."""
    from lanner.store import Store

    count = getattr(args, "count", None)
    conversation = getattr(args, "conversation", None)
    if count is None:
        count = 0 if conversation else DEFAULT_COUNT
    db = paths.db_path(paths.home(getattr(args, "home", None)))
    with Store(db) as store:
        turns = store.turns(
            limit=count or None, conversation_id=conversation, model=getattr(args, "model", None)
        )
    if getattr(args, "json", False):
        print(json.dumps([asdict(t) for t in turns], indent=2, ensure_ascii=False))
    elif not turns:
        filtered = conversation is not None or getattr(args, "model", None) is not None
        print("No logged turns match." if filtered else f"No turns logged yet (in {db}).")
    else:
        print("\n\n".join(format_turn(t) for t in turns))
    return 0


def format_turn(turn: Turn) -> str:
    """One turn as readable text: a provenance header, then the texts."""
    lines = [
        f"# {turn.created_at}  turn {turn.id}  conversation {turn.conversation_id}",
        f"model     {turn.model}  sha256 {turn.model_sha256[:_SHORT_HASH]}  {turn.model_path}",
        f"backend   {turn.backend} {turn.backend_version}{format_settings(turn)}",
        f"format    {turn.chat_format}  template sha256 {turn.chat_format_hash[:_SHORT_HASH]}",
        f"sampling  {format_sampling(turn.sampling, turn.seed)}",
        f"usage     {format_usage(turn)}",
    ]
    if turn.parent_id is not None:
        lines.append(f"step of   turn {turn.parent_id}")
    if turn.system:
        lines += ["", "## System", turn.system]
    lines += ["", "## Prompt", turn.prompt, "", "## Response", turn.response]
    return "\n".join(lines)


def format_settings(turn: Turn) -> str:
    """``  n_ctx 16384, rope yarn x2.0 of 8192`` (empty for turns logged before 5)."""
    s = turn.model_settings
    text = f"  n_ctx {s['n_ctx']}" if s.get("n_ctx") else ""
    rope = s.get("rope_scaling")
    if isinstance(rope, dict):
        text += f", rope {rope['type']} x{rope['factor']} of {rope['original_context']}"
    return text


def format_sampling(sampling: dict[str, object], seed: int | None) -> str:
    """``temperature=0.8 top_p=0.95 ... seed=42``; the seed from the turn itself."""
    parts = [f"{k}={json.dumps(v)}" for k, v in sampling.items() if k != "seed"]
    parts.append(f"seed={seed}" if seed is not None else "seed=none (random)")
    return " ".join(parts)


def format_usage(turn: Turn) -> str:
    """Token counts, finish reason and timings, with the decode rate."""
    text = (
        f"{turn.prompt_tokens} prompt + {turn.completion_tokens} completion tokens  "
        f"finish={turn.finish_reason}  ttft {turn.ttft_s:.3f} s  total {turn.total_s:.3f} s"
    )
    decode_s = turn.total_s - turn.ttft_s
    if turn.completion_tokens > 1 and decode_s > 0:
        # The first token's time is prefill; the rate counts the tokens after it.
        text += f"  ({(turn.completion_tokens - 1) / decode_s:.1f} tok/s)"
    if turn.cost is not None:
        text += f"  cost {turn.cost:.6g} {turn.currency or ''}".rstrip()
    return text
