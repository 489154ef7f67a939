"""Flags and output shared by the verbs that let a model call tools
(``run --tool``, ``chat --tools``); not a verb itself.

The tool modules (pydantic among them) are imported only when a tool is used,
so ``lanner --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from lanner.cli import render
from lanner.engine.types import Event, Finish, TextDelta
from lanner.errors import InvalidRequest

if TYPE_CHECKING:
    from lanner.chat.session import ChatSession
    from lanner.engine.model import Model
    from lanner.tools.loop import LoopEvent, ToolLoopResult
    from lanner.tools.schema import Tool

BUILTIN_TOOLS = ("python",)  # lanner.tools.loading.BUILTIN, named here to stay cheap
DEFAULT_MAX_STEPS = 5
_SHOWN = 400  # characters of a tool result echoed to the terminal


def add_tool_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tools")
    g.add_argument("--tool", "--tools", dest="tool", action="append", metavar="SPEC",
                   help="let the model call a tool: module:function, file.py:function, or "
                        f"a built-in ({', '.join(BUILTIN_TOOLS)}: the sandboxed code "
                        "interpreter); repeatable")
    g.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"most rounds of tool calls per answer (default {DEFAULT_MAX_STEPS})")
    g.add_argument("-y", "--yes", action="store_true",
                   help="run the python tool's code without asking each time")


def load_tools(args: argparse.Namespace) -> list[Tool]:
    from lanner.tools.loading import load_tool
    from lanner.tools.python_tool import ask_on_terminal

    if args.max_steps < 1:
        raise InvalidRequest("--max-steps", f"must be at least 1, got {args.max_steps}")
    return [load_tool(spec, yes=args.yes, confirm=ask_on_terminal) for spec in args.tool]


def show_event(event: LoopEvent) -> None:
    """Tool activity on stderr, so stdout carries only the model's text."""
    from lanner.tools.loop import ToolCallEvent, ToolResultEvent

    if isinstance(event, ToolCallEvent):
        print(f"\n[tool call] {event.call.name}({event.call.arguments})", file=sys.stderr)
    elif isinstance(event, ToolResultEvent):
        text = event.result if len(event.result) <= _SHOWN else event.result[:_SHOWN] + " ..."
        print(f"[tool result] {text}", file=sys.stderr)


def run_with_tools(args: argparse.Namespace, model: Model, session: ChatSession,
                   prompt: str) -> int:
    """``lanner run --tool``: the tool loop for one prompt, logged in ``session``'s
    conversation."""
    from lanner.tools.loop import ToolLoop

    if args.raw:
        raise InvalidRequest("--tool", "tools need the chat template; drop --raw")
    loop = ToolLoop(model, load_tools(args), max_steps=args.max_steps, store=session.store,
                    conversation_id=session.conversation_id, **session.options)
    messages = [*session.messages, {"role": "user", "content": prompt}]
    if args.json:
        result = loop.run(messages)
        print(json.dumps(_result_json(model.name, result, loop.conversation_id),
                         ensure_ascii=False))
        return 0
    stream = loop.stream(messages)
    with contextlib.closing(stream):  # logged before the caller closes the store
        render.stream_text(_showing_tools(stream), sys.stdout)
    sys.stdout.write("\n")
    if loop.result is not None and loop.result.stopped == "max_steps":
        print(f"[stopped after {args.max_steps} rounds of tool calls]", file=sys.stderr)
    return 0


def with_tools(args: argparse.Namespace, session: ChatSession) -> ChatSession:
    """``lanner chat --tools``: the session, with tools if any were asked for."""
    if not args.tool:
        return session
    from lanner.tools.session import ToolSession

    return ToolSession.with_tools(session, load_tools(args), max_steps=args.max_steps,
                                  on_event=show_event)


def _showing_tools(events: Iterable[LoopEvent]) -> Iterator[Event]:
    """The text events; tool activity is printed on the way."""
    for event in events:
        if isinstance(event, TextDelta | Finish):
            yield event
        else:
            show_event(event)


def _result_json(model: str, result: ToolLoopResult,
                 conversation_id: str | None) -> dict[str, Any]:
    return {"model": model, "text": result.answer, "stopped": result.stopped,
            "steps": result.steps, "conversation_id": conversation_id,
            "tool_calls": [{**c.to_openai(), "result": r}
                           for c, r in zip(result.calls, result.results, strict=True)]}
