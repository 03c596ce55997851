"""Mixing layers against per-input materialized weights (plain torch), every path, folding,
the cost rule, and per-call weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from polymerge.errors import PolymergeError
from polymerge.runtime.mixing_cost import choose_path, path_cost
from polymerge.runtime.mixing_layers import LowRank, TwinEmbedding, TwinLinear, TwinNorm
from polymerge.runtime.mixture import Mixture, current_mixture, mixing


def _materialized_linear(lin: torch.nn.Linear, u, v, bd, w, x):  # type: ignore[no-untyped-def]
    """Per input: build W_b = W + sum_t w_bt U_t V_t (and the bias) and run a plain linear."""
    rows = []
    for b in range(x.shape[0]):
        weight = lin.weight + sum(w[b, t] * u[t] @ v[t] for t in range(u.shape[0]))
        bias = lin.bias + sum(w[b, t] * bd[t] for t in range(u.shape[0]))
        rows.append(torch.nn.functional.linear(x[b], weight, bias))
    return torch.stack(rows)


def _weights(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(b, t, generator=g), -1)
    w[:, 1] = 0  # an expert no row uses (skipped)
    w[0, 2] = 0  # a top-k zero in one row
    return w / w.sum(-1, keepdim=True)


def test_twin_linear_batched_equals_per_input_materialized():
    g = torch.Generator().manual_seed(0)
    t, out_f, in_f, r, b = 4, 24, 20, 3, 5
    lin = torch.nn.Linear(in_f, out_f)
    u, v = torch.randn(t, out_f, r, generator=g), torch.randn(t, r, in_f, generator=g)
    bd = torch.randn(t, out_f, generator=g)
    layer = TwinLinear(lin, factors=(u, v), bias_delta=bd)
    x = torch.randn(b, 7, in_f, generator=g)
    w = _weights(b, t, 1)
    with torch.no_grad():
        with mixing(w, fold=False) as m:
            got = layer(x)
            assert m.state(layer)["u"].shape[1] == 3 * r  # expert 1 is skipped
        assert_close(got, _materialized_linear(lin, u, v, bd, w, x), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x), lin(x))  # no weights: the shared layer
        with mixing(None):
            assert torch.equal(layer(x), lin(x))
        with mixing(torch.zeros(b, t)):
            assert torch.equal(layer(x), lin(x))
        # dense per-expert weights (an out-of-scope weight kept per expert) and 2-D inputs
        dw = torch.randn(t, out_f, in_f, generator=g) * 0.1
        dense = TwinLinear(lin, weight_delta=dw, bias_delta=bd)
        x2 = torch.randn(b, in_f, generator=g)
        want = torch.stack([torch.nn.functional.linear(
            x2[i], lin.weight + torch.tensordot(w[i], dw, 1), lin.bias + w[i] @ bd)
            for i in range(b)])
        with mixing(w, fold=False):
            assert_close(dense(x2), want, rtol=1e-5, atol=1e-5)
        one = torch.nn.functional.linear(x2, lin.weight + torch.tensordot(w[0], dw, 1),
                                         lin.bias + w[0] @ bd)
        with mixing(w[0], fold=True) as m:  # folded dense deltas
            assert_close(dense(x2), one, rtol=1e-5, atol=1e-5)
            assert m.paths[dense] == "folded"
        with mixing(torch.ones(b, 3)), pytest.raises(PolymergeError, match="for 3 experts"):
            layer(x)


def test_conv1d_embedding_and_norms_mix_per_row():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(5)
    t, b, h = 3, 4, 12
    w = _weights(b, t, 2)[:, :t]
    w = w / w.sum(-1, keepdim=True)
    x = torch.randn(b, 6, h, generator=g)
    with torch.no_grad():
        conv = Conv1D(10, h)  # weight (in=h, out=10)
        conv.weight.normal_(generator=g)
        u, v = torch.randn(t, h, 2, generator=g), torch.randn(t, 2, 10, generator=g)
        layer = TwinLinear(conv, factors=(u, v))
        want = torch.stack([x[i] @ (conv.weight + sum(w[i, k] * u[k] @ v[k] for k in range(t)))
                            + conv.bias for i in range(b)])
        with mixing(w, fold=False):
            assert_close(layer(x), want, rtol=1e-5, atol=1e-5)

        emb = torch.nn.Embedding(30, h)
        eu, ev = torch.randn(t, 30, 2, generator=g), torch.randn(t, 2, h, generator=g)
        te = TwinEmbedding(emb, factors=(eu, ev))
        ids = torch.randint(0, 30, (b, 5), generator=g)
        mats = [emb.weight + sum(w[i, k] * eu[k] @ ev[k] for k in range(t)) for i in range(b)]
        want = torch.stack([mats[i][ids[i]] for i in range(b)])
        pos = torch.arange(5).unsqueeze(0)
        with mixing(w, fold=False):
            assert_close(te(ids), want, rtol=1e-5, atol=1e-5)
            # ids shared by every row (BERT's position ids): one output row per weight row
            assert_close(te(pos), torch.stack([mats[i][pos[0]] for i in range(b)]), rtol=1e-5,
                         atol=1e-5)

        for norm in (torch.nn.LayerNorm(h), LlamaRMSNorm(h, eps=1e-6)):
            norm.weight.normal_(generator=g)
            dw = torch.randn(t, h, generator=g) * 0.1
            db = torch.randn(t, h, generator=g) * 0.1 if hasattr(norm, "bias") else None
            tn = TwinNorm(norm, weight_delta=dw, bias_delta=db)
            rows = []
            for i in range(b):
                params = {"weight": norm.weight + w[i] @ dw}
                if db is not None:
                    params["bias"] = norm.bias + w[i] @ db
                rows.append(torch.func.functional_call(norm, params, (x[i:i + 1],))[0])
            with mixing(w, fold=False):
                assert_close(tn(x), torch.stack(rows), rtol=1e-5, atol=1e-5)
            assert "weight" in tn.state_dict()


def test_fold_equals_batched_when_rows_share_weights():
    g = torch.Generator().manual_seed(7)
    t, r = 4, 3
    lin = torch.nn.Linear(16, 8)
    layer = TwinLinear(lin, factors=LowRank.from_stacked(torch.randn(t, 8, r, generator=g),
                                                         torch.randn(t, r, 16, generator=g)),
                       bias_delta=torch.randn(t, 8, generator=g))
    x = torch.randn(3, 5, 16, generator=g)
    one = torch.softmax(torch.randn(t, generator=g), -1)
    with torch.no_grad():
        with mixing(one.expand(3, t), fold=False) as m:
            batched = layer(x)
            assert m.state(layer)["folded"] is None
        with mixing(one, fold=True) as m:
            folded = layer(x)
            assert m.state(layer)["folded"] is not None and m.paths[layer] == "folded"
        assert_close(folded, batched, rtol=1e-5, atol=1e-5)
        # auto: folds once the tokens seen make folding cheaper (16 * 8 / 24 = 5.3 tokens),
        # counted within one call
        with mixing(one.expand(3, t)) as m:
            layer(x[:1, :2])
            assert m.state(layer)["folded"] is None
            assert_close(layer(x), batched, rtol=1e-5, atol=1e-5)
            assert m.state(layer)["folded"] is not None
        with mixing(one.expand(3, t)) as m:  # a new call starts counting again
            layer(x[:1, :2])
            assert m.state(layer)["folded"] is None
    with pytest.raises(PolymergeError, match="fold=True needs one weight vector"):
        Mixture(torch.eye(t)[:3], fold=True)
    with pytest.raises(PolymergeError, match=r"shape \(experts,\) or \(batch, experts\)"):
        Mixture(torch.ones(3, 5, 2))
    with pytest.raises(PolymergeError, match="finite"):
        Mixture([float("inf"), 0.0])


def _top_k(b: int, t: int, k: int, seed: int) -> torch.Tensor:
    """Random per-row softmax weights, top-k kept and renormalized, routes mixed: every expert
    is some row's top expert and none is used by every row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, generator=g)
    logits[torch.arange(b), torch.arange(b) % t] += 4.0  # row i's top expert: i mod t
    w = torch.softmax(logits, -1)
    top = w.topk(k, -1)
    w = torch.zeros_like(w).scatter_(1, top.indices, top.values)
    w = w / w.sum(-1, keepdim=True)
    assert ((w != 0).sum(-1) == k).all() and (w != 0).any(0).all() and not (w != 0).all(0).any()
    return w


