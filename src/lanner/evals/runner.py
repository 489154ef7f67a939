"""Run a task on a loaded model: build the prompts, send every request through
the backend in batches, score each item and aggregate.

Speed comes from the backend: ``loglikelihood_batch`` (where a backend has it)
computes a question's context once for all its choices, and generation runs
as many requests at once as the backend decodes together (``n_seq_max``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lanner.engine.model import Model, make_request
from lanner.engine.types import collect
from lanner.errors import NotSupported
from lanner.evals import metrics
from lanner.evals.data import read_split
from lanner.evals.prompts import Item, build_items
from lanner.evals.taskfile import TaskSpec

DEFAULT_SEED = 1234  # lm-eval's --fewshot_random_seed default
_CHUNK_ITEMS = 64  # items per batch call: large enough to keep the backend busy
Progress = Callable[[int], None]
"""Called with the number of items just finished."""
T = TypeVar("T")


@dataclass
class ItemResult:
    doc_id: int
    prompt: str
    target: str
    output: Any
    """Per choice [loglikelihood, is_greedy]; or {"text", "filtered"}; or a loglikelihood."""
    scores: dict[str, Any]


@dataclass
class EvalRun:
    task: TaskSpec
    model: Model
    num_fewshot: int
    seed: int
    limit: int | None
    chat: bool
    """Prompts went through the model's chat format (``--chat-template``)."""
    items: list[ItemResult]
    metrics: dict[str, metrics.Aggregate]
    duration_s: float


def evaluate(
    model: Model, task: TaskSpec, *, num_fewshot: int | None = None, seed: int = DEFAULT_SEED,
    limit: int | None = None, progress: Progress | None = None, chat: bool = False,
) -> EvalRun:
    """Score ``model`` on ``task`` (its first ``limit`` items). ``chat``: send each
    prompt through the model's chat format as lm-eval's ``--apply_chat_template``
    does (description as the system message, few-shot examples and question as one
    user message); generate_until tasks only."""
    metrics.check(task)
    if chat and task.output_type != "generate_until":
        raise NotSupported(f"--chat-template applies to generate_until tasks; {task.name} is "
                           f"{task.output_type}")
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    start = time.perf_counter()
    items = prepare(task, num_fewshot=shots, seed=seed, limit=limit)
    if task.output_type == "generate_until":
        results = _generate(model, task, items, progress or (lambda n: None), chat)
    else:
        run = _RUNNERS[task.output_type]
        results = run(model, task, items, progress or (lambda n: None))
    per_item = [r.scores for r in results]
    return EvalRun(task, model, shots, seed, limit, chat, results, metrics.aggregate(per_item),
                   time.perf_counter() - start)


def prepare(task: TaskSpec, *, num_fewshot: int, seed: int, limit: int | None) -> list[Item]:
    """The task's items with their prompts (no model needed)."""
    docs = read_split(task.data_files[task.test_split], task.data_format)
    if task.fewshot_samples is not None:
        pool = list(task.fewshot_samples)
    elif task.fewshot_split is not None:
        pool = read_split(task.data_files[task.fewshot_split], task.data_format)
    else:
        pool = []
    return build_items(task, docs, pool, num_fewshot=num_fewshot, seed=seed, limit=limit)


# -- output types --------------------------------------------------------------


def _multiple_choice(model: Model, task: TaskSpec, items: list[Item], progress: Progress
                     ) -> list[ItemResult]:
    results = []
    for chunk in _chunks(items, _CHUNK_ITEMS):
        pairs = [(item.context, task.target_delimiter + choice)
                 for item in chunk for choice in item.choices or ()]
        lls = iter(score_pairs(model, pairs))
        for item in chunk:
            mine = [next(lls) for _ in item.choices or ()]
            scores = metrics.score_choices(item, mine, task.metrics)
            results.append(ItemResult(item.doc_id, item.context, item.target,
                                      [[ll, greedy] for ll, greedy in mine], scores))
        progress(len(chunk))
    return results


def _loglikelihood(model: Model, task: TaskSpec, items: list[Item], progress: Progress
                   ) -> list[ItemResult]:
    results = []
    for chunk in _chunks(items, _CHUNK_ITEMS):
        pairs = [(item.context, str(item.gold)) for item in chunk]
        for item, (ll, greedy) in zip(chunk, score_pairs(model, pairs), strict=True):
            scores = metrics.score_loglikelihood(ll, greedy, task.metrics)
            results.append(ItemResult(item.doc_id, item.context, item.target, [ll, greedy], scores))
        progress(len(chunk))
    return results


