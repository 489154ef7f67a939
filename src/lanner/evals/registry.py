"""Where tasks are found: a YAML path, or a name looked up in ``--include-path``
folders and then among the tasks that ship with Lanner (``evals/tasks/``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lanner.errors import TaskError
from lanner.evals.taskfile import read_yaml

BUILTIN = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskEntry:
    name: str
    path: Path
    output_type: str
    licence: str
    source: str


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def entries(include: Sequence[Path] = ()) -> list[TaskEntry]:
    """Every task in the include folders, then the built-in ones."""
    found: dict[str, TaskEntry] = {}
    for folder in [*include, BUILTIN]:
        if not Path(folder).is_dir():
            raise TaskError(f"--include-path {folder}: not a folder")
        for path in _yaml_files(Path(folder)):
            cfg = read_yaml(path)
            if "task" not in cfg or "dataset_path" not in cfg:
                continue  # a base file meant for `include:`
            meta = cfg.get("metadata") or {}
            name = str(cfg["task"])
            found.setdefault(name, TaskEntry(
                name, path, str(cfg.get("output_type", "generate_until")),
                str(meta.get("licence", "see the data's source")), str(meta.get("source", "")),
            ))
    return list(found.values())


def find(name_or_path: str, include: Sequence[Path] = ()) -> Path:
    """The YAML file of a task given by path or by name."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file {name_or_path} not found")
        return path
    for entry in entries(include):
        if entry.name == name_or_path or entry.path.stem == name_or_path:
            return entry.path
    names = ", ".join(sorted(e.name for e in entries(include)))
    raise TaskError(f"no task named {name_or_path!r} (known: {names}; or give a .yaml file)")
