"""Learned merges, the parts that need no transformer: parameters, the merge tree, coefficient
ranges, composition, the JSONL format, and the training loop on a linear model."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from polymerge.errors import PolymergeError, RecipeError
from polymerge.tuning.coefficients import Coefficients, layer_of, layer_order
from polymerge.tuning.data import (
    Example,
    TaskSpec,
    check_coverage,
    read_jsonl,
    split_heldout,
)
from polymerge.tuning.hierarchical import compose, merge_tree
from polymerge.tuning.objectives import Item, TaskOutput, mean_over_tasks, task_losses
from polymerge.tuning.params import ADAMERGING, SUPERMERGE, parse_config
from polymerge.tuning.task_vectors import Node, TaskVectors, leaf
from polymerge.tuning.trainer import merged_weights, train_coefficients


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLS = [TaskSpec("sent", Path("/x/sent"), ("sentiment",), ("neg", "pos")),
       TaskSpec("topic", Path("/x/topic"), (), ("a", "b", "c"))]
LM = [TaskSpec("code", Path("/x/code")), TaskSpec("math", Path("/x/math"))]


# ----------------------------------------------------------------------------- parameters


def test_parse_config_defaults_and_method_differences() -> None:
    sm = parse_config(SUPERMERGE, {"data": "cls"}, seed=3)
    am = parse_config(ADAMERGING, {"data": "cls", "granularity": "expert", "lr": 0.5}, seed=3)
    assert (sm.granularity, sm.group_size, sm.init, sm.seed) == ("tensor", None, 0.3, 3)
    assert sm.lr == SUPERMERGE.default_lr and am.lr == 0.5
    assert am.granularity == "expert" and am.method.activation == "clamp"


@pytest.mark.parametrize("params, message", [
    ({}, "needs 'data'"),
    ({"data": "cls", "stepz": 3}, "no parameter 'stepz'"),
    ({"data": "cls", "granularity": "row"}, "granularity 'row'"),
    ({"data": "cls", "group_size": 1}, "group_size"),
    ({"data": "cls", "steps": 0}, "steps"),
    ({"data": "cls", "holdout": 1.0}, "holdout"),
    ({"data": "cls", "init": 1.0}, "(-1, 1)"),
    ({"data": 3}, "must be a string"),
])
def test_parse_config_rejects_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(SUPERMERGE, params, seed=0)


def test_adamerging_init_must_be_in_unit_interval_and_no_per_model_parameters() -> None:
    with pytest.raises(RecipeError, match=r"\[0, 1\]"):
        parse_config(ADAMERGING, {"data": "x", "init": -0.1}, seed=0)
    with pytest.raises(RecipeError, match="per-model"):
        parse_config(SUPERMERGE, {"data": "x"}, seed=0, per_model={"a": {"weight": 1.0}})


# ----------------------------------------------------------------------------- layers, tree


def test_layer_of_each_granularity() -> None:
    name = "encoder.layer.3.attention.self.query.weight"
    assert layer_of(name, "tensor") == name
    assert layer_of(name, "block") == "block.3"
    assert layer_of("model.layers.11.mlp.up_proj.weight", "block") == "block.11"
    assert layer_of("embeddings.word_embeddings.weight", "block") == "embeddings"
    assert layer_of("model.norm.weight", "block") == "head"
    assert layer_of(name, "expert") == "all"
    names = ["model.layers.10.a", "model.layers.2.a", "model.norm.weight",
             "model.embed_tokens.weight"]
    assert layer_order(names, "block") == ["embeddings", "block.2", "block.10", "head"]


def test_merge_tree_shapes() -> None:
    assert merge_tree(4, None) == [[[0, 1, 2, 3]]]
    assert merge_tree(4, 4) == merge_tree(4, 9) == [[[0, 1, 2, 3]]]
    assert merge_tree(5, 2) == [[[0, 1], [2, 3], [4]], [[0, 1], [2]], [[0, 1]]]
    assert merge_tree(6, 3) == [[[0, 1, 2], [3, 4, 5]], [[0, 1]]]
    assert merge_tree(1, None) == [[[0]]]


# ----------------------------------------------------------------------------- coefficients


def test_coefficient_ranges_and_projection() -> None:
    tanh = Coefficients(["a", "b"], ["l0", "l1"], "tanh", 0.3)
    assert torch.allclose(tanh.values(), torch.full((2, 2), 0.3))
    with torch.no_grad():
        tanh.raw.fill_(50.0)
    assert bool((tanh.values() <= 1.0).all())
    clamp = Coefficients(["a"], ["l0", "l1"], "clamp", 0.3)
    with torch.no_grad():
        clamp.raw.copy_(torch.tensor([[1.7, -0.4]]))
    assert clamp.values().tolist() == [[1.0, 0.0]]
    clamp.project()
    assert clamp.raw.tolist() == [[1.0, 0.0]]


def test_absent_entries_are_not_counted_nor_reported() -> None:
    present = torch.tensor([[True, False], [True, True]])
    c = Coefficients(["a", "b"], ["l0", "l1"], "tanh", 0.5, present)
    assert c.trainable == 3
    table = c.as_table()
    assert table["a"]["l1"] is None and table["b"]["l1"] == pytest.approx(0.5)


def test_compose_multiplies_along_the_path() -> None:
    inner = Node("g0", ("a", "b"), {"a": {"l0": 0.5, "l1": 0.2}, "b": {"l0": -0.4}})
    other = leaf("c")
    coefs = Coefficients(["g0", "c"], ["l0", "l1"], "clamp", 0.0,
                         torch.tensor([[True, True], [True, False]]))
    with torch.no_grad():
        coefs.raw.copy_(torch.tensor([[0.8, 0.5], [0.6, 0.9]]))
    node = compose([inner, other], coefs, "top")
    assert node.tasks == ("a", "b", "c")
    assert node.parts["a"] == pytest.approx({"l0": 0.4, "l1": 0.1})
    assert node.parts["b"] == pytest.approx({"l0": -0.32})
    assert node.parts["c"] == pytest.approx({"l0": 0.6})  # c has no vector in l1


# ----------------------------------------------------------------------------- JSONL data


def _write(tmp_path: Path, lines: Sequence[object], name: str = "v.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_read_jsonl_resolves_tasks_and_labels(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"text": "fine", "task": "sentiment", "label": "pos"},
                             "", {"text": "meh", "task": "topic", "label": 2, "id": 7}])
    ex = read_jsonl(path, CLS, needs_labels=True)
    assert ex == [Example("fine", "sent", 1, f"{path}:1"), Example("meh", "topic", 2,
                                                                   f"{path}:3")]


@pytest.mark.parametrize("line, message", [
    ({"text": "x", "task": "sent", "label": "happy"}, "unknown label 'happy'"),
    ({"text": "x", "task": "sent", "label": 2}, "out of range"),
    ({"text": "x", "task": "weather", "label": "pos"}, "unknown expert 'weather'"),
    ({"text": "x", "expert": "weather", "label": "pos"}, "unknown expert 'weather'"),
    ({"text": "x", "expert": "sent", "task": "topic", "label": "pos"}, "disagree"),
    ({"text": "x", "label": "pos"}, "'expert' is required"),
    ({"text": "", "task": "sent", "label": "pos"}, "'text'"),
    ({"text": "x", "task": "sent"}, "'label' is required"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_read_jsonl_errors_name_the_line(tmp_path: Path, line: object, message: str) -> None:
    path = _write(tmp_path, [{"text": "ok", "task": "sent", "label": "neg"}, line])
    with pytest.raises(PolymergeError, match=f"{path.name}:2: .*{message}"):
        read_jsonl(path, CLS, needs_labels=True)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_data_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PolymergeError, match="has no examples"):
        read_jsonl(path, CLS, needs_labels=False)


def test_labels_optional_without_supervision_and_refused_for_lms(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"text": "x", "task": "topic"}])
    assert read_jsonl(path, CLS, needs_labels=False)[0].label is None
    lm = _write(tmp_path, [{"text": "def f(): pass", "task": "code", "label": "py"}], "lm.jsonl")
    with pytest.raises(PolymergeError, match="causal LM"):
        read_jsonl(lm, LM, needs_labels=False)
    one = _write(tmp_path, [{"text": "1 + 1 = 2"}], "one.jsonl")
    assert read_jsonl(one, LM[1:], needs_labels=False)[0].task == "math"


def test_split_heldout_is_seeded_disjoint_and_per_task() -> None:
    ex = [Example(f"t{i}", "a" if i % 3 else "b", 0, str(i)) for i in range(30)]
    train, held = split_heldout(ex, 0.2, seed=1)
    again = split_heldout(ex, 0.2, seed=1)
    assert (train, held) == again
    assert split_heldout(ex, 0.2, seed=2) != (train, held)
    assert not {e.text for e in train} & {e.text for e in held}
    assert len(train) + len(held) == 30
    assert {e.task for e in held} == {"a", "b"}
    with pytest.raises(PolymergeError, match="at least 2"):
        split_heldout([Example("x", "a", 0, "1")], 0.2, seed=0)
    with pytest.raises(PolymergeError, match="expert.*topic"):
        check_coverage(ex[:1], [CLS[0], CLS[1]], "v.jsonl")


# ----------------------------------------------------------------------------- training loop


class LinearObjective:
    """A linear classifier as "the model": logits = W x + b; one task, labelled."""

    def __init__(self, in_features: int, classes: int) -> None:
        self.model = torch.nn.Linear(in_features, classes)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.specs = (TaskSpec("t", Path("."), (), tuple(str(i) for i in range(classes))),)
        self.x: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, y: torch.Tensor) -> list[Item]:
        items = []
        for row, label in zip(x, y.tolist(), strict=True):
            self.x.append(row)
            items.append(Item((len(self.x) - 1,), "t", int(label)))
        return items

    def to(self, device: torch.device) -> LinearObjective:
        return self

    def outputs(self, forward, items: Sequence[Item]) -> dict[str, TaskOutput]:  # noqa: ANN001
        x = torch.stack([self.x[it.ids[0]] for it in items])
        y = torch.tensor([it.label for it in items])
        return {"t": TaskOutput(forward(input=x), y)}


def _linear_setup(n_experts: int = 1, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    obj = LinearObjective(6, 2)
    with torch.no_grad():
        obj.model.weight.zero_()
        obj.model.bias.zero_()
    true_w = torch.randn(2, 6, generator=g) * 3
    x = torch.randn(200, 6, generator=g)
    y = (x @ true_w.T).argmax(1)
    items = obj.add(x, y)
    # expert 0 knows the task; further experts are noise
    taus = [{"weight": true_w, "bias": torch.zeros(2)}]
    for _ in range(n_experts - 1):
        taus.append({"weight": torch.randn(2, 6, generator=g) * 3, "bias": torch.zeros(2)})
    nodes = [leaf(f"e{i}") for i in range(n_experts)]
    tv = TaskVectors(nodes, ["weight", "bias"], taus)
    return obj, tv, items


def test_one_expert_that_the_loss_wants_moves_toward_one() -> None:
    obj, tv, items = _linear_setup()
    coefs = Coefficients(["e0"], ["all"], "tanh", 0.3)
    result = train_coefficients(obj, tv, coefs, items[:160], items[160:],
                                criterion="cross_entropy", granularity="expert", steps=150,
                                lr=0.1, batch_size=32, eval_every=10, patience=50, seed=0,
                                progress=False)
    c = float(coefs.values().detach()[0, 0])
    assert c > 0.9, c
    assert result.best_heldout < result.initial_heldout


def test_gradients_reach_every_coefficient_and_only_them() -> None:
    obj, tv, items = _linear_setup(n_experts=3)
    coefs = Coefficients(["e0", "e1", "e2"], ["weight", "bias"], "tanh", 0.3,
                         torch.tensor([[True, False]] * 3))
    tv.taus = [{"weight": t["weight"]} for t in tv.taus]
    tv.names = ["weight"]
    base = {"weight": obj.model.weight.detach()}
    weights = merged_weights(base, tv, coefs, {"weight": 0})
    from torch.func import functional_call

    def forward(**kw):  # noqa: ANN202, ANN003
        return functional_call(obj.model, weights, args=(), kwargs=kw)

    loss = mean_over_tasks(task_losses(obj.outputs(forward, items[:50]), "cross_entropy"))
    loss.backward()
    grad = coefs.raw.grad
    assert grad is not None
    assert bool((grad[:, 0] != 0).all())  # every present coefficient gets a gradient
    assert bool((grad[:, 1] == 0).all())  # absent ones (no task vector) get none
    assert all(p.grad is None for p in obj.model.parameters())


@pytest.mark.parametrize("activation, criterion", [("tanh", "cross_entropy"),
                                                   ("clamp", "entropy")])
def test_coefficients_stay_in_range_under_a_huge_learning_rate(activation: str,
                                                                criterion: str) -> None:
    obj, tv, items = _linear_setup(n_experts=3)
    coefs = Coefficients(["e0", "e1", "e2"], ["weight", "bias"], activation, 0.3)
    train_coefficients(obj, tv, coefs, items[:160], items[160:], criterion=criterion,
                       granularity="tensor", steps=40, lr=5.0, batch_size=16, eval_every=5,
                       patience=100, seed=0, progress=False)
    v = coefs.values()
    if activation == "tanh":
        assert bool((v.abs() <= 1.0).all())
    else:
        assert bool((v >= 0).all() and (v <= 1).all())
        assert bool((coefs.raw >= 0).all() and (coefs.raw <= 1).all())


def test_training_is_deterministic_for_a_seed_and_keeps_the_best() -> None:
    runs = []
    for seed in (4, 4, 5):
        obj, tv, items = _linear_setup(n_experts=2)
        coefs = Coefficients(["e0", "e1"], ["weight", "bias"], "tanh", 0.3)
        r = train_coefficients(obj, tv, coefs, items[:160], items[160:],
                               criterion="cross_entropy", granularity="tensor", steps=30,
                               lr=0.05, batch_size=8, eval_every=5, patience=100, seed=seed,
                               progress=False)
        runs.append((coefs.raw.detach().clone(), r))
    assert torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], runs[2][0])
    held = [h["heldout"] for h in runs[0][1].history if "heldout" in h]
    assert runs[0][1].best_heldout == min(held)
    assert math.isfinite(runs[0][1].initial_heldout)


def test_entropy_criterion_prefers_confident_predictions() -> None:
    confident = {"t": TaskOutput(torch.tensor([[10.0, -10.0]]), None)}
    unsure = {"t": TaskOutput(torch.tensor([[0.0, 0.0]]), None)}
    lc = mean_over_tasks(task_losses(confident, "entropy"))
    lu = mean_over_tasks(task_losses(unsure, "entropy"))
    assert float(lc) < 1e-6 and float(lu) == pytest.approx(math.log(2))
