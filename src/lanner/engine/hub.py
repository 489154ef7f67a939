"""Pull models from the Hugging Face Hub into ``<LANNER_HOME>/models/<repo>``.

One GGUF file (``hf_hub_download``) or the safetensors/config/tokenizer files of
a transformers model (``snapshot_download``), checked against the Hub's own
size and hash metadata, then recorded in the registry (models.json) with the
repo, the commit, the licence from the model card, and where it came from.

``huggingface_hub`` is imported inside functions: ``import lanner`` stays fast.
The endpoint is ``HF_ENDPOINT`` (read at call time), the token the usual one
(``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from lanner.engine.registry import (
    ModelSpec,
    add_entry,
    check_name,
    index_path,
    registered,
    remove_entry,
    spec_for_path,
)
from lanner.errors import LannerError, ModelNotFound

DEFAULT_ENDPOINT = "https://huggingface.co"

# What a transformers model needs; weights in other formats (.bin, .pt, .onnx,
# .gguf) and duplicate checkpoints are left on the Hub.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken",
                     "*.txt", "*.jinja"]
SNAPSHOT_IGNORE = ["original/*", "onnx/*", "*/onnx/*", "consolidated*.safetensors"]

_SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file of a repo, with what the Hub says it should be."""

    name: str
    size: int | None
    sha256: str | None
    """Set for LFS files (weights); None for small git files."""
    blob_id: str | None
    """The git blob id (sha1 of ``b"blob <size>\\0" + content``)."""


@dataclass(frozen=True, slots=True)
class RepoListing:
    """A repo at one commit: its files and its licence."""

    repo_id: str
    commit: str
    license: str
    files: tuple[RemoteFile, ...]

    def file(self, name: str) -> RemoteFile | None:
        return next((f for f in self.files if f.name == name), None)


@dataclass(frozen=True, slots=True)
class PullPlan:
    """What to download: GGUF file(s), or a transformers snapshot."""

    format: str
    """"gguf" or "safetensors"."""
    files: tuple[RemoteFile, ...]
    main_file: str | None
    """For GGUF: the file to load (the first part of a split GGUF)."""


def endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def local_dir(home: Path, repo_id: str) -> Path:
    """Where a repo's files go: ``<home>/models/<org>/<name>``."""
    return home / "models" / Path(*repo_id.split("/"))


def pull(home: Path, repo_id: str, *, file: str | None = None, revision: str | None = None,
         name: str | None = None,
         on_listing: Callable[[RepoListing], object] | None = None,
         chat_format: str | None = None) -> ModelSpec:
    """Download a model from the Hub, verify it and register it under a short name.

    Raises ``LannerError`` (one line, no traceback) when the Hub cannot be
    reached, the repo, revision or file does not exist, the repo holds several
    GGUF files and ``file`` is not given, or a download does not match the
    Hub's size or hash. models.json is only written after a verified download.
    ``on_listing`` sees the repo's files and licence before anything is downloaded.
    ``chat_format`` is recorded for a checkpoint that ships no template (the
    catalog's format for the repo; the caller looks it up).
    """
    _check_repo_id(repo_id)
    registered(home)  # a damaged models.json fails now, not after the download
    if name is not None:
        _check_name_free(home, name, repo_id)
    listing = fetch_listing(repo_id, revision)
    if on_listing is not None:
        on_listing(listing)
    plan = choose(listing, file)
    short = name or default_name(repo_id, plan)
    _check_name_free(home, short, repo_id)
    dest = local_dir(home, repo_id)
    total = sum(f.size or 0 for f in plan.files)
    _say(f"pulling {repo_id}@{listing.commit[:12]}: {len(plan.files)} file(s), "
         f"{total / 1e6:.1f} MB -> {dest}")
    download(listing, plan, dest)
    _say("checking the files against the Hub's sizes and hashes")
    for remote in plan.files:
        verify(dest / remote.name, remote)
    path = dest / plan.main_file if plan.main_file else dest
    spec = spec_for_path(path, short)  # the same check `lanner add` makes
    add_entry(home, short, {
        "path": str(spec.path), "license": listing.license,
        "source": f"{endpoint()}/{repo_id}", "repo": repo_id,
        "revision": revision or "main", "commit": listing.commit,
        **({"chat_format": chat_format} if chat_format else {}),
    }, replace=True)
    return ModelSpec(short, spec.path, spec.format, listing.license, f"{endpoint()}/{repo_id}")


