"""Task routers: training on separable data, early stopping, saving, and store routers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_store_common import FAMILIES, make_family, recipe

import polymerge
from polymerge.errors import CheckpointError, PolymergeError
from polymerge.routing import (
    FeatureModel,
    LabelledTexts,
    Router,
    accuracy,
    load_router,
    read_labelled_jsonl,
    save_router,
    stratified_split,
    train_router,
)
from polymerge.routing.router import INFO_FILE
from polymerge.runtime import train_store_router


def _blobs(n_per: int, experts: list[str], dim: int = 16, seed: int = 0,
           centers_seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Gaussian clouds around one center per expert (centers fixed by ``centers_seed``)."""
    centers = torch.randn(len(experts), dim, generator=torch.Generator().manual_seed(
        centers_seed)) * 3
    g = torch.Generator().manual_seed(1000 + seed)
    feats, labels = [], []
    for i, e in enumerate(experts):
        feats.append(centers[i] + torch.randn(n_per, dim, generator=g))
        labels += [e] * n_per
    return torch.cat(feats), labels


def test_router_learns_separable_tasks():
    experts = ["math", "code", "chat", "german"]
    x, y = _blobs(60, experts)
    xt, yt = _blobs(40, experts, seed=1)  # fresh queries around the same centers
    result = train_router(x, y, experts, max_epochs=200, patience=20, seed=0)
    assert result.metrics["val_accuracy"] > 0.95
    assert accuracy(result.router, xt, yt) > 0.95
    assert result.metrics["epochs_run"] <= 200


def test_router_training_is_deterministic():
    experts = ["a", "b", "c"]
    x, y = _blobs(20, experts)
    r1 = train_router(x, y, experts, max_epochs=30, seed=3).router.state_dict()
    r2 = train_router(x, y, experts, max_epochs=30, seed=3).router.state_dict()
    for k in r1:
        assert torch.equal(r1[k], r2[k]), k


def test_early_stopping_keeps_the_best_heldout_epoch():
    experts = ["a", "b"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 8, generator=g)
    y = [experts[i % 2] for i in range(80)]  # labels carry no signal: held-out loss rises
    result = train_router(x, y, experts, max_epochs=300, patience=10, seed=0)
    m = result.metrics
    assert m["epochs_run"] < 300
    assert m["epochs_run"] == m["best_epoch"] + 10
    best = min(h["val_loss"] for h in result.history)
    assert result.history[m["best_epoch"] - 1]["val_loss"] == best


def test_stratified_split_holds_out_every_label():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + held) == list(range(17))
    assert {labels[i] for i in held} == {0, 1, 2}
    assert sum(labels[i] == 0 for i in held) == 2


def test_router_save_load_and_refusals(tmp_path):
    experts = ["a", "b"]
    x, y = _blobs(10, experts)
    router = train_router(x, y, experts, max_epochs=5).router
    folder = save_router(tmp_path / "router", router, {"feature": {"model": "x"}})
    loaded = load_router(folder, experts=experts)
    assert loaded.predict(x) == router.predict(x)
    with pytest.raises(CheckpointError, match="retrain it"):
        load_router(folder, experts=["b", "a"])
    info = json.loads((folder / INFO_FILE).read_text())
    info["format_version"] = 42
    (folder / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="newer"):
        load_router(folder)


def test_unknown_labels_are_refused():
    with pytest.raises(PolymergeError, match="unknown expert"):
        train_router(torch.zeros(2, 3), ["a", "z"], ["a", "b"])


