"""A scripted backend for tests of the edges: no model, exact control.

Tokens are single characters (id = code point + 3; 0/1/2 are BOS/EOS/PAD), so
token counts are easy to predict. Replies come from a script: a list of strings
used in turn, or a function of the prompt text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence

from lanner.backends.base import ModelMetadata
from lanner.engine.textstream import StopBuffer
from lanner.engine.types import Event, Finish, Request, Timings, Token, TopLogprob, Usage
from lanner.errors import InvalidRequest

BOS, EOS, PAD = 0, 1, 2
_OFFSET = 3
N_VOCAB = 0x110000 + _OFFSET
"""Every code point is a token (surrogates aside), after BOS/EOS/PAD."""
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = {"<s>": BOS, "</s>": EOS}


class FakeBackend:
    name = "fake"
    version = "1"

    def __init__(
        self,
        replies: Sequence[str] | Callable[[str], str] = ("Hello from the fake model.",),
        *,
        n_ctx: int = 2048,
        delay_s: float = 0.0,
        chat_template: str | None = CHATML,
    ) -> None:
        self._replies = replies
        self._turn = 0
        self.n_ctx = n_ctx
        self.delay_s = delay_s
        self.requests: list[Request] = []
        self.closed = False
        self.metadata = ModelMetadata(
            architecture="fake",
            chat_template=chat_template,
            bos_token="<s>",
            eos_token="<|im_end|>",
            n_ctx_train=n_ctx,
        )

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = [BOS] if add_bos else []
        i = 0
        while i < len(text):
            tok = next((s for s in SPECIAL if special and text.startswith(s, i)), None)
            if tok:
                ids.append(SPECIAL[tok])
                i += len(tok)
            else:
                ids.append(ord(text[i]) + _OFFSET)
                i += 1
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        _check_ids(ids)
        return "".join(chr(i - _OFFSET) for i in ids if i >= _OFFSET)

    def reply_for(self, prompt: str) -> str:
        if callable(self._replies):
            return self._replies(prompt)
        reply = self._replies[self._turn % len(self._replies)]
        self._turn += 1
        return reply

    def stream(self, request: Request) -> Generator[Event, None, None]:
        self.requests.append(request)
        start = time.perf_counter()
        prompt_ids = (
            self.tokenize(request.prompt)
            if isinstance(request.prompt, str)
            else list(request.prompt)
        )
        reply = self.reply_for(self.detokenize(prompt_ids))
        room = self.n_ctx - len(prompt_ids)
        limit = room if request.max_tokens is None else min(request.max_tokens, room)
        buffer = StopBuffer(request.stop)
        ttft = 0.0
        n = 0
        reason = "stop"
        for ch in reply:
            if n >= limit:
                reason = "length"
                break
            if self.delay_s:
                time.sleep(self.delay_s)
            n += 1
            token = self._token(ch, request)
            delta = buffer.push(ch, token)
            ttft = ttft or time.perf_counter() - start
            if delta:
                yield delta
            if buffer.hit:
                break
        if not buffer.hit and (tail := buffer.flush()):
            yield tail
        usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=n)
        yield Finish(reason, usage, Timings(ttft, time.perf_counter() - start))  # type: ignore[arg-type]

    def _token(self, ch: str, request: Request) -> Token:
        tid = ord(ch) + _OFFSET
        if not request.wants_logprobs:
            return Token(tid, ch)
        top = tuple(
            TopLogprob(c, math.log(p), ord(c) + _OFFSET)
            for c, p in [(ch, 0.9), ("?", 0.05), ("!", 0.03)][: max(request.top_logprobs, 1)]
        )
        return Token(tid, ch, math.log(0.9), top if request.top_logprobs else ())

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        return len(continuation) * math.log(0.9), True

    def close(self) -> None:
        self.closed = True


def _check_ids(ids: Sequence[int]) -> None:
    """As the real backends do: an id outside the vocabulary is a 400 naming prompt."""
    bad = next((i for i in ids if not 0 <= i < N_VOCAB or 0xD800 <= i - _OFFSET <= 0xDFFF), None)
    if bad is not None:
        raise InvalidRequest("prompt", f"token id {bad} is outside the vocabulary")
