"""Serving by mixing (twin stores): every path (dense, top-k grouped, fold) against models whose
weights are computed by plain torch from the experts' own files; routing on the shared model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime_common import (
    TEXTS,
    build,
    family,
    greedy,
    main_output,
    mixed_state,
    model_with,
    shared_state,
    store_recipe,
    tokenizer,
)
from test_store_common import FAMILIES
from torch.testing import assert_close

import polymerge
from polymerge.cli import main as cli_main
from polymerge.errors import PolymergeError
from polymerge.routing import LabelledTexts
from polymerge.runtime import (
    SHARED_FEATURES,
    MixRuntime,
    SwitchRuntime,
    build_shared_model,
    shared_feature_model,
    train_store_router,
)
from polymerge.stores import open_store


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("mix_llama"), "llama")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("mix_bert"), "bert")


def _twin(fam: Any, root: Path, **params: Any) -> Path:
    base, experts, _, _ = fam
    return build(store_recipe("twin", base, experts, **params), root / "store")


@pytest.fixture(scope="module")
def llama_full(llama, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return _twin(llama, tmp_path_factory.mktemp("mix_llama_full"), rank=1.0)


@pytest.fixture(scope="module")
def bert_full(bert, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return _twin(bert, tmp_path_factory.mktemp("mix_bert_full"), rank=1.0)


@pytest.fixture(scope="module")
def bert_low(bert, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return _twin(bert, tmp_path_factory.mktemp("mix_bert_low"), rank=0.5)


def _top_k(b: int, t: int, k: int, seed: int) -> torch.Tensor:
    """Per-row softmax weights, top-k kept and renormalized, routes mixed (row i's top expert
    is i mod t; no expert is used by every row)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, generator=g)
    logits[torch.arange(b), torch.arange(b) % t] += 4.0
    w = torch.softmax(logits, -1)
    top = w.topk(k, -1)
    w = torch.zeros_like(w).scatter_(1, top.indices, top.values)
    return w / w.sum(-1, keepdim=True)


def _dense(b: int, t: int, seed: int) -> torch.Tensor:
    w = torch.softmax(torch.randn(b, t, generator=torch.Generator().manual_seed(seed)), -1)
    w[:, 1] = 0  # an expert no row uses (left out)
    return w / w.sum(-1, keepdim=True)


def _references(fam: Any, store: Path, w: torch.Tensor) -> list[torch.Tensor]:
    """Each text alone through a model with shared + sum_t w[row, t] (expert_t - shared)."""
    base, _, base_sd, expert_sd = fam
    shared = shared_state(base_sd, expert_sd)
    tok = tokenizer(store)
    return [main_output(model_with(base, mixed_state(shared, expert_sd, w[row])), tok, text)
            for row, text in enumerate(TEXTS)]


# ----------------------------------------------------------------------------- references


