"""The Engine: loads models by name through the registry and keeps them cached.

It is passed explicitly to whoever needs it (no module-level globals). Backends
are named by data ("module:Class" strings) and imported only when used, so
``import lanner`` never pulls in torch or llama_cpp.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner import paths
from lanner.backends.base import Backend
from lanner.engine.registry import DEFAULT_MODEL, ModelSpec, resolve
from lanner.errors import BackendUnavailable, InvalidRequest

if TYPE_CHECKING:
    from lanner.engine.model import Model

BACKENDS: dict[str, str] = {
    "llama.cpp": "lanner.backends.llamacpp:LlamaCppBackend",
    "transformers": "lanner.backends.transformers:TransformersBackend",
    "fake": "lanner.backends.fake:FakeBackend",
    "remote": "lanner.backends.remote:RemoteBackend",
}
PRELOADERS: dict[str, str] = {"llama.cpp": "lanner.backends.llamacpp_native:preload"}
"""Backends that can read a model's weights on a background thread
(``Engine.preload``): ``preload(path, options)`` with the backend's options."""
_FORMATS = {"llama.cpp": {"gguf"}, "transformers": {"gguf", "safetensors"},
            "remote": {"remote"}}


def open_backend(spec: ModelSpec, backend: str | None = None, **options: Any) -> Backend:
    """Instantiate the backend for a model; heavy imports happen here."""
    name = backend or spec.backend
    if name not in BACKENDS or name == "fake":
        known = "llama.cpp, transformers, remote"
        raise InvalidRequest("backend", f"unknown backend {name!r} (one of: {known})")
    if spec.format not in _FORMATS[name]:
        raise InvalidRequest("backend", f"{name} cannot open a {spec.format} model")
    if name == "llama.cpp" and options.get("adapter") is not None:
        raise InvalidRequest("adapter", "the llama.cpp backend cannot load a peft adapter; "
                             "use --backend transformers (the default with --adapter)")
    if name == "llama.cpp" and options.get("quant") is not None:
        raise InvalidRequest("quant", "the llama.cpp backend runs a GGUF's own quantisation; "
                             "--quant is for --backend transformers (the default with --quant)")
    module_name, cls_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(
            f"the {name} backend needs {exc.name}, which is not installed"
        ) from exc
    cls = getattr(module, cls_name)
    kwargs = {k: v for k, v in options.items() if v is not None}
    if name != "llama.cpp" and kwargs.get("kv") == "auto":
        del kwargs["kv"]  # the default KV layout choice; other backends have no such choice
    if name != "llama.cpp" and kwargs.get("speculative") not in (None, "off"):
        raise InvalidRequest("speculative", f"only the llama.cpp backend speculates, not {name}")
    if name != "llama.cpp":
        kwargs.pop("speculative", None)
    if name == "remote":
        kwargs.pop("n_seq_max", None)  # the server decides how many it decodes at once
    if name == "remote":
        return _open_remote(cls, spec, kwargs)
    result: Backend = cls(spec.path, **kwargs)
    return result


def _open_remote(cls: Any, spec: ModelSpec, options: dict[str, Any]) -> Backend:
    """A remote engine takes no local-weights options; ``n_ctx`` sets its window."""
    local = sorted(set(options) - {"n_ctx"})
    if local:
        raise InvalidRequest(local[0], f"{spec.name} is a remote engine; options for local "
                             "weights do not apply to it")
    assert spec.remote is not None  # resolve() sets it for every "remote" spec
    from lanner.backends.remote import RemoteConfig

    config = RemoteConfig.from_entry(spec.name, spec.remote)
    result: Backend = cls(config, Path(str(spec.remote["home"])), **options)
    return result


