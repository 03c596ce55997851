"""A channel store's mixed batch in one pass (the gather path): each row gets what switching to
its expert gives, nothing is written into the working model, and the cost rule picks between
the two paths as its estimates say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_runtime_common import TEXTS, build, family, store_recipe
from torch.testing import assert_close

import polymerge
import polymerge.runtime.channel_batch as channel_batch
from polymerge.errors import PolymergeError
from polymerge.runtime import SwitchRuntime
from polymerge.runtime.channel_batch import GatherLayer, gathering
from polymerge.runtime.channel_cost import (
    GATHER_COPY,
    ModelCosts,
    choose,
    gather_cost,
    materializes,
    switch_cost,
)

NAMES = ["expert0", "expert2", "expert1", "expert3"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("gather_llama"), "llama", scale=0.0, noise=0.05,
                  seed=5)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("gather_bert"), "bert", scale=0.0, noise=0.05,
                  seed=6)


@pytest.fixture(params=["materialized", "k-outputs"])
def way(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Each channel-merged linear of a gathered pass forced one way: each expert's weight
    materialized, or the K group outputs gathered per row."""
    forced = request.param == "materialized"
    calls: list[bool] = []

    def force(k: int, tokens: int, experts: int) -> bool:
        calls.append(forced)
        return forced

    monkeypatch.setattr(channel_batch, "materializes", force)
    return calls


def _store(fam, root: Path, **params) -> Path:  # type: ignore[no-untyped-def]
    base, experts, _, _ = fam
    return build(store_recipe("channel", base, experts, group_method="task_arithmetic",
                              **{"lambda": 0.5, **params}), root)


def _same_outputs(a, b) -> None:  # type: ignore[no-untyped-def]
    assert torch.equal(a.weights, b.weights)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", [None, "."], ids=["blocks", "everything"])
def test_llama_gather_equals_switching(llama, tmp_path, scope):
    params = {"groups": 2} | ({"scope": scope} if scope else {})
    rt = polymerge.load_store(_store(llama, tmp_path / "s", **params))
    switched = rt.forward(TEXTS, NAMES, path="switch")
    switches = rt.switches
    gathered = rt.forward(TEXTS, NAMES, path="gather")
    _same_outputs(gathered, switched)
    assert rt.switches == switches  # nothing written
    assert rt.passes["gather"] == 1
    wrapped = [m for m in rt.model.modules() if isinstance(m, GatherLayer)]
    assert wrapped and rt.gather_unavailable is None
    # outside a gathering block the wrapped layers are the switched model's own
    assert_close(rt.forward(TEXTS[:1], "expert3", path="switch").outputs[0],
                 rt.forward(TEXTS[:1], "expert3", path="gather").outputs[0], rtol=1e-5,
                 atol=1e-5)
    # generation: one decode loop for every row, the same tokens as expert by expert
    g1 = rt.generate(TEXTS, NAMES, max_new_tokens=6, path="switch")
    g2 = rt.generate(TEXTS, NAMES, max_new_tokens=6, path="gather")
    assert g1.completions == g2.completions
    for x, y in zip(g1.token_ids, g2.token_ids, strict=True):
        assert torch.equal(x, y)


def test_k_equals_n_gather_serves_each_expert_exactly(llama, tmp_path, way):
    """K = N keeps every expert: each row of a gathered batch equals that expert alone, by
    either way of running a channel-merged linear."""
    _, experts, _, _ = llama
    rt = polymerge.load_store(_store(llama, tmp_path / "s", groups=4, scope=".",
                                     **{"lambda": 1.0}))
    out = rt.forward(TEXTS, NAMES, path="gather")
    from test_runtime_common import main_output, tokenizer
    from transformers import LlamaForCausalLM

    tok = tokenizer(experts[0])
    for row, name in enumerate(NAMES):
        model = LlamaForCausalLM.from_pretrained(experts[int(name[-1])]).eval()
        assert_close(out.outputs[row], main_output(model, tok, TEXTS[row]), rtol=1e-5,
                     atol=1e-5)
    assert way  # the forced way ran


def test_bert_with_per_expert_norms_and_biases(bert, tmp_path, way):
    rt = polymerge.load_store(_store(bert, tmp_path / "s", groups=2, scope="."))
    _same_outputs(rt.forward(TEXTS, NAMES, path="gather"), rt.forward(TEXTS, NAMES,
                                                                        path="switch"))
    # position ids shared by every row are looked up per row's expert
    _same_outputs(rt.forward(TEXTS[:2], ["expert1", "expert1"], path="gather"),
                  rt.forward(TEXTS[:2], ["expert1", "expert1"], path="switch"))
    assert way


