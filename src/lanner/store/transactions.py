"""Locked reads and IMMEDIATE write transactions on one shared SQLite connection:
the log Store and the document store both use this one implementation."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lanner.errors import StoreError


class Transactions:
    """Mixin; the class sets ``path``, ``_conn`` and ``_lock``."""

    path: Path
    _conn: sqlite3.Connection
    _lock: threading.RLock

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed on success, rolled back on any error."""
        with self._read() as conn:
            # IMMEDIATE takes the write lock up front, so a busy database waits
            # here (busy timeout) instead of failing at COMMIT.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:  # re-raised; the transaction must not stay open
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
