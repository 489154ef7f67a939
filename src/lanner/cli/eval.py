"""``lanner eval``: score a model on lm-evaluation-harness tasks, and read the results.

    lanner eval MODEL --task NAME_OR_FILE.yaml [--limit N] [--num-fewshot K]
    lanner eval --list | --runs
    lanner eval show RUN [--items]
    lanner eval diff RUN_A RUN_B [--metric acc,none]
    lanner eval plot RUN [RUN...] -o chart.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lanner import paths
from lanner.cli import options
from lanner.errors import InvalidRequest

_ACTIONS = ("show", "diff", "plot")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a model on evaluation tasks (lm-eval YAML)",
        description="Score a model on tasks in lm-evaluation-harness's YAML format, on "
        "exactly the weights and backend Lanner runs. Results go to the database "
        "with their provenance. Also: eval show RUN, eval diff A B, eval plot RUN...",
    )
    p.add_argument("words", nargs="*", metavar="MODEL | show RUN | diff A B | plot RUN...",
                   help="the model to evaluate, or an action on stored runs")
    p.add_argument("-t", "--task", action="append", default=[],
                   help="task name or .yaml file (repeatable)")
    p.add_argument("--include-path", action="append", type=Path, default=[], metavar="DIR",
                   help="also look for task YAML files here (repeatable)")
    p.add_argument("--limit", type=int, help="only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, help="override the task's num_fewshot")
    p.add_argument("--fewshot-seed", type=int, default=1234,
                   help="seed of the few-shot sampler (default 1234, as lm-eval)")
    p.add_argument("--chat-template", action="store_true",
                   help="send prompts through the model's chat format (lm-eval's "
                   "--apply_chat_template; generate_until tasks)")
    p.add_argument("--list", action="store_true", help="list the tasks that can be run")
    p.add_argument("--runs", action="store_true", help="list the stored runs")
    p.add_argument("--items", action="store_true", help="show: print every item")
    p.add_argument("--metric", help="diff: the score to compare (default: the first)")
    p.add_argument("-o", "--output", type=Path, default=Path("eval.png"),
                   help="plot: the PNG to write (default eval.png)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--no-log", action="store_true", help="do not store the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_model_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.evals import registry

    if args.list:
        return _list(registry.entries(args.include_path), args.json)
    if args.runs:
        return _runs(args)
    if args.words and args.words[0] in _ACTIONS:
        return _action(args, args.words[0], args.words[1:])
    if len(args.words) != 1:
        raise InvalidRequest("MODEL", "give one model to evaluate (or --list, --runs, show, "
                             "diff, plot)")
    if not args.task:
        raise InvalidRequest("--task", "name at least one task (lanner eval --list shows them)")
    if args.limit is not None and args.limit < 1:
        raise InvalidRequest("--limit", f"must be at least 1, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InvalidRequest("--num-fewshot", f"must be >= 0, got {args.num_fewshot}")
    return _evaluate(args, args.words[0])


def _store(args: argparse.Namespace) -> Any:
    from lanner.evals.results import EvalStore

    return EvalStore(paths.db_path(paths.home(args.home)))


def _evaluate(args: argparse.Namespace, model_name: str) -> int:
    from lanner.evals import registry, runner
    from lanner.evals.taskfile import load_task

    tasks = [load_task(registry.find(t, args.include_path)) for t in args.task]
    model = options.load_model(args, model_name)
    store = None if args.no_log else _store(args)
    out = []
    for task in tasks:
        items = len(runner.prepare(task, num_fewshot=0, seed=0, limit=args.limit))
        with _progress(task.name, items, args.no_progress) as bar:
            result = runner.evaluate(model, task, num_fewshot=args.num_fewshot,
                                     seed=args.fewshot_seed, limit=args.limit, progress=bar,
                                     chat=args.chat_template)
        run_id = store.save(result, store.model_sha256(model.spec.path),
                            adapter=args.adapter) if store else None
        out.append(_summary(run_id, result, args.adapter))
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        for entry in out:
            _print_summary(entry)
    return 0


def _summary(run_id: str | None, result: Any, adapter: str | None) -> dict[str, Any]:
    return {
        "run": run_id, "task": result.task.name, "model": result.model.name,
        "adapter": adapter, "backend": result.model.backend.name,
        "num_fewshot": result.num_fewshot,
        "items": len(result.items), "duration_s": round(result.duration_s, 2),
        "metrics": {k: {"value": a.value, "stderr": a.stderr} for k, a in result.metrics.items()},
    }


def _print_summary(entry: dict[str, Any]) -> None:
    adapter = f", adapter {entry['adapter']}" if entry["adapter"] else ""
    print(f"{entry['task']}  {entry['model']} ({entry['backend']}{adapter}), "
          f"{entry['items']} items, "
          f"{entry['num_fewshot']}-shot, {entry['duration_s']:.1f} s"
          + (f"  run {entry['run'][:12]}" if entry["run"] else ""))
    for key, m in entry["metrics"].items():
        err = f" ± {m['stderr']:.4f}" if m["stderr"] is not None else ""
        print(f"  {key:<32} {m['value']:.4f}{err}")


class _progress:
    """A tqdm bar on stderr with items/s and ETA; nothing when not wanted."""

    def __init__(self, name: str, total: int, off: bool) -> None:
        self.bar: Any = None
        if not off:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="item", file=sys.stderr,
                            dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> _progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _list(entries: list[Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps([{"task": e.name, "path": str(e.path), "output_type": e.output_type,
                           "licence": e.licence, "source": e.source} for e in entries], indent=2))
        return 0
    for e in entries:
        print(f"{e.name:<16} {e.output_type:<22} licence: {e.licence}")
        print(f"{'':<16} {e.source or e.path}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    with _store(args) as store:
        for r in store.runs():
            first = next(iter(r.metrics.items()), None)
            score = f"{first[0]} {first[1]['value']:.4f}" if first else ""
            print(f"{r.id[:12]}  {r.created_at[:19]}  {r.task:<18} {r.model:<20} "
                  f"{r.backend:<12} {r.n_items:>5} items  {score}")
    return 0


def _action(args: argparse.Namespace, action: str, ids: list[str]) -> int:
    with _store(args) as store:
        if action == "show":
            if len(ids) != 1:
                raise InvalidRequest("RUN", "eval show takes one run id")
            return _show(store, ids[0], args)
        if action == "diff":
            if len(ids) != 2:
                raise InvalidRequest("RUN", "eval diff takes two run ids")
            return _diff(store, ids[0], ids[1], args.metric)
        if not ids:
            raise InvalidRequest("RUN", "eval plot takes one or more run ids")
        from lanner.evals.plot import bar_chart

        bar_chart([store.get(i) for i in ids], args.output)
        print(f"wrote {args.output}")
        return 0


def _show(store: Any, run_id: str, args: argparse.Namespace) -> int:
    r = store.get(run_id)
    if args.json:
        items = [vars(i) for i in store.items(r.id)] if args.items else None
        print(json.dumps({**vars(r), "items": items}, indent=2, default=str))
        return 0
    print(f"run {r.id}  {r.created_at}\n  task {r.task}  model {r.model} ({r.backend}, "
          f"{r.weights})  {r.num_fewshot}-shot  {r.n_items} items  {r.duration_s:.1f} s")
    for key in ("model_sha256", "backend_version", "task_path", "task_sha256", "fewshot_seed",
                "item_limit", "chat_format_hash"):
        print(f"  {key}: {r.provenance.get(key)}")
    adapter = r.provenance["config"].get("adapter")
    if adapter:
        print(f"  adapter: {adapter['path']} (sha256 {adapter['sha256']})")
    for key, m in r.metrics.items():
        err = f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else ""
        print(f"  {key:<32} {m['value']:.4f}{err}")
    if args.items:
        for item in store.items(r.id):
            print(f"\n#{item.doc_id}  target: {item.target}  scores: {item.scores}\n"
                  f"  output: {json.dumps(item.output)[:300]}")
    return 0


def _diff(store: Any, id_a: str, id_b: str, metric: str | None) -> int:
    from lanner.evals.results import diff

    a, b = store.get(id_a), store.get(id_b)
    if a.task != b.task:
        raise InvalidRequest("RUN", f"the runs are of different tasks ({a.task}, {b.task})")
    items_a, items_b = store.items(a.id), store.items(b.id)
    key = metric or next(iter(a.metrics), "")
    if key not in a.metrics:
        raise InvalidRequest("--metric", f"{key!r} is not a score of run {a.id[:12]} "
                             f"({', '.join(a.metrics)})")
    changed = diff(items_a, items_b, key)
    print(f"{key}: {a.metrics[key]['value']:.4f} ({a.model}, {a.id[:12]}) -> "
          f"{b.metrics[key]['value']:.4f} ({b.model}, {b.id[:12]})")
    print(f"{len(changed)} of {len(items_a)} items changed")
    for doc_id, before, after in changed:
        print(f"  #{doc_id}: {before} -> {after}")
    return 0
