"""Every failure as OpenAI's error JSON: ``{"error": {message, type, param, code}}``.

Bad input is always a 4xx: pydantic's validation errors become 400 naming the
field (FastAPI would answer 422), LannerErrors carry their own status, unknown
routes are 404. Only a real bug reaches the catch-all, which logs the traceback
and answers 500 without leaking internals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lanner.errors import LannerError, Overloaded

log = logging.getLogger("lanner.server")

_TYPES = {401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def lanner_error_response(exc: LannerError) -> JSONResponse:
    """A LannerError with its own status, type, param and code."""
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after)
    body = error_body(str(exc), type=exc.error_type, param=exc.param, code=exc.code)
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic's location as one dotted name: ("body", "messages", 0, "role")
    -> "messages[0].role". Union branches ("str", "list[...]") are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool"):
            continue  # a union member's tag ("str", "list[str]", "TextPart"), not a field
        else:
            out += f".{part}" if out else part
    return out


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error, in the user's words."""
    kind = error.get("type", "")
    if kind == "json_invalid":
        ctx = error.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({ctx})", None
    param = field_path(error.get("loc", ())) or None
    if kind == "extra_forbidden":
        return f"{param}: unrecognized request argument", param
    if kind == "missing":
        if not param:
            return "the request body must be a JSON object", None
        return f"{param}: this field is required", param
    if kind in ("model_attributes_type", "dict_type") and not param:
        if isinstance(error.get("input"), bytes):  # not parsed: not sent as JSON
            return "the request body must be JSON (Content-Type: application/json)", None
        return "the request body must be a JSON object", None
    return f"{param}: {error.get('msg', 'invalid value')}" if param else \
        str(error.get("msg", "invalid request")), param


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    message, param = validation_message(first)
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _on_lanner(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, LannerError):  # pragma: no cover - registered for LannerError
        raise exc
    if exc.http_status >= 500:
        log.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
    return lanner_error_response(exc)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "error"
    if status == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    headers = getattr(exc, "headers", None)
    return JSONResponse(error_body(str(detail), type=_TYPES.get(status, "invalid_request_error")),
                        status_code=status, headers=headers)


async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error (see the server log)",
                                   type="server_error"), status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(LannerError, _on_lanner)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
