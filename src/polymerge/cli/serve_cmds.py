"""Command-line entry for serving: ``polymerge serve TARGET``."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_serve(args: argparse.Namespace) -> int:
    from polymerge.errors import PolymergeError
    from polymerge.serve import ServeOptions

    if not 0 <= args.port <= 65535:
        raise PolymergeError(f"serve: --port must be from 0 to 65535, got {args.port}")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise PolymergeError(f"serve: --api-key-env {args.api_key_env}: that environment "
                                 "variable is not set or empty")
    options = ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, timeout=args.timeout,
                           max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                           max_input_tokens=args.max_input_tokens, api_key=key, name=args.name)
    if args.threads is not None and args.threads < 1:
        raise PolymergeError(f"serve: --threads must be a whole number >= 1, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from polymerge.serve.server import load, serve

    runtime = load(args.target, device=args.device, base=args.base,
                   max_length=args.max_input_tokens, allow_pickle=args.allow_pickle)
    code = serve(runtime, options, host=args.host, port=args.port, log_level=args.log_level)
    # Drained: nothing is left to write or clean up (the server writes no file). Tearing
    # down the interpreter's torch and transformers modules takes seconds; skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the main parser."""
    p = sub.add_parser(
        "serve", help="serve a store or checkpoint over HTTP (OpenAI-compatible)",
        description="Serve an expert store (or a plain checkpoint) over HTTP: OpenAI-compatible "
                    "/v1/completions, /v1/chat/completions and /v1/models, plus /v1/classify, "
                    "/v1/route, /health and /metrics. Concurrent requests are batched into one "
                    "pass with per-row routing (model = the store's name routes, an expert's "
                    "name forces it). SIGTERM drains and exits 0.")
    p.add_argument("target", help="expert store folder or model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                       "127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, "
                                                          "printed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled weights (TARGET, --base) with torch.load(weights_only=True)")
    p.add_argument("--base", help="base model folder for a channel store's router features "
                                  "(default: the one recorded)")
    p.add_argument("--name", help="the store's model name (default: its folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more rows after its first (default 10)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="rows that may wait; beyond, 503 with Retry-After (default 256)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds after which a request is cancelled (504; default 60)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="largest max_tokens a request may ask for (default 512)")
    p.add_argument("--default-max-tokens", type=int, default=16,
                   help="max_tokens of a request that gives none (default 16)")
    p.add_argument("--max-input-tokens", type=int, default=512,
                   help="longest prompt or input, in tokens (default 512)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require 'Authorization: Bearer KEY' with KEY read from this "
                        "environment variable")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=_cmd_serve)
