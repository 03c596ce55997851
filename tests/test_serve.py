"""``polymerge serve`` as a real process on a free loopback port, driven with httpx and the
official openai client: answers equal the in-process runtime's, mixed batches equal their rows
one by one, bad requests get their status and leave the server serving, many clients lose and
mix nothing, limits (queue, timeout, key) hold, and SIGTERM drains and exits 0.

Four servers run for the module, started together: a twin store (mixing) and a channel store
(switching) of tiny Llama experts, a channel store of tiny BERT encoders (classification), and
a plain Llama checkpoint with a long context behind an API key, one row per batch, a queue of
one and a short timeout (the limits).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import tree_hashes
from test_runtime_common import build, store_recipe
from test_runtime_concurrency import _router_data
from test_serve_common import KEY, ServerProcess
from test_store_common import FAMILIES, make_family, make_tokenizer

import polymerge
from polymerge.runtime import train_store_router

PROMPTS = ["apple banana cherry", "car bus train", "red blue", "one two three four",
           "pear plum", "boat ship", "gold teal pink", "six seven"]
SLOW_TIMEOUT = 4.0


def _slow_checkpoint(folder: Path) -> Path:
    """A tiny Llama with a long context and no end-of-sequence token: it generates as many
    tokens as asked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32768, pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    torch.manual_seed(3)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("serve")
    base, experts = make_family(root / "llama", "llama", scale=0.0, noise=0.05, seed=5)
    twin = build(store_recipe("twin", base, experts, rank=0.5), root / "twin")
    chan = build(store_recipe("channel", base, experts, groups=2,
                              group_method="task_arithmetic", **{"lambda": 0.5}), root / "chan")
    bbase, bexperts = make_family(root / "bert", "bert", scale=0.0, noise=0.05, seed=6)
    cls = build(store_recipe("channel", bbase, bexperts, groups=2, scope=".",
                             group_method="task_arithmetic", **{"lambda": 0.5}), root / "cls")
    bases = {"twin": None, "chan": base, "cls": bbase}
    for store, b in ((twin, None), (chan, base), (cls, bbase)):
        train_store_router(store, _router_data(), base=b, max_epochs=40, patience=10)
    slow = _slow_checkpoint(root / "slow")
    targets = {"twin": twin, "chan": chan, "cls": cls, "slow": slow}
    cwds = {k: root / f"cwd-{k}" for k in targets}
    for d in cwds.values():
        d.mkdir()
    before = {k: tree_hashes(p) for k, p in targets.items()}
    servers = {
        "twin": ServerProcess(twin, "--max-wait-ms", "100", "--max-input-tokens", "24",
                              cwd=cwds["twin"]),
        "chan": ServerProcess(chan, "--max-wait-ms", "100", "--base", str(base),
                              cwd=cwds["chan"]),
        "cls": ServerProcess(cls, "--max-wait-ms", "50", "--base", str(bbase), cwd=cwds["cls"]),
        "slow": ServerProcess(slow, "--max-batch", "1", "--max-queue", "1", "--timeout",
                              str(SLOW_TIMEOUT), "--max-tokens", "32000", cwd=cwds["slow"],
                              key=True),
    }
    try:
        for s in servers.values():
            s.wait()
        yield {"servers": servers, "targets": targets, "cwds": cwds, "hashes": before,
               "rt": {k: polymerge.load_store(targets[k], base=bases[k])
                      for k in ("twin", "chan", "cls")}}
    finally:
        for s in servers.values():  # all at once: each drains in parallel
            if s.proc.poll() is None:
                s.proc.send_signal(15)
        for s in servers.values():
            s.stop()


def _generate(rt: Any, text: str, routing: Any = None, n: int = 6, **kw: Any) -> Any:
    return rt.generate([text], routing, max_new_tokens=n, **kw)


# ----------------------------------------------------------------------------- basics


