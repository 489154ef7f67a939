"""Every error Lanner raises on purpose, in one place.

Edges translate them: the CLI prints ``str(error)`` on one line and exits with
``exit_code``; the server answers with OpenAI's error JSON and ``http_status``.
"""

from __future__ import annotations


class LannerError(Exception):
    """Base class: a problem the user can act on, with a one-line message."""

    exit_code = 1
    http_status = 400
    error_type = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class InvalidRequest(LannerError):
    """A request field has a bad value; names the field."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.param = field


class ModelNotFound(LannerError):
    """No model by that name, path or registry entry."""

    http_status = 404
    code = "model_not_found"


class ModelLoadError(LannerError):
    """The model file exists but cannot be opened (corrupt, unsupported)."""

    http_status = 500
    error_type = "server_error"


class ChatFormatError(LannerError):
    """The model has no known chat format, or its template fails to render."""


class ContextLengthExceeded(LannerError):
    """The prompt (plus the tokens asked for) does not fit the context window."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, n_ctx: int, max_tokens: int | None = None) -> None:
        if max_tokens is None:
            msg = (
                f"prompt is {prompt_tokens} tokens long but the model's context window "
                f"is {n_ctx} tokens"
            )
        else:
            msg = (
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is "
                f"{prompt_tokens + max_tokens} tokens, more than the model's context "
                f"window of {n_ctx} tokens"
            )
        super().__init__(msg)
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx
        self.param = "messages"


class BackendUnavailable(LannerError):
    """A backend's library (torch, llama_cpp, ...) is not installed."""

    http_status = 500
    error_type = "server_error"


class PermissionDenied(LannerError):
    """The server does not allow this request (an admin route with no key set)."""

    http_status = 403
    error_type = "permission_error"


class Overloaded(LannerError):
    """The request queue is full; try again later."""

    http_status = 503
    error_type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(LannerError):
    """The log database cannot be opened or migrated."""


class TaskError(LannerError):
    """An evaluation task file, or its data, is malformed or uses a feature
    Lanner does not support; the message names the file and the key or line."""

    exit_code = 2


class NotSupported(LannerError):
    """The model or its backend cannot do what was asked (for example, a
    chat-only remote model cannot score loglikelihoods)."""


class BattleNotFound(LannerError):
    """No arena battle has this id."""

    http_status = 404
    code = "battle_not_found"
    param = "battle_id"


class AlreadyVoted(LannerError):
    """The battle's vote is recorded already; a vote is never overwritten."""

    http_status = 409
    code = "already_voted"
    param = "battle_id"


class DataError(LannerError):
    """A fine-tuning data file, or one of its rows, cannot be used; the message
    names the file and line (``train.jsonl:12: ...``)."""

    exit_code = 2


class TooLarge(LannerError):
    """An upload is over the server's size limit (413)."""

    http_status = 413
    code = "too_large"


class CatalogError(LannerError):
    """A catalog data file is malformed; the message names the file, the entry
    and the field. Also: no catalog entry by that name."""

    code = "catalog_error"


class WontFit(LannerError):
    """The memory planner says the model does not fit this machine; the
    message gives the numbers."""

    exit_code = 3
    http_status = 507
    error_type = "server_error"


class RemoteError(LannerError):
    """A remote engine (an OpenAI-compatible server registered with ``lanner
    remote add``) failed: unreachable, an answer it should not give, or a
    stream that broke off. The message names the remote and what happened."""

    http_status = 502
    error_type = "server_error"
    code = "remote_error"
