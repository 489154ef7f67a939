"""Checkpoints: everything a run needs to go on exactly where it stopped.

``output_dir/checkpoint-N/`` holds the adapter (peft format), the optimizer
and scheduler states, each process's RNG state (``rng-<rank>.pt``) and
``trainer_state.json`` (step, data position, loss history, counters, config).
It is written as ``.checkpoint-N.partial`` and renamed when whole, so a run
killed mid-save (kill -9 included) leaves its previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lanner.errors import LannerError

STATE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class TrainerState:
    """A run's progress, saved as JSON in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    epoch_position: int = 0
    """Rows of this epoch's order already trained on (the data position)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step: step, loss, learning_rate."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """Per evaluation: step, eval_loss."""
    tokens: int = 0
    """Real (non-pad) tokens trained on, all processes."""
    trained_tokens: int = 0
    """Of those, the targets with a loss."""
    seconds: float = 0.0
    """Time spent in training steps (not evaluation or saving)."""
    global_batch: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    data_sha256: str = ""
    """Of the training rows' ids and labels: a resumed run must train on the same."""

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        data = json.loads((folder / STATE).read_text(encoding="utf-8"))
        return cls(**data)


def latest(output_dir: Path) -> Path | None:
    """The newest whole checkpoint in ``output_dir``, if any."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*")
             if (m := _NAME.fullmatch(p.name)) and (p / STATE).is_file()]
    return max(found)[1] if found else None


def save(output_dir: Path, state: TrainerState, *, model: Any, optimizer: Any, scheduler: Any,
         rank: int, barrier: Callable[[], None]) -> Path:
    """Write ``checkpoint-<step>`` (every process calls this; rank 0 writes all
    but the RNG states)."""
    partial = output_dir / f".checkpoint-{state.step}.partial"
    final = output_dir / f"checkpoint-{state.step}"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    torch.save(_rng_state(), partial / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        model.save_pretrained(partial / "adapter")
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    barrier()
    return final


def restore(folder: Path, *, model: Any, optimizer: Any, scheduler: Any, rank: int,
            device: torch.device) -> TrainerState:
    """Load a checkpoint into the run's objects; returns its progress."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    rng = folder / f"rng-{rank}.pt"
    if not rng.is_file():
        raise LannerError(f"{folder} was written by fewer processes than this run has; "
                          "resume with as many as it had")
    weights = load_file(folder / "adapter" / "adapter_model.safetensors", device=str(device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(_load(folder / "optimizer.pt", device))
    scheduler.load_state_dict(_load(folder / "scheduler.pt", device))
    _set_rng_state(_load(rng, torch.device("cpu")))
    return TrainerState.read(folder)


def _load(path: Path, device: torch.device) -> Any:
    return torch.load(path, map_location=device, weights_only=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
