"""The Store: migrations, the turn log, model-file hashes, `lanner logs`, and
durability when the process is killed mid-write."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import lanner
from lanner import paths
from lanner.cli import logs as logs_cli
from lanner.errors import InvalidRequest, ModelNotFound, StoreError
from lanner.store import Store, Turn, hashing, migrate

SHA = "ab" * 32
TEMPLATE_SHA = "cd" * 32


def make_turn(cid: str, i: int = 0, **changes: object) -> Turn:
    fields: dict[str, object] = dict(
        conversation_id=cid, model="smollm2", model_path="/models/smol.gguf",
        model_sha256=SHA, backend="llama.cpp", backend_version="0.3.36",
        chat_format="chatml", chat_format_hash=TEMPLATE_SHA, system="Be brief.",
        prompt=f"question {i}", response=f"answer {i}",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": f"question {i}"}],
        sampling={"temperature": 0.7, "top_p": 0.9, "seed": 1234, "stop": ("\n\n",)},
        seed=1234, prompt_tokens=12, completion_tokens=5, finish_reason="stop",
        ttft_s=0.05, total_s=0.25,
    )
    fields.update(changes)
    return Turn(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "logs.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store(db) as s:
        yield s


def _migrations(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, name FROM _migrations ORDER BY id").fetchall()


# -- opening and migrations ---------------------------------------------------


def test_migrations_apply_once_and_are_recorded(db: Path) -> None:
    known = migrate.known_migrations()
    assert [m.name for m in known][0] == "0001_initial"
    with Store(db) as first:
        assert first.applied == [m.name for m in known]
    with Store(db) as again:
        assert again.applied == []
    assert _migrations(db) == [(m.id, m.name) for m in known]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "responses", "file_hashes", "_migrations"} <= tables


def test_newer_schema_is_refused(db: Path) -> None:
    Store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO _migrations VALUES (99, '0099_future', 'x')")
    with pytest.raises(StoreError, match="newer than this Lanner knows"):
        Store(db)


def test_a_file_that_is_not_a_database_is_refused_and_left_alone(db: Path) -> None:
    db.write_text("these are my notes, not a database\n" * 200)
    before = db.read_bytes()
    with pytest.raises(StoreError, match="not a SQLite database"):
        Store(db)
    assert db.read_bytes() == before


def test_another_programs_sqlite_file_is_refused(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE bookmarks (url TEXT)")
    with pytest.raises(StoreError, match="not Lanner's"):
        Store(db)


def test_a_failing_migration_leaves_the_previous_schema(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(db).close()
    shipped = migrate.known_migrations()
    n = len(shipped) + 1
    broken = migrate.Migration(n, f"{n:04d}_broken", "CREATE TABLE half (x);\nNOT SQL AT ALL;")
    monkeypatch.setattr(migrate, "known_migrations", lambda: [*shipped, broken])
    with pytest.raises(StoreError, match=f"{n:04d}_broken failed"):
        Store(db)
    assert _migrations(db) == [(m.id, m.name) for m in shipped]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None


def test_split_statements_respects_strings_comments_and_triggers() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE t (x TEXT DEFAULT 'a;b');
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 'c;d'; END;
    """
    statements = migrate.split_statements(script)
    assert len(statements) == 2
    assert statements[1].endswith("END;")
    with pytest.raises(StoreError, match="unterminated"):
        migrate.split_statements("CREATE TABLE u (x)")


# -- the log --------------------------------------------------------------------


def test_log_and_turns_round_trip(store: Store) -> None:
    cid = store.new_conversation("smollm2", title="greeting")
    turn = make_turn(cid, response="héllo ✓ 👋")
    turn_id = store.log(turn)
    assert turn.id == turn_id
    [back] = store.turns()
    assert back.id == turn_id
    assert back.response == "héllo ✓ 👋"
    assert back.messages == turn.messages
    # JSON has no tuples: the stop strings come back as a list.
    assert back.sampling == {"temperature": 0.7, "top_p": 0.9, "seed": 1234, "stop": ["\n\n"]}
    assert (back.model_sha256, back.chat_format_hash, back.seed) == (SHA, TEMPLATE_SHA, 1234)
    assert back.created_at == turn.created_at and back.created_at.endswith("+00:00")
    assert back.citations is None


