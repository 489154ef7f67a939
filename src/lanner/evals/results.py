"""Evaluation runs in Lanner's SQLite database (``store/migrations/0003_evals.sql``):
each run with the provenance needed to reproduce it, and every item's prompt,
output and scores, so two runs can be compared item by item."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lanner.errors import InvalidRequest, StoreError
from lanner.evals.runner import EvalRun
from lanner.store import Store, utc_now
from lanner.store.transactions import Transactions
from lanner.store.turn import new_conversation_id


@dataclass
class RunRecord:
    id: str
    task: str
    model: str
    backend: str
    weights: str
    num_fewshot: int
    n_items: int
    metrics: dict[str, dict[str, Any]]
    """``{"acc,none": {"value": 0.5, "stderr": 0.1, "n": 24}, ...}``"""
    duration_s: float
    created_at: str
    provenance: dict[str, Any]
    """Every other column: model sha256, backend version, task hash, seed, config."""


@dataclass
class ItemRecord:
    doc_id: int
    prompt: str
    target: str
    output: Any
    scores: dict[str, Any]


def weights_of(run: EvalRun) -> str:
    """What actually ran: the GGUF file type, or the torch dtype."""
    extra = run.model.backend.metadata.extra
    return str(extra.get("file_type") or extra.get("dtype") or "unknown")


class EvalStore(Transactions):
    """Runs in the database at ``path`` (created and migrated by ``Store``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        Store(self.path).close()  # creates the file and applies pending migrations
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc

    def save(self, run: EvalRun, model_sha256: str, adapter: str | Path | None = None) -> str:
        """Store ``run`` and its items; returns the run id. ``adapter``: the LoRA
        folder the model ran with, kept with its weights' sha256."""
        run_id = new_conversation_id()
        spec, backend = run.model.spec, run.model.backend
        config = {"task": run.task.config, "num_fewshot": run.num_fewshot, "seed": run.seed,
                  "limit": run.limit, "chat_template": run.chat}
        if adapter is not None:
            config["adapter"] = adapter_provenance(Path(adapter))
        metrics = {k: {"value": a.value, "stderr": a.stderr, "n": a.n}
                   for k, a in run.metrics.items()}
        row = (run_id, run.task.name, str(run.task.path), run.task.sha256(), run.model.name,
               str(spec.path), model_sha256, backend.name, backend.version, weights_of(run),
               run.model.chat_format.template_hash if run.chat else None,
               run.num_fewshot, run.seed, run.limit, json.dumps(config, default=str),
               json.dumps(metrics), len(run.items), run.duration_s, utc_now())
        with self._write() as conn:
            conn.execute(f"INSERT INTO eval_runs VALUES ({', '.join('?' * len(row))})", row)
            conn.executemany(
                "INSERT INTO eval_items VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, r.doc_id, r.prompt, r.target, json.dumps(r.output),
                  json.dumps(r.scores)) for r in run.items],
            )
        return run_id

    def runs(self, limit: int = 20) -> list[RunRecord]:
        """The latest runs, newest last."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM (SELECT * FROM eval_runs ORDER BY id DESC LIMIT ?) ORDER BY id",
                (limit,),
            ).fetchall()
        return [_run(r) for r in rows]

    def get(self, run_id: str) -> RunRecord:
        """The run whose id is ``run_id`` or starts with it (unambiguously)."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM eval_runs WHERE id LIKE ? LIMIT 2",
                                (run_id.replace("%", "") + "%",)).fetchall()
        if not rows:
            raise InvalidRequest("run", f"no evaluation run {run_id!r} (see lanner eval --runs)")
        if len(rows) > 1:
            raise InvalidRequest("run", f"{run_id!r} names several runs: give more of the id")
        return _run(rows[0])

    def items(self, run_id: str) -> list[ItemRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM eval_items WHERE run_id = ? ORDER BY doc_id",
                                (run_id,)).fetchall()
        return [ItemRecord(r["doc_id"], r["prompt"], r["target"], json.loads(r["output_json"]),
                           json.loads(r["scores_json"])) for r in rows]

    def model_sha256(self, path: Path) -> str:
        """The model file's sha256 (cached by the log Store); "" for a folder."""
        if not path.is_file():
            return ""
        with Store(self.path) as store:
            return store.file_sha256(path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EvalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adapter_provenance(folder: Path) -> dict[str, str]:
    """A peft adapter folder's path and the sha256 of its weights file."""
    folder = folder.expanduser().resolve()
    weights = [folder / name for name in ("adapter_model.safetensors", "adapter_model.bin")
               if (folder / name).is_file()]
    digest = hashlib.sha256()
    if weights:
        with weights[0].open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(folder), "sha256": digest.hexdigest() if weights else ""}


def _run(row: sqlite3.Row) -> RunRecord:
    try:
        provenance = {k: row[k] for k in row.keys() if k not in _SHOWN}  # noqa: SIM118 (a Row iterates values)
        provenance["config"] = json.loads(provenance.pop("config_json"))
        return RunRecord(row["id"], row["task"], row["model"], row["backend"], row["weights"],
                         row["num_fewshot"], row["n_items"], json.loads(row["metrics_json"]),
                         row["duration_s"], row["created_at"], provenance)
    except (KeyError, json.JSONDecodeError) as exc:
        raise StoreError(f"evaluation run {row['id']} is unreadable: {exc}") from exc


_SHOWN = {"id", "task", "model", "backend", "weights", "num_fewshot", "n_items", "metrics_json",
          "duration_s", "created_at"}


def diff(a: list[ItemRecord], b: list[ItemRecord], key: str) -> list[tuple[int, Any, Any]]:
    """Items whose ``key`` score differs between two runs: (doc_id, score in a, in b)."""
    scores_b = {item.doc_id: item.scores.get(key) for item in b}
    return [(item.doc_id, item.scores.get(key), scores_b[item.doc_id]) for item in a
            if item.doc_id in scores_b and item.scores.get(key) != scores_b[item.doc_id]]