def test_models_health_and_metrics(world):
    twin = world["servers"]["twin"]
    ids = [m.id for m in twin.openai().models.list()]
    assert ids == ["twin", "expert0", "expert1", "expert2", "expert3"]
    assert twin.get("/v1/models/twin/expert2").status_code == 404  # STORE/EXPERT: model only
    assert twin.get("/v1/models/expert2").json()["polymerge"]["kind"] == "expert"
    health = twin.get("/health").json()
    assert health["status"] == "ok" and health["serving"] == "mix"
    assert world["servers"]["chan"].get("/health").json()["serving"] == "switch"
    text = twin.get("/metrics").text
    for name in ("polymerge_requests_total", "polymerge_request_seconds_bucket",
                 "# TYPE polymerge_batch_rows histogram", "polymerge_queue_rows",
                 "polymerge_generated_tokens_total", "polymerge_tokens_per_second",
                 "process_resident_memory_bytes"):
        assert name in text, name


def test_completions_equal_the_runtime(world):
    twin, rt = world["servers"]["twin"], world["rt"]["twin"]
    client = twin.openai()
    cases = [("twin", None, {}), ("expert2", "expert2", {}),
             ("twin", {"expert1": 0.7, "expert3": 0.3}, {"weights": {"expert1": 0.7,
                                                                      "expert3": 0.3}}),
             ("twin/expert0", "expert0", {}),
             ("twin", "top", {"top_k": 1, "temperature": 0.5})]
    for k, (model, routing, body) in enumerate(cases):
        text = PROMPTS[k]
        got = client.completions.create(model=model, prompt=text, max_tokens=6, temperature=0,
                                        extra_body={"routing": body} if body else None)
        if routing == "top":
            want = _generate(rt, text, None, top_k=1, temperature=0.5)
        else:
            want = _generate(rt, text, routing)
        choice = got.choices[0]
        assert choice.text == want.completions[0], (model, body)
        assert choice.finish_reason == "length"
        extra = choice.model_extra or {}
        assert extra["expert"] == want.chosen[0]
        for name, w in want.routing(0).items():
            assert abs(extra["routing"][name] - w) < 1e-4
        assert got.usage.completion_tokens == 6


def test_chat_and_streaming(world):
    twin, rt = world["servers"]["twin"], world["rt"]["twin"]
    client = twin.openai()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "red blue green"}]
    got = client.chat.completions.create(model="twin", messages=messages, max_tokens=5,
                                         temperature=0)
    # no chat template in the tiny tokenizer: "role: content" lines; routed on the user text
    prompt = "system: be brief\nuser: red blue green\nassistant:"
    want = _generate(rt, prompt, rt.route(["red blue green"]), 5)
    assert got.choices[0].message.content == want.completions[0]
    assert (got.choices[0].model_extra or {})["expert"] == "expert2"
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="twin", messages=messages, max_tokens=5,
                                                temperature=0, stream=True):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == got.choices[0].message.content and finish == "length"
    # completions stream with usage, several prompts at once
    stream = client.completions.create(model="expert1", prompt=PROMPTS[:2], max_tokens=4,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    texts, usage = ["", ""], None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [_generate(rt, p, "expert1", 4).completions[0] for p in PROMPTS[:2]]
    whole = client.completions.create(model="expert1", prompt=PROMPTS[:2], max_tokens=4,
                                      temperature=0)
    assert [c.text for c in whole.choices] == texts and usage == whole.usage


def _concurrently(fn: Any, items: list[Any], threads: int) -> list[Any]:
    start = threading.Barrier(threads)

    def call(item: Any) -> Any:
        with _suppress_barrier():
            start.wait(timeout=10)
        return fn(item)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, items))


class _suppress_barrier:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is threading.BrokenBarrierError


