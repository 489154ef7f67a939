"""``lanner run MODEL "prompt"``: one answer, streamed to stdout."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING

from lanner.cli import options, render, strategy_options, tooling

if TYPE_CHECKING:
    from lanner.chat.session import ChatSession


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="answer one prompt and exit",
                       description="Answer one prompt with a model, streaming the text.")
    p.add_argument("model", help="short name (e.g. smollm2), .gguf file or model folder")
    p.add_argument("prompt", help="the prompt; - reads it from standard input")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    tooling.add_tool_flags(p)
    strategy_options.add_strategy_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = options.sampling_options(args)
    # One answer at a time, unless a strategy samples several at once.
    finish_loading = options.start_loading(args, args.model,
                                           streams=None if args.strategy else 1)
    # While the weights load: the imports, the prompt and the log.
    from lanner.chat.session import ChatSession

    prompt = options.read_prompt(args.prompt)
    store = options.open_store(args)
    try:
        session = ChatSession(finish_loading(), store, system=args.system, options=sampling)
        return _answer(args, session, prompt)
    finally:
        if store is not None:
            store.close()


def _answer(args: argparse.Namespace, session: ChatSession, prompt: str) -> int:
    model = session.model
    if args.tool:
        return tooling.run_with_tools(args, model, session, prompt)
    if args.strategy:
        return strategy_options.run_with_strategy(args, model, session, prompt)
    events = session.complete(prompt) if args.raw else session.send(prompt)
    with contextlib.closing(events):  # a reader gone mid-answer: the part said is logged now
        if args.json:
            from lanner.engine.types import collect

            result = collect(events)
            print(render.completion_json(model.name, result,
                                         conversation_id=session.conversation_id))
        elif args.show_probs is not None:
            render.stream_probs(events)
        else:
            render.stream_text(events)
            sys.stdout.write("\n")
    return 0
