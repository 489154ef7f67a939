"""``lanner arena -m A -m B ...``: vote blind between two models' answers;
``lanner arena ratings``: the Bradley-Terry ratings from every vote so far."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner import paths
from lanner.cli import options
from lanner.cli.columns import Columns
from lanner.cli.compare import model_options, read_prompts
from lanner.engine.types import TextDelta
from lanner.errors import InvalidRequest

if TYPE_CHECKING:  # the evals modules load numpy: imported by the functions that run
    from lanner.evals.arena import Arena, Battle
    from lanner.evals.ratings import Rating, Winner

KEYS: dict[str, Winner] = {"a": "a", "b": "b", "t": "tie", "x": "both_bad"}
QUESTION = "Which answer is better? [a] A  [b] B  [t] tie  [x] both bad  [q] quit: "
VERDICT = {"a": "A wins", "b": "B wins", "tie": "a tie", "both_bad": "both bad"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "arena", help="vote blind between two models' answers; `arena ratings` ranks them",
        description="For each prompt two of the models answer as A and B; vote without "
        "knowing which is which, then see the names. Prompts come from --file or are "
        "asked for. Battles and votes are saved; `lanner arena ratings` ranks the models.")
    p.add_argument("-m", "--model", dest="models", action="append", metavar="MODEL",
                   help="a model in the arena (give two or more)")
    p.add_argument("-f", "--file", type=Path, help="one prompt per line")
    p.add_argument("-s", "--system", help="system prompt, the same for both models")
    p.add_argument("--pair-seed", type=int,
                   help="repeatable choice of the two models and of which is A")
    options.add_model_flags(p)
    options.add_sampling_flags(p)
    p.set_defaults(func=run)
    more = p.add_subparsers(dest="arena_command", metavar="ratings")
    r = more.add_parser("ratings", help="Bradley-Terry ratings from the votes so far",
                        description="Rate the models from every arena vote: Bradley-Terry, "
                        "on an Elo-like scale (mean 1000), with bootstrap 95% intervals. "
                        "A tie, and a 'both bad' vote, counts as half a win each.")
    r.add_argument("-m", "--model", dest="rated", action="append", metavar="MODEL",
                   help="rate only these models, from the votes between them")
    r.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds (default 1000)")
    r.add_argument("--json", action="store_true", help="print JSON for scripts")
    r.set_defaults(func=run_ratings)


def run(args: argparse.Namespace) -> int:
    from lanner.evals.arena import Arena
    from lanner.evals.compare import check_names
    from lanner.store import Store

    names = args.models or []
    check_names(names, least=2, what="the arena")
    if args.no_log:
        raise InvalidRequest("--no-log", "the arena saves every battle and vote")
    prompts = read_prompts(None, args.file) if args.file else None
    sampling = model_options(args, "arena")
    models = [options.load_model(args, name) for name in names]
    with Store(paths.db_path(paths.home(args.home))) as store:
        arena = Arena(models, store, seed=args.pair_seed)
        voted = _battles(arena, prompts, args.system, sampling)
    print(f"{voted} vote(s) saved. `lanner arena ratings` ranks the models.", file=sys.stderr)
    return 0


def _battles(arena: Arena, prompts: list[str] | None, system: str | None,
             sampling: dict[str, Any]) -> int:
    """Battle over each prompt until the prompts run out or the user quits."""
    voted = 0
    for number, prompt in enumerate(prompts or iter(_ask_prompt, None), 1):
        if prompts:
            print(f"\n### Prompt {number}/{len(prompts)}: {prompt}\n")
        battle = arena.battle(prompt, system=system, **sampling)
        _show(battle)
        winner = ask_vote()
        if winner is None:
            break
        record = arena.vote(_saved(battle), winner)
        print(f"Vote: {VERDICT[winner]}. A was {record.model_a}, B was {record.model_b}.\n")
        voted += 1
    return voted


def _ask_prompt() -> str | None:
    """The next prompt typed by the user; None (stop) on an empty line or end of input."""
    try:
        line = input("Prompt (empty line to finish): ").strip()
    except EOFError:
        print()
        return None
    return line or None


def _show(battle: Battle) -> None:
    from lanner.evals.arena import LABELS

    columns = Columns([f"Answer {label}" for label in LABELS], sys.stdout)
    try:
        for index, event in battle.stream():
            if isinstance(event, TextDelta):
                columns.add(index, event.text)
    finally:
        columns.close()


def _saved(battle: Battle) -> str:
    if battle.record is None:  # pragma: no cover - a finished stream saves it
        raise RuntimeError("the battle was not saved")
    return battle.record.id


def ask_vote() -> Winner | None:
    """Ask until a known key comes: a, b, t or x (the winner), q or end of input (None)."""
    while True:
        try:
            key = input(QUESTION).strip().lower()
        except EOFError:
            print()
            return None
        if key == "q":
            return None
        if key in KEYS:
            return KEYS[key]
        print(f"Unknown choice {key!r}: type a, b, t (tie), x (both bad) or q (quit).")


def run_ratings(args: argparse.Namespace) -> int:
    from lanner.evals.arena_store import ArenaStore
    from lanner.evals.ratings import fit
    from lanner.store import Store

    db = paths.db_path(paths.home(args.home))
    with Store(db) as store:
        votes = ArenaStore(store).votes()
    if not votes:
        print(f"No arena votes in {db} yet; vote with `lanner arena -m MODEL -m MODEL`.",
              file=sys.stderr)
        return 0
    table = fit(votes, args.rated, rounds=args.rounds)
    if args.json:
        print(json.dumps([asdict(r) for r in table]))
    else:
        print(format_table(table))
    return 0


def format_table(table: list[Rating]) -> str:
    width = max(len("MODEL"), *(len(r.model) for r in table))
    lines = [f"{'MODEL':<{width}}  {'RATING':>6}  {'95% CI':<13}  {'W':>4} {'L':>4} {'T':>4}"
             f"  {'VOTES':>5}"]
    for r in table:
        ci = f"{r.low:.0f} - {r.high:.0f}"
        lines.append(f"{r.model:<{width}}  {r.rating:>6.0f}  {ci:<13}  {r.wins:>4} "
                     f"{r.losses:>4} {r.ties:>4}  {r.votes:>5}")
    return "\n".join(lines)
