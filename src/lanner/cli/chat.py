"""``lanner chat [MODEL]``: an interactive, multi-turn conversation.

Ctrl-C while the model answers stops that answer, not the program; Ctrl-D or
/exit leaves. Every turn is logged; ``--continue`` resumes the last conversation.
``/context`` shows how full the context window is; past 90% a warning says so,
and a message that would not fit drops the oldest turns (never the system
prompt) with a notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner.cli import options, render, tooling
from lanner.errors import InvalidRequest, LannerError

if TYPE_CHECKING:
    from lanner.chat.session import ChatSession, Dropped
    from lanner.rag.library import Library

HELP = """Commands:
  /reset        forget the conversation and start a new one (the log keeps it)
  /save [FILE]  save the conversation as JSON (default: conversation-<id>.json)
  /context      how much of the model's context window the conversation fills
  /help         this text
  /exit         leave (or Ctrl-D)"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model interactively")
    p.add_argument("model", nargs="?", help="model name or path (default: smollm2)")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("-c", "--continue", dest="resume", action="store_true",
                   help="resume the last conversation")
    p.add_argument("--conversation", help="resume this conversation id")
    p.add_argument("--collection", help="answer from this document collection, with "
                   "checked citations (see `lanner ingest`)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="with --collection: show every query used for retrieval")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    tooling.add_tool_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sampling = options.sampling_options(args)
    finish_loading = options.start_loading(args, args.model)
    store = options.open_store(args)  # while the weights load
    model = finish_loading()
    session = _session(args, model, store, sampling)
    session.on_drop = _show_dropped
    session = tooling.with_tools(args, session)
    library = None
    if args.collection:
        from lanner.rag.library import Library  # numpy and the embedder: only with documents

        library = Library.open(home=args.home)
    print(f"Chatting with {model.name} ({model.backend.name}). /help for commands, "
          "Ctrl-D to leave.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(line, session) == "exit":
                return 0
            continue
        if library is not None:
            _answer_from_documents(session, line, library, args.collection, args.verbose)
        else:
            _answer(session, line, show_probs=args.show_probs is not None)
        _warn_if_full(session)


def _session(args: argparse.Namespace, model: Any, store: Any,
             sampling: dict[str, Any]) -> ChatSession:
    from lanner.chat.session import ChatSession

    conversation = args.conversation
    if args.resume and not conversation:
        if store is None:
            raise InvalidRequest("--continue", "cannot resume with --no-log")
        conversation = store.last_conversation_id()
        if conversation is None:
            raise InvalidRequest("--continue", "there is no earlier conversation to resume")
    if conversation:
        session = ChatSession.resume(model, store, conversation, options=sampling)
        print(f"Resuming conversation {conversation} "
              f"({sum(m['role'] == 'user' for m in session.messages)} turns).", file=sys.stderr)
        return session
    return ChatSession(model, store, system=args.system, options=sampling)


def _answer(session: ChatSession, line: str, show_probs: bool) -> None:
    events = session.send(line)
    try:
        if show_probs:
            render.stream_probs(events)
        else:
            render.stream_text(events)
    except KeyboardInterrupt:
        events.close()  # frees the model's slot; the partial turn is logged
        print("\n[stopped]", file=sys.stderr)
        return
    except LannerError as exc:
        print(f"lanner: error: {exc}", file=sys.stderr)
        return
    print()


def _answer_from_documents(session: ChatSession, line: str, library: Library,
                           collection: str, verbose: bool) -> None:
    """Rewrite a follow-up into a standalone query, retrieve, answer with
    citations, then list the sources and any citation that failed its check."""
    from lanner.cli.ask import print_sources, show_queries
    from lanner.rag.answer import finish

    history = list(session.messages)
    try:
        prepared = library.prepare(session.model, line, collection, history=history,
                                   **session.options)
    except LannerError as exc:
        print(f"lanner: error: {exc}", file=sys.stderr)
        return
    if verbose:
        show_queries(prepared, sys.stderr)
    events = session.send(prepared.prompt)
    try:
        text = render.stream_text(events, sys.stdout).text
    except KeyboardInterrupt:
        events.close()  # type: ignore[attr-defined]  # a generator: frees the model's slot
        print("\n[stopped]", file=sys.stderr)
        return
    except LannerError as exc:
        print(f"lanner: error: {exc}", file=sys.stderr)
        return
    finally:
        # The history keeps the user's words, not the passages: they would
        # fill the context window within a few turns.
        _replace_last_user(session, prepared.prompt, line)
    print()
    print_sources(finish(prepared, text), sys.stderr)


def _command(line: str, session: ChatSession) -> str | None:
    name, _, arg = line.strip().partition(" ")
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name == "/reset":
        session.reset()
        print("Conversation reset.", file=sys.stderr)
    elif name == "/save":
        _save(session, arg.strip())
    elif name == "/context":
        print(_context_line(session), file=sys.stderr)
    elif name == "/help":
        print(HELP, file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists them", file=sys.stderr)
    return None


WARN_AT = 0.9


def _context_line(session: ChatSession) -> str:
    """``context: 1234 of 8192 tokens (15%)``, and the trained context and
    RoPE scaling where they differ from the window."""
    use, backend = session.context(), session.model.backend
    text = f"context: {use.tokens} of {use.window} tokens ({use.fraction:.0%})"
    trained = backend.metadata.n_ctx_train
    scaling = getattr(backend, "rope_scaling", None)
    if scaling is not None:
        text += f"; {scaling.type} RoPE scaling x{scaling.factor:g} of the trained {trained}"
    elif trained and trained != use.window:
        text += f"; trained context {trained}"
    return text


def _warn_if_full(session: ChatSession) -> None:
    if session.context().fraction >= WARN_AT:
        print(f"[{_context_line(session)}: the oldest turns will be dropped to make room; "
              "/reset starts afresh]", file=sys.stderr)


def _show_dropped(dropped: Dropped) -> None:
    turns = f"{dropped.turns} oldest turn{'s' if dropped.turns != 1 else ''}"
    print(f"[context window full: dropped the {turns} ({len(dropped.messages)} messages) to "
          f"fit {dropped.window} tokens; the system prompt stays, the log keeps them all]",
          file=sys.stderr)


def _replace_last_user(session: ChatSession, sent: str, line: str) -> None:
    for message in reversed(session.messages):
        if message["role"] == "user":
            if message["content"] == sent:
                message["content"] = line
            return


def _save(session: ChatSession, where: str) -> None:
    path = Path(where or f"conversation-{session.conversation_id or 'unsaved'}.json")
    if path.exists():
        print(f"lanner: error: {path} exists; not overwriting it", file=sys.stderr)
        return
    data = {"model": session.model.name, "conversation_id": session.conversation_id,
            "messages": session.messages}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"Saved {len(session.messages)} messages to {path}", file=sys.stderr)
