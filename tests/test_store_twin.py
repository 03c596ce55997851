"""Twin-Merging stores and their runtime: exactness at full rank, reconstruction error against
rank, accounting, batched mixing against per-input materialized weights, folding, soft routing,
LoRA experts, export, CLI, the zoo path and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_lora
from test_store_common import FAMILIES, make_family
from torch.testing import assert_close

import polymerge
from polymerge.cli import main as cli_main
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.routing import LabelledTexts, Router, train_store_router
from polymerge.runtime.twin import (
    SHARED_FEATURES,
    LowRank,
    Mixture,
    TwinEmbedding,
    TwinLinear,
    TwinModel,
    TwinNorm,
    build_shared_model,
    choose_path,
    path_cost,
    shared_feature_model,
)
from polymerge.stores import Store, TwinStore, export_expert, open_store, piece_name
from polymerge.stores.twin import lowrank_svd_of_product, resolve_rank, truncated_svd

TEXTS = ["apple banana cherry", "car bus", "red blue green black", "one two three"]


def twin_recipe(base: Path, experts: list[Path], **params: Any) -> dict[str, Any]:
    return {"merge_method": "twin", "base_model": str(base),
            "models": [{"model": str(e), "name": e.name} for e in experts],
            "parameters": params}


def _read(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    try:
        return {n: ckpt.read(n) for n in ckpt.tensors()}
    finally:
        ckpt.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models: intra-op threads only add overhead (and stall badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("twin_llama"), "llama")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("twin_bert"), "bert")


@pytest.fixture(scope="module")
def full_store(llama, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts = llama
    out = tmp_path_factory.mktemp("twin_stores") / "full"
    polymerge.merge(twin_recipe(base, experts, rank=1.0), out, progress=False)
    return out


@pytest.fixture(scope="module")
def bert_store(bert, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts = bert
    out = tmp_path_factory.mktemp("twin_stores") / "bert"
    polymerge.merge(twin_recipe(base, experts, rank=0.5), out, progress=False)
    return out


def _router_data() -> LabelledTexts:
    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    return data


# ----------------------------------------------------------------------------- the store


def test_full_rank_rebuilds_every_expert(full_store, llama):
    _, experts = llama
    store = open_store(full_store)
    assert isinstance(store, TwinStore) and store.method == "twin"
    kinds = {e.kind for e in store.entries.values()}
    assert kinds == {"twin", "expert"}
    for i, e in enumerate(experts):
        want = _read(e)
        got = store.expert_state_dict(e.name)
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], rtol=0, atol=2e-6, msg=name)
            assert got[name].dtype == want[name].dtype
        assert store.expert_index(e.name) == i
    err = store.recon_error()
    assert err["max"] < 1e-5 and err["mean"] < 1e-5
    name = "model.layers.0.mlp.up_proj.weight"
    assert store.rank_of(name) == 32
    assert store.manifest["summary"]["svd"]["exact"] == len(err["tensors"])


def test_full_rank_one_hot_outputs_equal_the_experts(full_store, llama):
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, experts = llama
    rt = polymerge.load_store(full_store)
    assert isinstance(rt, TwinModel)
    names = ["expert0", "expert2", "expert1", "expert3"]
    outs = rt.forward(TEXTS, experts=names)
    tok = AutoTokenizer.from_pretrained(full_store)
    for text, name, out in zip(TEXTS, names, outs, strict=True):
        assert out.expert == name and out.weights[name] == 1.0
        model = LlamaForCausalLM.from_pretrained(experts[int(name[-1])]).eval()
        with torch.inference_mode():
            want = model(**tok([text], return_tensors="pt")).logits[0]
        assert_close(out.output, want, rtol=1e-4, atol=1e-5)
    # greedy generation with one expert's one-hot weights is that expert's generation
    gen = rt.generate(["apple pear"], expert="expert1", max_new_tokens=3)[0]
    model = LlamaForCausalLM.from_pretrained(experts[1]).eval()
    enc = tok(["apple pear"], return_tensors="pt")
    seq = model.generate(**enc, max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.completion == tok.decode(seq[0, enc["input_ids"].shape[1]:],
                                        skip_special_tokens=True)


def test_recon_error_decreases_as_rank_grows(llama, tmp_path):
    base, experts = llama
    means, maxes = [], []
    for i, rank in enumerate([0.1, 0.3, 0.6, 1.0]):
        out = tmp_path / f"r{i}"
        polymerge.merge(twin_recipe(base, experts, rank=rank), out, progress=False)
        store = open_store(out)
        err = store.recon_error()
        means.append(err["mean"])
        maxes.append(err["max"])
        if i == 0:  # the recorded error is the exclusive part's relative Frobenius error
            name = "model.layers.1.self_attn.o_proj.weight"
            shared = store.shared_tensor(name)
            num = den = 0.0
            for t, e in enumerate(experts):
                exclusive = _read(e)[name] - shared
                num += float((exclusive - (store.tensor(name, t) - shared)).norm()) ** 2
                den += float(exclusive.norm()) ** 2
            assert err["tensors"][name]["error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
            assert store.rank_of(name) == 3  # round(0.1 * 32)
    assert means == sorted(means, reverse=True) and len(set(means)) == 4
    assert all(a >= b for a, b in zip(maxes, maxes[1:], strict=False))
    assert means[-1] < 1e-5 < means[0]


def test_parameter_accounting(llama, tmp_path):
    base, experts = llama
    n = len(experts)
    out = tmp_path / "acc"
    polymerge.merge(twin_recipe(base, experts, rank=4), out, progress=False)
    store = open_store(out)
    infos = open_checkpoint(base).tensors()
    by_hand = 0
    for name, info in infos.items():
        if len(info.shape) == 2:
            rows, cols = info.shape
            assert store.rank_of(name) == 4
            by_hand += rows * cols + n * 4 * (rows + cols)
        else:
            by_hand += (n + 1) * info.numel  # per expert, plus the shared merge
    pieces = sum(p.numel for e in store.entries.values() for p in e.pieces)
    counts = store.parameter_counts()
    assert counts["stored"] == pieces == by_hand == store.stored_parameters()
    assert counts["index_entries"] == 0
    assert store.nbytes() == 4 * pieces
    assert set(counts["stored_by_kind"]) == {"twin", "expert"}
    # others: shared keeps only the shared merge of 1-D tensors
    polymerge.merge(twin_recipe(base, experts, rank=4, others="shared"), tmp_path / "sh",
                    progress=False)
    shared_only = open_store(tmp_path / "sh").parameter_counts()
    ones = sum(i.numel for i in infos.values() if len(i.shape) == 1)
    assert shared_only["stored"] == by_hand - n * ones
    assert set(shared_only["stored_by_kind"]) == {"twin", "merged"}


def test_rank_rules_and_svd_paths():
    assert resolve_rank(0.1, 384, 1536) == 38 and resolve_rank(1.0, 48, 32) == 32
    assert resolve_rank(0.001, 48, 32) == 1 and resolve_rank(5, 48, 32) == 5
    with pytest.raises(RecipeError, match="'w': rank 40 exceeds the tensor's full rank 32"):
        resolve_rank(40, 48, 32, "w")
    with pytest.raises(RecipeError, match="neither a fraction"):
        resolve_rank(2.5, 48, 32)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 120, generator=g)
    u, s, vh, how = truncated_svd(a, 12, torch.Generator().manual_seed(1))
    assert how == "randomized" and u.shape == (400, 12) and vh.shape == (12, 120)
    exact = torch.linalg.svdvals(a)
    best = float(exact[12:].square().sum().sqrt())
    got = float((a - (u * s) @ vh).norm())
    assert best <= got <= 1.02 * best
    u2, s2, vh2, _ = truncated_svd(a, 12, torch.Generator().manual_seed(1))
    assert torch.equal(u, u2) and torch.equal(vh, vh2)  # deterministic for a seed
    assert truncated_svd(a, 40, g)[3] == "exact"


def test_lowrank_svd_of_product():
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(50, 6, generator=g), torch.randn(6, 30, generator=g)
    u, s, vh = lowrank_svd_of_product(left, right)
    want = torch.linalg.svdvals(left @ right)
    assert_close(s, want[:6], rtol=1e-4, atol=1e-5)
    assert_close((u * s) @ vh, left @ right, rtol=1e-4, atol=1e-5)
    assert_close(u.T @ u, torch.eye(6), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="do not make a matrix product"):
        lowrank_svd_of_product(left, left)


def test_lora_experts_use_the_factors(make_models, tmp_path):
    ms = make_models("llama", 0)
    loras = [make_lora(ms, f"lora{i}", r=2, seed=10 + i) for i in range(2)]
    rec = twin_recipe(ms.base, [x.adapter for x in loras], rank=1.0)
    out = polymerge.merge(rec, tmp_path / "lora_store", progress=False)
    store = open_store(out)
    svd = store.manifest["summary"]["svd"]
    assert svd["lora_factors"] > 0  # q_proj, v_proj (2 + 2 <= 16 / 2) and untouched tensors
    for i, lora in enumerate(loras):
        got = store.expert_state_dict(i)
        for name, want in lora.merged_state.items():
            if name in got:
                assert_close(got[name], want, rtol=1e-4, atol=2e-6, msg=name)
    # at a rank below the LoRA ranks' sum the factor path truncates optimally
    low = open_store(polymerge.merge(twin_recipe(ms.base, [x.adapter for x in loras],
                                                 rank=2), tmp_path / "low", progress=False))
    assert low.recon_error()["max"] > 0.01


# ----------------------------------------------------------------------------- twin layers


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
    layer.set_weights(w, fold=False)
    with torch.no_grad():
        got = layer(x)
        want = _materialized_linear(lin, u, v, bd, w, x)
        assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert layer._state["u"].shape[1] == 3 * r  # expert 1 is skipped
        layer.set_weights(None)
        assert torch.equal(layer(x), lin(x))  # no weights: the shared layer
        layer.set_weights(torch.zeros(b, t))
        assert torch.equal(layer(x), lin(x))
        # dense per-expert weights (an out-of-scope weight kept per expert) and 2-D inputs
        dw = torch.randn(t, out_f, in_f, generator=g) * 0.1
        dense = TwinLinear(lin, weight_delta=dw, bias_delta=bd)
        dense.set_weights(w, fold=False)
        x2 = torch.randn(b, in_f, generator=g)
        want = torch.stack([torch.nn.functional.linear(
            x2[i], lin.weight + torch.tensordot(w[i], dw, 1), lin.bias + w[i] @ bd)
            for i in range(b)])
        assert_close(dense(x2), want, rtol=1e-5, atol=1e-5)


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
        layer.set_weights(w, fold=False)
        want = torch.stack([x[i] @ (conv.weight + sum(w[i, k] * u[k] @ v[k] for k in range(t)))
                            + conv.bias for i in range(b)])
        assert_close(layer(x), want, rtol=1e-5, atol=1e-5)

        emb = torch.nn.Embedding(30, h)
        eu, ev = torch.randn(t, 30, 2, generator=g), torch.randn(t, 2, h, generator=g)
        te = TwinEmbedding(emb, factors=(eu, ev))
        te.set_weights(w, fold=False)
        ids = torch.randint(0, 30, (b, 5), generator=g)
        mats = [emb.weight + sum(w[i, k] * eu[k] @ ev[k] for k in range(t)) for i in range(b)]
        want = torch.stack([mats[i][ids[i]] for i in range(b)])
        assert_close(te(ids), want, rtol=1e-5, atol=1e-5)
        # ids shared by every row (BERT's position ids): one output row per weight row
        pos = torch.arange(5).unsqueeze(0)
        assert_close(te(pos), torch.stack([mats[i][pos[0]] for i in range(b)]), rtol=1e-5,
                     atol=1e-5)

        for norm in (torch.nn.LayerNorm(h), LlamaRMSNorm(h, eps=1e-6)):
            norm.weight.normal_(generator=g)
            dw = torch.randn(t, h, generator=g) * 0.1
            db = torch.randn(t, h, generator=g) * 0.1 if hasattr(norm, "bias") else None
            tn = TwinNorm(norm, weight_delta=dw, bias_delta=db)
            tn.set_weights(w, fold=False)
            rows = []
            for i in range(b):
                params = {"weight": norm.weight + w[i] @ dw}
                if db is not None:
                    params["bias"] = norm.bias + w[i] @ db
                rows.append(torch.func.functional_call(norm, params, (x[i:i + 1],))[0])
            assert_close(tn(x), torch.stack(rows), rtol=1e-5, atol=1e-5)
            assert "weight" in tn.state_dict()


def test_fold_equals_batched_when_rows_share_weights():
    g = torch.Generator().manual_seed(7)
    t, r = 4, 3
    lin = torch.nn.Linear(16, 8)
    mixture = Mixture(t)
    layer = TwinLinear(lin, factors=LowRank.from_stacked(torch.randn(t, 8, r, generator=g),
                                                         torch.randn(t, r, 16, generator=g)),
                       bias_delta=torch.randn(t, 8, generator=g), mixture=mixture)
    x = torch.randn(3, 5, 16, generator=g)
    one = torch.softmax(torch.randn(t, generator=g), -1)
    with torch.no_grad():
        mixture.set(one.expand(3, t), fold=False)
        batched = layer(x)
        assert layer._state["folded"] is None
        mixture.set(one, fold=True)
        folded = layer(x)
        assert layer._state["folded"] is not None
        assert_close(folded, batched, rtol=1e-5, atol=1e-5)
        # auto: folds once the tokens seen make folding cheaper (16 * 8 / 24 = 5.3 tokens)
        mixture.set(one.expand(3, t))
        layer(x[:1, :2])
        assert layer._state["folded"] is None
        assert_close(layer(x), batched, rtol=1e-5, atol=1e-5)
        assert layer._state["folded"] is not None
    with pytest.raises(PolymergeError, match="fold=True needs one weight vector"):
        mixture.set(torch.eye(t)[:3], fold=True)
    with pytest.raises(PolymergeError, match=r"shape \(4,\) or \(batch, 4\)"):
        mixture.set(torch.ones(3, 5))


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


def _paths(layer: Any, inputs: torch.Tensor) -> dict[str | None, torch.Tensor]:
    """The layer's output on each path and by the rule (None); records the rule's choice."""
    out = {}
    for path in PATHS:
        layer.mixture.path = path
        out[path] = layer(inputs)
    layer.mixture.path = None
    return out


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
    layer.set_weights(w, fold=False)
    with torch.no_grad():
        want = _materialized_linear(lin, u, v, bd, w, x)
        for path, y in _paths(layer, x).items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
        cpu = torch.device("cpu")
        by_expert = layer.mixture.groups(b, "experts", cpu, torch.float32)
        assert len(by_expert) == t  # one group per expert (every one is used)
        sets = layer.mixture.groups(b, "sets", cpu, torch.float32)
        assert sum(len(rows) for _, _, rows, _ in sets) == b  # each row in one group
        assert all(len(js) == k and wg.shape == (len(rows), k) and bool((wg > 0).all())
                   for js, _, rows, wg in sets)
        # an expert left out on every row and one that every row uses (no gather there)
        w2 = w.clone()
        w2[:, 1] = 0
        w2[:, 0] = 0.5
        w2 = w2 / w2.sum(-1, keepdim=True)
        layer.set_weights(w2, fold=False)
        want = _materialized_linear(lin, u, v, bd, w2, x)
        for path, y in _paths(layer, x).items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
        # dense per-expert weights and 2-D inputs (one token per row)
        dw = torch.randn(t, out_f, in_f, generator=g) * 0.1
        dense = TwinLinear(lin, factors=(u, v), weight_delta=dw, bias_delta=bd)
        dense.set_weights(w, fold=False)
        x2 = torch.randn(b, in_f, generator=g)
        want = torch.stack([torch.nn.functional.linear(
            x2[i], lin.weight + sum(w[i, e] * (u[e] @ v[e] + dw[e]) for e in range(t)),
            lin.bias + w[i] @ bd) for i in range(b)])
        for path, y in _paths(dense, x2).items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"path={path}")
        dense.mixture.path = "nope"
        with pytest.raises(PolymergeError, match="unknown path 'nope'"):
            dense(x2)


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
        layer.set_weights(w, fold=False)
        want = torch.stack([x[i] @ (conv.weight + sum(w[i, e] * u[e] @ v[e] for e in range(t)))
                            + conv.bias for i in range(b)])
        for path, y in _paths(layer, x).items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"conv1d path={path}")

        emb = torch.nn.Embedding(30, h, padding_idx=0)
        eu, ev = torch.randn(t, 30, 3, generator=g), torch.randn(t, 3, h, generator=g)
        dw = torch.randn(t, 30, h, generator=g) * 0.1
        te = TwinEmbedding(emb, factors=(eu, ev), weight_delta=dw)
        te.set_weights(w, fold=False)
        ids = torch.randint(1, 30, (b, 5), generator=g)
        ids[2:, 3:] = 0  # padding ids
        mats = [emb.weight + sum(w[i, e] * (eu[e] @ ev[e] + dw[e]) for e in range(t))
                for i in range(b)]
        want = torch.stack([mats[i][ids[i]] for i in range(b)])
        for path, y in _paths(te, ids).items():
            assert_close(y, want, rtol=1e-5, atol=1e-5, msg=f"embedding path={path}")
        te.mixture.path = "sets"  # no sets path for embeddings: per expert
        te(ids)
        assert te.last_path == "experts"
        te.mixture.path = None
        # ids shared by every row: each active expert's rows once, mixed per row
        pos = torch.arange(5).unsqueeze(0)
        assert_close(te(pos), torch.stack([mats[i][pos[0]] for i in range(b)]), rtol=1e-5,
                     atol=1e-5)
        assert te.last_path == "shared ids"


def test_model_grouped_paths_equal_dense_and_materialized(bert_store):
    rt = polymerge.load_store(bert_store)
    tok = rt.tokenizer
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    assert not bool(mask.all())  # a padded batch
    for k in (1, 2):
        w = _top_k(len(TEXTS), 4, k, 20 + k)
        module = rt.as_module(weights=w)
        outs = {}
        for path in PATHS:
            rt.mixture.path = path
            outs[path] = module(input_ids=enc["input_ids"],
                                attention_mask=enc["attention_mask"]).last_hidden_state
        rt.mixture.path = None
        for path in PATHS:
            assert_close(outs[path][mask], outs["dense"][mask], rtol=1e-4, atol=1e-5,
                         msg=f"path={path}")
        for i, text in enumerate(TEXTS):
            model = _materialized_model(bert_store, w[i])
            with torch.inference_mode():
                want = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
            assert_close(outs["sets"][i, :want.shape[0]], want, rtol=1e-4, atol=1e-5)


def test_choose_path_rule_and_routes():
    m = Mixture(4)
    device = torch.device("cpu")
    minilm = {"rank": 38, "factor_rank": 38, "dense_experts": 4}
    for width in (384 + 384, 384 + 1536):
        # top-1 of 4 experts, mixed routes, 64 tokens per row: one group per expert
        for b in (8, 32, 128):
            m.set(_top_k(b, 4, 1, b))
            routes = m.routes(b, device)
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
        m.set(_top_k(32, 4, 2, 5))
        routes = m.routes(32, device)
        assert routes.pairs == 64 and all(len(g.js) == 2 for g in routes.by_set)
        assert choose_path(routes, width=width, tokens_per_row=64, **minilm) == "sets"
        m.set(torch.softmax(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), -1))
        routes = m.routes(32, device)
        assert len(routes.by_set) == 1 and routes.by_set[0].size == 32
        assert choose_path(routes, width=width, tokens_per_row=64, **minilm) == "dense"
    # the estimate itself: a group of every row gathers nothing; copied columns cost
    assert path_cost([(4, 2, 0)], 4, 10, 5.0, 100) == 4 * 10 * (10 + 32) * 100 + 1e6
    assert path_cost([(3, 2, 10)], 4, 10, 5.0, 100) == (3 * 10 * (10 + 32 + 8) + 80) * 100 + 1e6
    # the rows each active expert needs and the sets, for the batch and a repeated (beam) one
    w = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [0.2, 0.0, 0.8, 0.0],
                      [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    m.set(w)
    assert m.active == [0, 1, 2]
    routes = m.routes(5, device)
    assert routes.rows == 5 and routes.pairs == 6
    assert [(g.js, g.rows.tolist()) for g in routes.by_expert] == [
        ((0,), [0, 2]), ((1,), [1]), ((2,), [0, 2, 3])]
    assert [(g.experts, g.rows.tolist(), g.contiguous) for g in routes.by_set] == [
        ((0, 2), [0, 2], False), ((1,), [1], True), ((2,), [3], True)]
    beams = m.routes(10, device)
    assert beams.pairs == 12 and beams.by_expert[1].rows.tolist() == [2, 3]


# ----------------------------------------------------------------------------- the runtime


def _materialized_model(store_path: Path, w: torch.Tensor) -> torch.nn.Module:
    """A plain model loaded with shared + sum_t w_t (theta_t - shared), tensor by tensor."""
    store = open_store(store_path)
    model = build_shared_model(store)
    with torch.no_grad():
        for name, target in store.targets(model).items():
            if not target.is_floating_point():
                continue
            shared = store.shared_tensor(name)
            mixed = shared + sum(float(w[t]) * (store.tensor(name, t) - shared)
                                 for t in range(len(store.experts)))
            target.copy_(mixed)
    return model


def test_batched_model_equals_per_input_materialized(bert_store):
    rt = polymerge.load_store(bert_store)
    w = _weights(4, 4, 3)
    outs = rt.forward(TEXTS, weights=w)
    tok = rt.tokenizer
    for i, text in enumerate(TEXTS):
        model = _materialized_model(bert_store, w[i])
        with torch.inference_mode():
            want = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
        assert_close(outs[i].output, want, rtol=1e-4, atol=1e-5)
        assert outs[i].weights["expert1"] == 0.0
    # the module the zoo uses gives the same rows, padded batch included
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    module = rt.as_module(weights=w)
    got = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for i, out in enumerate(outs):
        assert_close(got.last_hidden_state[i, :out.output.shape[0]], out.output, rtol=1e-4,
                     atol=1e-5)
    # all rows the same: folded, still the same numbers
    same = rt.forward(TEXTS[:2], weights=w[0])
    model = _materialized_model(bert_store, w[0])
    with torch.inference_mode():
        want = model(**tok([TEXTS[1]], return_tensors="pt")).last_hidden_state[0]
    assert_close(same[1].output, want, rtol=1e-4, atol=1e-5)
    mem = rt.memory()
    assert mem["total"] == mem["store"] + mem["working_model"] and mem["feature_model"] == 0
    # the store's pieces are views of the model's tensors: lookup still rebuilds experts
    fresh = open_store(bert_store)
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(rt.store.tensor(name, 2), fresh.tensor(name, 2))


def test_router_trained_on_shared_features_and_soft_routing(bert_store, tmp_path, capsys):
    import shutil

    store_path = tmp_path / "routed"
    shutil.copytree(bert_store, store_path)
    rt = polymerge.load_store(store_path)
    with pytest.raises(PolymergeError, match="no router; train one with `polymerge router "
                                             "train"):
        rt.forward(TEXTS)
    result = train_store_router(store_path, _router_data(), max_epochs=80, patience=15)
    info = json.loads((store_path / "router" / "router.json").read_text())
    assert info["feature"]["model"] == SHARED_FEATURES
    assert result.metrics["train_accuracy"] > 0.9
    # pass 1 computes the features the router was trained on
    rt = polymerge.load_store(store_path)
    fm = shared_feature_model(store_path)
    assert_close(rt.features(TEXTS), fm(TEXTS), rtol=1e-5, atol=1e-5)
    outs = rt.forward(TEXTS)
    assert [o.expert for o in outs] == ["expert0", "expert1", "expert2", "expert3"]
    for o in outs:
        assert sum(o.weights.values()) == pytest.approx(1.0, abs=1e-5)
    top = polymerge.load_store(store_path, top_k=2, temperature=0.5)
    for o in top.forward(TEXTS):
        assert sum(v > 0 for v in o.weights.values()) == 2
    # routed rows equal running each text alone with its routed weights
    w = torch.tensor([[o.weights[e] for e in rt.experts] for o in outs])
    alone = rt.forward([TEXTS[2]], weights=w[2])[0]
    assert_close(outs[2].output, alone.output, rtol=1e-5, atol=1e-6)
    assert cli_main(["run", str(store_path), TEXTS[2], "car bus train plane", "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "[expert2 " in text and "[expert1 " in text and "-> " in text
    with pytest.raises(PolymergeError, match="base= does not apply"):
        polymerge.load_store(store_path, base=str(store_path))
    with pytest.raises(PolymergeError, match="top_k must be an integer from 1 to 4"):
        polymerge.load_store(store_path, top_k=5)


def test_router_weights_softmax_temperature_top_k():
    torch.manual_seed(0)
    router = Router(6, ["a", "b", "c", "d"], hidden=8)
    feats = torch.randn(5, 6)
    w = router.weights(feats)
    assert w.shape == (5, 4) and (w > 0).all()
    assert_close(w.sum(-1), torch.ones(5))
    assert_close(w, router.probabilities(feats))
    k2 = router.weights(feats, top_k=2)
    assert ((k2 > 0).sum(-1) == 2).all()
    assert_close(k2.sum(-1), torch.ones(5))
    assert torch.equal(k2.argmax(-1), w.argmax(-1))
    cold = router.weights(feats, temperature=1e-4)
    assert_close(cold, torch.nn.functional.one_hot(w.argmax(-1), 4).float(), rtol=0,
                 atol=1e-4)
    hot = router.weights(feats, temperature=100.0)
    assert_close(hot, torch.full((5, 4), 0.25), rtol=0, atol=0.02)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(PolymergeError, match="temperature must be a number > 0"):
            router.weights(feats, temperature=bad)
    for bad in (0, 5, 1.5):
        with pytest.raises(PolymergeError, match="top_k must be an integer from 1 to 4"):
            router.weights(feats, top_k=bad)  # type: ignore[arg-type]


def test_runtime_errors(full_store):
    rt = polymerge.load_store(full_store)
    with pytest.raises(PolymergeError, match="no expert named 'nope'"):
        rt.forward(TEXTS[:1], expert="nope")
    with pytest.raises(PolymergeError, match=r"weights must have shape \(4,\) or \(2, 4\)"):
        rt.forward(TEXTS[:2], weights=torch.ones(2, 3))
    with pytest.raises(PolymergeError, match="give one of"):
        rt.forward(TEXTS[:1], expert="expert0", weights=[1, 0, 0, 0])
    with pytest.raises(PolymergeError, match="no router; train one"):
        rt.generate(TEXTS[:1])
    with pytest.raises(PolymergeError, match="not a twin store"):
        TwinModel(Store(full_store, open_store(full_store).manifest, {}))
    named = rt.forward(TEXTS[:1], weights={"expert3": 1.0})[0]
    assert named.expert == "expert3"


@pytest.mark.parametrize("params,match", [
    ({"rank": 40}, r"rank 40 exceeds the tensor's full rank 32"),
    ({"rank": 20}, r"model.layers.0.self_attn.k_proj.weight'.*full rank 16"),
    ({"rank": 0}, "rank must be > 0"),
    ({"rank": -0.5}, "rank must be > 0"),
    ({"rank": 2.5}, "neither a fraction"),
    ({"shared_method": "slerp"}, "shared_method 'slerp' is not supported"),
    ({"others": "drop"}, "others must be one of expert, shared"),
    ({"scope": "(unclosed"}, "not a valid regular expression"),
    ({"lambda": 0.5}, "no parameter 'lambda'"),
])
def test_bad_recipes_are_refused_before_any_tensor(llama, tmp_path, params, match):
    base, experts = llama
    with pytest.raises(RecipeError, match=match):
        polymerge.merge(twin_recipe(base, experts, **params), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- I/O, CLI, zoo


def test_export_reloads_with_transformers(full_store, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    store = open_store(full_store)
    out = export_expert(store, "expert2", tmp_path / "e2")
    model = LlamaForCausalLM.from_pretrained(out).eval()
    got = {k: v for k, v in model.state_dict().items()}
    for name, want in store.expert_state_dict("expert2").items():
        assert torch.equal(got[name], want), name
    tok = AutoTokenizer.from_pretrained(out)
    rt = polymerge.load_store(full_store)
    with torch.inference_mode():
        logits = model(**tok([TEXTS[0]], return_tensors="pt")).logits[0]
    assert_close(rt.forward(TEXTS[:1], expert="expert2")[0].output, logits, rtol=1e-5,
                 atol=1e-5)


def test_cli_merge_inspect_and_export(llama, tmp_path, capsys):
    import yaml

    base, experts = llama
    rec = tmp_path / "twin.yaml"
    rec.write_text(yaml.safe_dump(twin_recipe(base, experts, rank=0.25,
                                              shared_method="ties", density=0.7)))
    assert cli_main(["merge", str(rec), "-o", str(tmp_path / "s"), "-q"]) == 0
    store = open_store(tmp_path / "s")
    assert store.manifest["parameters"]["shared_method"] == "ties"
    assert store.manifest["parameters"]["density"] == 0.7
    assert cli_main(["inspect", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "expert store: twin" in text and "shared expert: ties (lambda 0.3)" in text
    assert "reconstruction error" in text and "rank 0.25 -> 4..8" in text
    assert cli_main(["export", str(tmp_path / "s"), "--expert", "expert0", "-o",
                     str(tmp_path / "e0")]) == 0
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(_read(tmp_path / "e0")[name], store.tensor(name, "expert0"))
    assert piece_name(name, "u.0") in store.pieces


class _StubSuite:
    """Just what store_rows and store_weights read: tasks named after the experts."""

    name = "stub"

    def __init__(self, root: Path, base: Path, experts: list[Path]) -> None:
        self.root = root
        self.base_dir = base
        self._experts = {e.name: e for e in experts}
        self.tasks = tuple(self._experts)
        self.seen: dict[str, list[str]] = {}

    def expert_dir(self, task: str) -> Path:
        return self._experts[task]

    def expert_parameters(self) -> tuple[int, int]:
        return sum(i.numel for i in open_checkpoint(self.base_dir).tensors().values()), 0

    def router_texts(self, split: str) -> dict[str, list[str]]:
        data = _router_data()
        out: dict[str, list[str]] = {}
        for text, expert in zip(data.texts, data.experts, strict=True):
            out.setdefault(expert, []).append(text)
        return out

    def evaluate(self, weights: Any, *, progress: bool = True) -> dict[str, dict[str, float]]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base_dir)
        scores = {}
        for i, task in enumerate(self.tasks):
            module = weights(task)
            enc = tok([" ".join(FAMILIES[i][:3])], return_tensors="pt")
            module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            self.seen.setdefault(task, []).extend(module.last_routes)
            scores[task] = {"score": 1.0}
        return scores


def test_zoo_store_rows_build_and_score_twin_variants(bert, tmp_path):
    from polymerge.zoo.stores import TWIN_VARIANTS, store_recipe

    base, experts = bert
    suite = _StubSuite(tmp_path, base, experts)
    assert store_recipe(suite, "twin", rank=0.1)["merge_method"] == "twin"
    rows = store_rows_twin(suite, TWIN_VARIANTS)
    assert [r.name for r in rows] == ["Twin (oracle)", "Twin (router)"]
    assert "twin store, rank 0.1" in rows[0].note and "one-hot" in rows[0].note
    assert "soft weights" in rows[1].note and 0 < rows[0].params_ratio < 1
    # oracle rows used each task's own expert; the router picked the right one here too
    assert all(routes[0] == task for task, routes in suite.seen.items())
    assert all(routes[1] == task for task, routes in suite.seen.items())


def store_rows_twin(suite: _StubSuite, variants: Any) -> list[Any]:
    from polymerge.zoo.stores import store_rows

    return store_rows(suite, variants, progress=False, out_root=suite.root / "stores")


def test_load_store_keeps_channel_stores_on_the_routed_runtime(llama, tmp_path):
    from test_store_common import recipe

    from polymerge.runtime import RoutedModel

    base, experts = llama
    out = polymerge.merge(recipe(base, experts), tmp_path / "channel", progress=False)
    assert isinstance(polymerge.load_store(out), RoutedModel)
    with pytest.raises(PolymergeError, match="channel stores take no option"):
        polymerge.load_store(out, top_k=2)