def remove(home: Path, name: str, *, delete_files: bool = False) -> list[Path]:
    """Drop ``name`` from the registry; with ``delete_files``, also delete what
    Lanner downloaded for it and return the deleted paths.

    Files outside ``<home>/models`` are never deleted: asking for that is a
    LannerError and the entry stays. A repo folder still used by another entry
    keeps its other files.
    """
    entries = registered(home)
    entry = entries.get(name)
    if entry is None or not delete_files:
        remove_entry(home, name)  # raises ModelNotFound for unknown names
        return []
    models_root = (home / "models").resolve()
    path = Path(entry["path"]).resolve()
    if not path.is_relative_to(models_root):
        raise LannerError(f"{path} was not downloaded by Lanner (it is outside {models_root}); "
                          f"not deleting it (run `lanner rm {name}` without --delete-files)")
    targets = _owned_paths(home, name, entries, path)
    remove_entry(home, name)
    for target in targets:
        _delete(target)
    _prune_empty(path.parent, models_root)
    return targets


def _owned_paths(home: Path, name: str, entries: dict[str, dict[str, str]],
                 path: Path) -> list[Path]:
    """The whole repo folder when no other entry uses it, else just the entry's files."""
    others = [Path(e["path"]).resolve() for n, e in entries.items() if n != name]
    repo = entries[name].get("repo")
    root = local_dir(home, repo).resolve() if repo else path
    if path.is_relative_to(root) and not any(o.is_relative_to(root) for o in others):
        return [root]
    split = _SPLIT_GGUF.match(path.name)
    if split:
        return sorted(path.parent.glob(f"{glob_escape(split['stem'])}-*-of-{split['total']}.gguf"))
    return [path]


def _delete(target: Path) -> None:
    import shutil

    try:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    except OSError as exc:
        raise LannerError(f"cannot delete {target}: {exc}") from exc


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove now-empty folders from ``folder`` up to (not including) ``stop``."""
    while folder != stop and folder.is_relative_to(stop) and folder.is_dir():
        if any(folder.iterdir()):
            return
        folder.rmdir()
        folder = folder.parent


def fetch_listing(repo_id: str, revision: str | None) -> RepoListing:
    """The repo's files with sizes and hashes, its commit and its licence."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id):
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=revision,
                                                    files_metadata=True)
    if not info.sha:
        raise LannerError(f"{endpoint()} gave no commit for {repo_id}; is HF_ENDPOINT a Hub?")
    files = tuple(
        RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size,
                   s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in info.siblings or []
    )
    return RepoListing(repo_id, info.sha, _license(info), files)


def choose(listing: RepoListing, file: str | None) -> PullPlan:
    """Pick what to download; a repo with several GGUF models needs ``file``."""
    names = [f.name for f in listing.files]
    if file is not None:
        if file not in names:
            raise ModelNotFound(f"{listing.repo_id} has no file {file!r} "
                                f"(GGUF files: {_gguf_list(names) or 'none'})")
        if not file.lower().endswith(".gguf"):
            raise LannerError(f"--file must name a .gguf file, not {file!r} "
                              "(leave --file out to pull a safetensors model)")
        return _gguf_plan(listing, file)
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return _snapshot_plan(listing)
    ggufs = _gguf_list(names)
    if len(ggufs) == 1:
        return _gguf_plan(listing, ggufs[0])
    if ggufs:
        raise LannerError(f"{listing.repo_id} has {len(ggufs)} GGUF files; choose one with "
                          f"--file: {', '.join(ggufs)}")
    raise LannerError(f"{listing.repo_id} has no .gguf file and no safetensors model "
                      "(config.json + *.safetensors) for Lanner to pull")


def default_name(repo_id: str, plan: PullPlan) -> str:
    """A short name: the GGUF file's stem, or the repo's name, in lower case."""
    if plan.main_file:
        stem = Path(plan.main_file).name[: -len(".gguf")]
        split = _SPLIT_GGUF.match(Path(plan.main_file).name)
        return (split["stem"] if split else stem).lower()
    return repo_id.split("/")[-1].lower()


