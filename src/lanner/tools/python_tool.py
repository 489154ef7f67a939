"""The code interpreter: a ``python`` tool that runs the model's code in the
sandbox, after the user says yes.

    tool = python_tool()                 # asks on the terminal before each run
    tool = python_tool(yes=True)         # the user said --yes: no questions
    run_tools(model, "What is 12 factorial?", [tool])

What goes back to the model is the run's report (stdout, stderr, the value of
the last expression, the error, the files created): see ``RunResult.to_text``.
The working folder lives as long as the tool, so files persist between runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lanner.tools.sandbox import Limits, Sandbox
from lanner.tools.schema import Tool, make_tool

CONFIRM_QUESTION = "Run this code? [y/N] "
DECLINED = "Error: the user declined to run this code. Do not run it again; answer without it."


def ask_on_terminal(code: str) -> bool:
    """Show the code on stderr and ask on the terminal; only "y"/"yes" runs it
    (end of input, Ctrl-C or anything else declines)."""
    print(f"\nThe model wants to run this Python code:\n---\n{code.rstrip()}\n---",
          file=sys.stderr)
    try:
        # The question goes to stderr with the code: stdout carries only the answer.
        print(CONFIRM_QUESTION, end="", file=sys.stderr, flush=True)
        answer = input()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")


def python_tool(*, yes: bool = False, confirm: Callable[[str], bool] | None = None,
                sandbox: Sandbox | None = None, limits: Limits | None = None) -> Tool:
    """The ``python`` tool. Unless ``yes``, ``confirm(code)`` (default: ask on
    the terminal) must return True before each run. Raises SandboxUnavailable
    at once if the sandbox cannot run here."""
    box = sandbox or Sandbox(limits=limits)
    ask = confirm or ask_on_terminal

    def python(code: str) -> str:
        """Run Python code in a sandbox with no network and a private working
        folder, and return what it printed, the value of its last expression,
        its error if any, and the files it created. Use print() to show results.

        Args:
            code: the Python program to run
        """
        if not yes and not ask(code):
            return DECLINED
        return box.run_python(code).to_text()

    # The closure keeps the sandbox (and its folder) alive as long as the tool.
    return make_tool(python)