def test_read_labelled_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hi", "expert": "a"}\n\n{"text": "yo", "task": "b", "label": 1}\n'
                 '{"text": "ok", "expert": "c", "task": "c"}\n')
    data = read_labelled_jsonl(f)
    assert data.texts == ["hi", "yo", "ok"] and data.experts == ["a", "b", "c"]
    assert data.labels == [None, 1, None]
    assert data.where == [f"{f}:1", f"{f}:3", f"{f}:4"]
    f.write_text('{"text": "hi"}\n')
    with pytest.raises(PolymergeError, match=r"d.jsonl:1: 'expert' \(or its alias 'task'\) "
                                             "is required"):
        read_labelled_jsonl(f)
    assert read_labelled_jsonl(f, default_expert="only").experts == ["only"]
    f.write_text('{"text": "a", "expert": "x", "task": "y"}\n')
    with pytest.raises(PolymergeError, match="d.jsonl:1: 'expert' and its alias 'task'"):
        read_labelled_jsonl(f)


def test_router_weights_softmax_temperature_top_k():
    torch.manual_seed(0)
    router = Router(6, ["a", "b", "c", "d"], hidden=8)
    feats = torch.randn(5, 6)
    w = router.weights(feats)
    assert w.shape == (5, 4) and (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    torch.testing.assert_close(w, router.probabilities(feats))
    k2 = router.weights(feats, top_k=2)
    assert ((k2 > 0).sum(-1) == 2).all()
    torch.testing.assert_close(k2.sum(-1), torch.ones(5))
    assert torch.equal(k2.argmax(-1), w.argmax(-1))
    cold = router.weights(feats, temperature=1e-4)
    torch.testing.assert_close(cold, torch.nn.functional.one_hot(w.argmax(-1), 4).float(),
                               rtol=0, atol=1e-4)
    hot = router.weights(feats, temperature=100.0)
    torch.testing.assert_close(hot, torch.full((5, 4), 0.25), rtol=0, atol=0.02)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(PolymergeError, match="temperature must be a number > 0"):
            router.weights(feats, temperature=bad)
    for bad in (0, 5, 1.5):
        with pytest.raises(PolymergeError, match="top_k must be an integer from 1 to 4"):
            router.weights(feats, top_k=bad)  # type: ignore[arg-type]


def _texts(family: int, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = FAMILIES[family]
    return [" ".join(words[j] for j in torch.randint(0, len(words), (5,), generator=g).tolist())
            for _ in range(n)]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_store_router_from_base_features(tmp_path, kind):
    """Features from a (tiny, random) base model still separate disjoint vocabularies."""
    base, experts = make_family(tmp_path, kind, n=2)
    store = tmp_path / "store"
    polymerge.merge(recipe(base, experts), store, progress=False)
    data, test = LabelledTexts(), LabelledTexts()
    for i, e in enumerate(experts):
        for t in _texts(i, 40, seed=i):
            data.add(t, e.name)
        for t in _texts(i, 20, seed=100 + i):
            test.add(t, e.name)
    result = train_store_router(store, data, test=test, max_epochs=100, patience=15, base=base)
    assert result.metrics["val_accuracy"] > 0.95
    assert result.metrics["test_accuracy"] > 0.95
    assert (store / "router" / "router.safetensors").is_file()
    rt = polymerge.load_store(store, base=base)
    assert [rt.experts[i] for i in rt.route(test.texts).argmax(-1)] == test.experts
    with pytest.raises(PolymergeError, match=r"expert\(s\) \['nope'\] that are not among"):
        train_store_router(store, LabelledTexts(["x"], ["nope"]), base=base)
    fm = FeatureModel(base)
    assert fm(["apple pear", "car"]).shape == (2, 32)


def test_cli_router_train(tmp_path, capsys):
    from polymerge.cli import main

    base, experts = make_family(tmp_path, "bert", n=2)
    store = tmp_path / "store"
    polymerge.merge(recipe(base, experts), store, progress=False)
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "expert": e.name}) for i, e in enumerate(experts)
             for t in _texts(i, 30, seed=i)]
    data.write_text("\n".join(lines) + "\n")
    assert main(["router", "train", str(store), "--data", str(data), "--epochs", "60",
                 "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy: 1.0000" in out
    assert main(["inspect", str(store)]) == 0
    assert "router: " in capsys.readouterr().out
    assert Path(store / "router" / "router.json").is_file()
