"""Runs model-written code inside the sandbox (standard library only).

Usage: ``python -I sandbox_runner.py RESULT_FD`` with the code on standard
input. The code runs as ``__main__``; if its last statement is an expression,
its value is reported like a notebook cell's. A traceback goes to stderr
(showing only the code's own frames); a JSON object ``{"value": repr or null,
"error": "Type: message" or null}`` is written to RESULT_FD at the end.
"""

from __future__ import annotations

import ast
import json
import linecache
import os
import sys
import traceback
from typing import Any

FILENAME = "<code>"
MAX_REPR = 4000


def run(source: str) -> dict[str, Any]:
    """Execute ``source``; return the value of its last expression and its error."""
    result: dict[str, Any] = {"value": None, "error": None}
    linecache.cache[FILENAME] = (len(source), None, source.splitlines(True), FILENAME)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(source, filename=FILENAME)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        exec(compile(tree, FILENAME, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, FILENAME, "eval"), namespace)
            if value is not None:
                result["value"] = _short_repr(value)
    except SystemExit as exc:  # exit() in the code ends it, without a traceback
        if exc.code not in (None, 0):
            result["error"] = f"SystemExit: {exc.code}"
    except BaseException as exc:  # everything the code raises is reported, not re-raised
        # Skip this file's own frame; a SyntaxError has no frame of the code at all.
        tb = None if isinstance(exc, SyntaxError) or exc.__traceback__ is None \
            else exc.__traceback__.tb_next
        traceback.print_exception(type(exc), exc, tb)
        result["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return result


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."


def main() -> int:
    result_fd = int(sys.argv[1])
    source = sys.stdin.read()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - input() in the code sees end of file
    result = run(source)
    sys.stdout.flush()
    sys.stderr.flush()
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