def download(listing: RepoListing, plan: PullPlan, dest: Path) -> None:
    """Fetch the plan's files into ``dest`` (progress bars on stderr)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    dest.mkdir(parents=True, exist_ok=True)
    with hub_errors(listing.repo_id):
        if plan.format == "gguf":
            for remote in plan.files:
                hf_hub_download(listing.repo_id, remote.name, revision=listing.commit,
                                local_dir=dest, endpoint=endpoint())
        else:
            snapshot_download(listing.repo_id, revision=listing.commit, local_dir=dest,
                              allow_patterns=SNAPSHOT_PATTERNS, ignore_patterns=SNAPSHOT_IGNORE,
                              endpoint=endpoint())


def verify(path: Path, remote: RemoteFile) -> None:
    """Check a downloaded file against the Hub's size and hash; a file that
    does not match is deleted (so the next pull fetches it again)."""
    problem = _mismatch(path, remote)
    if problem:
        path.unlink(missing_ok=True)
        raise LannerError(f"download of {remote.name} is damaged ({problem}); "
                          "it was deleted, run the pull again")


def _mismatch(path: Path, remote: RemoteFile) -> str | None:
    if not path.is_file():
        return "the file is missing"
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, the Hub says {remote.size}"
    if remote.sha256:
        got = _file_hash(path, hashlib.sha256())
        return None if got == remote.sha256 else f"sha256 {got}, the Hub says {remote.sha256}"
    if remote.blob_id:
        # Small files are plain git blobs: the Hub gives their git sha1.
        got = _file_hash(path, hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False))
        return None if got == remote.blob_id else f"git id {got}, the Hub says {remote.blob_id}"
    return None


def _file_hash(path: Path, h: Any) -> str:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest: str = h.hexdigest()
    return digest


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's and the network's exceptions into one-line LannerErrors."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    where = endpoint()
    if constants.HF_HUB_OFFLINE:
        raise LannerError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; "
                          "unset it (or set HF_HUB_OFFLINE=0) to pull")
    try:
        yield
    except hf.GatedRepoError as exc:
        raise LannerError(f"{repo_id} is gated: accept its terms on {where}/{repo_id} and log in "
                          "(`hf auth login` or HF_TOKEN)") from exc
    except hf.RepositoryNotFoundError as exc:
        raise ModelNotFound(f"no model repo {repo_id!r} on {where} (or it is private: "
                            "log in with `hf auth login` or set HF_TOKEN)") from exc
    except hf.RevisionNotFoundError as exc:
        raise ModelNotFound(f"{repo_id} has no such revision ({_first_line(exc)})") from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise ModelNotFound(f"{repo_id}: file not found on {where} ({_first_line(exc)})") from exc
    except hf.HFValidationError as exc:
        raise LannerError(f"{repo_id}: {_first_line(exc)}") from exc
    except hf.HfHubHTTPError as exc:
        raise LannerError(f"the Hub at {where} refused the request: {_first_line(exc)}") from exc
    except (httpx2.TransportError, hf.LocalEntryNotFoundError, ConnectionError) as exc:
        raise LannerError(f"cannot reach the Hugging Face Hub at {where} "
                          f"({type(exc).__name__}); check the network or HF_ENDPOINT") from exc
    except OSError as exc:
        raise LannerError(f"cannot write the download: {exc}") from exc


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(re.fullmatch(r"[\w.-]+", p) for p in parts) or ".." in repo_id:
        raise LannerError(f"{repo_id!r} is not a Hub repo id (expected ORG/NAME)")


def _check_name_free(home: Path, name: str, repo_id: str) -> None:
    """A re-pull of the same repo may update its entry; anything else may not.
    Checked before downloading, so a bad name costs no download."""
    check_name(name)
    existing = registered(home).get(name)
    if existing is not None and existing.get("repo") != repo_id:
        raise LannerError(f"a model named {name!r} is already registered ({existing['path']}, "
                          f"in {index_path(home)}); choose another with --name")


def _gguf_plan(listing: RepoListing, file: str) -> PullPlan:
    names = [file]
    split = _SPLIT_GGUF.match(Path(file).name)
    if split:
        # llama.cpp opens a split GGUF by its first part and finds the rest beside it.
        prefix = file[: len(file) - len(Path(file).name)] + split["stem"]
        names = [f"{prefix}-{i:05d}-of-{split['total']}.gguf"
                 for i in range(1, int(split["total"]) + 1)]
    parts = [listing.file(n) for n in names]
    missing = [n for n, part in zip(names, parts, strict=True) if part is None]
    if missing:
        raise LannerError(f"{listing.repo_id}: split GGUF {file} lacks {', '.join(missing)}")
    return PullPlan("gguf", tuple(p for p in parts if p is not None), names[0])


def _snapshot_plan(listing: RepoListing) -> PullPlan:
    from huggingface_hub.utils import filter_repo_objects

    wanted = set(filter_repo_objects([f.name for f in listing.files],
                                     allow_patterns=SNAPSHOT_PATTERNS,
                                     ignore_patterns=SNAPSHOT_IGNORE))
    return PullPlan("safetensors", tuple(f for f in listing.files if f.name in wanted), None)


def _gguf_list(names: list[str]) -> list[str]:
    """The repo's GGUF models: plain files and the first part of each split file."""
    out = []
    for n in sorted(names):
        split = _SPLIT_GGUF.match(Path(n).name)
        if n.lower().endswith(".gguf") and (not split or int(split["part"]) == 1):
            out.append(n)
    return out


def _license(info: Any) -> str:
    """The licence from the model card's metadata (or the Hub's tags), else "unknown"."""
    card = info.card_data
    if card is not None:
        lic = getattr(card, "license", None)
        other = getattr(card, "license_name", None)
        if lic == "other" and other:
            return str(other)
        if isinstance(lic, list) and lic:
            return ", ".join(str(x) for x in lic)
        if lic:
            return str(lic)
    tags = [t for t in info.tags or [] if isinstance(t, str) and t.startswith("license:")]
    return tags[0].split(":", 1)[1] if tags else "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _say(text: str) -> None:
    print(f"lanner: {text}", file=sys.stderr, flush=True)
