"""Stores on the zoo's evaluation contract (a stand-in suite: no packaged data needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_store_common import FAMILIES, make_family

import polymerge
from polymerge.errors import PolymergeError
from polymerge.routing import suite_texts
from polymerge.stores import export_expert, open_store
from polymerge.zoo.stores import (
    channel_recipe,
    store_params_ratio,
    store_target,
    store_weights,
    train_suite_router,
)
from polymerge.zoo.suite import Suite


class _Example:
    def __init__(self, text: str) -> None:
        self.text = text


class _Splits:
    def __init__(self, family: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        words = FAMILIES[family]

        def make(n: int) -> list[_Example]:
            return [_Example(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                                      .tolist())) for _ in range(n)]

        self.validation = make(30)
        self.test = make(10)


class TinySuite(Suite):
    """Four BERT experts named after their tasks; 'evaluation' returns encoder outputs."""

    name = "tiny"
    primary = "score"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.root = root
        self.outputs: dict[str, torch.Tensor] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("expert0", "expert1", "expert2", "expert3")

    def build(self, *, progress: bool = True):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def splits(self, task: str) -> _Splits:
        return _Splits(self.tasks.index(task), seed=self.tasks.index(task))

    def evaluate(self, weights, *, tasks=None, progress=True):  # type: ignore[no-untyped-def]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base_dir)
        scores = {}
        for task in tasks or self.tasks:
            module = weights(task)
            texts = [e.text for e in self.splits(task).test]
            enc = tok(texts, padding=True, return_tensors="pt")
            with torch.inference_mode():
                out = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            self.outputs[task] = out.last_hidden_state
            scores[task] = {"score": 1.0}
        return scores

    def expert_parameters(self) -> tuple[int, int]:
        return open_store(self.root / "store").parameter_counts()["model"], 1000


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> TinySuite:
    root = tmp_path_factory.mktemp("tinysuite")
    make_family(root, "bert")
    (root / "experts").mkdir()
    for i in range(4):
        (root / f"expert{i}").rename(root / "experts" / f"expert{i}")
    s = TinySuite(root)
    polymerge.merge(channel_recipe(s), root / "store", progress=False)
    return s


def test_oracle_routing_gives_each_task_its_expert(suite, tmp_path):
    from transformers import AutoTokenizer, BertModel

    weights = store_weights(suite.root / "store", suite, "oracle")
    suite.evaluate(weights)
    tok = AutoTokenizer.from_pretrained(suite.base_dir)
    for task in ("expert0", "expert3"):
        model = BertModel.from_pretrained(export_expert(suite.root / "store", task,
                                                        tmp_path / task)).eval()
        texts = [e.text for e in suite.splits(task).test]
        with torch.inference_mode():
            want = model(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state
        torch.testing.assert_close(suite.outputs[task], want, rtol=1e-5, atol=1e-5)
    # one working model serves every task: one switch per task
    assert weights.runtime.switches == 4


def test_router_routing_and_store_target(suite):
    with pytest.raises(PolymergeError, match="has no router"):
        store_weights(suite.root / "store", suite, "router")
    data = suite_texts(suite, "validation")
    assert len(data) == 120 and set(data.experts) == set(suite.tasks)
    metrics = train_suite_router(suite.root / "store", suite, max_epochs=60)
    assert metrics["test_accuracy"] > 0.95
    weights = store_target(suite.root / "store" / "router", suite)
    assert weights.routing == "router"
    suite.evaluate(weights)
    module = weights("expert2")
    assert module.expert is None and set(module.last_routes) == {"expert3"}
    assert store_target(suite.root / "store", suite).routing == "oracle"
    assert store_target(suite.base_dir, suite) is None


def test_params_ratio_counts_private_parts(suite):
    counts = open_store(suite.root / "store").parameter_counts()
    ratio = store_params_ratio(suite, suite.root / "store")
    assert ratio == pytest.approx((counts["stored"] + 1000) / (counts["ensemble"] + 1000))


def test_router_texts_from_token_windows(suite):
    """A suite of token windows (the gen suite's shape) gives decoded texts per split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(suite.base_dir)

    class Windows:
        tasks = ("expert0", "expert1")

        def tokenizer(self):  # type: ignore[no-untyped-def]
            return tok

        def windows(self, task):  # type: ignore[no-untyped-def]
            i = self.tasks.index(task)
            ids = tok(["apple pear plum", "car bus tram"][i])["input_ids"]
            return {"train": torch.tensor([ids] * 3), "heldout": torch.tensor([ids])}

    val = suite_texts(Windows(), "validation")
    test = suite_texts(Windows(), "test")
    assert val.texts == ["apple pear plum"] * 3 + ["car bus tram"] * 3
    assert test.experts == ["expert0", "expert1"]
