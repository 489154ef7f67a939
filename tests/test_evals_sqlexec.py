"""Text-to-SQL execution accuracy on the bookshop database, its gold data, and
the bundled task files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from lanner.errors import TaskError
from lanner.evals.sqlexec import database_path, execution_accuracy, has_top_level_order_by

TASKS = Path(__file__).resolve().parents[1] / "src" / "lanner" / "evals" / "tasks"
DATA = TASKS / "text_to_sql"
DATABASE = "text_to_sql/shop.sqlite"


def score(prediction: str, gold: str, **options: Any) -> float:
    return execution_accuracy(prediction, {"question": "?", "query": gold}, task_dir=TASKS,
                              database=DATABASE, **options)


def rows(split: str) -> list[dict[str, str]]:
    with (DATA / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def db() -> Path:
    return database_path(TASKS / DATABASE)


def test_database_is_built_in_the_cache_not_beside_the_task(lanner_home: Path, db: Path) -> None:
    assert db.is_relative_to(lanner_home)
    assert not (TASKS / DATABASE).exists()
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM books").fetchone() == (60,)
    con.close()


def test_same_rows_in_another_order_score_1() -> None:
    gold = "SELECT title FROM books WHERE genre = 'Poetry'"
    assert score("SELECT title FROM books WHERE genre = 'Poetry' ORDER BY title DESC", gold) == 1.0
    assert score("select b.title from books as b where b.genre like 'poetry';", gold) == 1.0


def test_order_counts_when_the_gold_query_orders() -> None:
    gold = "SELECT title, pages FROM books ORDER BY pages DESC LIMIT 3"
    assert score("SELECT title, pages FROM books ORDER BY pages DESC LIMIT 3", gold) == 1.0
    assert score("SELECT title, pages FROM books WHERE pages > 520 ORDER BY pages", gold) == 0.0


def test_duplicates_count() -> None:
    gold = "SELECT genre FROM books WHERE genre = 'Poetry'"
    assert score("SELECT DISTINCT genre FROM books WHERE genre = 'Poetry'", gold) == 0.0


@pytest.mark.parametrize("prediction", [
    "SELECT title FROM books WHERE genre = 'Mystery'",     # wrong rows
    "SELECT title, price FROM books WHERE genre = 'Poetry'",  # wrong columns
    "SELEC title FROM books",                               # syntax error
    "SELECT title FROM no_such_table",
    "[invalid]",                                            # lm-eval's regex fallback
    "",
])
def test_wrong_queries_score_0(prediction: str) -> None:
    assert score(prediction, "SELECT title FROM books WHERE genre = 'Poetry'") == 0.0


@pytest.mark.parametrize("statement", [
    "DELETE FROM books",
    "DROP TABLE reviews",
    "INSERT INTO authors VALUES (99, 'Mallory', 'Nowhere', 2000)",
    "UPDATE books SET price = 0",
    "ATTACH DATABASE 'attached.sqlite' AS other",
    "PRAGMA writable_schema = ON",
    "SELECT 1; DELETE FROM books",
    "WITH doomed AS (SELECT book_id FROM books) DELETE FROM books",
    "CREATE TABLE loot AS SELECT * FROM customers",
    "VACUUM INTO 'copy.sqlite'",
])
def test_statements_that_are_not_a_select_score_0_and_change_nothing(
        statement: str, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"  # where ATTACH or VACUUM INTO would create a file
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    assert score(statement, "SELECT COUNT(*) FROM books") == 0.0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("runaway", [
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n",
    "SELECT COUNT(*) FROM order_items a, order_items b, order_items c, order_items d",
])
def test_runaway_query_is_stopped_at_the_time_limit(runaway: str) -> None:
    start = time.monotonic()
    assert score(runaway, "SELECT COUNT(*) FROM books", timeout=0.5) == 0.0
    assert time.monotonic() - start < 3


def test_endless_stream_of_rows_scores_0() -> None:
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i FROM n"
    assert score(endless, "SELECT book_id FROM books") == 0.0


def test_a_broken_gold_query_is_the_task_s_error() -> None:
    with pytest.raises(TaskError, match="gold query"):
        score("SELECT 1", "SELECT nothing FROM nowhere")


@pytest.mark.parametrize(("sql", "ordered"), [
    ("SELECT a FROM t ORDER BY a", True),
    ("select a from t order\n by a desc limit 3", True),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)", False),
    ("SELECT RANK() OVER (PARTITION BY g ORDER BY p) FROM t", False),
    ("SELECT 'order by' FROM t", False),
    ("SELECT SUM(x) OVER (ORDER BY id) FROM t GROUP BY id ORDER BY id", True),
])
def test_top_level_order_by(sql: str, ordered: bool) -> None:
    assert has_top_level_order_by(sql) is ordered


# --- the data ----------------------------------------------------------------------

def test_split_sizes_and_no_overlap() -> None:
    train, test = rows("train"), rows("test")
    assert len(train) + len(test) >= 300
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == len(questions)
    assert all(set(r) == {"question", "query"} for r in train + test)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gold_query_returns_rows_in_a_stable_order(split: str, db: Path) -> None:
    con = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
    problems = []
    for row in rows(split):
        sql = row["query"]
        results = []
        for reverse in (0, 1):  # a result that changes with scan order is ambiguous
            con.execute(f"PRAGMA reverse_unordered_selects = {reverse}")
            found = [tuple(round(v, 6) if isinstance(v, float) else v for v in r)
                     for r in con.execute(sql).fetchall()]
            results.append(found if has_top_level_order_by(sql) else Counter(found))
        if not results[0] or all(v is None for r in results[0] for v in r):
            problems.append(f"no rows: {sql}")
        elif results[0] != results[1]:
            problems.append(f"depends on scan order: {sql}")
    con.close()
    assert problems == []


def test_gold_queries_score_1_against_themselves() -> None:
    # Every construct the gold queries use (CTEs, windows, INTERSECT...) gets
    # past the read-only authorizer.
    for row in rows("train") + rows("test"):
        assert score(row["query"], row["query"]) == 1.0, row["question"]


# --- the bundled task files ----------------------------------------------------------

def _data_file(name: str, task: Path) -> Path:
    if name.startswith("package:"):
        module, _, rest = name.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            pytest.fail(f"{module} is not installed (make install)")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    return task.parent / name


@pytest.mark.parametrize("task", sorted(TASKS.glob("*.yaml")), ids=lambda p: p.name)
def test_task_files_parse_and_name_existing_data(task: Path) -> None:
    config = yaml.safe_load(task.read_text(encoding="utf-8"))
    assert config["dataset_path"] == "json"
    for files in config["dataset_kwargs"]["data_files"].values():
        assert _data_file(files, task).is_file(), files
    assert {"licence", "source"} <= set(config["metadata"])


def _sql_task() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((TASKS / "sql.yaml").read_text(encoding="utf-8"))
    return config


def test_sql_prompt_shows_schema_sql_and_the_question() -> None:
    schema = "\n".join(line for line in (DATA / "schema.sql").read_text().splitlines()
                       if not line.startswith("--")).strip()
    prompt = jinja2.Template(_sql_task()["doc_to_text"]).render(question="How many books?")
    assert prompt.startswith("You are given an SQLite database with these tables:\n\n"
                             + schema + "\n\nWrite one SQLite query")
    assert prompt.endswith("\n\nQuestion: How many books?\nSQL:")


@pytest.mark.parametrize(("reply", "query"), [
    ("```sql\nSELECT title FROM books;\n```\nThis lists the titles.", "SELECT title FROM books;"),
    ("Here it is:\n```sqlite\nSELECT 1\n```", "SELECT 1"),
    ("```sql\nSELECT 2 FROM books", "SELECT 2 FROM books"),  # cut off before the fence closed
    (" SELECT name\nFROM authors;\n\nQuestion: next", "SELECT name\nFROM authors"),
    ("SELECT 3\n\nThe query counts.", "SELECT 3"),
])
def test_sql_filter_extracts_the_query(reply: str, query: str) -> None:
    step = _sql_task()["filter_list"][0]["filter"][0]
    # lm-eval's RegexFilter: findall, first match, first non-empty group, stripped.
    match = re.findall(step["regex_pattern"], reply)[0]
    assert next(group for group in match if group).strip() == query
