"""Numbered schema migrations, applied in order, each in its own transaction.

A migration is a package-data file ``lanner/store/migrations/NNNN_name.sql``
(numbers start at 0001, no gaps). Applied ones are recorded in the table
``_migrations(id, name, applied_at)``; a database that records a migration this
version does not know was written by a newer Lanner and is refused rather than
guessed at. To change the schema, add the next numbered file; never edit one
that has shipped.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

from lanner.errors import StoreError
from lanner.store.turn import utc_now

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    id: int
    name: str
    """File name without ``.sql``, e.g. ``0001_initial``."""
    sql: str


def known_migrations() -> list[Migration]:
    """The migrations shipped with this version, in order.

    Raises ``StoreError`` on a misnamed file, a duplicate number or a gap:
    each would make two installs disagree about what schema N means.
    """
    folder = resources.files("lanner.store").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise StoreError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.id)
    if [m.id for m in found] != list(range(1, len(found) + 1)):
        names = [m.name for m in found]
        raise StoreError(f"migrations must be numbered 1..N without gaps: {names}")
    return found


def split_statements(script: str) -> list[str]:
    """Split an SQL script into single statements.

    ``executescript`` would do this for us but commits first, which breaks
    one-transaction-per-migration; SQLite's own ``complete_statement`` tells
    where a statement ends (it knows about strings, comments and triggers).
    """
    statements: list[str] = []
    buffer = ""
    *pieces, last = script.split(";")
    for piece in pieces:
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    rest = buffer + last
    if _strip_comments(rest).strip():
        raise StoreError(f"unterminated SQL statement in migration: {rest.strip()[:80]!r}")
    return [s for s in statements if _strip_comments(s).strip(" \n\t;")]


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def apply_pending(conn: sqlite3.Connection, where: str) -> list[str]:
    """Apply the migrations ``conn`` lacks; return the names applied.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Each
    migration runs in its own ``BEGIN IMMEDIATE`` transaction, so a failure
    leaves the database at the previous schema, and two processes opening
    the same new database cannot both apply one. ``where`` names the database
    in error messages.
    """
    _check_ours(conn, where)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations ("
        " id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    known = known_migrations()
    _check_not_newer(conn, known, where)
    applied: list[str] = []
    for migration in known:
        if _apply_one(conn, migration, where):
            applied.append(migration.name)
    return applied


def _check_ours(conn: sqlite3.Connection, where: str) -> None:
    """Refuse another program's SQLite file rather than add our tables to it."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "_migrations" not in tables:
        raise StoreError(
            f"{where} is a SQLite database but not Lanner's (it has no _migrations table); "
            "move it aside or use another --home"
        )


def _check_not_newer(conn: sqlite3.Connection, known: list[Migration], where: str) -> None:
    names = {m.id: m.name for m in known}
    for mid, name in conn.execute("SELECT id, name FROM _migrations ORDER BY id"):
        if mid not in names:
            raise StoreError(
                f"{where} has schema migration {name!r}, newer than this Lanner knows "
                f"(up to {known[-1].name if known else 'none'}); upgrade Lanner to open it"
            )
        if names[mid] != name:
            raise StoreError(
                f"{where} records migration {mid} as {name!r} but this Lanner ships "
                f"{names[mid]!r}; the database was written by a different build"
            )


def _apply_one(conn: sqlite3.Connection, migration: Migration, where: str) -> bool:
    """Apply ``migration`` unless already recorded; True if this call applied it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Checked inside the write lock: another process may have just applied it.
        row = conn.execute("SELECT 1 FROM _migrations WHERE id = ?", (migration.id,))
        if row.fetchone() is not None:
            conn.execute("COMMIT")
            return False
        for statement in split_statements(migration.sql):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO _migrations (id, name, applied_at) VALUES (?, ?, ?)",
            (migration.id, migration.name, utc_now()),
        )
        conn.execute("COMMIT")
    except BaseException as exc:  # re-raised below; the rollback must happen on any failure
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{where}: migration {migration.name} failed: {exc}") from exc
        raise
    return True
