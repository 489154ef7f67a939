"""OpenAI's request and response shapes, and the one place their names become ours.

Requests are pydantic models that reject unknown top-level fields with a 400
naming the field, as OpenAI itself does ("Unrecognized request argument").
Message objects ignore extra keys, because clients replay whole response
messages (``refusal``, ``audio``, ``annotations``: None) into the next request.
Fields OpenAI defines but Lanner cannot honour yet (logit_bias, ...) are
accepted only at their neutral value; anything else is a 400 naming the field.
Tools are validated here for shape; ``server/tool_calls.py`` decides what they
do to the prompt, the decoding and the answer.

``*_options`` turn a request into keyword options for ``Model.chat_request`` /
``Model.completion_request`` (our ``Request`` field names); ``chat_logprobs`` and
``completion_logprobs`` turn our ``Token`` objects into OpenAI's logprobs shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from lanner.engine import constrain
from lanner.engine.types import Constraint, Token
from lanner.errors import InvalidRequest

_STRICT = ConfigDict(extra="forbid", strict=True)


def _whole(value: object) -> object:
    """JSON Schema's integer includes 2.0; strict pydantic would refuse it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]
"""An integer field: strict (no "5" strings), but 2.0 counts as 2."""

Stop = str | list[str] | None

MAX_TOKEN_ID = 2**31 - 1
"""Token ids are int32 in llama.cpp; a larger one could only overflow a tokenizer."""

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(min_length=1)]


def _prompt_shape(value: object) -> object:
    """A completions ``prompt`` as OpenAI and vLLM take it: a string, a list of
    strings, one list of token ids or a list of them. Anything else is one error
    naming ``prompt`` (pydantic's union errors would name a union member)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        problem = "must not be an empty list" if value == [] else _PROMPT_SHAPES
    elif all(isinstance(v, str) for v in value):
        return value
    elif all(isinstance(v, list) for v in value):
        problem = next((p for k, ids in enumerate(value)
                        if (p := _token_ids_problem(ids, f"prompt[{k}]"))), "")
    elif any(isinstance(v, (str, list)) for v in value):
        problem = _PROMPT_SHAPES
    else:
        problem = _token_ids_problem(value, "prompt")
    if problem:
        raise PydanticCustomError("prompt", "{problem}", {"problem": problem})
    return value


_PROMPT_SHAPES = ("must be a string, a list of strings, a list of token ids or a list of "
                  "lists of token ids (not a mix)")


def _token_ids_problem(ids: list[object], where: str) -> str:
    if not ids:
        return f"{where} is an empty list of token ids"
    for k, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
            return f"{where}[{k}] is {t!r}, not a token id (an integer from 0 to {MAX_TOKEN_ID})"
    return ""


Prompt = Annotated[str | list[str] | TokenIds | list[TokenIds], BeforeValidator(_prompt_shape)]
"""One prompt or several; each is text or token ids."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str
    """JSON text, exactly as the model wrote it."""


class MessageToolCall(BaseModel):
    """A call in an assistant message of the history (as a response gave it)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """One message; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    """A function the model may call; ``parameters`` is a JSON schema of its
    arguments object (absent: it takes none)."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    """Accepted; Lanner always decodes a forced call under the schema."""


class ToolDef(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function the model must call."""

    model_config = _STRICT
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields of every route that generates (chat, completions,
    Lanner's compare and arena). Ranges are OpenAI's (published in the OpenAPI
    schema); ``Request`` checks them again for every other caller."""

    model_config = _STRICT
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Int | None = Field(None, ge=0, le=2**32 - 1)
    stop: Stop = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # Extensions (llama.cpp / vLLM names).
    top_k: Int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)


class _Sampling(SamplingFields):
    """Fields shared by chat and completions."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1, le=128)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    """Accepted and ignored (OpenAI uses it for abuse monitoring)."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    """False: at most one call per answer (later ones are dropped)."""
    response_format: dict[str, Any] | None = None
    # Lanner's extension: answer from a document collection, citations checked.
    collection: str | None = None
    passages: Int = Field(5, ge=1, le=50)
    """With ``collection``: how many passages to retrieve."""
    conversation_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    """Lanner's extension: log this answer as a turn of that conversation
    (``POST /v1/lanner/conversations`` makes one), as ``lanner chat`` logs."""
    # Accepted and ignored: they change nothing a local model does.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    """Token ids are used exactly as given (no BOS added)."""
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=5)
    """OpenAI's legacy meaning: how many top alternatives per token (0-5)."""
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = _STRICT
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = Field(None, ge=1)
    user: str | None = None


# -- requests -> our options ---------------------------------------------------

_COMMON = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
           "top_k", "min_p", "repetition_penalty")


