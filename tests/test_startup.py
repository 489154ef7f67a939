"""Quick start: each verb imports only what its work needs.

``lanner --help`` registers every verb without importing a service, and
``lanner run`` / ``lanner chat`` on a GGUF model load llama.cpp and the chat
template, but not torch, transformers, llguidance, FastAPI or the document
pipeline. Each case runs in a fresh interpreter and lists ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lanner.cli import rag_options

# Heavy for a one-shot answer: the transformers backend, constrained decoding,
# the server, the document pipeline (numpy + the embedder), tools (pydantic).
NOT_FOR_RUN = ("torch", "transformers", "sentence_transformers", "llguidance", "fastapi",
               "uvicorn", "pydantic", "lanner.rag", "lanner.server", "lanner.evals",
               "lanner.tools")
# --help also needs no model code at all: no llama.cpp, numpy, jinja2 or SQLite.
NOT_FOR_HELP = (*NOT_FOR_RUN, "llama_cpp", "numpy", "jinja2", "sqlite3", "lanner.engine.model",
                "lanner.chat", "lanner.store")

SCRIPT = """
import json, sys
from lanner.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
watched = json.loads(%r)
print(json.dumps({"code": code, "loaded": sorted(m for m in watched if m in sys.modules)}),
      file=sys.stderr)
"""


def imports_of(*args: str, home: Path, stdin: str = "") -> list[str]:
    """Which of the watched modules the ``lanner`` command ``args`` imported."""
    watched = json.dumps(sorted({*NOT_FOR_HELP, "llama_cpp", "jinja2"}))
    result = subprocess.run([sys.executable, "-c", SCRIPT % watched, "--home", str(home), *args],
                            input=stdin, capture_output=True, text=True, timeout=300)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), result.stderr
    loaded: list[str] = report["loaded"]
    return loaded


def test_help_imports_no_service(lanner_home: Path) -> None:
    loaded = imports_of("--help", home=lanner_home)
    assert [m for m in loaded if m in NOT_FOR_HELP] == []


def test_every_verbs_help_imports_no_service(lanner_home: Path) -> None:
    for verb in ("run", "chat", "ask", "ingest", "compare", "arena", "logs", "serve"):
        loaded = imports_of(verb, "--help", home=lanner_home)
        assert [m for m in loaded if m in NOT_FOR_HELP] == [], verb


def test_run_imports_llama_cpp_and_nothing_heavy(lanner_home: Path) -> None:
    loaded = imports_of("run", "smollm2-q4_1", "Hi", "--temperature", "0", "--max-tokens", "2",
                        home=lanner_home)
    assert "llama_cpp" in loaded and "jinja2" in loaded  # the real path ran
    assert [m for m in loaded if m in NOT_FOR_RUN] == []


def test_chat_imports_llama_cpp_and_nothing_heavy(lanner_home: Path) -> None:
    loaded = imports_of("chat", "smollm2-q4_1", "--max-tokens", "2", "--temperature", "0",
                        home=lanner_home, stdin="Hi\n")
    assert "llama_cpp" in loaded
    assert [m for m in loaded if m in NOT_FOR_RUN] == []


def test_cli_copies_of_rag_defaults_match_the_originals() -> None:
    from lanner.rag.chunking import MAX_CHARS, OVERLAP
    from lanner.rag.embed import BATCH_SIZE, RUNTIMES
    from lanner.rag.search import MODES
    from lanner.rag.store import DEFAULT_COLLECTION

    assert rag_options.DEFAULT_COLLECTION == DEFAULT_COLLECTION
    assert rag_options.MODES == MODES
    assert (rag_options.CHUNK_CHARS, rag_options.CHUNK_OVERLAP) == (MAX_CHARS, OVERLAP)
    assert rag_options.EMBED_BATCH == BATCH_SIZE
    assert rag_options.EMBED_RUNTIMES == RUNTIMES