def test_gpt2_conv1d_and_tied_embeddings(make_models, way):
    from test_store_common import make_tokenizer

    ms = make_models("gpt2", 3, scale=0.05)
    for folder in [ms.base, *ms.experts]:
        make_tokenizer(folder)
    store = build({"merge_method": "channel", "base_model": str(ms.base),
                   "models": [{"model": str(e), "name": f"expert{i}"}
                              for i, e in enumerate(ms.experts)],
                   "parameters": {"groups": 2, "scope": ".", "group_method": "task_arithmetic",
                                  "lambda": 0.5}}, ms.root / "store")
    rt = polymerge.load_store(store)
    texts = ["apple banana cherry", "car", "red blue green"]
    names = ["expert2", "expert0", "expert1"]
    _same_outputs(rt.forward(texts, names, path="gather"), rt.forward(texts, names,
                                                                       path="switch"))
    assert rt.generate(texts, names, max_new_tokens=4, path="gather").completions == \
        rt.generate(texts, names, max_new_tokens=4, path="switch").completions
    assert way


def test_switch_path_narrows_per_row_options(llama, tmp_path):
    """A stopping criterion with per-row state sees each expert group's own rows."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    seen: list[list[int]] = []

    class Rows(StoppingCriteria):
        def __init__(self, rows: list[int]) -> None:
            self.rows = rows

        def select_rows(self, rows: list[int]) -> Rows:
            seen.append([self.rows[i] for i in rows])
            return Rows([self.rows[i] for i in rows])

        def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
            assert input_ids.shape[0] == len(self.rows)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    rt = polymerge.load_store(_store(llama, tmp_path / "s", groups=2))
    rt.generate(TEXTS, ["expert1", "expert3", "expert1", "expert3"], max_new_tokens=2,
                path="switch", stopping_criteria=StoppingCriteriaList([Rows([0, 1, 2, 3])]))
    assert sorted(seen) == [[0, 2], [1, 3]]


def test_auto_path_and_errors(llama, tmp_path):
    rt = polymerge.load_store(_store(llama, tmp_path / "s", groups=2))
    w = rt.weights(NAMES, 4)
    rt.switch("expert1")
    one = rt.weights(["expert1"] * 4, 4)
    assert rt.choose_path(one, 8, 1, "auto") == "switch"  # the loaded expert: nothing to write
    assert rt.choose_path(w, 8, 9, "auto") == "gather"  # a short mixed decode
    assert rt.path == "auto"  # the runtime's default: the cost rule, as the server
    assert rt.choose_path(w, 8, 9, None) == "gather"
    assert rt.choose_path(w, 8, 9, "switch") == "switch"
    assert SwitchRuntime(rt.store, path="switch").choose_path(w, 8, 9, None) == "switch"
    switches = rt.switches
    rt.forward(TEXTS, NAMES, path="auto")
    assert rt.switches == switches and rt.passes["gather"] >= 1
    with pytest.raises(PolymergeError, match="unknown path"):
        rt.forward(TEXTS, NAMES, path="sideways")
    with gathering([0, 1]) as g:
        assert g is not None and g.rows(4, torch.device("cpu")).tolist() == [0, 0, 1, 1]
        with pytest.raises(PolymergeError, match="experts were given for 2"):
            g.rows(3, torch.device("cpu"))


def _costs(n: int = 4, written: float = 1e6, extra: float = 1e4) -> ModelCosts:
    w = torch.full((n + 1, n), written, dtype=torch.float64)
    w[:n].fill_diagonal_(0)
    return ModelCosts(linear_per_token=1e4, attention_per_token_and_position=10.0,
                      extra_per_token=extra, calls=50, per_expert_modules=5, written=w)


def test_cost_rule():
    groups = [(0, 8), (1, 8), (2, 8), (3, 8)]
    # cheap switches, costly gathering, long rows: switch
    assert choose(_costs(written=10.0, extra=1e6), groups, 0, 512) == "switch"
    # costly switches, short rows: gather
    assert choose(_costs(written=1e8), groups, 0, 8) == "gather"
    # decoding multiplies the per-call costs of switching by the steps
    c = _costs(written=1e3)
    assert switch_cost(c, groups, 0, 40, 33) > gather_cost(c, groups, 40, 33)
    assert choose(c, groups, 0, 40, 33) == "gather"
    # no gather path: switch
    assert choose(None, groups, 0, 8) == "switch"


def test_materializing_rule():
    # an expert's weight is worth copying when the pass's tokens outweigh the copies
    assert materializes(2, 4 * 64 * 32, 4) and not materializes(2, 32, 4)
    assert materializes(3, int(4 * GATHER_COPY / 2) + 1, 4)
    assert not materializes(3, int(4 * GATHER_COPY / 2), 4)
    # a long forward pass over 4 experts, materialized, costs less than its K outputs
    c = _costs(written=1e12, extra=1e4)
    long = gather_cost(c, [(0, 8), (1, 8), (2, 8), (3, 8)], 64, 1)
    c.channel_elements = 1e4  # the same model with its channel linears known: materialized
    assert gather_cost(c, [(0, 8), (1, 8), (2, 8), (3, 8)], 64, 1) < long
    # a generation runs the output head on one token per row and pass: a costly head counts
    # (steps x rows) tokens, not (steps x rows x tokens)
    c.head_elements, c.head_extra = 5e3, 5e3
    head = gather_cost(c, [(0, 8), (1, 8)], 40, 9)
    c.head_elements, c.head_extra = 0.0, 0.0
    body = gather_cost(c, [(0, 8), (1, 8)], 40, 9)
    assert head < body
