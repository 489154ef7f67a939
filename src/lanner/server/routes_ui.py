"""The web UI: its static files at ``/`` (no key needed: the page asks for it
and sends it on every /v1/ call), and the small JSON routes it needs that the
OpenAI API has no place for:

- ``GET /v1/lanner/models``: the served models with their context window
  (known once loaded), for the model picker and the context gauge;
- ``POST /v1/lanner/conversations``: a new conversation id, to pass as
  ``conversation_id`` on chat completions (each answer is then logged there);
- ``GET /v1/lanner/conversations`` and ``/{id}``: the log's conversations and
  one as chat messages, to reopen it (a documents answer's message carries its
  ``citations``, as logged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from lanner import paths
from lanner.server.serving import state_of
from lanner.store import Store

T = TypeVar("T")
router = APIRouter()  # under the API key
open_router = APIRouter()  # the page itself


def static_dir() -> Path:
    """The folder of the UI's files, shipped inside the package."""
    return Path(str(resources.files("lanner") / "ui"))


def mount_static(app: Any) -> None:
    app.mount("/ui", StaticFiles(directory=static_dir()), name="ui")


async def _in_store(http: Request, work: Callable[[Store], T]) -> T:
    """``work`` on the log database, in a worker thread."""
    home = state_of(http).pool.engine.home

    def run() -> T:
        with Store(paths.db_path(home)) as store:
            return work(store)

    return await asyncio.to_thread(run)


@open_router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(static_dir() / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/lanner/models")
async def models(http: Request) -> dict[str, Any]:
    """Each served model, whether it is loaded, and its window in tokens (null
    until it has loaded; ``n_ctx`` from the server's flags when given)."""
    pool = state_of(http).pool
    data = []
    for name in pool.names:
        model = pool.entry(name).model
        window = model.backend.n_ctx if model is not None else pool.load_options.get("n_ctx")
        data.append({"id": name, "loaded": model is not None, "context_window": window})
    return {"object": "list", "data": data}


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str = Field(min_length=1)
    title: str | None = Field(None, max_length=200)


@router.post("/v1/lanner/conversations", status_code=201)
async def new_conversation(body: NewConversation, http: Request) -> dict[str, Any]:
    """A conversation in the log; its id goes in chat completions' ``conversation_id``."""
    state_of(http).pool.entry(body.model)  # 404 for a model this server does not serve
    cid = await _in_store(http, lambda store: store.new_conversation(body.model, body.title))
    return {"id": cid, "object": "lanner.conversation", "model": body.model}


@router.get("/v1/lanner/conversations")
async def conversations(http: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    """The latest conversations with at least one answer, newest first."""
    data = await _in_store(http, lambda store: store.conversations(limit=limit))
    return {"object": "list", "data": data}


@router.get("/v1/lanner/conversations/{conversation_id}")
async def conversation(conversation_id: str, http: Request) -> dict[str, Any]:
    """One conversation as chat messages (system first, if it had one); 400 if
    unknown. An assistant message answered from documents has ``citations``."""

    def read(store: Store) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = list(store.conversation_messages(conversation_id))
        turns = [t for t in store.turns(limit=None, conversation_id=conversation_id)
                 if t.parent_id is None]
        answers = [m for m in messages if m["role"] == "assistant"]
        # not strict: a turn logged between the two reads is the last, unpaired
        for message, turn in zip(answers, turns, strict=False):
            if turn.citations is not None:
                message["citations"] = turn.citations
        return messages

    messages = await _in_store(http, read)
    return {"id": conversation_id, "object": "lanner.conversation", "messages": messages}
