"""The FastAPI application: ``create_app`` wires the routes, the API key check,
request metrics and OpenAI-shaped errors around one Engine.

The key check and the request counter are plain ASGI middleware, so they see
every request first: a request without the key gets 401 even if its body is
malformed, and streamed responses are counted without being buffered.
"""

from __future__ import annotations

import hmac
import importlib.util
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from types import EllipsisType
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lanner import __version__
from lanner.engine.engine import Engine
from lanner.rag.embed import BUNDLED_PACKAGE
from lanner.server import (
    errors,
    routes_adapters,
    routes_arena,
    routes_chat,
    routes_completions,
    routes_documents,
    routes_embeddings,
    routes_models,
    routes_ui,
)
from lanner.server.documents import Documents
from lanner.server.embedder import Embedder, SentenceTransformerEmbedder
from lanner.server.metrics import Metrics, esc
from lanner.server.pool import ModelPool
from lanner.server.protocol import ErrorResponse
from lanner.server.serving import ServerState

PROTECTED_PREFIX = "/v1/"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "invalid request (names the field)"), (401, "bad or missing key"),
                         (404, "unknown model"), (503, "queue full; see Retry-After"))
}


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every /v1/ route, compared in constant time."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        message = ("incorrect API key provided" if given else
                   "missing API key: send the header 'Authorization: Bearer <key>'")
        body = errors.error_body(message, code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class RequestCounter:
    """Counts every HTTP request by method, route and status for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            # The route template, not the raw path: unknown paths must not
            # grow the label set without bound.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.count_request(scope["method"], path, status)


def default_embedder(home: Path | None = None) -> Embedder | None:
    """The bundled all-MiniLM-L6-v2 if its package is installed (loads on first
    use; ONNX exports cached in ``home``)."""
    if importlib.util.find_spec(BUNDLED_PACKAGE) is None:
        return None
    return SentenceTransformerEmbedder(home=home)


def create_app(
    engine: Engine, models: list[str], *, api_key: str | None = None, keep_alive_s: float = 300.0,
    max_queue: int = 128, embedder: Embedder | None | EllipsisType = ...,
    load_options: dict[str, Any] | None = None, store: str | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving ``models`` (names the engine can load).

    Models already loaded in ``engine`` (``engine.attach``) are used as they
    are and never unloaded; the others load on first use with
    ``load_options`` and unload after ``keep_alive_s`` seconds idle (negative:
    never). At most ``max_queue`` generations are held at once; more get 503
    with Retry-After. ``embedder``: ``...`` for the bundled MiniLM, None for no
    /v1/embeddings model.
    ``store``: where the collections of ``collection`` requests live (see
    ``lanner.rag.open_store``; default logs.db in the engine's home), opened
    once and shared by all requests.
    """
    pool = ModelPool(engine, models, keep_alive_s=keep_alive_s, max_queue=max_queue,
                     load_options=load_options)
    executor = ThreadPoolExecutor(max_workers=max_queue, thread_name_prefix="lanner-stream")
    metrics = Metrics()
    state = ServerState(pool, executor, metrics,
                        default_embedder(engine.home) if embedder is ... else embedder, api_key,
                        Documents(engine, store))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        state.documents.close()

    app = FastAPI(title="Lanner", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for open-weight models run by Lanner.")
    app.state.lanner = state
    for router in (routes_chat.router, routes_completions.router,
                   routes_embeddings.router, routes_models.router, routes_arena.router,
                   routes_adapters.router, routes_ui.router, routes_documents.router):
        app.include_router(router, responses=_ERRORS)
    app.include_router(routes_models.open_router)
    app.include_router(routes_ui.open_router)  # the web UI's page, at /
    routes_ui.mount_static(app)
    errors.install(app)
    _register_gauges(metrics, pool)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: counts 401s too
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _register_gauges(metrics: Metrics, pool: ModelPool) -> None:
    metrics.gauge("lanner_queue_depth", "admitted generations waiting for their first token",
                  lambda: pool.waiting)
    metrics.gauge("lanner_requests_in_flight", "admitted generations (running or queued)",
                  lambda: pool.in_flight)
    metrics.gauge("lanner_active_streams", "generations producing tokens",
                  lambda: pool.in_flight - pool.waiting)
    metrics.gauge("lanner_max_queue", "the queue limit (--max-queue)", lambda: pool.max_queue)
    metrics.gauge("lanner_models_loaded", "models in memory",
                  lambda: sum(pool.is_loaded(n) for n in pool.names))
    metrics.collector(lambda: _backend_stats(pool))


def _backend_stats(pool: ModelPool) -> list[str]:
    """``lanner_backend_<stat>{model=...}`` for each loaded backend with ``stats()``
    (llama.cpp: its own queue, active sequences, largest batch, reused prefix tokens)."""
    values: dict[str, list[str]] = {}
    for name in pool.names:
        model = pool.entry(name).model
        stats = getattr(model.backend, "stats", None) if model is not None else None
        if not callable(stats):
            continue
        for key, value in stats().items():
            line = f'lanner_backend_{key}{{model="{esc(name)}"}} {value}'
            values.setdefault(key, []).append(line)
    out = []
    for key, lines in sorted(values.items()):
        out += [f"# HELP lanner_backend_{key} backend statistic {key}",
                f"# TYPE lanner_backend_{key} gauge", *lines]
    return out


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, minus its 422 answers: this server answers 400 instead."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    app.openapi_schema = schema
    return schema
