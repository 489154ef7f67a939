"""Where Lanner keeps its files: the Lanner home and what lives in it."""

from __future__ import annotations

import os
from pathlib import Path

from lanner.errors import LannerError

HOME_ENV = "LANNER_HOME"


def home(override: str | Path | None = None) -> Path:
    """The Lanner home folder, created if missing.

    The first that is set wins: ``override`` (the ``--home`` flag), the
    ``LANNER_HOME`` environment variable, then the platform's user data
    folder (``~/.local/share/lanner`` on Linux). Raises ``LannerError`` if
    the folder cannot be created.
    """
    # `or` skips an empty flag or variable; a Path is never falsy.
    chosen: str | Path | None = override or os.environ.get(HOME_ENV) or None
    if chosen is None:
        import platformdirs  # only needed when no home is given

        chosen = platformdirs.user_data_dir("lanner")
    path = Path(chosen).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LannerError(f"cannot create the Lanner home {path}: {exc}") from exc
    return path


def db_path(home: Path) -> Path:
    """The log database inside ``home``."""
    return home / "logs.db"