def _rolling(model: Model, task: TaskSpec, items: list[Item], progress: Progress
             ) -> list[ItemResult]:
    results = []
    for item in items:
        text = str(item.gold)
        ll = rolling_loglikelihood(model, text)
        results.append(ItemResult(item.doc_id, item.context, text, ll,
                                  metrics.score_rolling(text, ll, task.metrics)))
        progress(1)
    return results


def _generate(model: Model, task: TaskSpec, items: list[Item], progress: Progress,
              chat: bool) -> list[ItemResult]:
    workers = int(getattr(model.backend, "n_seq_max", 1))

    def one(item: Item) -> ItemResult:
        text = generate_until(model, task, item, chat)
        scores, filtered = metrics.score_generation(item, text, task)
        progress(1)
        return ItemResult(item.doc_id, item.context, item.target,
                          {"text": text, "filtered": filtered}, scores)

    return _parallel(one, items, workers)


_RUNNERS = {
    "multiple_choice": _multiple_choice,
    "loglikelihood": _loglikelihood,
    "loglikelihood_rolling": _rolling,
}


# -- requests to the model -----------------------------------------------------


def score_pairs(model: Model, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """lm-eval ``loglikelihood`` of every (context, continuation) pair, batched
    when the backend can batch."""
    backend = model.backend
    batch = getattr(backend, "loglikelihood_batch", None)
    if batch is not None:
        return list(batch(pairs))
    single = getattr(backend, "loglikelihood", None)
    if single is None:
        raise NotSupported(f"model {model.name} ({backend.name}) cannot score loglikelihoods, "
                           "which multiple_choice and perplexity tasks need; "
                           "generate_until tasks work")
    return [single(context, continuation) for context, continuation in pairs]


def rolling_loglikelihood(model: Model, text: str) -> float:
    """lm-eval ``loglikelihood_rolling``: log P(text) from a BOS (else EOS) token,
    in windows of the model's context with one token of overlap context."""
    backend = model.backend
    score = getattr(backend, "prompt_logprobs", None)
    if score is None:
        raise NotSupported(f"model {model.name} ({backend.name}) cannot score token "
                           "logprobs, which perplexity tasks need")
    meta = backend.metadata
    prefix_text = meta.bos_token or meta.eos_token
    if not prefix_text:
        raise NotSupported(f"model {model.name} has neither a BOS nor an EOS token to "
                           "condition the first token on")
    prefix = backend.tokenize(prefix_text, add_bos=False, special=True)
    tokens = backend.tokenize(text, add_bos=False)
    total = 0.0
    # n_ctx - 1: the scored ids (context + predicted) must fit the window.
    for context, predicted in rolling_windows(tokens, prefix[0], backend.n_ctx - 1):
        scored = score(context + predicted)
        total += sum(t.logprob or 0.0 for t in scored[-len(predicted):])
    return total


def rolling_windows(tokens: list[int], prefix: int, max_len: int
                    ) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows`` (context_len 1) made disjoint:
    (context, predicted) pairs that together predict every token once."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[max(0, end - max_len - 1) : end - 1]
        yield window[: len(window) - (n - 1)], tokens[end - n : end]
        done = end


def generate_until(model: Model, task: TaskSpec, item: Item, chat: bool = False) -> str:
    """Greedy (unless ``do_sample``) text for the item's prompt, cut at the first
    stop string. The prompt keeps its last n_ctx - max_gen_toks tokens, as
    lm-eval's HF model does."""
    gen = task.generation
    assert gen is not None
    backend = model.backend
    if chat:
        body = item.context[len(item.system):]
        messages = [{"role": "system", "content": item.system}] if item.system else []
        request = model.chat_request([*messages, {"role": "user", "content": body}])
        ids = [int(i) for i in request.prompt]
    else:
        ids = backend.tokenize(item.context, add_bos=True)
    room = backend.n_ctx - gen.max_gen_toks
    if room < 1:
        raise NotSupported(f"max_gen_toks {gen.max_gen_toks} does not fit the model's "
                           f"context of {backend.n_ctx} tokens")
    stop = tuple(dict.fromkeys([*gen.until, *(model.chat_format.stop if chat else ())]))
    options: dict[str, Any] = {"max_tokens": gen.max_gen_toks, "stop": stop,
                               "temperature": 0.0}
    if gen.do_sample:
        options.update(temperature=gen.temperature or 1.0, top_p=gen.top_p or 1.0,
                       top_k=gen.top_k or 0, min_p=0.0)
    request = make_request(ids[-room:], options)
    return collect(backend.stream(request)).text


# -- helpers -------------------------------------------------------------------


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _parallel(fn: Callable[[Item], ItemResult], items: list[Item], workers: int
              ) -> list[ItemResult]:
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))