def test_one_hot_equals_each_expert(llama, llama_full):
    from transformers import LlamaForCausalLM

    _, experts, _, _ = llama
    rt = polymerge.load_store(llama_full)
    assert isinstance(rt, MixRuntime) and rt.serving == "mix"
    names = ["expert0", "expert2", "expert1", "expert3"]
    out = rt.forward(TEXTS, names)
    tok = tokenizer(llama_full)
    models = [LlamaForCausalLM.from_pretrained(e).eval() for e in experts]
    for row, name in enumerate(names):
        i = int(name[-1])
        assert out.chosen[row] == name and out.routing(row)[name] == 1.0
        assert_close(out.outputs[row], main_output(models[i], tok, TEXTS[row]), rtol=1e-4,
                     atol=1e-5)
        # discriminative: the next expert's model gives other numbers
        other = main_output(models[(i + 1) % 4], tok, TEXTS[row])
        assert (out.outputs[row] - other).abs().max() > 1e-3
    gen = rt.generate(["apple pear"], "expert1", max_new_tokens=3)
    assert gen.completions[0] == greedy(models[1], tok, "apple pear", 3)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_dense_soft_weights_equal_the_plain_torch_mixture(arch, request):
    fam = request.getfixturevalue(arch)
    store = request.getfixturevalue(f"{arch}_full")
    rt = polymerge.load_store(store)
    w = _dense(4, 4, 3)
    out = rt.forward(TEXTS, w, path="dense")
    want = _references(fam, store, w)
    for row in range(4):
        assert_close(out.outputs[row], want[row], rtol=1e-4, atol=1e-5)
        assert out.routing(row)["expert1"] == 0.0
    # the module the zoo uses gives the same rows, padded batch included
    enc = rt.tokenizer(TEXTS, padding=True, return_tensors="pt")
    got = rt.as_module(w)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    main = got.logits if arch == "llama" else got.last_hidden_state
    for row in range(4):
        assert_close(main[row, :want[row].shape[0]], want[row], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_paths_equal_the_plain_torch_mixture(bert, bert_full, k):
    rt = polymerge.load_store(bert_full)
    w = _top_k(4, 4, k, 20 + k)
    want = _references(bert, bert_full, w)
    enc = rt.tokenizer(TEXTS, padding=True, return_tensors="pt")
    for path in ("dense", "experts", "sets", None):
        out = rt.forward(TEXTS, w, path=path)
        for row in range(4):
            assert_close(out.outputs[row], want[row], rtol=1e-4, atol=1e-5,
                         msg=f"path={path} row={row}")
        with torch.inference_mode(), rt.mixed(w, path=path) as mixture:
            rt.model(**enc)
        taken = set(mixture.paths.values())
        if path == "sets":
            assert "sets" in taken and "experts" in taken  # embeddings: no sets path
        elif path is not None:
            assert path in taken


def test_fold_equals_the_plain_torch_mixture(llama, llama_full):
    rt = polymerge.load_store(llama_full)
    one = torch.tensor([0.1, 0.4, 0.0, 0.5])
    want = _references(llama, llama_full, one.expand(4, 4))
    out = rt.forward(TEXTS, one, fold=True)
    for row in range(4):
        assert_close(out.outputs[row], want[row], rtol=1e-4, atol=1e-5)
    enc = rt.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.inference_mode(), rt.mixed(one, fold=True) as mixture:
        rt.model(**enc)
    assert "folded" in set(mixture.paths.values())
    with pytest.raises(PolymergeError, match="fold=True needs one weight vector"):
        rt.forward(TEXTS[:2], [[1.0, 0, 0, 0], [0, 1.0, 0, 0]], fold=True)
    # generation with one weight vector folds on its own (auto) and still greedy-decodes the
    # materialized mixture
    base, _, base_sd, expert_sd = llama
    model = model_with(base, mixed_state(shared_state(base_sd, expert_sd), expert_sd, one))
    gen = rt.generate(["apple pear", "car bus"], one, max_new_tokens=4)
    tok = tokenizer(llama_full)
    assert gen.completions == [greedy(model, tok, t, 4) for t in ["apple pear", "car bus"]]


def test_low_rank_rows_equal_their_materialized_weights(bert_low):
    """Below full rank the experts are not rebuilt; each row must still equal a plain model
    loaded with shared + sum_t w_t u_t v_t (plain torch on the stored factors)."""
    rt = polymerge.load_store(bert_low)
    w = _dense(4, 4, 5)
    out = rt.forward(TEXTS, w)
    store = open_store(bert_low)
    tok = tokenizer(bert_low)
    for row, text in enumerate(TEXTS):
        model = build_shared_model(store)
        with torch.no_grad():
            for name, target in store.targets(model).items():
                entry = store.entries[name]
                shared = store.shared_tensor(name).double()
                if entry.kind == "twin":
                    for t in range(4):
                        u, v = store.factors(name, t)
                        shared = shared + float(w[row, t]) * (u.double() @ v.double())
                elif entry.kind == "expert":
                    for t in range(4):
                        shared = shared + float(w[row, t]) * (
                            store.pieces[f"{name}@expert.{t}"].double()
                            - store.shared_tensor(name).double())
                target.copy_(shared)
        assert_close(out.outputs[row], main_output(model, tok, text), rtol=1e-4, atol=1e-5)
    mem = rt.memory()
    assert mem["total"] == mem["store"] + mem["working_model"] and mem["feature_model"] == 0
    # the store's pieces are views of the model's tensors: lookup still rebuilds experts
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(rt.store.tensor(name, 2), store.tensor(name, 2))


def test_the_model_outside_a_call_is_the_shared_model(bert, bert_full):
    base, _, base_sd, expert_sd = bert
    rt = polymerge.load_store(bert_full)
    rt.forward(TEXTS, _dense(4, 4, 1))  # nothing of this call stays behind
    enc = rt.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.inference_mode():
        got = rt.model(**enc).last_hidden_state[0]
    shared = model_with(base, {k: v.float() if v.is_floating_point() else v
                               for k, v in shared_state(base_sd, expert_sd).items()})
    assert_close(got, main_output(shared, tokenizer(bert_full), TEXTS[0]), rtol=1e-4,
                 atol=1e-5)
    zero = rt.forward(TEXTS[:1], torch.zeros(4))  # all-zero weights: the shared model too
    assert_close(zero.outputs[0], got, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- routing


def _router_data() -> LabelledTexts:
    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    return data


def test_router_on_shared_features_and_soft_routing(bert_low, tmp_path, capsys):
    store_path = tmp_path / "routed"
    shutil.copytree(bert_low, store_path)
    rt = polymerge.load_store(store_path)
    with pytest.raises(PolymergeError, match="no router; train one with `polymerge router "
                                             "train"):
        rt.forward(TEXTS)
    with pytest.raises(PolymergeError, match="--base does not apply"):
        train_store_router(store_path, _router_data(), base=store_path)
    result = train_store_router(store_path, _router_data(), max_epochs=80, patience=15)
    info = json.loads((store_path / "router" / "router.json").read_text())
    assert info["feature"]["model"] == SHARED_FEATURES
    assert result.metrics["train_accuracy"] > 0.9
    # pass 1 computes the features the router was trained on
    rt = polymerge.load_store(store_path)
    assert_close(rt.features(TEXTS), shared_feature_model(store_path)(TEXTS), rtol=1e-5,
                 atol=1e-5)
    outs = rt.forward(TEXTS)
    assert outs.chosen == ["expert0", "expert1", "expert2", "expert3"]
    assert_close(outs.weights.sum(-1), torch.ones(4))
    assert torch.equal(outs.weights, rt.route(TEXTS))
    for top in (polymerge.load_store(store_path, top_k=2, temperature=0.5).forward(TEXTS),
                rt.forward(TEXTS, top_k=2, temperature=0.5)):
        assert ((top.weights > 0).sum(-1) == 2).all()
    # routed rows equal running each text alone with its routed weights
    alone = rt.forward([TEXTS[2]], outs.weights[2])
    assert_close(outs.outputs[2], alone.outputs[0], rtol=1e-5, atol=1e-6)
    # token ids in (left padding undone for routing)
    tok = rt.tokenizers.left
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    module = rt.as_module()
    module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert module.last_routes == outs.chosen
    assert cli_main(["run", str(store_path), TEXTS[2], "car bus train plane", "--top-k",
                     "2"]) == 0
    text = capsys.readouterr().out
    assert "[expert2 " in text and "[expert1 " in text and "-> " in text
    with pytest.raises(PolymergeError, match="base= does not apply"):
        polymerge.load_store(store_path, base=str(store_path))
    with pytest.raises(PolymergeError, match="top_k must be an integer from 1 to 4"):
        polymerge.load_store(store_path, top_k=5)
    with pytest.raises(PolymergeError, match="top_k must be an integer from 1 to 4"):
        rt.forward(TEXTS, top_k=0)


def test_runtime_errors(bert_full, bert, tmp_path):
    from test_store_common import recipe

    rt = polymerge.load_store(bert_full)
    with pytest.raises(PolymergeError, match="no expert named 'nope'"):
        rt.forward(TEXTS[:1], "nope")
    with pytest.raises(PolymergeError, match=r"weights must have shape \(4,\) or \(2, 4\)"):
        rt.forward(TEXTS[:2], torch.ones(2, 3))
    with pytest.raises(PolymergeError, match="unknown path 'nope'"):
        rt.forward(TEXTS[:1], "expert0", path="nope")
    with pytest.raises(PolymergeError, match="needs weights"), rt.mixed(None):
        pass
    assert rt.forward(TEXTS[:1], {"expert3": 1.0}).chosen == ["expert3"]
    base, experts, _, _ = bert
    channel = polymerge.merge(recipe(base, experts), tmp_path / "channel", progress=False)
    assert isinstance(polymerge.load_store(channel), SwitchRuntime)
    with pytest.raises(PolymergeError, match="channel stores take no option"):
        polymerge.load_store(channel, top_k=2)
    with pytest.raises(PolymergeError, match="not by mixing"):
        MixRuntime(open_store(channel))