def sampling_options(req: SamplingFields) -> dict[str, Any]:
    """Keyword options from the sampling fields the client set: unset ones keep
    Lanner's defaults. Not max_tokens: an unset one means something per API."""
    options = {name: getattr(req, name) for name in _COMMON if getattr(req, name) is not None}
    if isinstance(req.stop, str):
        options["stop"] = (req.stop,)
    elif req.stop:
        options["stop"] = tuple(req.stop)
    return options


def _common_options(req: _Sampling) -> dict[str, Any]:
    options = sampling_options(req)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options", "is only allowed when stream is true")
    if req.logit_bias:
        raise InvalidRequest("logit_bias", "is not supported by Lanner")
    return options


def chat_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """Keyword options for ``Model.chat_request``; unset max tokens means "until
    the context window is full", as in OpenAI's chat API."""
    options = _common_options(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("max_completion_tokens",
                             "give max_tokens or max_completion_tokens, not both")
    options["max_tokens"] = req.max_completion_tokens or req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs", "requires logprobs to be true")
    options["logprobs"] = req.logprobs
    options["top_logprobs"] = req.top_logprobs or 0
    constraint = response_constraint(req.response_format)
    if constraint is not None:
        options["constraint"] = constraint
    return options


_SCHEMA_FIELD = "response_format.json_schema.schema"


def response_constraint(fmt: dict[str, Any] | None) -> Constraint | None:
    """OpenAI's ``response_format`` as a decoding constraint: ``json_object`` is
    any JSON object; ``json_schema`` is ``{"json_schema": {"name", "schema"}}``."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return constrain.json_schema(constrain.JSON_OBJECT)
    if kind != "json_schema":
        raise InvalidRequest("response_format.type",
                             f"must be text, json_object or json_schema, got {kind!r}")
    spec = fmt.get("json_schema") if fmt else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidRequest(_SCHEMA_FIELD, "a JSON schema object is required")
    constraint = constrain.json_schema(spec["schema"], field=_SCHEMA_FIELD)
    constrain.check(constraint)
    return constraint


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """Each prompt of the request: text, or token ids used exactly as given."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [cast(list[int], prompt)]
    return list(cast(list[str] | list[list[int]], prompt))


def completion_options(req: CompletionRequest) -> dict[str, Any]:
    """Keyword options for ``Model.completion_request``; unset max_tokens is 16,
    the default of OpenAI's completions API."""
    options = _common_options(req)
    options["max_tokens"] = 16 if req.max_tokens is None else req.max_tokens
    if req.logprobs is not None:
        options["logprobs"] = True
        options["top_logprobs"] = req.logprobs
    if req.suffix:
        raise InvalidRequest("suffix", "is not supported by Lanner")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("best_of", "is not supported by Lanner (leave it unset or equal to n)")
    return options


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index`` of ``n`` samples with ``seed + index``: the choices differ
    from each other, and the same request gives the same choices again."""
    return None if seed is None else (seed + index) % 2**32


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as our ChatFormat takes them: text content, None keys dropped."""
    out = []
    for i, message in enumerate(req.messages):
        m = message.model_dump(exclude_none=True)
        if message.role == "developer":
            m["role"] = "system"
        if isinstance(message.content, list):
            m["content"] = _join_parts(message.content, i)
        out.append(m)
    return out


def _join_parts(parts: list[TextPart], index: int) -> str:
    for part in parts:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"messages[{index}].content",
                                 f"only text parts are supported, got {part.type!r}")
    return "\n".join(part.text for part in parts if part.text is not None)


# -- our tokens -> OpenAI logprobs --------------------------------------------


def chat_logprobs(tokens: list[Token] | tuple[Token, ...]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion (or of one stream chunk)."""

    def entry(text: str, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        {**entry(t.text, t.logprob), "top_logprobs": [entry(a.token, a.logprob) for a in t.top]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[Token] | tuple[Token, ...], offset: int) -> dict[str, Any]:
    """``choices[i].logprobs`` of a legacy completion; ``offset`` is where the
    first token's text starts in the choice's text (negative when the tokens
    spell a leading space the text lacks: a SentencePiece prompt's first piece;
    offsets never go below 0)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({a.token: a.logprob for a in t.top} if t.top else None)
        out["text_offset"].append(max(offset, 0))
        offset += len(t.text)
    return out


def echo_offset(text: str, tokens: list[Token] | tuple[Token, ...]) -> int:
    """Where an echoed prompt's first token starts in its text: the pieces
    may spell one more leading character than the prompt (SentencePiece's
    dummy prefix " "), which belongs to no character of the text."""
    return len(text) - sum(len(t.text) for t in tokens)


# -- response shapes (published in the OpenAPI schema) -------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChoiceMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    citations: dict[str, Any] | None = None
    """Lanner extension, with ``collection``: sources, citations and their checks."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lanner"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
