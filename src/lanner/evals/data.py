"""Rows of a task's data files (JSON Lines, a JSON list, CSV; optionally gzipped).

A row that cannot be read is a ``TaskError`` naming the file and line: a
silently skipped row would change every score after it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

from lanner.errors import TaskError

Doc = dict[str, Any]


def read_split(files: tuple[Path, ...], data_format: str) -> list[Doc]:
    """Every row of ``files``, in order."""
    docs: list[Doc] = []
    for file in files:
        docs.extend(_read_csv(file) if data_format == "csv" else _read_json(file))
    return docs


def _text(file: Path) -> str:
    try:
        raw = file.read_bytes()
        if file.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise TaskError(f"{file}: cannot read: {exc}") from exc


def _read_json(file: Path) -> list[Doc]:
    text = _text(file)
    if text.lstrip().startswith("["):  # one JSON list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{file}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        return [_row(file, i + 1, r) for i, r in enumerate(rows)]
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{file}:{n}: not valid JSON: {exc.msg}") from exc
        docs.append(_row(file, n, value))
    return docs


def _row(file: Path, line: int, value: object) -> Doc:
    if not isinstance(value, dict):
        raise TaskError(f"{file}:{line}: a row must be a JSON object, got {type(value).__name__}")
    return value


def _read_csv(file: Path) -> list[Doc]:
    reader = csv.reader(io.StringIO(_text(file), newline=""))
    header = next(reader, None)
    if not header:
        raise TaskError(f"{file}: empty CSV file (no header row)")
    docs = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise TaskError(f"{file}:{reader.line_num}: {len(row)} fields, the header has "
                            f"{len(header)}")
        docs.append(dict(zip(header, row, strict=True)))
    for column in header:
        _infer_numbers(docs, column)
    return docs


def _infer_numbers(docs: list[Doc], column: str) -> None:
    """Make a column of integers (or of numbers) numeric, as ``datasets``' CSV
    reader (pandas) does: ``doc_to_target: label`` must see 1, not "1"."""
    for kind in (int, float):
        try:
            values = [kind(doc[column]) for doc in docs]
        except ValueError:
            continue
        for doc, value in zip(docs, values, strict=True):
            doc[column] = value
        return
