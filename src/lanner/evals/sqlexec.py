"""Execution accuracy for text-to-SQL: the predicted query scores 1.0 when it
returns the same rows as the gold query on the task's SQLite database.

Only one SELECT statement is ever run, on a read-only connection, under an
authorizer that allows reading and nothing else, and under a time limit. Rows
are compared as multisets (order-insensitive) unless the gold query has a
top-level ORDER BY; floats are compared to 6 decimals, since the order in
which SQLite sums rows moves the last digits.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lanner import paths
from lanner.errors import TaskError

MAX_ROWS = 100_000
"""A query returning more rows than this is not compared (it scores 0.0)."""
MAX_VALUE_BYTES = 10_000_000
"""Longest string or blob a query may build (SQLite's own limit is 1 GB)."""
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 sqlite3.SQLITE_RECURSIVE}
_STARTS_AS_SELECT = re.compile(r"(?is)\s*(select|with)\b")
_LEADING_COMMENTS = re.compile(r"\s*(--[^\n]*(\n|$)|/\*.*?\*/)", re.DOTALL)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]")


class Rejected(Exception):
    """The query was not run to the end: not a single SELECT, an SQL error, a
    forbidden action, the time limit, or too many rows."""


def execution_accuracy(prediction: str, doc: Mapping[str, Any], *, task_dir: Path,
                       database: str, timeout: float = 5.0, **options: Any) -> float:
    """1.0 if ``prediction`` returns the same rows as ``doc["query"]`` on
    ``database`` (a path relative to ``task_dir``), else 0.0.

    A gold query that fails is a ``TaskError``: it is the task's fault, not
    the model's.
    """
    db = database_path(task_dir / database)
    gold_sql = str(doc["query"])
    try:
        gold = run_select(db, gold_sql, timeout)
    except Rejected as exc:
        raise TaskError(f"{db}: the gold query {gold_sql!r} fails: {exc}") from exc
    try:
        predicted = run_select(db, prediction, timeout)
    except Rejected:
        return 0.0
    if has_top_level_order_by(gold_sql):
        return 1.0 if predicted == gold else 0.0
    return 1.0 if Counter(predicted) == Counter(gold) else 0.0


def run_select(db: Path, sql: str, timeout_s: float) -> list[tuple[Any, ...]]:
    """The rows of the single SELECT ``sql`` on a read-only connection to ``db``
    (floats rounded to 6 decimals); raises ``Rejected`` otherwise."""
    if not _STARTS_AS_SELECT.match(_without_leading_comments(sql)):
        raise Rejected("not a SELECT statement")
    try:
        conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise TaskError(f"cannot open the database {db}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.set_authorizer(_allow_reads_only)
        # Called every 1000 virtual-machine steps; a non-zero answer interrupts.
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        rows = conn.execute(sql).fetchmany(MAX_ROWS + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
        if time.monotonic() > deadline:
            raise Rejected(f"stopped after {timeout_s:g} s (time limit)") from exc
        raise Rejected(str(exc) or type(exc).__name__) from exc
    finally:
        conn.close()
    if len(rows) > MAX_ROWS:
        raise Rejected(f"more than {MAX_ROWS} rows")
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


def _without_leading_comments(sql: str) -> str:
    while match := _LEADING_COMMENTS.match(sql):
        sql = sql[match.end():]
    return sql


def _allow_reads_only(action: int, *_args: object) -> int:
    # Read-only mode already refuses writes; this also refuses ATTACH, PRAGMA,
    # and every other statement that is not a plain read.
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def has_top_level_order_by(sql: str) -> bool:
    """Whether ``sql`` orders its result (an ORDER BY inside parentheses, in a
    subquery or a window, does not count)."""
    text = _QUOTED.sub("''", sql)
    outside, depth = [], 0
    for ch in text:  # parenthesised text becomes blanks
        if ch == "(":
            depth += 1
        outside.append(ch if depth == 0 else " ")
        if ch == ")":
            depth = max(0, depth - 1)
    return re.search(r"(?i)\border\s+by\b", "".join(outside)) is not None


def database_path(declared: Path) -> Path:
    """``declared`` if it exists; else a copy built from the ``schema.sql`` and
    ``seed.sql`` beside it, kept in the Lanner home's cache (never written
    next to the task, which may be inside site-packages)."""
    if declared.is_file():
        return declared
    schema, seed = declared.with_name("schema.sql"), declared.with_name("seed.sql")
    if not (schema.is_file() and seed.is_file()):
        raise TaskError(f"database {declared} not found, and there is no schema.sql and "
                        "seed.sql beside it to build it from")
    digest = hashlib.sha256(schema.read_bytes() + b"\0" + seed.read_bytes()).hexdigest()
    cached = paths.home() / "cache" / "sqlite" / f"{declared.stem}-{digest[:16]}.sqlite"
    if not cached.is_file():
        build_database(schema, seed, cached)
    return cached


def build_database(schema: Path, seed: Path, target: Path) -> Path:
    """Create the SQLite database ``target`` from ``schema`` and ``seed``
    (SQL scripts), checking foreign keys. Written to a temporary file and
    renamed, so a concurrent reader never sees half a database."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.executescript(schema.read_text(encoding="utf-8") + "\n"
                               + seed.read_text(encoding="utf-8"))
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise TaskError(f"{seed}: rows break foreign keys: {broken[:3]}")
            conn.commit()
        finally:
            conn.close()
        os.replace(tmp, target)
    except sqlite3.Error as exc:
        raise TaskError(f"cannot build {target} from {schema} and {seed}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
