"""Flags shared by the verbs that run a model (run, chat, ...): one place that
turns them into engine options. Validation itself happens in ``Request``."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanner import paths
from lanner.engine.registry import DEFAULT_MODEL
from lanner.engine.types import Constraint
from lanner.errors import InvalidRequest

if TYPE_CHECKING:  # the engine (jinja2) and the store load when a verb runs, not for --help
    from lanner.engine.model import Model
    from lanner.store import Store

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--backend", choices=("llama.cpp", "transformers"),
                   help="default: llama.cpp for .gguf, transformers for folders")
    g.add_argument("--chat-format", help="built-in format name or a .jinja file, "
                   "for models that ship no chat template")
    g.add_argument("--n-ctx", type=int, help="context window in tokens (per request)")
    g.add_argument("--rope-scaling", choices=("linear", "yarn"),
                   help="stretch the model's trained context with RoPE scaling (both backends)")
    g.add_argument("--rope-factor", type=float, metavar="F",
                   help="with --rope-scaling: how many times the trained context (default: "
                   "--n-ctx / trained context); the default window grows by F")
    g.add_argument("--kv", choices=("unified", "split", "auto"),
                   help="llama.cpp KV cache: 'unified' (all requests share n-ctx cells), "
                   "'split' (each of the 16 sequence slots gets its own n-ctx cells: fastest "
                   "under concurrency, 16x the memory) or 'auto' (split when that fits a "
                   "quarter of RAM, at most 4 GiB). Default: unified; serve: auto")
    g.add_argument("--speculative", metavar="ngram|draft:MODEL|off",
                   help="llama.cpp speculative decoding: 'ngram' drafts from the prompt and the "
                   "text so far, 'draft:MODEL' from a smaller model with the same "
                   "vocabulary, 'off' (default) decodes one token per step. Output is unchanged")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (transformers backend)")
    g.add_argument("--quant", choices=("int8", "int4"),
                   help="load the weights quantised (transformers backend, then the default): "
                   "bitsandbytes int8/int4 on a CUDA GPU; refused on a CPU")
    g.add_argument("--adapter", metavar="PATH",
                   help="a LoRA adapter folder (peft format, e.g. from lanner tune) loaded on "
                   "top of the model; runs on the transformers backend")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (default 0.95)")
    g.add_argument("--top-k", type=int, help="0 disables (default 40)")
    g.add_argument("--min-p", type=float, help="default 0.05")
    g.add_argument("--repetition-penalty", type=float, help="default 1.0 (off)")
    g.add_argument("--seed", type=int, help="same seed, same settings -> same text")
    g.add_argument("--max-tokens", type=int, help="most new tokens (default 256)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--show-probs", nargs="?", const=5, type=int, metavar="N",
                   help="show each token's probability and its top N alternatives")
    g.add_argument("--schema", metavar="FILE|JSON",
                   help="constrain the output to this JSON schema (a file or inline JSON)")
    g.add_argument("--no-log", action="store_true", help="do not log this to the database")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        name: getattr(args, name) for name in _SAMPLING if getattr(args, name) is not None
    }
    if args.stop:
        options["stop"] = tuple(args.stop)
    if args.show_probs is not None:
        options["logprobs"] = True
        options["top_logprobs"] = args.show_probs
    if args.schema:
        options["constraint"] = schema_constraint(args.schema)
    return options


def schema_constraint(value: str) -> Constraint:
    """``--schema`` takes a path to a JSON file or the JSON itself."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise InvalidRequest("--schema", f"no such file: {value} (or give inline JSON)")
        text = path.read_text()
    from lanner.engine import constrain  # numpy and the grammar library: only with --schema

    constraint = constrain.json_schema(text, field="--schema")
    constrain.check(constraint)
    return constraint


def load_model(args: argparse.Namespace, name: str | None,
               streams: int | None = None) -> Model:
    """The model the verb names, with the model flags. ``streams``: how many
    requests it must decode at once (None: the backend's default, 16 for
    llama.cpp); a one-shot answer asks for 1, which sizes a smaller context."""
    return start_loading(args, name, streams)()


def start_loading(args: argparse.Namespace, name: str | None,
                  streams: int | None = None) -> Callable[[], Model]:
    """``load_model`` in two halves: this starts reading the weights in the
    background (``Engine.preload``), the function it returns finishes the load.
    A verb does its own start-up work (imports, opening the log) in between."""
    from lanner.engine.engine import Engine

    options = {"n_ctx": args.n_ctx, "dtype": args.dtype, "kv": args.kv,
               "adapter": args.adapter, "rope_scaling": args.rope_scaling,
               "rope_factor": args.rope_factor, "quant": args.quant,
               "speculative": args.speculative, "n_seq_max": streams}
    engine = Engine(args.home)
    licence_notice(engine.home, name or DEFAULT_MODEL)
    engine.preload(name or DEFAULT_MODEL, backend=args.backend,
                   chat_format=args.chat_format, **options)
    return functools.partial(engine.load, name or DEFAULT_MODEL, backend=args.backend,
                             chat_format=args.chat_format, **options)


def licence_notice(home: Path, name: str) -> None:
    """Once per model: say so when its licence restricts hosting or use, or
    needs its terms accepted (an unknown name is left to the loader to report)."""
    from lanner.catalog.licensing import warn_for_spec
    from lanner.engine.registry import resolve
    from lanner.errors import ModelNotFound

    try:
        spec = resolve(name, home)
    except ModelNotFound:
        return
    warn_for_spec(home, spec)


def open_store(args: argparse.Namespace) -> Store | None:
    if getattr(args, "no_log", False):
        return None
    from lanner.store import Store

    return Store(paths.db_path(paths.home(args.home)))


def read_prompt(prompt: str) -> str:
    """``-`` means: read the prompt from standard input."""
    return sys.stdin.read() if prompt == "-" else prompt