PATHS = ("dense", "experts", "sets", None)


def _paths(layer: Any, inputs: torch.Tensor, w: torch.Tensor
           ) -> tuple[dict[str | None, torch.Tensor], dict[str | None, str]]:
    """The layer's output on each path and by the rule (None), and the path each took."""
    out, taken = {}, {}
    for path in PATHS:
        with mixing(w, fold=False, path=path) as m:
            out[path] = layer(inputs)
            taken[path] = m.paths[layer]
    return out, taken


@pytest.mark.parametrize("k", [1, 2])
def test_twin_linear_grouped_paths_equal_dense_and_materialized(k):
    g = torch.Generator().manual_seed(11)
    t, out_f, in_f, r, b = 4, 24, 20, 6, 7
    lin = torch.nn.Linear(in_f, out_f)
    u, v = torch.randn(t, out_f, r, generator=g), torch.randn(t, r, in_f, generator=g)
    bd = torch.randn(t, out_f, generator=g)
    layer = TwinLinear(lin, factors=(u, v), bias_delta=bd)
    x = torch.randn(b, 5, in_f, generator=g)
    x[3:, 3:] = 0  # padding (the layer sees no mask: padded positions are rows like others)
    w = _top_k(b, t, k, k)
    with torch.no_grad():
        want = _materialized_linear(lin, u, v, bd, w, x)
        outs, taken = _paths(layer, x, w)
        for path, y in outs.items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
            assert path is None or taken[path] == path
        cpu = torch.device("cpu")
        m = Mixture(w, fold=False)
        by_expert = m.groups(b, "experts", cpu, torch.float32)
        assert len(by_expert) == t  # one group per expert (every one is used)
        sets = m.groups(b, "sets", cpu, torch.float32)
        assert sum(len(rows) for _, _, rows, _ in sets) == b  # each row in one group
        assert all(len(js) == k and wg.shape == (len(rows), k) and bool((wg > 0).all())
                   for js, _, rows, wg in sets)
        # an expert left out on every row and one that every row uses (no gather there)
        w2 = w.clone()
        w2[:, 1] = 0
        w2[:, 0] = 0.5
        w2 = w2 / w2.sum(-1, keepdim=True)
        want = _materialized_linear(lin, u, v, bd, w2, x)
        for path, y in _paths(layer, x, w2)[0].items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
        # dense per-expert weights and 2-D inputs (one token per row)
        dw = torch.randn(t, out_f, in_f, generator=g) * 0.1
        dense = TwinLinear(lin, factors=(u, v), weight_delta=dw, bias_delta=bd)
        x2 = torch.randn(b, in_f, generator=g)
        want = torch.stack([torch.nn.functional.linear(
            x2[i], lin.weight + sum(w[i, e] * (u[e] @ v[e] + dw[e]) for e in range(t)),
            lin.bias + w[i] @ bd) for i in range(b)])
        for path, y in _paths(dense, x2, w)[0].items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
    with pytest.raises(PolymergeError, match="unknown path 'nope'"):
        Mixture(w, path="nope")


