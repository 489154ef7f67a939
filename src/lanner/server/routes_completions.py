"""``POST /v1/completions``: OpenAI's legacy text completion, kept because
evaluation tools use it: ``echo`` with ``logprobs`` scores the prompt itself.
A prompt is text or token ids (lm-evaluation-harness sends ids, to score
exactly the tokens it counted).

Choices are ordered prompt by prompt, ``n`` per prompt, as OpenAI orders them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lanner.engine.model import Model, make_request
from lanner.engine.types import Event, Finish, TextDelta, Token
from lanner.engine.types import Request as GenRequest
from lanner.errors import ContextLengthExceeded, InvalidRequest
from lanner.server import protocol as p
from lanner.server.serving import (
    ClientGone,
    Run,
    collect,
    completion_tokens,
    finish_reason,
    first_event,
    prompt_tokens,
    start_run,
    state_of,
)
from lanner.server.sse import DONE, EventStreamResponse, event, guarded

router = APIRouter()


def build_requests(model: Model, body: p.CompletionRequest) -> list[GenRequest]:
    options = p.completion_options(body)
    out = []
    for prompt in p.completion_prompts(body):
        try:
            request = _request(model, prompt, options)
        except ContextLengthExceeded as exc:
            exc.param = "prompt"
            raise
        out += [dataclasses.replace(request, seed=p.choice_seed(request.seed, i))
                for i in range(body.n)]
    return out


def _request(model: Model, prompt: str | list[int], options: dict[str, Any]) -> GenRequest:
    """Text is tokenized as a raw completion (BOS added as the model wants);
    token ids are used exactly as given, as OpenAI and vLLM use them."""
    if isinstance(prompt, str):
        return model.completion_request(prompt, strict_context=True, **options)
    request = make_request(prompt, dict(options))
    model.check_context(len(prompt), request.max_tokens)
    return request


def prompt_logprobs(model: Model, ids: Sequence[int], top: int, skip: int = 0) -> list[Token]:
    """Each prompt token with log P(token | the tokens before it), less the
    first ``skip`` (the BOS the model adds to a text prompt is not part of the
    echoed text).

    Uses the backend's ``prompt_logprobs(ids, top)`` (llama.cpp and
    transformers: one forward pass, one Token per id, with the ``top``
    alternatives). A backend without it falls back on ``loglikelihood(context,
    token)`` per token: one scoring pass per token, no alternatives, and exact
    where the prefix's text tokenizes back to the same ids; tokens holding part
    of a character get None. The first token, which has no context of its own,
    gets None, as in OpenAI's answers.
    """
    backend = model.backend
    scorer = getattr(backend, "prompt_logprobs", None)
    if scorer is not None:
        scored: list[Token] = scorer(ids, top)
        return scored[skip:]
    body = list(ids[skip:])
    out: list[Token] = []
    for k, token_id in enumerate(body):
        text = backend.detokenize([token_id])
        # No context yet, or a token holding part of a character (its text
        # would not tokenize back to it): nothing loglikelihood can score.
        scorable = k > 0 and text != "" and "\ufffd" not in text
        logprob = backend.loglikelihood(backend.detokenize(body[:k]), text)[0] if scorable \
            else None
        out.append(Token(token_id, text, logprob))
    return out


def end_token(model: Model, ids: Sequence[int], request: GenRequest, top: int) -> Token | None:
    """The end-of-generation token a choice stopped on after ``ids`` (its
    prompt and generated tokens), scored with ``top`` alternatives; None if the
    model has no single-token EOS.

    OpenAI and vLLM list it last in a completion's logprobs, and
    lm-evaluation-harness counts on that: it drops the last entry as the one
    generated token. Our backends end the stream without it, so it is scored
    here, in one more pass. It is the model's EOS, except where greedy decoding
    without penalties stopped on the most likely token, which may be another
    end token (EOT, ``<|endoftext|>``).
    """
    backend = model.backend
    eos = backend.tokenize(backend.metadata.eos_token or "", add_bos=False, special=True)
    if len(eos) != 1:
        return None
    scored = prompt_logprobs(model, [*ids, *eos], max(top, 1))[-1]
    best = scored.top[0] if scored.top else None
    argmax_chose = request.greedy and request.repetition_penalty == 1.0 \
        and request.presence_penalty == 0.0 and request.frequency_penalty == 0.0
    if argmax_chose and best is not None and best.token_id not in (-1, scored.id):
        return Token(best.token_id, best.token, best.logprob, scored.top[:top])
    return Token(scored.id, scored.text, scored.logprob, scored.top[:top])


def _ended_on_eos(body: p.CompletionRequest, finish: Finish | None) -> bool:
    """Whether a choice stopped on an end-of-generation token: with no stop
    strings (and no constraint on completions), nothing else stops it. With
    stop strings the two cannot be told apart, and no end token is listed."""
    return finish is not None and finish.reason == "stop" and not body.stop


@router.post("/v1/completions", response_model=p.Completion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(body: p.CompletionRequest, http: Request) -> Any:
    """Creates a completion for the provided prompt."""
    state = state_of(http)
    run = await start_run(state, body.model, len(p.completion_prompts(body)) * body.n,
                          lambda model: build_requests(model, body), "cmpl")
    echoes = await _echoes(run, body)
    if body.stream:
        try:
            events = await first_event(run, http)
        except ClientGone:
            return Response(status_code=499)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(guarded(_sse(run, body, events, echoes, include_usage),
                                           f"completion stream {run.id}"),
                                   on_close=run.streams.close)
    try:
        results = await collect(run, http)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for i, r in enumerate(results):
        echo_text, echo_tokens = echoes[i // body.n]
        lp = None
        if body.logprobs is not None:
            generated = r.tokens + await _end(run, body, i, r.tokens, r.finish)
            start = p.echo_offset(echo_text, echo_tokens)
            lp = _joined(p.completion_logprobs(echo_tokens, start),
                         p.completion_logprobs(generated, len(echo_text)))
        choices.append(p.CompletionChoice(index=i, text=echo_text + r.text, logprobs=lp,
                                          finish_reason=finish_reason(r)))
    completion = completion_tokens(results)
    return p.Completion(id=run.id, created=run.created, model=run.model,
                        system_fingerprint=run.fingerprint, choices=choices,
                        usage=_usage(run, body.n, completion))


async def _end(run: Run, body: p.CompletionRequest, index: int, generated: list[Token],
               finish: Finish | None) -> list[Token]:
    """Choice ``index``'s end-of-generation token, scored, if it stopped on one."""
    if body.logprobs is None or not _ended_on_eos(body, finish):
        return []
    request = run.requests[index]
    ids = [*cast(Sequence[int], request.prompt), *(t.id for t in generated)]
    token = await asyncio.to_thread(end_token, run.loaded, ids, request, body.logprobs)
    return [] if token is None else [token]


