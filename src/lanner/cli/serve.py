"""``lanner serve [MODEL...]``: an OpenAI-compatible server on this machine."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from lanner.cli import options
from lanner.engine.registry import DEFAULT_MODEL, resolve

KEY_ENV = "LANNER_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API",
        description="Serve models over an OpenAI-compatible HTTP API (chat, completions, "
        "embeddings, models, /health, /metrics). Models load on first use.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"short names, .gguf files or model folders (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${KEY_ENV}, "
                   "else no key)")
    p.add_argument("--no-api-key", action="store_true",
                   help="serve a non-loopback --host without a key, on purpose (anyone who "
                   "can reach it can run models and upload documents)")
    p.add_argument("--keep-alive", type=float, default=300.0, metavar="SECONDS",
                   help="unload a model after this long unused (default 300; negative: never)")
    p.add_argument("--max-queue", type=int, default=128, metavar="N",
                   help="most generations held at once, running or queued; more get 503 "
                   "with Retry-After (default 128)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="do not serve the bundled embedding model on /v1/embeddings")
    p.add_argument("--store", metavar="URL", default=None,
                   help="where the collections of \"collection\" requests live: a postgresql:// "
                   "URL (one connection pool for all requests) or a SQLite file (default: "
                   "logs.db in the Lanner home)")
    options.add_model_flags(p)
    p.set_defaults(func=run, kv="auto")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lanner.catalog.fit import check_models_for_serving
    from lanner.engine.engine import Engine
    from lanner.server.app import create_app

    if args.max_queue < 1:
        print("lanner: error: --max-queue must be at least 1", file=sys.stderr)
        return 2
    if not args.api_key and not args.no_api_key and not is_loopback(args.host):
        print(f"lanner: error: --host {args.host} opens the server to the network, and it has "
              f"no API key: add --api-key KEY (or set ${KEY_ENV}), or --no-api-key if you "
              "mean to leave it open", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(args.models or [DEFAULT_MODEL]))
    engine = Engine(args.home)
    for name in names:
        resolve(name, engine.home)  # an unknown name fails now, not on first request
    # Licence notices, and a model that will not fit is refused before loading;
    # the KV layout is the one the memory planner sized.
    args.kv = check_models_for_serving(engine.home, names, backend=args.backend,
                                       n_ctx=args.n_ctx, kv=args.kv, adapter=args.adapter)
    load_options = {"backend": args.backend, "chat_format": args.chat_format,
                    "n_ctx": args.n_ctx, "dtype": args.dtype, "kv": args.kv,
                    "adapter": args.adapter, "rope_scaling": args.rope_scaling,
                    "rope_factor": args.rope_factor, "quant": args.quant,
                    "speculative": args.speculative}
    app = create_app(engine, names, api_key=args.api_key, keep_alive_s=args.keep_alive,
                     max_queue=args.max_queue, embedder=None if args.no_embeddings else ...,
                     store=args.store,
                     load_options={k: v for k, v in load_options.items() if v is not None})
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    print(f"{base}/  Lanner's web UI, serving {', '.join(names)} (OpenAI-compatible API at "
          f"{base}/v1{'; API key required' if args.api_key else ''}). Ctrl-C stops.", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface
