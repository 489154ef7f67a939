"""``lanner``: one thin module per verb. Each module exposes ``register(sub)``
and ``run(args) -> int``; this module only parses and maps errors to exits."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from lanner import __version__
from lanner.errors import LannerError

VERBS = (
    "run", "chat", "models", "chat_format", "logs", "serve",
    "ingest", "ask", "collections", "forget", "pull", "add", "rm", "do", "eval",
    "compare", "arena", "tune", "merge", "fit", "info", "remote",
)
VERSION = f"lanner {__version__}"


def build_parser(verbs: Sequence[str] = VERBS) -> argparse.ArgumentParser:
    """The parser with ``verbs``' subcommands (module names; all by default)."""
    parser = argparse.ArgumentParser(
        prog="lanner",
        description="Run open-weight language models on your own hardware.",
    )
    parser.add_argument("--version", action="version", version=VERSION)
    parser.add_argument(
        "--home", default=None,
        help="data folder for logs and caches (default: $LANNER_HOME or the user data dir)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in verbs:
        importlib.import_module(f"lanner.cli.{verb}").register(sub)
    return parser


def named_verb(argv: Sequence[str]) -> str | None:
    """The module of the verb ``argv`` runs, when it names a known one before
    any help or version flag (``--home DIR`` may come first); else None."""
    words = iter(argv)
    for word in words:
        if word == "--home":
            next(words, None)
        elif not word.startswith("-"):
            module = word.replace("-", "_")
            return module if module in VERBS else None
        elif not word.startswith("--home="):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # without building every verb's parser (~80 ms)
        print(VERSION)
        return 0
    # Only the named verb's parser: registering all of them imports every verb
    # module, ~50 ms of a one-shot `lanner run`. Help, errors about the verb
    # itself and a bare `lanner` get the whole parser.
    verb = named_verb(argv)
    parser = build_parser(VERBS if verb is None else (verb,))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code: int = args.func(args)
        return code
    except LannerError as exc:
        print(f"lanner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


QUICK_EXIT = ("run",)
"""Verbs whose process ends without the interpreter's teardown (``console_main``)."""


def console_main() -> None:
    """The ``lanner`` command.

    After a one-shot verb (``QUICK_EXIT``) the process exits as Python would
    (threads joined, every exit handler run, output flushed) but skips the
    interpreter's teardown, module by module, which would add about 40 ms
    after the answer's last token (docs/benchmarks.md). The verb closes what
    it opened, so the teardown has nothing left to do but free memory.
    """
    argv = sys.argv[1:]
    if named_verb(argv) not in QUICK_EXIT:
        sys.exit(main(argv))
    status = [1]  # an uncaught exception exits 1, as Python would
    atexit.register(_end_process, status)
    try:
        status[0] = main(argv)
    except SystemExit as exc:  # argparse's errors (2) and --help (0)
        status[0] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    sys.exit(status[0])


def _end_process(status: list[int]) -> None:
    """An exit handler that ends the process: the handlers registered before
    it (which would run after it) first, then the flushed output."""
    atexit.unregister(_end_process)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe takes nothing more
            stream.flush()
    os._exit(status[0])


if __name__ == "__main__":
    console_main()