def _joined(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {key: a[key] + b[key] for key in a}


async def _echoes(run: Run, body: p.CompletionRequest) -> list[tuple[str, list[Token]]]:
    """Per prompt: the text to echo and its scored tokens ("" and [] without echo)."""
    prompts = p.completion_prompts(body)
    if not body.echo:
        return [("", []) for _ in prompts]
    try:
        return [await asyncio.to_thread(_echo, run.loaded, prompt, run.requests[k * body.n],
                                        body.logprobs)
                for k, prompt in enumerate(prompts)]
    except BaseException:
        run.streams.close()
        raise


def _echo(model: Model, prompt: str | list[int], request: GenRequest,
          top: int | None) -> tuple[str, list[Token]]:
    """One prompt's echo: its text and, when ``top`` is given, its scored tokens."""
    text = prompt if isinstance(prompt, str) else _prompt_text(model, prompt)
    if top is None:
        return text, []
    # completion_request always tokenizes: the request's prompt is token ids here.
    ids = cast(Sequence[int], request.prompt)
    skip = len(ids) - len(model.backend.tokenize(prompt, add_bos=False)) \
        if isinstance(prompt, str) else 0
    return text, prompt_logprobs(model, ids, top, skip)


def _prompt_text(model: Model, ids: list[int]) -> str:
    try:
        return model.backend.detokenize(ids)
    except InvalidRequest as exc:  # llama.cpp names its own argument ("ids")
        message = str(exc).removeprefix(f"{exc.param}: ")
        raise InvalidRequest("prompt", message) from exc


def _usage(run: Run, n: int, completion: int) -> p.Usage:
    prompt = prompt_tokens(run.requests, n)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


async def _sse(
    run: Run, body: p.CompletionRequest, events: AsyncIterator[tuple[int, Event]],
    echoes: list[tuple[str, list[Token]]], include_usage: bool,
) -> AsyncIterator[bytes]:
    head = {"id": run.id, "object": "text_completion", "created": run.created,
            "model": run.model, "system_fingerprint": run.fingerprint}
    if include_usage:
        head["usage"] = None
    offsets = [len(echoes[i // body.n][0]) for i in range(len(run.requests))]
    generated: list[list[Token]] = [[] for _ in run.requests]
    completion = 0
    wants_lp = body.logprobs is not None
    if body.echo:
        for i in range(len(run.requests)):
            text, tokens = echoes[i // body.n]
            lp = (p.completion_logprobs(tokens, p.echo_offset(text, tokens)) if wants_lp
                  else None)
            yield event({**head, "choices": [_choice(i, text, lp)]})
    async for index, ev in events:
        if isinstance(ev, TextDelta) and (ev.text or (wants_lp and ev.tokens)):
            lp = p.completion_logprobs(ev.tokens, offsets[index]) if wants_lp else None
            offsets[index] += len(ev.text)
            generated[index] += ev.tokens
            yield event({**head, "choices": [_choice(index, ev.text, lp)]})
        elif isinstance(ev, Finish):
            if end := await _end(run, body, index, generated[index], ev):
                lp = p.completion_logprobs(end, offsets[index])
                yield event({**head, "choices": [_choice(index, "", lp)]})
            completion += ev.usage.completion_tokens
            reason = "length" if ev.reason == "length" else "stop"
            yield event({**head, "choices": [_choice(index, "", None, reason)]})
    if include_usage:
        yield event({**head, "choices": [], "usage": _usage(run, body.n, completion).model_dump()})
    yield DONE


def _choice(index: int, text: str, logprobs: dict[str, Any] | None = None,
            finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