@pytest.mark.parametrize("k", [1, 2])
def test_conv1d_and_embedding_grouped_paths(k):
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(12)
    t, b, h = 4, 6, 12
    w = _top_k(b, t, k, 10 + k)
    x = torch.randn(b, 5, h, generator=g)
    with torch.no_grad():
        conv = Conv1D(10, h)
        conv.weight.normal_(generator=g)
        u, v = torch.randn(t, h, 4, generator=g), torch.randn(t, 4, 10, generator=g)
        layer = TwinLinear(conv, factors=(u, v))
        want = torch.stack([x[i] @ (conv.weight + sum(w[i, e] * u[e] @ v[e] for e in range(t)))
                            + conv.bias for i in range(b)])
        for path, y in _paths(layer, x, w)[0].items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"conv1d path={path}")

        emb = torch.nn.Embedding(30, h, padding_idx=0)
        eu, ev = torch.randn(t, 30, 3, generator=g), torch.randn(t, 3, h, generator=g)
        dw = torch.randn(t, 30, h, generator=g) * 0.1
        te = TwinEmbedding(emb, factors=(eu, ev), weight_delta=dw)
        ids = torch.randint(1, 30, (b, 5), generator=g)
        ids[2:, 3:] = 0  # padding ids
        mats = [emb.weight + sum(w[i, e] * (eu[e] @ ev[e] + dw[e]) for e in range(t))
                for i in range(b)]
        want = torch.stack([mats[i][ids[i]] for i in range(b)])
        outs, taken = _paths(te, ids, w)
        for path, y in outs.items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"embedding path={path}")
        assert taken["sets"] == "experts"  # no sets path for embeddings: per expert
        # ids shared by every row: each active expert's rows once, mixed per row
        pos = torch.arange(5).unsqueeze(0)
        with mixing(w, fold=False) as m:
            assert_close(te(pos), torch.stack([mats[i][pos[0]] for i in range(b)]),
                         rtol=1e-5, atol=1e-5)
            assert m.paths[te] == "shared ids"


