"""Starting the server: load the runtime, warm it up, bind, serve with uvicorn until SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the requests in flight finish
(up to the request timeout), then the app's lifespan ends: the model thread runs what is still
queued and stops. The process then exits with status 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

from polymerge.errors import PolymergeError
from polymerge.serve.options import ServeOptions


def load(target: str | Path, *, device: str = "cpu", base: str | Path | None = None,
         max_length: int = 512, allow_pickle: bool = False) -> Any:
    """The runtime of a store or checkpoint folder, warmed up (model and tokenizer loaded, a
    first pass run; the app warms the router), so the first request pays nothing extra.
    ``base``: a channel store's base model folder, which its router's features come from;
    ``allow_pickle``: load pickled weights (a plain checkpoint's, the base's)."""
    import transformers

    from polymerge.runtime import load_runtime

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rt = load_runtime(target, device=device, base=base, max_length=max_length,
                      allow_pickle=allow_pickle)
    if not hasattr(rt, "folder") or not hasattr(rt, "model"):
        raise PolymergeError(f"serve: {type(rt).__name__} runtimes cannot be served")
    rt.model  # noqa: B018  (built now, not on the first request)
    probe = ["hello"]
    expert = rt.experts[0]
    if rt.is_causal:
        rt.generate(probe, expert, max_new_tokens=1)
    else:
        rt.forward(probe, expert)
    if rt.serving == "switch":
        rt.gather_costs  # noqa: B018  (the mixed-batch path, installed once)
    return rt


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with
    # Nagle on, a response written in two parts on a kept-alive connection waits for the
    # client's delayed ACK (40 ms on Linux) before its second part goes out.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise PolymergeError(f"serve: cannot listen on {host}:{port} "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    sock.set_inheritable(True)
    return sock


def serve(runtime: Any, options: ServeOptions, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", out: TextIO | None = None) -> int:
    """Serve ``runtime`` until SIGTERM or Ctrl-C; returns 0 after a graceful drain."""
    import uvicorn

    from polymerge.serve.app import create_app

    app = create_app(runtime, options)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(options.timeout) + 5,
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"polymerge: serving {app.state.service.name} ({runtime.serving}, experts: "
          f"{', '.join(runtime.experts)}) at http://{shown}:{actual}", file=out or sys.stdout,
          flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained, with the handler found
    # at start restored; SIGTERM's is made a no-op here, so the process ends with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0