def test_a_documents_answer_keeps_its_citations(store: Store) -> None:
    citations = {"sources": [{"number": 1, "path": "/d/a.txt", "start": 0, "end": 9,
                              "text": "Built 1871"}],
                 "citations": [{"number": 1, "verified": True, "marker": [12, 15]}]}
    store.log(make_turn(store.new_conversation("smollm2"), citations=citations))
    assert store.turns()[0].citations == citations


def test_turns_gives_the_latest_oldest_first_and_filters(store: Store) -> None:
    a = store.new_conversation("smollm2")
    b = store.new_conversation("qwen")
    for i in range(5):
        store.log(make_turn(a, i))
        store.log(make_turn(b, i, model="qwen"))
    latest = store.turns(limit=3)
    assert [(t.model, t.prompt) for t in latest] == [
        ("qwen", "question 3"), ("smollm2", "question 4"), ("qwen", "question 4")]
    assert [t.prompt for t in store.turns(limit=None, conversation_id=a)] == [
        f"question {i}" for i in range(5)]
    assert [t.prompt for t in store.turns(limit=2, model="qwen")] == ["question 3", "question 4"]
    assert len(store.turns(limit=None)) == 10
    assert store.turns(conversation_id="nope") == []
    with pytest.raises(InvalidRequest, match="limit"):
        store.turns(limit=0)


def test_conversation_messages_rebuild_the_thread(store: Store) -> None:
    assert store.last_conversation_id() is None
    a = store.new_conversation("smollm2")
    b = store.new_conversation("smollm2")
    first = store.log(make_turn(a, 0))
    store.log(make_turn(b, 0, system=None))
    store.log(make_turn(a, 1))
    # A strategy's intermediate call belongs to a turn but not to the thread.
    store.log(make_turn(a, 99, parent_id=first, prompt="draft", response="scratch"))
    assert store.conversation_messages(a) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 0"},
        {"role": "assistant", "content": "answer 0"},
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": "answer 1"},
    ]
    assert store.conversation_messages(b)[0] == {"role": "user", "content": "question 0"}
    assert store.last_conversation_id() == a
    store.log(make_turn(b, 1))
    assert store.last_conversation_id() == b
    with pytest.raises(InvalidRequest, match="no conversation"):
        store.conversation_messages("0123")


def test_conversation_ids_are_unique_and_sort_by_creation(store: Store) -> None:
    ids = [store.new_conversation("smollm2") for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0][:12] <= ids[-1][:12]  # the time prefix never goes backwards


def test_log_refuses_bad_turns(store: Store) -> None:
    cid = store.new_conversation("smollm2")
    turn = make_turn(cid)
    store.log(turn)
    with pytest.raises(StoreError, match="already logged"):
        store.log(turn)
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.log(make_turn(cid, parent_id=12345))
    with pytest.raises(StoreError, match="conversation_id is empty"):
        store.log(make_turn(""))
    with pytest.raises(StoreError, match="sampling cannot be stored"):
        store.log(make_turn(cid, sampling={"x": object()}))
    assert len(store.turns(limit=None)) == 1  # the failed ones left nothing behind


def test_an_unknown_conversation_id_is_created_on_log(store: Store) -> None:
    store.log(make_turn("server-request-1"))
    assert store.conversation_messages("server-request-1")[1]["content"] == "question 0"


