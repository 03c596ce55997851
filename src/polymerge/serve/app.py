"""The ASGI app: OpenAI-compatible endpoints over one runtime, plus classify, route, health and
metrics.

========================  ==================================================================
``GET /health``           ``{"status": "ok", ...}`` (no key needed)
``GET /metrics``          Prometheus text (:mod:`.metrics`)
``GET /v1/models``        the store (routes) and each expert (forces it)
``POST /v1/completions``  OpenAI completions (causal LMs); ``stream`` as server-sent events
``POST /v1/chat/completions``  OpenAI chat completions (the tokenizer's chat template)
``POST /v1/classify``     per input: the expert, its routing, the label and score when the
                          output is a head's logits with labels, the pooled output
``POST /v1/route``        per input: the router's weights and the expert it picks
========================  ==================================================================

Each answer says which expert served each prompt (``expert``: the top weight) and with what
``routing`` weights; the ``X-Polymerge-Experts`` header lists them too. Requests are parsed
strictly (:mod:`.schemas`), resolved against the runtime's names (:mod:`.catalog`), checked
against the limits (:class:`.ServeOptions`), and only then queued (:mod:`.batcher`); every
refusal is an OpenAI-style error (:mod:`.errors`). No request field names a file: the server
reads and writes none on a client's behalf.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polymerge.errors import PolymergeError
from polymerge.routing import load_tokenizer
from polymerge.serve.batcher import Batcher
from polymerge.serve.catalog import Catalog, RowRouting
from polymerge.serve.engine import Engine
from polymerge.serve.errors import (
    APIError,
    bad_request,
    internal,
    timed_out,
    unauthorized,
)
from polymerge.serve.metrics import Metrics
from polymerge.serve.options import ServeOptions
from polymerge.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    InputsRequest,
    Sampling,
    parse,
)
from polymerge.serve.work import Answer, Row
from polymerge.serve.work import Sampling as RowSampling

POOLED_SHOWN = 64
"""Values of the pooled output shown per input by /v1/classify (the rest are summarized)."""


class Service:
    """The runtime with its catalog, queue, model thread and metrics (one per app)."""

    def __init__(self, runtime: Any, options: ServeOptions) -> None:
        self.rt = runtime
        self.options = options
        self.name = options.name or runtime.folder.name
        self.catalog = Catalog(runtime, self.name)
        self.metrics = Metrics()
        self.engine = Engine(runtime, self.metrics)
        self.batcher = Batcher(self.engine, self.metrics, max_batch=options.max_batch,
                               max_wait_ms=options.max_wait_ms, max_queue=options.max_queue)
        self.tokenizer = load_tokenizer(runtime.folder)  # the event loop's own instance
        self.causal = bool(runtime.is_causal)
        self.context = self._context_length()
        self.defaults = self._sampling_defaults()
        self.labels = self._labels()
        self.draining = False
        self._warm_router()

    def _warm_router(self) -> None:
        """Load the router and its features now; if that fails (a channel store served
        without ``--base``), requests that ask for the router get a 400 saying why."""
        if len(self.catalog.experts) < 2 or not self.catalog.has_router:
            return
        try:
            self.rt.route(["hello"])
        except PolymergeError as exc:
            self.catalog.router_error = str(exc)
            print(f"polymerge: warning: routing by the store's router is unavailable: {exc}",
                  file=sys.stderr, flush=True)

    def _context_length(self) -> int | None:
        cfg = getattr(self.rt.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _sampling_defaults(self) -> tuple[float, float]:
        """(temperature, top_p) when a request gives none: the model's generation config
        (greedy unless it samples)."""
        if not self.causal:
            return 0.0, 1.0
        gc = getattr(self.rt.model, "generation_config", None)
        if gc is None or not getattr(gc, "do_sample", False):
            return 0.0, 1.0
        return float(gc.temperature or 1.0), float(gc.top_p or 1.0)

    def _labels(self) -> dict[int, str] | None:
        cfg = getattr(self.rt.model, "config", None)
        arch = " ".join(getattr(cfg, "architectures", None) or [])
        id2label = getattr(cfg, "id2label", None)
        if "ForSequenceClassification" in arch and id2label:
            return {int(k): str(v) for k, v in id2label.items()}
        return None

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.draining = True
        self.batcher.close(drain=True)

    # -- checks
    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def check_texts(self, texts: Sequence[Any], param: str, *, limit: bool) -> list[int]:
        if not texts:
            raise bad_request(f"{param} is empty", param=param, code="empty_input")
        if len(texts) > self.options.max_prompts:
            raise bad_request(f"{param}: at most {self.options.max_prompts} per request",
                              param=param)
        counts = []
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise bad_request(f"{param} holds an empty text", param=param,
                                  code="empty_input")
            n = self.tokens(text) if limit else 0
            if n > self.options.max_input_tokens:
                raise bad_request(f"{param} has {n} tokens, more than this server's limit of "
                                  f"{self.options.max_input_tokens}", param=param,
                                  code="context_length_exceeded")
            counts.append(n)
        return counts

    def sampling(self, req: Sampling, limit: int | None, prompt_tokens: Sequence[int]
                 ) -> RowSampling:
        max_tokens = limit if limit is not None else min(self.options.default_max_tokens,
                                                         self.options.max_tokens)
        if max_tokens > self.options.max_tokens:
            raise bad_request(f"max_tokens is {max_tokens}, more than this server's limit of "
                              f"{self.options.max_tokens}", param="max_tokens",
                              code="max_tokens_exceeded")
        if self.context is not None and max(prompt_tokens) + max_tokens > self.context:
            raise bad_request(f"the prompt ({max(prompt_tokens)} tokens) and max_tokens "
                              f"({max_tokens}) exceed the model's context of {self.context} "
                              "tokens", param="max_tokens", code="context_length_exceeded")
        temperature, top_p = self.defaults
        return RowSampling(max_tokens=max_tokens,
                           temperature=temperature if req.temperature is None
                           else float(req.temperature),
                           top_p=top_p if req.top_p is None else float(req.top_p),
                           stop=tuple(req.stops()), seed=req.seed)

    def require_causal(self, yes: bool) -> None:
        if yes and not self.causal:
            raise bad_request(f"{self.name} does not generate text; use /v1/classify",
                              param="model", code="not_a_generator")
        if not yes and self.causal:
            raise bad_request(f"{self.name} generates text; use /v1/completions",
                              param="model", code="not_a_classifier")

    def chat_prompt(self, req: ChatRequest) -> tuple[str, str]:
        """(prompt, text to route on): the tokenizer's chat template (or ``role: content``
        lines when it has none); the router reads the last user message."""
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                prompt = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                            add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - the template rejected the messages
                raise bad_request(f"the chat template rejected the messages "
                                  f"({type(exc).__name__})", param="messages") from None
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        return str(prompt), users[-1] if users else str(prompt)

    # -- running rows
    def rows(self, kind: str, endpoint: str, texts: Sequence[str], routing: RowRouting, *,
             route_texts: Sequence[str] | None = None, sampling: RowSampling | None = None,
             prompt_tokens: Sequence[int] = ()) -> list[Row]:
        deadline = time.monotonic() + self.options.timeout
        return [Row(kind, t, routing, endpoint,
                    route_text=route_texts[i] if route_texts else None,
                    sampling=sampling, deadline=deadline,
                    prompt_tokens=prompt_tokens[i] if prompt_tokens else 0)
                for i, t in enumerate(texts)]

    def cancel(self, rows: Sequence[Row]) -> None:
        for r in rows:
            r.cancelled.set()
        self.batcher.wake()

    async def answers(self, rows: Sequence[Row]) -> list[Answer]:
        """Queue the rows and wait for every answer (504 past the timeout)."""
        self.batcher.submit(rows)
        futures = [asyncio.wrap_future(r.future) for r in rows]
        left = max(0.0, min(r.deadline for r in rows) - time.monotonic())
        done, pending = await asyncio.wait(futures, timeout=left)
        if pending:
            self.cancel(rows)
            for f in pending:
                f.cancel()
            raise timed_out(self.options.timeout)
        out = []
        for f in futures:
            exc = f.exception()
            if exc is not None:
                raise exc if isinstance(exc, APIError) else (
                    timed_out(self.options.timeout) if isinstance(exc, TimeoutError)
                    else internal())
            out.append(f.result())
        return out

    def count(self, endpoint: str, answers: Sequence[Answer]) -> None:
        for a in answers:
            self.metrics.rows.labels(endpoint, a.expert).inc()

    def model_label(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.catalog.names() else "unknown"


# ----------------------------------------------------------------------------- responses


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _experts_header(answers: Sequence[Answer]) -> dict[str, str]:
    return {"X-Polymerge-Experts": ",".join(a.expert for a in answers)}


def _usage(rows: Sequence[Row], answers: Sequence[Answer]) -> dict[str, int]:
    p = sum(r.prompt_tokens for r in rows)
    c = sum(a.tokens for a in answers)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(runtime: Any, options: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving ``runtime`` (a store's or a checkpoint's, loaded by the caller).
    The model thread starts with the app's lifespan and drains when it ends."""
    svc = Service(runtime, options or ServeOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            await asyncio.to_thread(svc.stop)

    app = FastAPI(title="polymerge", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" \
            if exc.status_code == 405 else None
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    def authorized(request: Request) -> bool:
        key = svc.options.api_key
        if key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  key.encode())

    async def body(request: Request) -> bytes:
        limit = svc.options.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"the body is larger than {limit} bytes",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the body is larger than {limit} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    Handler = Callable[[bytes], Awaitable[Response]]

    async def handle(request: Request, endpoint: str, handler: Handler,
                     needs_body: bool = True) -> Response:
        start = time.monotonic()
        counted = needs_body  # requests for the model (not /metrics, /v1/models)
        if counted:
            svc.metrics.in_flight.inc()
        status, model = 500, "unknown"
        streaming = False
        try:
            if not authorized(request):
                raise unauthorized()
            raw = await body(request) if needs_body else b""
            if raw:
                with contextlib.suppress(Exception):
                    model = svc.model_label(json.loads(raw).get("model"))
            response = await handler(raw)
            status = response.status_code
            streaming = isinstance(response, StreamingResponse)
            if streaming:
                return _timed(response, svc, endpoint, model, start, counted)
            return response
        except APIError as exc:
            status = exc.status
            svc.metrics.errors.labels(endpoint, exc.code or exc.type).inc()
            return error_response(exc)
        finally:
            if not streaming:
                if counted:
                    svc.metrics.in_flight.dec()
                svc.metrics.requests.labels(endpoint, model, str(status)).inc()
                svc.metrics.latency.labels(endpoint).observe(time.monotonic() - start)

    # -- endpoints
    @app.get("/health")
    async def health() -> Response:
        status = "draining" if svc.draining else "ok"
        return JSONResponse({"status": status, "model": svc.name, "serving": svc.rt.serving,
                             "experts": svc.catalog.experts, "queue": svc.batcher.depth,
                             "generates": svc.causal},
                            status_code=503 if svc.draining else 200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        async def run(_: bytes) -> Response:
            svc.metrics.queue.set(svc.batcher.depth)
            return Response(svc.metrics.render(), media_type=svc.metrics.content_type)
        return await handle(request, "metrics", run, needs_body=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def run(_: bytes) -> Response:
            created = int(svc.rt.folder.stat().st_mtime) if svc.rt.folder.exists() else 0
            return JSONResponse({"object": "list", "data": [dict(m, created=created)
                                                            for m in svc.catalog.models()]})
        return await handle(request, "models", run, needs_body=False)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        async def run(_: bytes) -> Response:
            for m in svc.catalog.models():
                if m["id"] == model_id:
                    return JSONResponse(dict(m, created=0))
            from polymerge.serve.errors import not_found_model

            raise not_found_model(model_id, svc.catalog.names())
        return await handle(request, "models", run, needs_body=False)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def run(raw: bytes) -> Response:
            req = parse(raw, CompletionRequest)
            routing = svc.catalog.resolve(req.model, req.routing)
            svc.require_causal(True)
            prompts = req.prompts()
            counts = svc.check_texts(prompts, "prompt", limit=True)
            sampling = svc.sampling(req, req.max_tokens, counts)
            rows = svc.rows("generate", "completions", prompts, routing, sampling=sampling,
                            prompt_tokens=counts)
            return await generate(req, rows, chat=False)
        return await handle(request, "completions", run)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        async def run(raw: bytes) -> Response:
            req = parse(raw, ChatRequest)
            routing = svc.catalog.resolve(req.model, req.routing)
            svc.require_causal(True)
            for m in req.messages:
                if not isinstance(m.content, str) and not m.content:
                    raise bad_request("a message has no content", param="messages",
                                      code="empty_input")
            if not any(m.text().strip() for m in req.messages):
                raise bad_request("messages hold no text", param="messages",
                                  code="empty_input")
            prompt, route_text = svc.chat_prompt(req)
            counts = svc.check_texts([prompt], "messages", limit=True)
            sampling = svc.sampling(req, req.limit(), counts)
            rows = svc.rows("generate", "chat", [prompt], routing, route_texts=[route_text],
                            sampling=sampling, prompt_tokens=counts)
            return await generate(req, rows, chat=True)
        return await handle(request, "chat", run)

    async def generate(req: Sampling, rows: list[Row], *, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            return await stream(req, rows, chat=chat, ident=ident, created=created)
        answers = await svc.answers(rows)
        svc.count(endpoint, answers)
        choices = []
        for i, a in enumerate(answers):
            choice: dict[str, Any] = {"index": i, "finish_reason": a.finish_reason,
                                      "logprobs": None, "expert": a.expert,
                                      "routing": a.weights}
            if chat:
                choice["message"] = {"role": "assistant", "content": a.text}
            else:
                choice["text"] = a.text
            choices.append(choice)
        return JSONResponse({"id": ident, "object": "chat.completion" if chat
                             else "text_completion", "created": created, "model": req.model,
                             "choices": choices, "usage": _usage(rows, answers),
                             "system_fingerprint": None}, headers=_experts_header(answers))

    async def stream(req: Sampling, rows: list[Row], *, chat: bool, ident: str,
                     created: int) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        done = object()
        for i, row in enumerate(rows):
            row.sink = lambda text, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, text))

            def finished(_: concurrent.futures.Future, i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, done))

            row.future.add_done_callback(finished)
        svc.batcher.submit(rows)  # a full queue is a 503 before the stream starts
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, text: str | None, finish: str | None = None,
                  extra: dict[str, Any] | None = None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish,
                                          "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            choice.update(extra or {})
            return _sse({"id": ident, "object": kind, "created": created, "model": req.model,
                         "choices": [choice]})

        async def events_out() -> AsyncIterator[str]:
            pending = set(range(len(rows)))
            answers: list[Answer | None] = [None] * len(rows)
            try:
                if chat:
                    for i in range(len(rows)):
                        yield chunk(i, "", role=True)
                while pending:
                    left = min(r.deadline for r in rows) - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    i, item = await asyncio.wait_for(events.get(), left)
                    if item is not done:
                        yield chunk(i, item)
                        continue
                    pending.discard(i)
                    exc = rows[i].future.exception()
                    if exc is not None:
                        err = exc if isinstance(exc, APIError) else (
                            timed_out(svc.options.timeout) if isinstance(exc, TimeoutError)
                            else internal())
                        svc.metrics.errors.labels("chat" if chat else "completions",
                                                  err.code or err.type).inc()
                        yield _sse(err.body())
                        return
                    a = rows[i].future.result()
                    answers[i] = a
                    svc.count("chat" if chat else "completions", [a])
                    yield chunk(i, None if chat else "", a.finish_reason,
                                {"expert": a.expert, "routing": a.weights})
                if include_usage:
                    yield _sse({"id": ident, "object": kind, "created": created,
                                "model": req.model, "choices": [],
                                "usage": _usage(rows, [a for a in answers if a])})
                yield "data: [DONE]\n\n"
            except TimeoutError:
                err = timed_out(svc.options.timeout)
                svc.metrics.errors.labels("chat" if chat else "completions", "timeout").inc()
                yield _sse(err.body())
            finally:
                svc.cancel([r for r in rows if not r.future.done()])

        return StreamingResponse(events_out(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        async def run(raw: bytes) -> Response:
            req = parse(raw, InputsRequest)
            routing = svc.catalog.resolve(req.model, req.routing)
            svc.require_causal(False)
            texts = req.inputs()
            counts = svc.check_texts(texts, "input", limit=True)
            rows = svc.rows("forward", "classify", texts, routing, prompt_tokens=counts)
            answers = await svc.answers(rows)
            svc.count("classify", answers)
            data = [dict(classification(a.output, svc.labels), index=i, expert=a.expert,
                         routing=a.weights) for i, a in enumerate(answers)]
            return JSONResponse({"object": "list", "model": req.model, "data": data},
                                headers=_experts_header(answers))
        return await handle(request, "classify", run)

    @app.post("/v1/route")
    async def route(request: Request) -> Response:
        async def run(raw: bytes) -> Response:
            req = parse(raw, InputsRequest)
            routing = svc.catalog.resolve(req.model, req.routing)
            texts = req.inputs()
            svc.check_texts(texts, "input", limit=False)
            rows = svc.rows("route", "route", texts, routing)
            answers = await svc.answers(rows)
            svc.count("route", answers)
            data = [{"index": i, "expert": a.expert, "routing": a.weights}
                    for i, a in enumerate(answers)]
            return JSONResponse({"object": "list", "model": req.model,
                                 "serving": svc.rt.serving, "data": data},
                                headers=_experts_header(answers))
        return await handle(request, "route", run)

    return app


def classification(output: torch.Tensor | None, labels: dict[int, str] | None
                   ) -> dict[str, Any]:
    """What /v1/classify says of one input's outputs (tokens x dim): ``label`` and ``score``
    when the model's outputs are a classification head's logits with labels (``id2label``);
    else ``label`` None and the mean over tokens (``pooled``: its first values, ``dim``)."""
    out: dict[str, Any] = {"label": None, "score": None}
    if output is None:
        return out
    vec = output.float()
    if labels and vec.shape[-1] == len(labels):
        logits = vec.reshape(-1, vec.shape[-1])[0] if vec.dim() > 1 else vec
        probs = torch.softmax(logits, -1)
        top = int(probs.argmax())
        out.update(label=labels.get(top, str(top)), score=round(float(probs[top]), 6),
                   logits=[round(float(v), 6) for v in logits])
        return out
    pooled = vec.mean(0) if vec.dim() > 1 else vec
    out.update(tokens=int(vec.shape[0]) if vec.dim() > 1 else 1, dim=int(pooled.shape[-1]),
               pooled=[round(float(v), 6) for v in pooled[:POOLED_SHOWN]])
    return out


def _timed(response: StreamingResponse, svc: Service, endpoint: str, model: str,
           start: float, counted: bool) -> StreamingResponse:
    """Count a streamed response when its last byte is sent."""
    inner = response.body_iterator

    async def body() -> AsyncIterator[Any]:  # (not named `counted`: that is the flag)
        try:
            async for piece in inner:
                yield piece
        finally:
            if counted:
                svc.metrics.in_flight.dec()
            svc.metrics.requests.labels(endpoint, model, str(response.status_code)).inc()
            svc.metrics.latency.labels(endpoint).observe(time.monotonic() - start)

    response.body_iterator = body()
    return response
