"""Serving a store (or a checkpoint) over HTTP: an OpenAI-compatible server that batches
requests of different experts into one pass.

Layout: :mod:`.options` (limits and settings), :mod:`.schemas` (request bodies),
:mod:`.catalog` (model names and routing), :mod:`.work` (a row of work and its answer),
:mod:`.generation` (per-row sampling, stops and streaming inside one generate call),
:mod:`.engine` (a batch on the runtime), :mod:`.batcher` (the queue and the model thread),
:mod:`.metrics` (Prometheus), :mod:`.app` (the ASGI app), :mod:`.server` (uvicorn, signals).

Sits between :mod:`polymerge.runtime` (which it serves, through the one ``Runtime``
interface) and :mod:`polymerge.zoo`; nothing below imports it. Needs the ``serve`` extra
(``fastapi``, ``uvicorn``, ``prometheus-client``).
"""

from polymerge.serve.options import ServeOptions

__all__ = ["ServeOptions", "create_app", "load", "serve"]


def __getattr__(name: str):  # the web stack is imported only when used
    if name == "create_app":
        from polymerge.serve.app import create_app

        return create_app
    if name in ("load", "serve"):
        from polymerge.serve import server

        return getattr(server, name)
    raise AttributeError(name)
