"""HTTP to an OpenAI-compatible server: retries with back-off, SSE, errors.

``RemoteClient.post`` sends one JSON request and returns the open response,
trying again on 429 and 5xx (and on a refused connection) with exponential
back-off, or after the server's ``Retry-After`` when it gives one; a wait
longer than ``Retry.max_wait_s`` is not waited: the caller gets ``Overloaded``
at once. ``events`` reads a server-sent-event stream; a connection that drops
or goes silent mid-stream (``timeout_s`` between bytes) is a ``RemoteError``,
never a hang. Statuses become Lanner's errors in ``raise_for_answer``.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from lanner.errors import (
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    RemoteError,
)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Retry:
    """How hard to try: ``attempts`` in all, waits of ``base_s * 2**n`` (with
    jitter) unless the server says ``Retry-After``, no wait over ``max_wait_s``."""

    attempts: int = 5
    base_s: float = 0.5
    max_wait_s: float = 30.0


class RemoteClient:
    """One connection pool to one server (``base_url`` ends in ``/v1`` as a
    rule). ``label`` names the remote in every error message."""

    def __init__(self, base_url: str, *, label: str, api_key: str | None = None,
                 timeout_s: float = 120.0, retry: Retry | None = None,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect: a dead host fails fast; read: the longest silence allowed,
        # between bytes of a stream too (a stalled server is an error, not a hang).
        timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self.base_url = base_url.rstrip("/")
        self.label = label
        self.retry = retry or Retry()
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url + "/", headers=headers,
                                  timeout=timeout, transport=transport)

    def get(self, path: str) -> Any:
        """GET ``path`` (relative to the base URL) and return its JSON."""
        response = self._send("GET", path, None)
        try:
            response.read()
            return _json(response, self.label)
        finally:
            response.close()

    def post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        """POST ``payload`` and return the open 2xx response (the caller closes
        it); retries as the class docstring says."""
        return self._send("POST", path, payload)

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, payload: dict[str, Any] | None) -> httpx.Response:
        for attempt in range(1, self.retry.attempts + 1):
            last = attempt == self.retry.attempts
            try:
                request = self._http.build_request(method, path, json=payload)
                response = self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    raise RemoteError(f"cannot reach {self.label}: "
                                      f"{exc or type(exc).__name__}") from exc
                self._sleep(self._backoff(attempt, None))
                continue
            except httpx.TransportError as exc:
                raise RemoteError(f"{self.label}: {method} {path} failed: "
                                  f"{exc or type(exc).__name__}") from exc
            if response.is_success:
                return response
            try:
                response.read()
            except httpx.TransportError as exc:
                raise RemoteError(f"{self.label}: {method} {path} answered "
                                  f"{response.status_code} and then dropped: {exc}") from exc
            finally:
                response.close()
            if response.status_code not in RETRY_STATUSES or last:
                raise_for_answer(response, self.label, attempts=attempt)
            wait = retry_after_s(response.headers.get("retry-after"))
            if wait is not None and wait > self.retry.max_wait_s:
                raise Overloaded(f"{self.label} answered {response.status_code} and asks to "
                                 f"wait {wait:.0f} s, longer than the {self.retry.max_wait_s:.0f} "
                                 "s Lanner waits", retry_after=max(1, round(wait)))
            self._sleep(self._backoff(attempt, wait))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        step = self.retry.base_s * 2 ** (attempt - 1)
        return min(self.retry.max_wait_s, step * (0.5 + random.random() / 2))


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delta seconds or an HTTP
    date), or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def raise_for_answer(response: httpx.Response, label: str, *, attempts: int = 1) -> None:
    """Raise the Lanner error for a non-2xx answer, with the server's own message."""
    status = response.status_code
    message, param = _error_message(response)
    tried = f" (after {attempts} tries)" if attempts > 1 else ""
    if status in (400, 422):
        raise InvalidRequest(param or "request", f"{label} refused it: {message}")
    if status in (401, 403):
        raise PermissionDenied(f"{label} answered {status}: {message} (check its API key: "
                               "`lanner remote add --api-key-env VAR`)")
    if status == 404:
        raise ModelNotFound(f"{label} answered 404: {message}")
    if status in RETRY_STATUSES:
        wait = retry_after_s(response.headers.get("retry-after"))
        raise Overloaded(f"{label} answered {status}{tried}: {message}",
                         retry_after=max(1, round(wait or 1)))
    raise RemoteError(f"{label} answered {status}: {message}")


def events(response: httpx.Response, label: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent-event stream, up to ``data: [DONE]``.

    A connection that drops, a silence past the read timeout, a stream that
    ends without ``[DONE]`` and an ``error`` object in the stream are all
    RemoteError (a stream cut short must never read as a finished answer).
    """
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (": ping"), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                obj = json.loads(data)
            except json.JSONDecodeError as exc:
                raise RemoteError(f"{label} sent a stream event that is not JSON: "
                                  f"{data[:200]!r}") from exc
            if isinstance(obj, dict) and obj.get("error"):
                raise RemoteError(f"{label} reported an error mid-stream: "
                                  f"{_describe(obj['error'])}")
            yield obj
    except httpx.TimeoutException as exc:
        raise RemoteError(f"{label} went silent mid-stream (no data within the read "
                          "timeout); the answer is incomplete") from exc
    except httpx.TransportError as exc:
        raise RemoteError(f"the connection to {label} dropped mid-stream "
                          f"({exc or type(exc).__name__}); the answer is incomplete") from exc
    raise RemoteError(f"{label}'s stream ended without [DONE]; the answer is incomplete")


def _json(response: httpx.Response, label: str) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RemoteError(f"{label} answered with something that is not JSON: "
                          f"{response.text[:200]!r}") from exc


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """OpenAI's ``{"error": {"message", "param"}}``, or other servers' shapes, or the text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return (response.text.strip()[:300] or response.reason_phrase), None
    error = body.get("error", body) if isinstance(body, dict) else body
    param = error.get("param") if isinstance(error, dict) else None
    return _describe(error), param if isinstance(param, str) else None


def _describe(error: object) -> str:
    if isinstance(error, dict):
        for key in ("message", "detail", "error"):
            if isinstance(error.get(key), str):
                return str(error[key])
    return str(error)[:300]
