"""Document collections over HTTP, for the web UI's Documents tab:

- ``GET /v1/lanner/collections``: every collection with its counts;
- ``POST /v1/lanner/collections/{collection}/files?filename=NAME``: the
  request body is one file's bytes; it is stored in the collection's upload
  folder (``uploads/<collection>/`` in the Lanner home) and ingested. One file
  per request, so a browser shows each file's progress and error on its own.

A file name is a plain name: path separators, ``..`` and hidden names are
refused before anything is written, so an upload can never land outside its
collection's folder. A body over ``MAX_UPLOAD_BYTES`` is refused with 413.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request

from lanner.errors import InvalidRequest, TooLarge
from lanner.rag.loaders import SUFFIXES
from lanner.rag.store import check_name
from lanner.server.serving import ServerState, state_of

router = APIRouter()
MAX_UPLOAD_BYTES = 64 * 2**20
UPLOADS = "uploads"


@router.get("/v1/lanner/collections")
async def collections(http: Request) -> dict[str, Any]:
    """Every collection by name, with its embedder and document and chunk counts."""
    library = await asyncio.to_thread(state_of(http).documents.library)
    found = await asyncio.to_thread(library.store.collections)
    return {"object": "list", "data": [
        {"name": c.name, "documents": c.documents, "chunks": c.chunks, "embedder": c.embedder,
         "created_at": c.created_at} for c in found]}


@router.post("/v1/lanner/collections/{collection}/files", status_code=201,
             responses={413: {"description": "the file is over the upload limit"}})
async def upload(collection: str, http: Request,
                 filename: str = Query(min_length=1, max_length=255)) -> dict[str, Any]:
    """Store the body as ``filename`` in ``collection`` (created if new) and
    ingest it; 400 naming ``filename`` if it cannot be read as a document."""
    check_name(collection)
    name = safe_filename(filename)
    state = state_of(http)
    folder = state.pool.engine.home / UPLOADS / collection
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    target = folder / name
    await _receive(http, target)
    return await asyncio.to_thread(_ingest, state, collection, target)


def safe_filename(filename: str) -> str:
    """``filename`` if it is a plain, visible file name of a supported type."""
    if ("/" in filename or "\\" in filename or "\0" in filename or filename.startswith(".")
            or Path(filename).name != filename):
        raise InvalidRequest("filename", f"{filename!r} must be a plain file name "
                             "(no folders, no '..', not hidden)")
    if Path(filename).suffix.lower() not in SUFFIXES:
        raise InvalidRequest("filename", f"{filename}: unsupported file type "
                             f"(known: {', '.join(SUFFIXES)})")
    return filename


async def _receive(http: Request, target: Path) -> None:
    """The body into ``target`` (replaced only once it has all arrived)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise _too_large(target.name)
    fd, part = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for piece in http.stream():
                size += len(piece)
                if size > MAX_UPLOAD_BYTES:
                    raise _too_large(target.name)
                await asyncio.to_thread(out.write, piece)
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.unlink(part)


def _too_large(name: str) -> TooLarge:
    return TooLarge(f"{name} is larger than this server's upload limit of "
                    f"{MAX_UPLOAD_BYTES // 2**20} MiB")


def _ingest(state: ServerState, collection: str, path: Path) -> dict[str, Any]:
    report = state.documents.library().ingest([path], collection)
    if report.skipped:
        _, why = report.skipped[0]
        path.unlink(missing_ok=True)
        raise InvalidRequest("filename", f"{path.name}: {why}")
    status = "added" if report.added else "updated" if report.updated else "unchanged"
    return {"object": "lanner.document", "collection": collection, "filename": path.name,
            "status": status, "chunks": report.chunks, "seconds": round(report.seconds, 3)}
