"""``lanner run --strategy``: flags and output for inference strategies; not a verb."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from lanner.errors import InvalidRequest

if TYPE_CHECKING:
    from lanner.chat.session import ChatSession
    from lanner.engine.model import Model

# lanner.chat.strategies.STRATEGIES less "plain" (plain is a run without the flag)
CHOICES = ("show-work", "self-consistency", "check-revise")


def add_strategy_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("strategies")
    g.add_argument("--strategy", choices=CHOICES,
                   help="show-work: worked steps for maths/reasoning, final answer extracted; "
                        "self-consistency: majority vote over --samples worked answers; "
                        "check-revise: draft, critique, revision")
    g.add_argument("--samples", type=int, default=5,
                   help="self-consistency: how many answers to sample (default 5)")


def run_with_strategy(args: argparse.Namespace, model: Model, session: ChatSession,
                      prompt: str) -> int:
    """One prompt answered with ``args.strategy``, logged in ``session``'s conversation."""
    from lanner.chat.strategies import run_strategy

    if args.raw:
        raise InvalidRequest("--strategy", "strategies need the chat template; drop --raw")
    print(f"[{args.strategy}] thinking...", file=sys.stderr)
    result = run_strategy(model, [*session.messages, {"role": "user", "content": prompt}],
                          args.strategy, samples=args.samples, store=session.store,
                          conversation_id=session.conversation_id, **session.options)
    if args.json:
        print(json.dumps({"model": model.name, "strategy": result.strategy, "text": result.text,
                          "answer": result.answer, "votes": result.votes,
                          "calls": len(result.calls),
                          "conversation_id": session.conversation_id}, ensure_ascii=False))
        return 0
    print(result.text)
    if result.votes:
        top = max(result.votes.values())
        print(f"[self-consistency] {top} of {args.samples} samples agree on {result.answer}",
              file=sys.stderr)
    elif result.answer is not None:
        print(f"[{args.strategy}] final answer: {result.answer}", file=sys.stderr)
    return 0
