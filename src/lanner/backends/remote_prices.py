"""What remote tokens cost: ``prices.toml`` in the Lanner home, and the usage ledger.

The price table is the user's to edit. One table per model, named by the
Lanner name of the remote (``lanner remote add NAME``) or by the model id the
server reports; prices are per million tokens::

    # <LANNER_HOME>/prices.toml
    ["gpt-4o-mini"]
    input = 0.15        # per million prompt tokens
    output = 0.60       # per million completion tokens
    currency = "USD"    # optional; USD when absent

A model with no table costs nothing that Lanner knows of (cost None). Every
remote request appends one JSON line to ``remote-usage.jsonl`` in the home:
time, remote, server model, endpoint, token usage and cost.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lanner.errors import LannerError

PRICES_FILE = "prices.toml"
LEDGER_FILE = "remote-usage.jsonl"
_FIELDS = {"input": float, "output": float, "currency": str}
log = logging.getLogger("lanner.remote")


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    """Per million prompt tokens."""
    output: float
    """Per million completion tokens."""
    currency: str = "USD"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1e6


def read_prices(home: Path) -> dict[str, Price]:
    """The price table, {} if the file does not exist; a malformed file is a
    LannerError naming the file, the table and the field."""
    path = home / PRICES_FILE
    if not path.exists():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LannerError(f"cannot read the price table {path}: {exc}") from exc
    return {name: _price(path, name, table) for name, table in data.items()}


def _price(path: Path, name: str, table: object) -> Price:
    where = f"{path}: [{name!r}]"
    if not isinstance(table, dict):
        raise LannerError(f"{where} must be a table with input and output prices per "
                          "million tokens")
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise LannerError(f"{where}: unknown field {unknown[0]!r} (known: input, output, "
                          "currency)")
    for field in ("input", "output"):
        value = table.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise LannerError(f"{where}: {field} must be a number >= 0 (per million tokens), "
                              f"got {value!r}")
    currency = table.get("currency", "USD")
    if not isinstance(currency, str) or not currency:
        raise LannerError(f"{where}: currency must be text such as \"USD\"")
    return Price(float(table["input"]), float(table["output"]), currency)


def price_for(prices: dict[str, Price], *names: str | None) -> Price | None:
    """The first of ``names`` (Lanner name, then server model id) with a price."""
    return next((prices[n] for n in names if n and n in prices), None)


def record(home: Path, entry: dict[str, Any]) -> None:
    """Append one usage line to the ledger (and the ``lanner.remote`` logger).
    A ledger that cannot be written is logged, never fatal to the answer."""
    line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
    log.info("remote usage %s", line)
    try:
        home.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(line, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(home / LEDGER_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)  # one write in append mode: lines never interleave
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot write %s: %s", home / LEDGER_FILE, exc)


def ledger(home: Path) -> list[dict[str, Any]]:
    """The ledger's lines, oldest first (unreadable lines skipped)."""
    path = home / LEDGER_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
