"""``lanner tune CONFIG.yaml``: LoRA/QLoRA fine-tuning from a YAML config."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lanner import paths
from lanner.errors import InvalidRequest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="fine-tune a model with LoRA from a YAML config",
        description="Fine-tune a model with LoRA (QLoRA on a CUDA GPU) as CONFIG.yaml says. "
        "Writes the adapter, loss_curve.png, metrics.json and config.resolved.yaml to the "
        "config's output_dir, with checkpoints every save_steps; run again to resume after "
        "an interruption. For several GPUs or processes: accelerate launch -m lanner tune ...")
    p.add_argument("config", metavar="CONFIG.yaml", help="the fine-tuning config")
    p.add_argument("--dry-run", action="store_true",
                   help="load no weights: print one training example with its trained tokens "
                   "marked, and the dataset's token counts")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in output_dir to resume from (without this flag "
                   "a run resumes when there is one, and starts afresh when there is none)")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N optimizer steps (replaces epochs/max_steps of the config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lanner.tune.config import load_config

    config = load_config(args.config)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise InvalidRequest("--max-steps", f"must be at least 1, got {args.max_steps}")
        config = dataclasses.replace(config, max_steps=args.max_steps, epochs=None)
    home = paths.home(args.home)
    if args.dry_run:
        from lanner.tune.dryrun import dry_run

        print(dry_run(config, home, color=sys.stdout.isatty()))
        return 0
    from lanner.tune.trainer import train

    result = train(config, home=home, resume=True if args.resume else None)
    if result.main_process:  # once, under accelerate launch too
        print(result.adapter)
    return 0
