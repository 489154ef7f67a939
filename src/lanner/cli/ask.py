"""``lanner ask "question"``: an answer from a document collection, with its
citations checked and its sources listed by file, page and character span.

On a terminal the answer is printed as the model writes it, then its sources
and the citations that failed their check; piped (or with ``--json``) it is
printed whole, once checked, with unverified citations marked ``[n?]``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Generator
from typing import TYPE_CHECKING, TextIO

from lanner.cli import options
from lanner.cli.rag_options import MODES, add_collection_flags, open_library

if TYPE_CHECKING:
    from lanner.engine.types import Event
    from lanner.rag.answer import Answer, Prepared


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer a question from your documents, with citations",
                       description="Retrieve passages from a collection and answer with "
                       "numbered citations; every citation is checked against its passage.")
    p.add_argument("question", help="the question; - reads it from standard input")
    add_collection_flags(p)
    p.add_argument("-m", "--model", help="model name or path (default: smollm2)")
    p.add_argument("-k", type=int, default=5, help="passages to retrieve (default 5)")
    p.add_argument("--mode", choices=MODES, default="hybrid",
                   help="retrieval: hybrid (default), vector or keyword")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("--show-context", action="store_true",
                   help="print exactly what the model was given before the answer")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show every query used for retrieval")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.chat.session import ChatSession
    from lanner.engine.types import collect
    from lanner.rag.answer import finish

    question = options.read_prompt(args.question)
    sampling = options.sampling_options(args)
    library = open_library(args)
    try:
        model = options.load_model(args, args.model)
        prepared = library.prepare(model, question, args.collection, k=args.k,
                                   mode=args.mode, system=args.system, **sampling)
    finally:
        library.close()
    if args.verbose:
        show_queries(prepared)
    if args.show_context:
        show_context(prepared.messages)
    session = ChatSession(model, options.open_store(args), system=args.system,
                          options=sampling)
    events = session.send(prepared.prompt)
    if not args.json and sys.stdout.isatty():
        return stream_answer(prepared, events)
    answer = finish(prepared, collect(events).text)
    if args.json:
        print(json.dumps(answer.to_json(), ensure_ascii=False))
    else:
        print_answer(answer)
    return 0


def stream_answer(prepared: Prepared, events: Generator[Event, None, None],
                  out: TextIO | None = None) -> int:
    """The answer's words as they come, then its sources and the citations
    that failed their check (listed, since the printed text is unmarked).
    Ctrl-C stops the model; what it said is logged."""
    from lanner.cli import render
    from lanner.rag.answer import finish

    out = out or sys.stdout
    try:
        text = render.stream_text(events, out).text
    except KeyboardInterrupt:
        events.close()  # frees the model's slot; the partial turn is logged
        print("\n[stopped]", file=sys.stderr)
        return 130
    out.write("\n\n")
    print_sources(finish(prepared, text), out)
    return 0


def show_queries(prepared: Prepared, out: TextIO | None = None) -> None:
    """Every query retrieval searched for, and a rewrite it did not use."""
    out = out or sys.stderr
    lines = prepared.retrieval.describe() if prepared.retrieval else [
        f"retrieval query: {prepared.query}"]
    for line in lines:
        out.write(f"[{line}]\n")


def show_context(messages: list[dict[str, object]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write("----- context given to the model -----\n")
    for message in messages:
        out.write(f"[{message['role']}]\n{message['content']}\n")
    out.write("----- answer -----\n")


def print_answer(answer: Answer, out: TextIO | None = None) -> None:
    """The answer (unverified citations marked ``[n?]``), its sources, and
    why each flagged citation failed."""
    out = out or sys.stdout
    out.write(answer.marked_text().strip() + "\n\n")
    print_sources(answer, out)


def print_sources(answer: Answer, out: TextIO | None = None) -> None:
    """Each source by file, page and span; then the flagged citations."""
    out = out or sys.stdout
    cited = {c.number for c in answer.citations}
    if answer.sources:
        out.write("Sources:\n")
    for s in answer.sources:
        mark = "cited" if s.number in cited else "not cited"
        heading = f" ({s.heading})" if s.heading else ""
        out.write(f"  [{s.number}] {s.location}{heading} - {mark}\n")
    if not answer.citations:
        out.write("\nThe answer cites no passage: nothing in it is backed by your documents.\n")
    if answer.extracted:
        out.write("What the top passages say (extracted from the documents, not the "
                  "model's words):\n")
    for e in answer.extracted:
        out.write(f"  [{e.number}] \"{_short(e.text, 300)}\"\n")
    if answer.flagged:
        out.write("\nUnverified citations (marked ?; do not rely on them):\n")
    for c in answer.flagged:
        out.write(f"  [{c.number}?] {c.reason}: \"{_short(c.claim)}\"\n")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
