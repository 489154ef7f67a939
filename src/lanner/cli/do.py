"""``lanner do "objective"``: the shell agent. The model proposes one command at
a time; each is shown and runs after you say yes (or, with ``--yes`` and
``--workdir``, without asking unless it touches paths outside the folder)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from lanner.cli import options

if TYPE_CHECKING:
    from lanner.tools.shell_agent import Step

QUESTION = "Run this command? [y/N/q] "
OUTSIDE_QUESTION = "It touches paths outside the working folder. Run it anyway? [y/N/q] "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("do", help="reach an objective with shell commands you approve",
                       description="Plan shell commands with a model and run each after "
                                   "confirmation, feeding the output back.")
    p.add_argument("objective", help="what to get done; - reads it from standard input")
    p.add_argument("-m", "--model", help="model name or path (default: smollm2)")
    p.add_argument("--workdir", help="the folder commands run in (default: the current one; "
                   "required with --yes)")
    p.add_argument("-y", "--yes", action="store_true",
                   help="run commands without asking, confined to --workdir; commands that "
                        "name paths outside it are still asked about every time")
    p.add_argument("--max-steps", type=int, default=10, help="most commands (default 10)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one command may run (default 60)")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    p.set_defaults(func=run)


def ask(command: str, outside: list[str]) -> bool | None:
    """Show the command and ask; "q" (or end of input) stops the agent."""
    print(f"\n$ {command}", file=sys.stderr)
    if outside:
        print(f"  outside the working folder: {', '.join(outside)}", file=sys.stderr)
    try:
        answer = input(OUTSIDE_QUESTION if outside else QUESTION).strip().lower()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None
    return None if answer in ("q", "quit") else answer in ("y", "yes")


def show(step: Step) -> None:
    """A step's outcome on stderr (the command too when it ran without a question)."""
    if not step.asked:
        print(f"\n$ {step.command}", file=sys.stderr)
    if step.ran:
        if step.output:
            print(step.output, file=sys.stderr)
        print(f"[exit status {step.exit_code}]", file=sys.stderr)
    elif not step.stop:
        print("[declined]", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from lanner.errors import InvalidRequest
    from lanner.tools.shell_agent import ShellAgent

    if args.yes and not args.workdir:
        raise InvalidRequest("--yes", "needs --workdir: the folder the commands are confined to")
    objective = options.read_prompt(args.objective)
    model = options.load_model(args, args.model)
    agent = ShellAgent(model, args.workdir or ".", confirm=ask, yes=args.yes,
                       max_steps=args.max_steps, timeout_s=args.timeout,
                       store=options.open_store(args), on_step=show,
                       **options.sampling_options(args))
    result = agent.run(objective)
    print(result.summary)
    if result.stopped != "done":
        print(f"[{'stopped by you' if result.stopped == 'user' else result.summary}]",
              file=sys.stderr)
    return 0