def prepare(spec: ModelSpec, backend: str | None, home: Path) -> ModelSpec:
    """The spec of the file that will actually run: a GGUF whose entry asks for
    other weights is re-encoded once (cached in ``home/converted``)."""
    if spec.weights is None or (backend or spec.backend) != "llama.cpp":
        return spec
    from lanner.backends.gguf_reencode import reencoded

    path = reencoded(spec.path, spec.weights, home / "converted")
    source = f"{spec.source}, {spec.path.name} re-encoded as {spec.weights}"
    return dataclasses.replace(spec, path=path, weights=None, source=source)


class Engine:
    """Holds loaded models for one user directory."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = paths.home(home)
        self._models: dict[tuple[object, ...], Model] = {}

    def load(
        self,
        name: str = DEFAULT_MODEL,
        *,
        backend: str | None = None,
        chat_format: str | None = None,
        **backend_options: Any,
    ) -> Model:
        """A loaded model, reused if the same one was loaded before. With an
        ``adapter`` or ``quant`` option the default backend is transformers
        (GGUF included)."""
        from lanner.engine.model import Model  # the chat template engine: not for preload

        spec, backend_name, options, key = self._plan(name, backend, chat_format,
                                                      backend_options)
        if key not in self._models:
            instance = open_backend(spec, backend_name, **options)
            self._models[key] = Model(spec, instance, chat_format_override=chat_format)
        return self._models[key]

    def preload(
        self,
        name: str = DEFAULT_MODEL,
        *,
        backend: str | None = None,
        chat_format: str | None = None,
        **backend_options: Any,
    ) -> None:
        """Start reading the weights that ``load`` with the same arguments
        will need, on a background thread, so that the caller's own start-up
        work (imports, opening its log) runs meanwhile; ``load`` then waits for
        them. Backends without a preloader (all but llama.cpp) read theirs in
        ``load``. A name that does not resolve raises here, as ``load`` would;
        errors from reading the file are raised by ``load``."""
        spec, backend_name, options, key = self._plan(name, backend, chat_format,
                                                      backend_options)
        target = PRELOADERS.get(backend_name)
        if key in self._models or target is None:
            return
        module_name, func_name = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return  # load says which package is missing
        getattr(module, func_name)(spec.path, options)

    def _plan(self, name: str, backend: str | None, chat_format: str | None,
              backend_options: dict[str, Any]
              ) -> tuple[ModelSpec, str, dict[str, Any], tuple[object, ...]]:
        """What ``load(name, ...)`` opens: the spec of the file that runs, the
        backend's name and options, and the key the loaded model is kept under."""
        wants_hf = any(backend_options.get(k) is not None for k in ("adapter", "quant"))
        if backend is None and wants_hf and resolve(name, self.home).format != "remote":
            backend = "transformers"
        spec = prepare(resolve(name, self.home), backend, self.home)
        backend_name = backend or spec.backend
        draft = backend_options.get("speculative")
        if isinstance(draft, str) and draft.startswith("draft:") and draft != "draft:":
            # The draft model by name, as the file llama.cpp will run.
            path = prepare(resolve(draft.removeprefix("draft:"), self.home), "llama.cpp",
                           self.home).path
            backend_options = {**backend_options, "speculative": f"draft:{path}"}
        if backend_name == "transformers" and spec.format == "gguf":
            # Conversions belong to this engine's home, not LANNER_HOME's.
            backend_options = {"cache_dir": self.home / "converted", **backend_options}
        key = (spec.path, backend_name, chat_format, tuple(sorted(backend_options.items())))
        return spec, backend_name, backend_options, key

    def attach(self, name: str, backend: Backend, chat_format: str | None = None) -> Model:
        """Register an already-built backend (tests, the fake backend, remote engines)."""
        from lanner.engine.model import Model

        spec = ModelSpec(name, Path(name), "fake", source=backend.name)
        model = Model(spec, backend, chat_format_override=chat_format)
        self._models[(name,)] = model
        return model

    def loaded(self) -> list[Model]:
        return list(self._models.values())

    def unload(self, model: Model) -> None:
        for key, value in list(self._models.items()):
            if value is model:
                del self._models[key]
        model.close()

    def close(self) -> None:
        for model in self._models.values():
            model.close()
        self._models.clear()
