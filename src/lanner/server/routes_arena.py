"""Side-by-side comparison and the blind arena over HTTP, for a web UI:

- ``POST /v1/lanner/compare``: several models answer one prompt (``stream``:
  SSE, every event carrying its model's ``index``);
- ``POST /v1/lanner/arena/battles``: two of the models answer as A and B;
  returns the battle id and the two anonymous answers;
- ``POST /v1/lanner/arena/battles/{id}/vote``: a, b, tie or both_bad, once;
  reveals the names;
- ``GET /v1/lanner/arena/ratings``: Bradley-Terry ratings from every vote.

The services (``lanner.evals``) run in one worker thread per request, on models
admitted by the pool like any generation; answers are logged and battles saved
in the Store of the engine's home, opened per request in that thread.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from lanner import paths
from lanner.engine.types import Event, Finish, TextDelta
from lanner.errors import InvalidRequest
from lanner.evals.arena import Battle, pick_pair
from lanner.evals.arena_store import ArenaStore, BattleRecord
from lanner.evals.compare import Answer, Comparison
from lanner.evals.ratings import fit
from lanner.server import protocol as p
from lanner.server.pool import Lease
from lanner.server.serving import ServerState, state_of
from lanner.server.sse import DONE, EventStreamResponse, event, guarded
from lanner.store import Store

router = APIRouter()
T = TypeVar("T")
_STRICT = ConfigDict(extra="forbid", strict=True)


class Sampling(p.SamplingFields):
    """Chat completions' sampling fields and checks, the same for every model
    (so an arena's two answers differ by model alone, a set seed included)."""

    def options(self) -> dict[str, Any]:
        """Keyword options for ``Model.chat_request``: only the fields the client
        set (an unset max_tokens keeps Lanner's default, as ``lanner compare`` does)."""
        options = p.sampling_options(self)
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        return options


class CompareRequest(Sampling):
    models: list[str] = Field(min_length=2)
    prompt: str | None = None
    """The user's message; or give ``messages`` (a conversation ending with one)."""
    messages: list[p.ChatMessage] | None = None
    system: str | None = None
    """With ``prompt``: the system message."""
    stream: bool = False


class BattleRequest(Sampling):
    prompt: str = Field(min_length=1)
    system: str | None = None
    models: list[str] | None = None
    """The models to pick two from (default: every served model)."""
    pick_seed: p.Int | None = None
    """Makes the choice of the two models, and which is A, repeatable."""


class VoteRequest(BaseModel):
    model_config = _STRICT
    winner: str
    """"a", "b", "tie" or "both_bad"."""


# -- compare -------------------------------------------------------------------


@router.post("/v1/lanner/compare", responses={200: {"content": {"text/event-stream": {}}}})
async def compare(body: CompareRequest, http: Request) -> Any:
    """Every model's answer to one prompt (streamed as SSE with ``stream``)."""
    state = state_of(http)
    system, history, prompt = _conversation(body)
    options = body.options()
    leases = await _admit(state, body.models)

    def work(store: Store) -> Generator[tuple[int, Event], None, list[Answer]]:
        comparison = Comparison([lease.model for lease in leases], prompt, store=store,
                                system=system, history=history, options=options)
        yield from comparison.stream()
        return comparison.answers

    feed: _Feed[list[Answer]] = _Feed(state, leases, work)
    if body.stream:
        try:
            events = await _until_disconnect(http, feed.started(), feed.stop)
        except _ClientGone:
            return Response(status_code=499)
        return EventStreamResponse(guarded(_compare_sse(feed, events, body.models),
                                           "compare stream"), on_close=feed.stop)
    try:
        answers = await _until_disconnect(http, feed.result(), feed.stop)
    except _ClientGone:
        return Response(status_code=499)
    return {"object": "lanner.comparison", "created": int(time.time()), "prompt": prompt,
            "answers": [_answer_json(i, a) for i, a in enumerate(answers)]}


def _conversation(body: CompareRequest) -> tuple[str | None, list[dict[str, Any]], str]:
    """(system, earlier messages, the user's message) from ``prompt`` or ``messages``."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("prompt", "give prompt or messages, not both")
    if body.messages is None:
        return body.system, [], body.prompt or ""
    if body.system is not None:
        raise InvalidRequest("system", "with messages, send the system message in messages")
    # chat_messages reads only .messages: the chat route's one conversion, reused.
    messages = p.chat_messages(p.ChatCompletionRequest.model_construct(messages=body.messages))
    last = messages[-1] if messages else {}
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        raise InvalidRequest("messages", "the last message must be the user's, with text")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    return system, messages[1 if system is not None else 0:-1], last["content"]


async def _compare_sse(feed: _Feed[list[Answer]], events: AsyncIterator[tuple[int, Event]],
                       names: list[str]) -> AsyncIterator[bytes]:
    """A chunk per text delta and per finished answer, each with its model's
    ``index``; then every answer whole (with its log id); then [DONE]."""
    chunk = {"object": "lanner.comparison.chunk"}
    async for index, ev in events:
        if isinstance(ev, TextDelta) and ev.text:
            yield event({**chunk, "index": index, "model": names[index], "delta": ev.text})
        elif isinstance(ev, Finish):
            yield event({**chunk, "index": index, "model": names[index],
                         "finish_reason": _reason(ev), "usage": _usage(ev)})
    answers = feed.value or []
    yield event({"object": "lanner.comparison", "created": int(time.time()),
                 "answers": [_answer_json(i, a) for i, a in enumerate(answers)]})
    yield DONE


def _answer_json(index: int, answer: Answer) -> dict[str, Any]:
    finish = answer.finish
    return {"index": index, "model": answer.model, "content": answer.text,
            "finish_reason": _reason(finish) if finish else "cancelled",
            "usage": _usage(finish) if finish else None,
            "log_id": answer.log_id, "conversation_id": answer.conversation_id}


def _reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"


def _usage(finish: Finish) -> dict[str, int]:
    usage = finish.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


# -- arena ---------------------------------------------------------------------


@router.post("/v1/lanner/arena/battles")
async def create_battle(body: BattleRequest, http: Request) -> Any:
    """Two of the models answer the prompt; their answers come back as A and B."""
    state = state_of(http)
    names = state.pool.names if body.models is None else body.models
    for name in names:
        state.pool.entry(name)  # an unknown model is a 404 before anything runs
    pair = pick_pair(names, random.Random(body.pick_seed))
    options = body.options()
    leases = await _admit(state, list(pair))

    def work(store: Store) -> Generator[tuple[int, Event], None, BattleRecord]:
        battle = Battle(ArenaStore(store), (leases[0].model, leases[1].model), body.prompt,
                        system=body.system, options=options)
        return (yield from _battle_events(battle))

    feed: _Feed[BattleRecord] = _Feed(state, leases, work)
    try:
        record = await _until_disconnect(http, feed.result(), feed.stop)
    except _ClientGone:
        return Response(status_code=499)
    return {"id": record.id, "object": "lanner.arena.battle", "created_at": record.created_at,
            "prompt": record.prompt, "answers": {"a": record.answer_a, "b": record.answer_b}}


def _battle_events(battle: Battle) -> Generator[tuple[int, Event], None, BattleRecord]:
    yield from battle.stream()
    if battle.record is None:  # pragma: no cover - a finished stream saves it
        raise RuntimeError("the battle was not saved")
    return battle.record


@router.post("/v1/lanner/arena/battles/{battle_id}/vote", responses={
    409: {"model": p.ErrorResponse, "description": "the battle has a vote already"}})
async def vote(battle_id: str, body: VoteRequest, http: Request) -> Any:
    """Record the vote (once: a second one is 409) and reveal both models."""
    record = await _in_store(http, lambda store: ArenaStore(store).vote(battle_id, body.winner))
    return {"id": record.id, "object": "lanner.arena.vote", "winner": record.winner,
            "model_a": record.model_a, "model_b": record.model_b, "voted_at": record.voted_at}


@router.get("/v1/lanner/arena/ratings")
async def ratings(http: Request, rounds: int = Query(1000, ge=0, le=10_000)) -> Any:
    """Bradley-Terry ratings (Elo-like scale, mean 1000) with bootstrap 95% intervals;
    an empty list before the first vote."""

    def rate(store: Store) -> tuple[int, list[dict[str, Any]]]:
        votes = ArenaStore(store).votes()
        table = fit(votes, rounds=rounds) if votes else []
        return len(votes), [asdict(r) for r in table]

    count, table = await _in_store(http, rate)
    return {"object": "list", "votes": count, "data": table}


# -- running services off the event loop ----------------------------------------


async def _admit(state: ServerState, names: list[str]) -> list[Lease]:
    """One stream on each model (404 for an unknown one, 503 when full)."""
    for name in names:
        state.pool.entry(name)
    leases: list[Lease] = []
    try:
        for name in names:
            leases.append(await state.pool.acquire(name, 1))
    except BaseException:
        for lease in leases:
            lease.release_all()
        raise
    return leases


async def _in_store(http: Request, work: Callable[[Store], T]) -> T:
    home = state_of(http).pool.engine.home
    return await asyncio.to_thread(_with_store, home, work)


def _with_store(home: Path, work: Callable[[Store], T]) -> T:
    with Store(paths.db_path(home)) as store:
        return work(store)


@dataclass(frozen=True, slots=True)
class _Result:
    value: Any


_END = object()


class _Feed(Generic[T]):
    """A service generator of ``(model index, event)`` run in a worker thread
    (with the Store open there) and read from the event loop; its return value
    becomes ``value``. ``stop`` ends it at the next event: closing the service's
    generator logs a cut-short answer as "cancelled". The leases follow it: a
    model's stream starts at its first event and all are released at the end."""

    def __init__(self, state: ServerState, leases: list[Lease],
                 work: Callable[[Store], Generator[tuple[int, Event], None, T]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._stop = threading.Event()
        self._leases = leases
        self._started = [False] * len(leases)
        self.value: T | None = None
        home = state.pool.engine.home
        state.executor.submit(self._run, home, work)

    def stop(self) -> None:
        self._stop.set()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                self.stop()
                raise item
            if isinstance(item, _Result):
                self.value = item.value
                continue
            yield cast("tuple[int, Event]", item)

    async def started(self) -> AsyncIterator[tuple[int, Event]]:
        """The events, once the first has come (its error is still an HTTP error)."""
        events = self.events()
        first = await anext(events)

        async def rest() -> AsyncIterator[tuple[int, Event]]:
            yield first
            async for item in events:
                yield item

        return rest()

    async def result(self) -> T:
        async for _ in self.events():
            pass
        if self.value is None:  # pragma: no cover - stopped only with the client gone
            raise RuntimeError("the work ended without a result")
        return self.value

    # -- the worker thread ----------------------------------------------------------

    def _post(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()

    def _run(self, home: Path,
             work: Callable[[Store], Generator[tuple[int, Event], None, T]]) -> None:
        try:
            with Store(paths.db_path(home)) as store:
                self._drive(work(store))
        except Exception as exc:  # reported to the request's handler, which maps it
            self._post(exc)
        finally:
            for lease, started in zip(self._leases, self._started, strict=True):
                lease.release(started)
            self._post(_END)

    def _drive(self, gen: Generator[tuple[int, Event], None, T]) -> None:
        try:
            while not self._stop.is_set():
                try:
                    index, ev = next(gen)
                except StopIteration as end:
                    self._post(_Result(end.value))
                    return
                if not self._started[index]:
                    self._started[index] = True
                    self._leases[index].started()
                self._post((index, ev))
        finally:
            gen.close()


class _ClientGone(Exception):
    """The client left before the answer was ready."""


async def _until_disconnect(http: Request, work: Awaitable[T], stop: Callable[[], None]) -> T:
    """``work``'s result, unless the client disconnects first (then ``stop``)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            stop()
    if task not in done:
        raise _ClientGone()
    return task.result()


async def _disconnected(http: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        continue