def test_one_store_can_be_shared_by_threads(store: Store) -> None:
    cid = store.new_conversation("smollm2")

    def worker(k: int) -> None:
        for i in range(25):
            store.log(make_turn(cid, 100 * k + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns = store.turns(limit=None)
    assert len(turns) == 100 and len({t.id for t in turns}) == 100


# -- model-file hashes ------------------------------------------------------------


def test_file_sha256_matches_hashlib_and_reads_the_file_once(
    store: Store, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(3 << 20))
    reads: list[Path] = []
    real = hashing.sha256_of_file

    def counting(path: Path) -> str:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "sha256_of_file", counting)

    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert store.file_sha256(model) == expected
    assert store.file_sha256(model) == expected
    with Store(db) as reopened:  # the cache is in the database, not the process
        assert reopened.file_sha256(model) == expected
    assert reads == [model]

    model.write_bytes(b"retrained")
    os.utime(model, ns=(1, 1))  # a new mtime and size: the cached hash no longer applies
    assert store.file_sha256(model) == hashlib.sha256(b"retrained").hexdigest()
    assert len(reads) == 2


def test_folder_sha256_is_the_sha256sum_manifest(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(b"weights")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("changes every download")
    manifest = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in [("config.json", b"{}"), ("sub/model.safetensors", b"weights")]
    )
    assert store.file_sha256(folder) == hashlib.sha256(manifest.encode()).hexdigest()
    with pytest.raises(ModelNotFound):
        store.file_sha256(tmp_path / "missing.gguf")


def test_the_bundled_model_hash_is_cached(store: Store, smollm2_gguf: Path) -> None:
    import time

    start = time.perf_counter()
    first = store.file_sha256(smollm2_gguf)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    assert store.file_sha256(smollm2_gguf) == first
    warm = time.perf_counter() - start
    assert len(first) == 64
    assert warm < cold / 10, (cold, warm)


# -- paths ------------------------------------------------------------------------


def test_home_prefers_the_flag_then_the_environment_then_the_user_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda name: str(tmp_path / "data" / name))
    monkeypatch.setenv("LANNER_HOME", str(tmp_path / "env"))
    assert paths.home(tmp_path / "flag") == tmp_path / "flag"
    assert paths.home() == tmp_path / "env"
    monkeypatch.delenv("LANNER_HOME")
    assert paths.home() == tmp_path / "data" / "lanner"
    assert (tmp_path / "flag").is_dir() and (tmp_path / "data" / "lanner").is_dir()
    assert paths.db_path(tmp_path) == tmp_path / "logs.db"


# -- `lanner logs` ---------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lanner")
    parser.add_argument("--home", default=None)
    logs_cli.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(list(argv))


def _log_four(home: Path) -> str:
    with Store(paths.db_path(paths.home(home))) as s:
        cid = s.new_conversation("smollm2")
        for i in range(4):
            s.log(make_turn(cid, i, seed=1234 + i))
    return cid


