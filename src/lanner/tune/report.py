"""What a finished run leaves beside its adapter: ``metrics.json``,
``loss_curve.png`` (train and eval loss) and ``config.resolved.yaml``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lanner.tune.checkpoint import TrainerState

METRICS = "metrics.json"
CURVE = "loss_curve.png"
RESOLVED = "config.resolved.yaml"


def write_resolved_config(output_dir: Path, config: dict[str, Any]) -> Path:
    """The config as the run used it (defaults filled, paths absolute)."""
    import yaml

    path = output_dir / RESOLVED
    _write_atomic(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def metrics(state: TrainerState, *, total_steps: int, steps_per_epoch: int, processes: int,
            data: dict[str, Any], resumed_from: int | None) -> dict[str, Any]:
    """The numbers of a run, for ``metrics.json``."""
    last = state.history[-1] if state.history else {}
    return {
        "steps": state.step, "total_steps": total_steps,
        "epochs": round(state.step / steps_per_epoch, 4),
        "final_loss": last.get("loss"),
        "eval_loss": state.evals[-1]["eval_loss"] if state.evals else None,
        "train_tokens": state.tokens, "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.seconds, 3),
        "tokens_per_second": round(state.tokens / state.seconds, 1) if state.seconds else None,
        "global_batch": state.global_batch, "processes": processes,
        "resumed_from_step": resumed_from, "data": data,
        "history": state.history, "evals": state.evals,
    }


def write_metrics(output_dir: Path, values: dict[str, Any]) -> Path:
    path = output_dir / METRICS
    _write_atomic(path, json.dumps(values, indent=2) + "\n")
    return path


def plot_loss(output_dir: Path, state: TrainerState) -> Path:
    """Train loss per step and eval loss per evaluation, on one chart."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in any thread
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        ax.plot([h["step"] for h in state.history], [h["loss"] for h in state.history],
                label="train", linewidth=1)
        if state.evals:
            ax.plot([e["step"] for e in state.evals], [e["eval_loss"] for e in state.evals],
                    "o-", label="eval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean per trained token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = output_dir / CURVE
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
