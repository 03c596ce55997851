"""Several threads calling one loaded runtime get exactly what the same calls get one by one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime_common import TEXTS, build, family, store_recipe
from test_store_common import FAMILIES

import polymerge
from polymerge.routing import LabelledTexts
from polymerge.runtime import RunOutput, Runtime, train_store_router

THREADS = 8
ROUNDS = 3


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("cc_llama"), "llama", scale=0.0, noise=0.05, seed=5)


def _router_data() -> LabelledTexts:
    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    return data


def _call(rt: Runtime, request: tuple[str, list[str], Any, dict[str, Any]]) -> RunOutput:
    kind, texts, routing, kwargs = request
    if kind == "generate":
        return rt.generate(texts, routing, max_new_tokens=3, **kwargs)
    return rt.forward(texts, routing, **kwargs)


def _same(got: RunOutput, want: RunOutput) -> None:
    assert torch.equal(got.weights, want.weights)
    assert got.completions == want.completions
    if want.outputs is not None:
        assert got.outputs is not None
        assert all(torch.equal(a, b) for a, b in zip(got.outputs, want.outputs, strict=True))
    if want.token_ids is not None:
        assert got.token_ids is not None
        assert all(torch.equal(a, b) for a, b in zip(got.token_ids, want.token_ids,
                                                     strict=True))


def _hammer(rt: Runtime, requests: list[tuple[str, list[str], Any, dict[str, Any]]]) -> None:
    assert len(requests) == THREADS
    expected = [_call(rt, r) for r in requests]  # one by one
    start = threading.Barrier(THREADS)

    def worker(k: int) -> list[RunOutput]:
        start.wait()
        return [_call(rt, requests[(k + i) % THREADS]) for i in range(ROUNDS)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    for k, outs in enumerate(results):
        for i, got in enumerate(outs):
            _same(got, expected[(k + i) % THREADS])


def _rotated(k: int) -> list[str]:
    return TEXTS[k % 4:] + TEXTS[:k % 4]


def test_switching_runtime_under_threads(llama, tmp_path):
    base, experts, _, _ = llama
    store = build(store_recipe("channel", base, experts, groups=2,
                               group_method="task_arithmetic", **{"lambda": 0.5}),
                  tmp_path / "store")
    train_store_router(store, _router_data(), max_epochs=40, patience=10, base=base)
    rt = polymerge.load_store(store, base=base)
    names = [f"expert{i}" for i in range(4)]
    requests = [("forward", _rotated(k), names[k % 4] if k < 4 else
                 [names[(k + j) % 4] for j in range(4)], {"batch_size": 2})
                for k in range(6)]
    requests += [("generate", _rotated(1), "expert2", {}), ("generate", TEXTS[:2], None, {})]
    _hammer(rt, requests)
    assert rt.switches > 4  # the threads took turns on the working model


def test_mixing_runtime_under_threads(llama, tmp_path_factory):
    base, experts, _, _ = llama
    store = build(store_recipe("twin", base, experts, rank=0.5),
                  tmp_path_factory.mktemp("cc_twin") / "store")
    train_store_router(store, _router_data(), max_epochs=40, patience=10)
    rt = polymerge.load_store(store)
    g = torch.Generator().manual_seed(1)
    dense = torch.softmax(torch.randn(4, 4, generator=g), -1)
    top2 = torch.zeros(4, 4).scatter_(1, torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]]), 0.5)
    requests = [
        ("forward", TEXTS, dense, {}),
        ("forward", TEXTS, top2, {}),
        ("forward", _rotated(1), ["expert1", "expert3", "expert0", "expert2"], {}),
        ("forward", TEXTS, None, {"top_k": 2}),
        ("forward", TEXTS, [0.25, 0.25, 0.25, 0.25], {"fold": True}),
        ("forward", _rotated(2), top2, {"path": "sets", "batch_size": 3}),
        ("generate", TEXTS[:3], dense[:3], {}),
        ("generate", _rotated(3)[:2], {"expert2": 0.7, "expert0": 0.3}, {}),
    ]
    _hammer(rt, requests)


def test_a_plain_checkpoint_under_threads(llama):
    from polymerge.runtime import load_runtime

    _, experts, _, _ = llama
    rt = load_runtime(Path(experts[0]))
    requests = [("generate" if k % 2 else "forward", _rotated(k), None, {}) for k in range(8)]
    _hammer(rt, requests)