def test_logs_shows_provenance_of_the_latest_three(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "h"
    cid = _log_four(home)
    args = _parse("--home", str(home), "logs")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "question 0" not in out  # only the latest three by default
    for text in ("question 1", "answer 3", SHA[:12], TEMPLATE_SHA[:12], cid,
                 "llama.cpp 0.3.36", "temperature=0.7", "top_p=0.9", "seed=1237",
                 "12 prompt + 5 completion tokens", "finish=stop", "## System"):
        assert text in out, text
    assert out.index("question 1") < out.index("question 3")  # newest last


def test_logs_json_and_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LANNER_HOME", str(tmp_path / "env-home"))
    cid = _log_four(tmp_path / "env-home")
    with Store(paths.db_path(tmp_path / "env-home")) as s:
        s.log(make_turn(s.new_conversation("qwen"), 9, model="qwen"))

    assert logs_cli.run(_parse("logs", "-n", "0", "--json")) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 5
    assert records[0]["model_sha256"] == SHA
    assert records[0]["sampling"]["temperature"] == 0.7
    assert records[0]["messages"][1] == {"role": "user", "content": "question 0"}

    logs_cli.run(_parse("logs", "--conversation", cid))
    out = capsys.readouterr().out
    assert [f"question {i}" in out for i in range(4)] == [True] * 4
    assert "question 9" not in out

    logs_cli.run(_parse("logs", "--model", "qwen", "--json"))
    assert [r["prompt"] for r in json.loads(capsys.readouterr().out)] == ["question 9"]


def test_logs_on_an_empty_log_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert logs_cli.run(argparse.Namespace(home=str(tmp_path / "new"))) == 0
    assert "No turns logged yet" in capsys.readouterr().out
    assert logs_cli.run(_parse("--home", str(tmp_path / "new"), "logs", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_logs_rejects_a_negative_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("logs", "-n", "-2")
    assert "-n/--count" in capsys.readouterr().err


# -- kill -9 ----------------------------------------------------------------------

_CHILD = """
import itertools, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_store import make_turn
from lanner.store import Store

store = Store(Path(sys.argv[1]))
cid = store.new_conversation("smollm2")
if sys.argv[2] == "held-write":
    for i in range(3):
        store.log(make_turn(cid, i))
    # A fourth turn mid-write, bigger than SQLite's page cache so uncommitted
    # pages spill into the WAL before the kill.
    big = make_turn(cid, 3, response="x" * (8 << 20))
    with store._write() as conn:
        conn.execute("INSERT INTO conversations VALUES ('half', 'm', NULL, 'now')")
        print("READY", flush=True)
        from lanner.store.turn import COLUMNS, to_row
        names, marks = ", ".join(COLUMNS), ", ".join("?" * len(COLUMNS))
        conn.execute(f"INSERT INTO responses ({{names}}) VALUES ({{marks}})", to_row(big))
        print("WRITTEN", flush=True)
        time.sleep(60)
else:
    for i in itertools.count():
        store.log(make_turn(cid, i, response="y" * 200_000))
        print(i + 1, flush=True)
"""


def _run_child(db: Path, mode: str, until: str | int) -> list[str]:
    """Start a child that logs turns, SIGKILL it at a point; return its output lines."""
    env = {**os.environ, "PYTHONPATH": str(Path(lanner.__file__).parents[1])}
    script = _CHILD.format(tests=str(Path(__file__).parent))
    child = subprocess.Popen([sys.executable, "-c", script, str(db), mode],
                             stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    assert child.stdout is not None
    stdout = child.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while not seen or seen[-1] != str(until):
            seen.append(lines.get(timeout=60))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        reader.join(timeout=30)  # drain what the child printed before it died
    while not lines.empty():
        seen.append(lines.get())
    assert child.returncode == -signal.SIGKILL
    return seen


def _check_intact(db: Path) -> list[Turn]:
    with Store(db) as s:
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return s.turns(limit=None)


def test_kill_9_during_a_write_keeps_every_committed_turn(db: Path) -> None:
    _run_child(db, "held-write", "WRITTEN")
    assert (db.parent / "logs.db-wal").stat().st_size > 1 << 20  # the half-write reached disk
    turns = _check_intact(db)
    assert [t.prompt for t in turns] == ["question 0", "question 1", "question 2"]
    assert all(t.response.startswith("answer") for t in turns)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM conversations WHERE id='half'").fetchone() == (0,)


def test_kill_9_in_a_stream_of_logs_loses_no_acknowledged_turn(db: Path) -> None:
    seen = _run_child(db, "loop", 25)
    acknowledged = int(seen[-1])
    turns = _check_intact(db)
    # Every turn whose log() returned is there; at most the one in flight is lost or kept whole.
    assert acknowledged <= len(turns) <= acknowledged + 1
    assert [t.prompt for t in turns] == [f"question {i}" for i in range(len(turns))]
    assert all(t.response == "y" * 200_000 for t in turns)
