"""Admin routes for LoRA adapters, without a restart:

- ``POST /v1/lanner/adapters`` ``{"name", "path", "base"}``: serve the peft
  adapter at ``path`` (a folder on the server's machine) on the served model
  ``base`` as the new model ``name``; answers 201 with the new model's card;
- ``GET /v1/lanner/adapters``: the adapters added so far.

Several adapters on one base share its weights (``TransformersBackend.
add_adapter``); the base stays loaded from then on. Since a request names a
folder on the server's disk, the route needs the server's ``--api-key``:
without one it answers 403.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lanner.engine.model import Model
from lanner.errors import InvalidRequest, NotSupported, PermissionDenied
from lanner.server.serving import ServerState, state_of

router = APIRouter()


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=200)
    """The new model id clients will ask for."""
    path: str = Field(min_length=1)
    """The adapter folder (peft format: adapter_config.json and weights)."""
    base: str = Field(min_length=1)
    """A model this server serves (on the transformers backend)."""


@router.post("/v1/lanner/adapters", status_code=201)
async def add_adapter(body: AddAdapter, http: Request) -> JSONResponse:
    """Load an adapter onto a served model and serve it under a new name."""
    state = state_of(http)
    if not state.api_key:
        raise PermissionDenied("adding adapters needs a server started with --api-key")
    if body.name in _served(state):
        raise InvalidRequest("name", f"this server already serves a model {body.name!r}")
    lease = await state.pool.acquire(body.base, 1)  # loads the base; held while we work
    try:
        base = lease.model
        add = getattr(base.backend, "add_adapter", None)
        if add is None:
            raise NotSupported(f"{body.base} runs on the {base.backend.name} backend; adapters "
                               "need transformers (serve it with --backend transformers)")
        backend = await asyncio.to_thread(add, body.path, body.name)
        spec = dataclasses.replace(base.spec, name=body.name)
        model = Model(spec, backend,
                      chat_format_override=state.pool.load_options.get("chat_format"))
        state.pool.add_loaded(body.name, model, base=body.base)
    finally:
        lease.release_all()
    return JSONResponse(_card(state, body.name, body.base, backend), status_code=201)


@router.get("/v1/lanner/adapters")
async def list_adapters(http: Request) -> dict[str, Any]:
    """The adapters added to this server, with their base and folder."""
    state = state_of(http)
    data = []
    for name in state.pool.names:
        model = state.pool.entry(name).model
        if model is not None and "adapter" in model.backend.metadata.extra:
            data.append(_card(state, name, None, model.backend))
    return {"object": "list", "data": data}


def _served(state: ServerState) -> set[str]:
    return {*state.pool.names, *([state.embedder.name] if state.embedder else [])}


def _card(state: ServerState, name: str, base: str | None, backend: Any) -> dict[str, Any]:
    extra = backend.metadata.extra
    card = {"id": name, "object": "model", "created": state.started, "owned_by": "lanner",
            "adapter": extra.get("adapter")}
    return card | ({"base": base} if base else {})
