"""Rows of fine-tuning data files, and the conversation each row stands for.

A row that cannot be used is a ``DataError`` naming the file and line (for
Parquet, the 1-based row number), unless ``skip_bad_rows`` is set: then it is
skipped and counted by a ``BadRows``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanner.chat.prompts import render_prompt
from lanner.engine.chatformat import validate_messages
from lanner.errors import DataError, InvalidRequest

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Row:
    source: str
    """"file:line" ("file:row N" for Parquet and JSON-list files)."""
    values: dict[str, Any]


@dataclass(frozen=True)
class ChatSample:
    """A conversation, rendered with the ChatFormat."""

    messages: Messages


@dataclass(frozen=True)
class TextSample:
    """Raw text (format completion): ``prompt`` then ``completion``, no template."""

    prompt: str
    completion: str


Sample = ChatSample | TextSample


class BadRow(ValueError):
    """Why a row cannot be used (the caller adds the file and line)."""


@dataclass
class BadRows:
    """Raises a row's DataError, or with ``skip`` counts it and keeps the first reasons."""

    skip: bool
    count: int = 0
    reasons: list[str] = field(default_factory=list)
    keep: int = 10

    def report(self, source: str, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{source}: {reason} (set data.skip_bad_rows to skip such rows)")
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(f"{source}: {reason}")


# -- reading files -----------------------------------------------------------------


def read_rows(file: Path, bad: BadRows) -> Iterator[Row]:
    """Every usable row of ``file`` in order; malformed ones go to ``bad``."""
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(file)
        return
    text = _text(file)
    if suffix == ".csv":
        yield from _csv_rows(file, text, bad)
    elif text.lstrip().startswith("["):
        yield from _json_list_rows(file, text, bad)
    else:
        yield from _jsonl_rows(file, text, bad)


def _text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read: {exc}") from exc


def _jsonl_rows(file: Path, text: str, bad: BadRows) -> Iterator[Row]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.report(f"{file}:{n}", f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(value, dict):
            bad.report(f"{file}:{n}", f"a row must be a JSON object, got {type(value).__name__}")
            continue
        yield Row(f"{file}:{n}", value)


def _json_list_rows(file: Path, text: str, bad: BadRows) -> Iterator[Row]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:  # the whole file is one value: nothing to skip to
        raise DataError(f"{file}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    for i, value in enumerate(values, start=1):
        if not isinstance(value, dict):
            bad.report(f"{file}:row {i}", f"a row must be a JSON object, got "
                       f"{type(value).__name__}")
            continue
        yield Row(f"{file}:row {i}", value)


def _csv_rows(file: Path, text: str, bad: BadRows) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{file}: empty CSV file (no header row)")
        line = reader.line_num + 1
        for record in reader:
            if record and len(record) != len(header):
                bad.report(f"{file}:{line}", f"{len(record)} fields, the header has "
                           f"{len(header)}")
            elif record:
                yield Row(f"{file}:{line}", dict(zip(header, record, strict=True)))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{file}:{reader.line_num}: not valid CSV: {exc}") from exc


def _parquet_rows(file: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        values = pq.read_table(file).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types (ArrowInvalid, OSError)
        raise DataError(f"{file}: cannot read Parquet: {exc}") from exc
    for i, value in enumerate(values, start=1):
        yield Row(f"{file}:row {i}", value)


# -- rows -> samples -----------------------------------------------------------------


def sample_maker(data_format: str, system: str | None,
                 schema: Path | None) -> Callable[[dict[str, Any]], Sample]:
    """The function that turns a row of ``data_format`` into a Sample (raises BadRow)."""
    if data_format == "completion":
        return _completion
    if data_format == "chat":
        return lambda row: ChatSample(_with_system(_chat(row), system))
    if data_format == "alpaca":
        return lambda row: ChatSample(_with_system(_alpaca(row), system))
    if data_format == "sql":
        tables = read_schema(schema) if schema else ""
        return lambda row: ChatSample(_with_system(_sql(row, tables), system))
    raise ValueError(f"unknown data format {data_format!r}")


def read_schema(path: Path) -> str:
    """A schema file as the sql evaluation task shows it: ``--`` comment lines left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the schema: {exc}") from exc
    return "\n".join(line for line in text.splitlines() if not line.startswith("--")).strip()


def sql_reply(query: str) -> str:
    """The assistant reply a sql row trains: the query in a ```sql block, as the
    prompt asks."""
    return f"```sql\n{query.strip()}\n```"


def _chat(row: dict[str, Any]) -> Messages:
    messages = _field(row, "messages", (list, str))
    if isinstance(messages, str):  # a CSV cell holds the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise BadRow(f"messages: not valid JSON: {exc.msg}") from exc
    try:
        clean = validate_messages(messages)
    except InvalidRequest as exc:
        raise BadRow(str(exc)) from exc
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRow("messages: no assistant message to train on")
    return clean


def _alpaca(row: dict[str, Any]) -> Messages:
    instruction = _field(row, "instruction", str)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"input: must be text, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _field(row, "output", str)}]


def _sql(row: dict[str, Any], tables: str) -> Messages:
    question = _field(row, "question", str)
    prompt = render_prompt("tune_sql_user.jinja", schema=tables, question=question)
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": sql_reply(_field(row, "query", str))}]


def _completion(row: dict[str, Any]) -> Sample:
    return TextSample(_field(row, "prompt", str, empty=True), _field(row, "completion", str))


def _field(row: dict[str, Any], key: str, kind: type | tuple[type, ...],
           empty: bool = False) -> Any:
    if key not in row or row[key] is None:
        raise BadRow(f"no {key!r} (columns: {', '.join(map(str, row)) or 'none'})")
    value = row[key]
    if not isinstance(value, kind):
        raise BadRow(f"{key}: must be {'text' if kind is str else 'a list'}, got "
                     f"{type(value).__name__}")
    if not empty and isinstance(value, str) and not value.strip():
        raise BadRow(f"{key}: is empty")
    return value


def _with_system(messages: Messages, system: str | None) -> Messages:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]