def test_choose_path_rule_and_routes():
    device = torch.device("cpu")
    minilm = {"rank": 38, "factor_rank": 38, "dense_experts": 4}
    for width in (384 + 384, 384 + 1536):
        # top-1 of 4 experts, mixed routes, 64 tokens per row: one group per expert
        for b in (8, 32, 128):
            routes = Mixture(_top_k(b, 4, 1, b)).routes(b, device)
            assert routes.pairs == b and len(routes.by_expert) == 4
            assert choose_path(routes, width=width, tokens_per_row=64, **minilm) == "experts"
            # lower ranks too; at rank 2 the narrow GEMMs and the gathers cost more than the
            # 3 of 4 experts saved
            assert choose_path(routes, rank=8, width=width, tokens_per_row=64,
                               dense_experts=4) == "experts"
            assert choose_path(routes, rank=2, width=width, tokens_per_row=64,
                               dense_experts=4) == "dense"
            # decoding a small batch (one token per row): the calls cost more than they save
            decode = choose_path(routes, width=width, tokens_per_row=1, **minilm)
            assert decode == {8: "dense", 32: decode, 128: "experts"}[b]
        # top-2 of 4: one group per pair of experts; dense softmax weights: dense
        routes = Mixture(_top_k(32, 4, 2, 5)).routes(32, device)
        assert routes.pairs == 64 and all(len(g.js) == 2 for g in routes.by_set)
        assert choose_path(routes, width=width, tokens_per_row=64, **minilm) == "sets"
        dense = torch.softmax(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), -1)
        routes = Mixture(dense).routes(32, device)
        assert len(routes.by_set) == 1 and routes.by_set[0].size == 32
        assert choose_path(routes, width=width, tokens_per_row=64, **minilm) == "dense"
    # the estimate itself: a group of every row gathers nothing; copied columns cost
    assert path_cost([(4, 2, 0)], 4, 10, 5.0, 100) == 4 * 10 * (10 + 32) * 100 + 1e6
    assert path_cost([(3, 2, 10)], 4, 10, 5.0, 100) == (3 * 10 * (10 + 32 + 8) + 80) * 100 + 1e6
    # the rows each active expert needs and the sets, for the batch and a repeated (beam) one
    w = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [0.2, 0.0, 0.8, 0.0],
                      [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m = Mixture(w)
    assert m.active == [0, 1, 2]
    routes = m.routes(5, device)
    assert routes.rows == 5 and routes.pairs == 6
    assert [(g.js, g.rows.tolist()) for g in routes.by_expert] == [
        ((0,), [0, 2]), ((1,), [1]), ((2,), [0, 2, 3])]
    assert [(g.experts, g.rows.tolist(), g.contiguous) for g in routes.by_set] == [
        ((0, 2), [0, 2], False), ((1,), [1], True), ((2,), [3], True)]
    beams = m.routes(10, device)
    assert beams.pairs == 12 and beams.by_expert[1].rows.tolist() == [2, 3]


def test_weights_are_per_context():
    """Nested blocks restore the outer weights; another thread sees its own (none here)."""
    import threading

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(6, 5)
    layer = TwinLinear(lin, factors=(torch.randn(2, 5, 2, generator=g),
                                     torch.randn(2, 2, 6, generator=g)))
    x = torch.randn(1, 3, 6, generator=g)
    seen: list[Any] = []
    with torch.no_grad(), mixing([1.0, 0.0]) as outer:
        first = layer(x)
        with mixing(None):
            assert current_mixture() is None
            assert torch.equal(layer(x), lin(x))
        assert current_mixture() is outer
        assert torch.equal(layer(x), first)
        thread = threading.Thread(target=lambda: seen.append(current_mixture()))
        thread.start()
        thread.join()
    assert seen == [None] and current_mixture() is None
