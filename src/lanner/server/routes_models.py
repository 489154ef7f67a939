"""``GET /v1/models`` (and one model by id), ``GET /health``, ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from lanner.errors import ModelNotFound
from lanner.server import protocol as p
from lanner.server.serving import ServerState, state_of

router = APIRouter()  # under the API key
open_router = APIRouter()  # health and metrics: for load balancers and scrapers


def _cards(state: ServerState) -> list[p.ModelCard]:
    names = state.pool.names + ([state.embedder.name] if state.embedder else [])
    return [p.ModelCard(id=name, created=state.started) for name in names]


@router.get("/v1/models", response_model=p.ModelList)
async def list_models(http: Request) -> p.ModelList:
    """Lists the models this server answers with (chat/completion models, then
    the embedding model)."""
    return p.ModelList(data=_cards(state_of(http)))


@router.get("/v1/models/{model:path}", response_model=p.ModelCard)
async def retrieve_model(model: str, http: Request) -> p.ModelCard:
    """One model by its id; 404 if this server does not serve it."""
    card = next((c for c in _cards(state_of(http)) if c.id == model), None)
    if card is None:
        raise ModelNotFound(f"the model {model!r} does not exist on this server")
    return card


@open_router.get("/health")
async def health(http: Request) -> dict[str, Any]:
    """Liveness and load: which models are in memory, how many generations run."""
    state = state_of(http)
    pool = state.pool
    return {
        "status": "ok",
        "models": {name: "loaded" if pool.is_loaded(name) else "unloaded"
                   for name in pool.names},
        "in_flight": pool.in_flight,
        "queued": pool.waiting,
        "max_queue": pool.max_queue,
    }


@open_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(http: Request) -> PlainTextResponse:
    """Prometheus text format."""
    return PlainTextResponse(state_of(http).metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