@pytest.mark.parametrize("kind", ["twin", "chan"])
def test_a_mixed_batch_equals_its_rows_one_by_one(world, kind):
    server, rt = world["servers"][kind], world["rt"][kind]
    names = ["expert0", "expert1", "expert2", "expert3"]
    batches_before = server.metric("polymerge_batch_rows_count", kind="generate")
    rows_before = server.metric("polymerge_batch_rows_sum", kind="generate")
    requests = [(PROMPTS[i], names[i % 4]) for i in range(8)]

    def ask(item: tuple[str, str]) -> str:
        r = server.post("/v1/completions", {"model": item[1], "prompt": item[0],
                                            "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.headers["x-polymerge-experts"] == item[1]
        return r.json()["choices"][0]["text"]

    got = _concurrently(ask, requests, 8)
    want = [_generate(rt, text, name, 5).completions[0] for text, name in requests]
    assert got == want
    batches = server.metric("polymerge_batch_rows_count", kind="generate") - batches_before
    rows = server.metric("polymerge_batch_rows_sum", kind="generate") - rows_before
    assert rows == 8 and batches < 8  # rows of different experts shared a batch
    if kind == "chan":  # the switching store ran them gathered, without switching
        assert server.metric("polymerge_model_passes_total", path="gather") >= 1


def test_many_clients_lose_and_mix_nothing(world):
    twin, rt = world["servers"]["twin"], world["rt"]["twin"]
    names = ["twin", "expert0", "expert1", "expert2", "expert3"]
    requests = []
    for i in range(48):
        words = FAMILIES[i % 4]
        text = " ".join(words[(i * 7 + j) % 10] for j in range(1 + i % 4))
        requests.append((text, names[i % 5], 2 + i % 4))

    def ask(item: tuple[str, str, int]) -> tuple[str, str]:
        r = twin.post("/v1/completions", {"model": item[1], "prompt": item[0],
                                          "max_tokens": item[2], "temperature": 0})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["text"], c["expert"]

    got = _concurrently(ask, requests, 24)
    for (text, model, n), (answer, expert) in zip(requests, got, strict=True):
        want = _generate(rt, text, None if model == "twin" else model, n)
        assert (answer, expert) == (want.completions[0], want.chosen[0]), (text, model)


def test_sampling_seed_and_stop(world):
    twin = world["servers"]["twin"]
    body = {"model": "expert1", "prompt": "apple pear", "max_tokens": 8, "temperature": 1.5,
            "top_p": 0.9, "seed": 7}
    first = twin.post("/v1/completions", body).json()["choices"][0]["text"]
    others = _concurrently(lambda b: twin.post("/v1/completions", b).json()
                           ["choices"][0]["text"],
                           [body, dict(body, prompt="car bus", seed=8), body], 3)
    assert others[0] == others[2] == first  # the same seed: the same text, batched or not
    greedy = twin.post("/v1/completions", {"model": "expert0", "prompt": "one two",
                                           "max_tokens": 6, "temperature": 0}).json()
    words = greedy["choices"][0]["text"].split()
    stop = words[2]
    cut = twin.post("/v1/completions", {"model": "expert0", "prompt": "one two",
                                        "max_tokens": 6, "temperature": 0,
                                        "stop": [stop, "zzz"]}).json()["choices"][0]
    full = greedy["choices"][0]["text"]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.find(stop)]


def test_classify_and_route(world):
    cls, rt = world["servers"]["cls"], world["rt"]["cls"]
    texts = ["apple banana", "car bus train", "red green"]
    r = cls.post("/v1/classify", {"model": "cls", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    want = rt.forward(texts)  # routed by the store's router
    for i, row in enumerate(data):
        assert row["expert"] == want.chosen[i]
        assert row["label"] is None and row["dim"] == 32
        torch.testing.assert_close(torch.tensor(row["pooled"]), want.outputs[i].mean(0),
                                   atol=2e-5, rtol=0)
    forced = cls.post("/v1/classify", {"model": "expert3", "input": "pear"}).json()["data"][0]
    assert forced["expert"] == "expert3" and forced["routing"]["expert3"] == 1.0
    route = cls.post("/v1/route", {"model": "cls", "input": texts}).json()
    weights = rt.route(texts)
    for i, row in enumerate(route["data"]):
        assert row["expert"] == rt.experts[int(weights[i].argmax())]
        for name, w in row["routing"].items():
            assert abs(w - float(weights[i, rt.experts.index(name)])) < 1e-5
    no = cls.post("/v1/completions", {"model": "cls", "prompt": "x"})
    assert no.status_code == 400 and no.json()["error"]["code"] == "not_a_generator"
    twin = world["servers"]["twin"]
    assert twin.post("/v1/classify", {"model": "twin", "input": "x"}).status_code == 400
    top = twin.post("/v1/route", {"model": "twin", "input": ["red blue"],
                                  "routing": {"top_k": 2}}).json()["data"][0]["routing"]
    assert sum(1 for w in top.values() if w > 0) == 2


# ----------------------------------------------------------------------------- bad requests

BAD = [
    # (body or raw bytes, path, status, code)
    (b"{not json", "/v1/completions", 400, "invalid_json"),
    (b"[1, 2]", "/v1/completions", 400, "invalid_json"),
    (b'{"model": "twin", "prompt": "a", "max_tokens": NaN}', "/v1/completions", 400,
     "invalid_json"),
    ({"model": "twin", "prompt": "a", "frobnicate": 1}, "/v1/completions", 400,
     "unknown_parameter"),
    ({"prompt": "a"}, "/v1/completions", 400, "missing_parameter"),
    ({"model": "nope", "prompt": "a"}, "/v1/completions", 404, "model_not_found"),
    ({"model": "../../etc/passwd", "prompt": "a"}, "/v1/completions", 404, "model_not_found"),
    ({"model": "twin", "prompt": ""}, "/v1/completions", 400, "empty_input"),
    ({"model": "twin", "prompt": []}, "/v1/completions", 400, "empty_input"),
    ({"model": "twin", "messages": []}, "/v1/chat/completions", 400, "invalid_value"),
    ({"model": "twin", "messages": [{"role": "user", "content": " "}]},
     "/v1/chat/completions", 400, "empty_input"),
    ({"model": "twin", "prompt": " ".join(["apple"] * 40)}, "/v1/completions", 400,
     "context_length_exceeded"),
    ({"model": "twin", "prompt": "a", "max_tokens": 100000}, "/v1/completions", 400,
     "max_tokens_exceeded"),
    ({"model": "twin", "prompt": "apple", "max_tokens": 64}, "/v1/completions", 400,
     "context_length_exceeded"),
    ({"model": "twin", "prompt": "a", "max_tokens": "5"}, "/v1/completions", 400,
     "invalid_value"),
    ({"model": "twin", "prompt": "a", "n": 2}, "/v1/completions", 400, "invalid_value"),
    ({"model": "twin", "prompt": "a", "temperature": -1}, "/v1/completions", 400,
     "invalid_value"),
    ({"model": "twin", "prompt": "a", "logprobs": 3}, "/v1/completions", 400, "invalid_value"),
    ({"model": "twin", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "/v1/completions",
     400, "invalid_value"),
    ({"model": "twin", "prompt": "a", "routing": {"weights": {"nope": 1.0}}},
     "/v1/completions", 400, "unknown_expert"),
    ({"model": "twin", "prompt": "a", "routing": {"weights": {"expert0": -1.0}}},
     "/v1/completions", 400, "invalid_value"),
    ({"model": "twin", "prompt": "a", "routing": {"weights": [0.5, 0.5]}}, "/v1/completions",
     400, None),
    ({"model": "twin", "prompt": "a", "routing": {"weights": [0, 0, 0, 0]}},
     "/v1/completions", 400, "invalid_value"),
    ({"model": "twin", "prompt": "a", "routing": {"top_k": 9}}, "/v1/completions", 400, None),
    ({"model": "twin", "prompt": "a", "routing": {"temperature": 0}}, "/v1/completions", 400,
     "invalid_value"),
    ({"model": "expert1", "prompt": "a", "routing": {"top_k": 1}}, "/v1/completions", 400,
     None),
    ({"model": "twin", "prompt": "a", "routing": {"expert": "/etc/passwd"}},
     "/v1/completions", 400, "unknown_expert"),
    ({"model": "twin", "input": ""}, "/v1/route", 400, "empty_input"),
    ({"model": "twin", "input": ["a"] * 100}, "/v1/route", 400, None),
]


def test_bad_requests_leave_the_server_serving(world):
    twin = world["servers"]["twin"]
    for body, path, status, code in BAD:
        if isinstance(body, bytes):
            r = twin.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = twin.post(path, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code is not None:
            assert err["code"] == code, (body, err)
    assert twin.post("/v1/completions", content=b"x" * (2 << 20)).status_code == 413
    assert twin.get("/v1/completions").status_code == 405
    assert twin.get("/nowhere").json()["error"]["code"] == "not_found"
    from openai import BadRequestError, NotFoundError

    client = twin.openai()
    with pytest.raises(NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(BadRequestError):
        client.completions.create(model="twin", prompt="a", max_tokens=2, n=3)
    ok = twin.post("/v1/completions", {"model": "twin", "prompt": "apple", "max_tokens": 2})
    assert ok.status_code == 200 and twin.get("/health").json()["status"] == "ok"
    assert twin.metric("polymerge_request_errors_total") >= len(BAD)


# ----------------------------------------------------------------------------- limits


def test_api_key(world):
    slow = world["servers"]["slow"]
    body = {"model": "slow", "prompt": "apple", "max_tokens": 3}
    assert slow.post("/v1/completions", body, headers={"Authorization": ""}).status_code == 401
    bad = httpx.post(slow.url + "/v1/completions", json=body,
                     headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(slow.url + "/metrics").status_code == 401
    assert httpx.get(slow.url + "/health").status_code == 200  # probes need no key
    got = slow.openai().completions.create(model="slow", prompt="apple", max_tokens=3,
                                           temperature=0)
    assert got.usage.completion_tokens == 3
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=slow.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert KEY not in bad.text


def _wait_for(cond: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_and_timeout(world):
    slow = world["servers"]["slow"]
    results: dict[str, httpx.Response] = {}

    def ask(name: str, tokens: int) -> None:
        results[name] = slow.post("/v1/completions", {"model": "slow", "prompt": "apple",
                                                      "max_tokens": tokens})

    long = threading.Thread(target=ask, args=("long", 32000))
    long.start()
    _wait_for(lambda: slow.metric("polymerge_requests_in_flight") >= 1
              and slow.metric("polymerge_queue_rows") == 0)
    time.sleep(0.3)  # taken by the model thread (it waits 10 ms for company)
    queued = threading.Thread(target=ask, args=("queued", 5))
    queued.start()
    _wait_for(lambda: slow.metric("polymerge_queue_rows") == 1)
    full = slow.post("/v1/completions", {"model": "slow", "prompt": "apple", "max_tokens": 2})
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"
    long.join(30)
    queued.join(30)
    assert results["long"].status_code == 504  # 32000 tokens take far longer than the timeout
    assert results["long"].json()["error"]["code"] == "timeout"
    assert results["queued"].status_code in (200, 504)
    ok = slow.post("/v1/completions", {"model": "slow", "prompt": "apple", "max_tokens": 2})
    assert ok.status_code == 200


def test_nothing_a_client_sends_touches_a_file(world):
    for server in world["servers"].values():
        if server.proc.poll() is None:
            server.post("/v1/completions", {"model": "/etc/passwd", "prompt": "a"})
            server.post("/v1/route", {"model": str(server.target), "input": "a"})
    for key, cwd in world["cwds"].items():
        assert list(cwd.iterdir()) == [], key
    for key, path in world["targets"].items():
        assert tree_hashes(path) == world["hashes"][key], key


def test_kept_alive_connections_answer_without_delayed_acks(world):
    """Requests on one kept-alive connection come back at once: with Nagle's algorithm on the
    server's sockets, each response's second write waited for the client's delayed ACK (40 ms
    on Linux), whatever the request."""
    cls = world["servers"]["cls"]
    with httpx.Client(timeout=30) as client:
        client.get(cls.url + "/health")
        times = []
        for _ in range(15):
            start = time.perf_counter()
            assert client.get(cls.url + "/health").status_code == 200
            times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.03, times


def test_sigterm_drains_in_flight_requests_and_exits_0(world):
    slow = world["servers"]["slow"]
    first = threading.Event()
    got: dict[str, Any] = {}

    def stream() -> None:
        text, finish = "", None
        with httpx.stream("POST", slow.url + "/v1/completions", headers=slow.headers,
                          json={"model": "slow", "prompt": "apple", "max_tokens": 100,
                                "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    c = json.loads(line[6:])["choices"][0]
                    text += c["text"]
                    finish = c["finish_reason"] or finish
                    first.set()
                elif line == "data: [DONE]":
                    got["done"] = True
        got.update(text=text, finish=finish)

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(20)
    slow.proc.send_signal(15)
    t.join(30)
    assert got.get("done") and got["finish"] == "length" and len(got["text"].split()) >= 50
    assert slow.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(slow.url + "/health", timeout=2)
