"""The Store: Lanner's one SQLite database (``logs.db`` in the Lanner home).

It holds conversations and every logged response with its provenance (model
file hash, backend and version, chat-format hash, sampling settings, seed,
token counts, timings) and caches model-file hashes. Later migrations add
document collections, evaluation runs and arena votes.

Durability: WAL journal with ``synchronous=FULL``; each ``log`` call is one
transaction committed before it returns, so a crash or ``kill -9`` loses at
most the turn still being generated, never an earlier one.

One ``Store`` may be shared between threads (calls are serialised by a
lock); several processes may open the same file (SQLite locks, with a busy
timeout of ``BUSY_TIMEOUT_S``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from types import TracebackType

from lanner.errors import InvalidRequest, StoreError
from lanner.store import hashing
from lanner.store.migrate import apply_pending
from lanner.store.transactions import Transactions
from lanner.store.turn import COLUMNS, Turn, from_row, new_conversation_id, to_row, utc_now

BUSY_TIMEOUT_S = 10.0
_SELECT_TURN = f"SELECT id, {', '.join(COLUMNS)} FROM responses"


class Store(Transactions):
    """Opens (creating if needed) and migrates the database at ``path``.

    Raises ``StoreError`` if the file is not a SQLite database, is a SQLite
    database that is not Lanner's, or was written by a newer Lanner.
    ``applied`` lists the migrations this open applied (empty when the
    schema was already current).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = self._connect()
        try:
            self.applied: list[str] = apply_pending(self._conn, str(self.path))
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"{self.path} is not a Lanner log database: {exc}") from exc
        except StoreError:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: every transaction below is an explicit BEGIN ... COMMIT.
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the log database {self.path}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path} is not a SQLite database: {exc}") from exc
        return conn

    # -- conversations and turns ---------------------------------------------

    def new_conversation(self, model: str, title: str | None = None) -> str:
        """Create a conversation and return its id (32 hex digits, time-sortable)."""
        cid = new_conversation_id()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO conversations (id, model, title, created_at) VALUES (?, ?, ?, ?)",
                (cid, model, title, utc_now()),
            )
        return cid

    def log(self, turn: Turn) -> int:
        """Store ``turn``, set ``turn.id`` and return it; durable once this returns.

        A conversation id not created by ``new_conversation`` is created here
        (model taken from the turn). Raises ``StoreError`` if the turn was
        already logged, has no conversation id, or names a missing parent.
        """
        if turn.id is not None:
            raise StoreError(f"turn is already logged as #{turn.id}")
        if not turn.conversation_id:
            raise StoreError("turn.conversation_id is empty; use Store.new_conversation()")
        marks = ", ".join("?" * len(COLUMNS))
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO conversations (id, model, title, created_at)"
                " VALUES (?, ?, NULL, ?)",
                (turn.conversation_id, turn.model, turn.created_at),
            )
            cursor = conn.execute(
                f"INSERT INTO responses ({', '.join(COLUMNS)}) VALUES ({marks})", to_row(turn)
            )
        if cursor.lastrowid is None:  # cannot happen after an INSERT; keeps the type exact
            raise StoreError("SQLite returned no id for the logged turn")
        turn.id = cursor.lastrowid
        return turn.id

    def turns(
        self,
        *,
        limit: int | None = 20,
        conversation_id: str | None = None,
        model: str | None = None,
    ) -> list[Turn]:
        """The latest ``limit`` logged turns matching the filters, oldest first.

        Oldest first in every case, so a conversation reads as a thread and a
        terminal shows the newest turn last. ``limit=None`` returns all. The
        filters combine; ``model`` matches the model name exactly. Sub-calls
        (turns with a ``parent_id``) are included.
        """
        if limit is not None and (isinstance(limit, bool) or limit < 1):
            raise InvalidRequest("limit", f"must be a positive integer or None, got {limit!r}")
        where, params = _filters(conversation_id=conversation_id, model=model)
        sql = (
            f"SELECT * FROM ({_SELECT_TURN}{where} ORDER BY id DESC LIMIT ?) ORDER BY id"
        )
        with self._read() as conn:
            rows = conn.execute(sql, (*params, -1 if limit is None else limit)).fetchall()
        return [from_row(row) for row in rows]

    def last_conversation_id(self) -> str | None:
        """The conversation of the most recently logged user-facing turn, or None.

        A conversation created but never logged to (interrupted before its
        first response) is skipped: there is nothing in it to continue.
        """
        with self._read() as conn:
            row = conn.execute(
                "SELECT conversation_id FROM responses WHERE parent_id IS NULL"
                " ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return None if row is None else str(row[0])

    def conversations(self, *, limit: int = 50) -> list[dict[str, object]]:
        """The latest ``limit`` conversations that have a user-facing turn, newest
        first: id, model, title (else the first prompt), created_at, turns."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT c.id, c.model, c.created_at, COALESCE(c.title, ("
                "  SELECT prompt FROM responses f WHERE f.conversation_id = c.id"
                "  AND f.parent_id IS NULL ORDER BY f.id LIMIT 1)) AS title,"
                " COUNT(r.id) AS turns, MAX(r.id) AS last"
                " FROM conversations c JOIN responses r ON r.conversation_id = c.id"
                " AND r.parent_id IS NULL GROUP BY c.id ORDER BY last DESC LIMIT ?",
                (limit,)).fetchall()
        return [{k: row[k] for k in ("id", "model", "title", "created_at", "turns")}
                for row in rows]

    def conversation_messages(self, conversation_id: str) -> list[dict[str, str]]:
        """The conversation as chat messages, to resume it.

        ``[{"role": "system", ...}]`` (the latest turn's system prompt, if it
        had one) then one user and one assistant message per user-facing turn,
        in order. Raises ``InvalidRequest`` naming ``conversation_id`` if no
        such conversation exists.
        """
        with self._read() as conn:
            known = conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,))
            if known.fetchone() is None:
                raise InvalidRequest(
                    "conversation_id", f"no conversation {conversation_id!r} in {self.path}"
                )
        thread = [t for t in self.turns(limit=None, conversation_id=conversation_id)
                  if t.parent_id is None]
        messages: list[dict[str, str]] = []
        if thread and thread[-1].system:
            messages.append({"role": "system", "content": thread[-1].system})
        for turn in thread:
            messages.append({"role": "user", "content": turn.prompt})
            messages.append({"role": "assistant", "content": turn.response})
        return messages

    # -- model files ---------------------------------------------------------

    def file_sha256(self, path: Path) -> str:
        """sha256 of a model file, or of a folder's manifest (see ``store.hashing``).

        Cached by (resolved path, size, mtime_ns): a file is read again only
        after it changes. Raises ``ModelNotFound`` if ``path`` does not exist.
        """
        # Hashing a large file must not hold the lock: the DB work takes it itself.
        try:
            return hashing.cached_sha256(self._conn, Path(path), self._lock)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _filters(**equal: str | None) -> tuple[str, list[str]]:
    """A WHERE clause requiring each non-None column to equal its value."""
    used = {column: value for column, value in equal.items() if value is not None}
    if not used:
        return "", []
    return " WHERE " + " AND ".join(f"{c} = ?" for c in used), list(used.values())
