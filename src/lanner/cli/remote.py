"""``lanner remote add|list|rm|usage``: OpenAI-compatible servers used as models."""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from lanner import paths

_EXAMPLE = ("example: vllm serve Qwen/Qwen2.5-72B-Instruct --tensor-parallel-size 4; then "
            "lanner remote add qwen72 http://gpu-host:8000 --model Qwen/Qwen2.5-72B-Instruct")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "remote", help="use an OpenAI-compatible server (vLLM, TGI, Ollama, ...) as a model",
        description="Register a remote engine under a short name; it then works wherever a "
                    "model name does (run, chat, compare, eval, ask, serve). " + _EXAMPLE)
    more = p.add_subparsers(dest="remote_command", metavar="add|list|rm|usage")
    a = more.add_parser("add", help="register a server's model under NAME",
                        description="Register the model MODEL of the OpenAI-compatible server "
                        "at URL (http://host:port, or the API's base ending in /v1) as NAME, "
                        "in models.json of the Lanner home. The server is asked for its "
                        "model list unless --no-check.")
    a.add_argument("name", metavar="NAME", help="the short name to use it by")
    a.add_argument("url", metavar="URL", help="the server, e.g. http://gpu-host:8000")
    a.add_argument("--model", metavar="ID", default=None,
                   help="the model id on the server (default: the server's only model)")
    a.add_argument("--api-key-env", metavar="VAR", default=None,
                   help="environment variable holding the API key (the key is never stored)")
    a.add_argument("--context", type=int, metavar="TOKENS", default=None,
                   help="the model's context window (default: what /models says, else 4096)")
    a.add_argument("--timeout", type=float, metavar="SECONDS", default=120.0,
                   help="longest silence allowed from the server, also between streamed "
                        "chunks, before the request fails (default 120)")
    a.add_argument("--extra-sampling", action="store_true",
                   help="also send top_k, min_p and repetition_penalty (vLLM, llama.cpp's "
                        "server and lanner serve take them; OpenAI refuses them)")
    a.add_argument("--no-check", action="store_true",
                   help="do not contact the server now (--model is then required)")
    a.add_argument("--license", metavar="L", default="unknown",
                   help="the model's licence, shown by `lanner models` (default: unknown)")
    a.add_argument("--replace", action="store_true", help="replace an entry of that name")
    a.set_defaults(func=run_add)
    ls = more.add_parser("list", help="the registered remote engines")
    ls.set_defaults(func=run_list)
    r = more.add_parser("rm", help="forget a remote engine")
    r.add_argument("name", metavar="NAME")
    r.set_defaults(func=run_rm)
    u = more.add_parser("usage", help="tokens and cost per remote, from remote-usage.jsonl",
                        description="Token usage and cost of every remote request so far, "
                        "summed per remote. Prices come from prices.toml in the Lanner home "
                        "(see the README); a model without a price shows no cost.")
    u.set_defaults(func=run_usage)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_add(args: argparse.Namespace) -> int:
    from lanner.backends.remote import RemoteConfig, normalise_url
    from lanner.engine.registry import add_entry, check_name
    from lanner.errors import InvalidRequest

    home = paths.home(args.home)
    check_name(args.name)
    if args.context is not None and args.context < 1:
        raise InvalidRequest("--context", f"must be at least 1, got {args.context}")
    if args.timeout <= 0:
        raise InvalidRequest("--timeout", f"must be > 0, got {args.timeout}")
    url = normalise_url(args.url)
    config = RemoteConfig(args.name, url, args.model or "", args.api_key_env, args.context,
                          args.timeout, args.extra_sampling)
    if args.no_check:
        if not args.model:
            raise InvalidRequest("--model", "is required with --no-check")
        window = None
    else:
        config, window = _checked(config)
    add_entry(home, args.name, {**config.to_entry(), "license": args.license},
              replace=args.replace)
    said = f", context {window} tokens" if window else ""
    print(f"{args.name}: {config.model} at {url}{said}")
    return 0


def _checked(config: Any) -> tuple[Any, int | None]:
    """Ask the server for its models: the one to use, and its context window."""
    import dataclasses

    from lanner.backends.remote import server_models, window_of
    from lanner.backends.remote_http import RemoteClient, Retry
    from lanner.errors import ModelNotFound

    client = RemoteClient(config.url, label=f"the server at {config.url}",
                          api_key=config.api_key(), timeout_s=min(config.timeout_s, 30.0),
                          retry=Retry(attempts=2))
    try:
        cards = server_models(client)
    finally:
        client.close()
    ids = [c["id"] for c in cards]
    if not config.model:
        if len(ids) != 1:
            raise ModelNotFound(f"the server at {config.url} serves {len(ids)} models "
                                f"({', '.join(ids) or 'none'}); choose one with --model")
        config = dataclasses.replace(config, model=ids[0])
    card = next((c for c in cards if c["id"] == config.model), None)
    if card is None:
        raise ModelNotFound(f"the server at {config.url} does not serve {config.model!r} "
                            f"(it serves: {', '.join(ids) or 'none'})")
    return config, config.context or window_of(card)


def run_list(args: argparse.Namespace) -> int:
    from lanner.engine.registry import registered

    entries = {n: e for n, e in registered(paths.home(args.home)).items()
               if e.get("format") == "remote"}
    if not entries:
        print("no remote engines (add one with `lanner remote add NAME URL`)")
        return 0
    for name, e in sorted(entries.items()):
        key = f"  key ${e['api_key_env']}" if e.get("api_key_env") else ""
        print(f"{name:20} {e.get('model')} at {e['path']}{key}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from lanner.engine.registry import registered, remove_entry
    from lanner.errors import ModelNotFound

    home = paths.home(args.home)
    if registered(home).get(args.name, {}).get("format") != "remote":
        raise ModelNotFound(f"{args.name!r} is not a remote engine (see `lanner remote list`)")
    remove_entry(home, args.name)
    print(f"removed {args.name}")
    return 0


def run_usage(args: argparse.Namespace) -> int:
    from lanner.backends.remote_prices import ledger

    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "prompt": 0, "completion": 0, "cost": {}})
    for line in ledger(paths.home(args.home)):
        t = totals[str(line.get("remote"))]
        t["requests"] += 1
        t["prompt"] += int(line.get("prompt_tokens") or 0)
        t["completion"] += int(line.get("completion_tokens") or 0)
        if line.get("cost") is not None:
            cur = str(line.get("currency") or "USD")
            t["cost"][cur] = t["cost"].get(cur, 0.0) + float(line["cost"])
    if not totals:
        print("no remote requests yet")
        return 0
    print(f"{'remote':20} {'requests':>8} {'prompt tok':>11} {'output tok':>11}  cost")
    for name, t in sorted(totals.items()):
        cost = ", ".join(f"{v:.4f} {k}" for k, v in t["cost"].items()) or "no price"
        print(f"{name:20} {t['requests']:>8} {t['prompt']:>11} {t['completion']:>11}  {cost}")
    return 0
