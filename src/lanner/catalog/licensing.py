"""Licence notices: before a model whose licence restricts hosting, commercial
use or the use of outputs, or needs its terms accepted (Falcon-180B, Llama 2,
Gemma, ...), say so once per model and Lanner home.

Shown notices are remembered in ``<home>/licence-notices.json``; a damaged or
unwritable file only means the notice shows again. A model whose licence needs
no notice is remembered in ``<home>/licence-checked.json`` (by name, recorded
licence, Hub repo and Lanner version), so that later runs of it skip reading
the catalog (15 ms of a one-shot ``lanner run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lanner import __version__
from lanner.engine.registry import ModelSpec, registered

if TYPE_CHECKING:  # the catalog loads when a licence is looked up, not on import
    from lanner.catalog.entries import Licence


def notices_path(home: Path) -> Path:
    return home / "licence-notices.json"


def licence_of(spec: ModelSpec, home: Path) -> Licence | None:
    """The licence of a local model: its recorded licence (model card, bundled
    entry) if the catalog knows it, else the catalog entry of its Hub repo."""
    from lanner.catalog.entries import find, licence_for, licences

    lic = licence_for(spec.license)
    if lic is not None:
        return lic
    repo = registered(home).get(spec.name, {}).get("repo")
    entry = find(repo) if repo else None
    return licences()[entry.licence] if entry else None


def notice(model: str, lic: Licence) -> str:
    """The warning text: which licence, what it restricts, where to read it."""
    return (f"lanner: note: {model} is under the {lic.name} "
            f"({'; '.join(lic.restrictions())}). {lic.summary} Terms: {lic.url}")


def warn_once(home: Path, model: str, lic: Licence | None, *, key: str | None = None,
              stream: TextIO | None = None) -> bool:
    """Print the notice for ``model`` unless its licence needs none or it was
    shown before in this home (``key``: what identifies the model, by default
    its name; a Hub repo id, so that pull and run share one notice). True if
    it was printed."""
    if lic is None or not lic.warns:
        return False
    seen_key = f"{key or model}|{lic.id}"
    path = notices_path(home)
    seen = _read(path)
    if seen_key in seen:
        return False
    print(notice(model, lic), file=stream or sys.stderr, flush=True)
    _write(path, sorted({*seen, seen_key}))
    return True


def checked_path(home: Path) -> Path:
    return home / "licence-checked.json"


def warn_for_spec(home: Path, spec: ModelSpec, *, stream: TextIO | None = None) -> bool:
    """``warn_once`` for a resolved local model (keyed by its Hub repo if pulled).

    A model found to need no notice is remembered with what decided it (its
    recorded licence, its repo, this Lanner's catalog), and not looked up again
    until one of them changes."""
    repo = registered(home).get(spec.name, {}).get("repo")
    quiet_key = f"{__version__}|{spec.name}|{spec.license or ''}|{repo or ''}"
    path = checked_path(home)
    quiet = _read(path)
    if quiet_key in quiet:
        return False
    lic = licence_of(spec, home)
    if lic is not None and lic.warns:
        return warn_once(home, spec.name, lic, key=repo, stream=stream)
    # Keys of other Lanner versions go: their catalog may have said otherwise.
    _write(path, sorted({k for k in quiet if k.startswith(f"{__version__}|")} | {quiet_key}))
    return False


def warn_for_repo(home: Path, repo_id: str, card_licence: str | None = None, *,
                  stream: TextIO | None = None) -> bool:
    """``warn_once`` before pulling ``repo_id``: the catalog's licence for it,
    else the one its model card names."""
    from lanner.catalog.entries import find, licence_for, licences

    entry = find(repo_id)
    lic = licences()[entry.licence] if entry else licence_for(card_licence)
    return warn_once(home, repo_id, lic, key=repo_id, stream=stream)


def _read(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {str(x) for x in data} if isinstance(data, list) else set()


def _write(path: Path, keys: list[str]) -> None:
    with contextlib.suppress(OSError):  # unwritten: the notice simply shows again
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(keys, f, indent=1)
        os.replace(tmp, path)
