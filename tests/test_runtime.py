"""Serving by switching (channel stores) and plain checkpoints, checked against models whose
weights come from the experts' own files; routing specs and the output type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_runtime_common import (
    TEXTS,
    build,
    channel_state,
    family,
    greedy,
    main_output,
    model_with,
    store_recipe,
    tokenizer,
)
from test_store_common import FAMILIES
from torch.testing import assert_close

import polymerge
from polymerge.errors import PolymergeError
from polymerge.routing import LabelledTexts
from polymerge.runtime import (
    CheckpointRuntime,
    RunOutput,
    SwitchRuntime,
    load_runtime,
    routing_weights,
    train_store_router,
)
from polymerge.stores import open_store


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("rt_llama"), "llama")


@pytest.fixture(scope="module")
def llama_store(llama, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts, _, _ = llama
    out = tmp_path_factory.mktemp("rt_stores") / "kn"
    return build(store_recipe("channel", base, experts, groups=4,
                              group_method="task_arithmetic", **{"lambda": 1.0}), out)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("rt_bert"), "bert")


@pytest.fixture(scope="module")
def bert_store(bert, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts, _, _ = bert
    out = tmp_path_factory.mktemp("rt_stores") / "bert_kn"
    return build(store_recipe("channel", base, experts, groups=4,
                              group_method="task_arithmetic", **{"lambda": 1.0}), out)


def _expert_model(folder: Path) -> torch.nn.Module:
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, AutoConfig.from_pretrained(folder).architectures[0])
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- switching


def test_k_equals_n_serves_each_expert_exactly(llama, llama_store):
    _, experts, _, _ = llama
    rt = polymerge.load_store(llama_store)
    assert isinstance(rt, SwitchRuntime) and rt.serving == "switch" and rt.is_causal
    names = ["expert0", "expert2", "expert1", "expert3"]
    out = rt.forward(TEXTS, names, path="switch")  # (the default, "auto", may gather)
    assert isinstance(out, RunOutput) and out.inputs == TEXTS and out.chosen == names
    assert out.routing(1) == {"expert0": 0.0, "expert1": 0.0, "expert2": 1.0, "expert3": 0.0}
    tok = tokenizer(llama_store)
    models = [_expert_model(e) for e in experts]
    for row, (text, name) in enumerate(zip(TEXTS, names, strict=True)):
        i = int(name[-1])
        want = main_output(models[i], tok, text)
        assert_close(out.outputs[row], want, rtol=1e-5, atol=1e-5)
        # the check can fail: the next expert (the row a lookup off by one would read) differs
        other = main_output(models[(i + 1) % 4], tok, text)
        assert (out.outputs[row] - other).abs().max() > 1e-3
    assert rt.switches == 4  # grouped: one switch per distinct expert


def test_partial_switches_equal_the_plain_torch_merge(tmp_path):
    """K=2: a switch rewrites only the rows whose group changes; after every switch the
    working model holds the weights computed by plain torch from the experts' files."""
    base, experts, base_sd, expert_sd = family(tmp_path, "llama", scale=0.0, noise=0.05,
                                               seed=5)
    out = build(store_recipe("channel", base, experts, groups=2, preset="paper",
                             group_method="task_arithmetic", **{"lambda": 0.5}),
                tmp_path / "store")
    index = {name: open_store(out).groups_of(name)  # type: ignore[attr-defined]
             for name, e in open_store(out).entries.items() if e.kind == "channel"}
    rt = polymerge.load_store(out)
    tok = tokenizer(out)
    partial = 0
    previous = None
    for name in ["expert0", "expert1", "expert0", "expert2", "expert3", "expert1", "expert3",
                 "expert0", "expert2"]:
        i = int(name[-1])
        got = rt.forward(TEXTS[:1], name).outputs[0]
        want_state = channel_state(base_sd, expert_sd, index, i, 0.5)
        state = rt.model.state_dict()
        for k, v in want_state.items():
            assert_close(state[k], v, rtol=0, atol=2e-6, msg=f"{previous}->{name} {k}")
        assert_close(got, main_output(model_with(base, want_state), tok, TEXTS[0]), rtol=1e-5,
                     atol=1e-5)
        if previous is not None:
            j = int(previous[-1])
            partial += sum(0 < float((g[i] != g[j]).float().mean()) < 1 for g in index.values())
        previous = name
    assert partial > 0  # the row-by-row path was exercised


def test_switch_only_when_the_expert_changes(llama_store):
    rt = polymerge.load_store(llama_store)
    assert rt.switch("expert1") is True
    assert rt.switch("expert1") is False
    rt.forward(TEXTS, ["expert1", "expert3", "expert1", "expert3"], path="switch")
    # expert1 was active, so its group runs first: one more switch (to expert3)
    assert rt.switches == 2 and rt.active == "expert3"
    with pytest.raises(PolymergeError, match="no expert named 'nope'"):
        rt.forward(TEXTS[:1], "nope")
    with pytest.raises(PolymergeError, match="no router"):
        rt.route(TEXTS)
    with pytest.raises(PolymergeError, match="no router"):
        rt.forward(TEXTS)


def test_soft_weights_run_top_1(llama, llama_store):
    _, experts, _, _ = llama
    rt = polymerge.load_store(llama_store)
    out = rt.forward(TEXTS[:2], [[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    assert out.chosen == ["expert1", "expert0"]
    assert torch.equal(out.weights, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))
    tok = tokenizer(llama_store)
    assert_close(out.outputs[0], main_output(_expert_model(experts[1]), tok, TEXTS[0]),
                 rtol=1e-5, atol=1e-5)
    named = rt.forward(TEXTS[:1], {"expert3": 0.9, "expert0": 0.1})
    assert named.chosen == ["expert3"]
    with pytest.raises(PolymergeError, match="no positive entry"):
        rt.forward(TEXTS[:1], [0.0, 0.0, 0.0, 0.0])


def _router_data() -> LabelledTexts:
    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    return data


def test_generate_with_the_router_equals_each_experts_generation(llama, llama_store, tmp_path):
    import shutil

    base, experts, _, _ = llama
    store = tmp_path / "routed"
    shutil.copytree(llama_store, store)
    train_store_router(store, _router_data(), max_epochs=80, patience=15, base=base)
    rt = polymerge.load_store(store, base=base)
    gens = rt.generate(TEXTS, max_new_tokens=3)
    assert gens.chosen == ["expert0", "expert1", "expert2", "expert3"]
    assert len(gens.token_ids[0]) == 3 and gens.outputs is None
    tok = tokenizer(store)
    for row in range(2):
        want = greedy(_expert_model(experts[row]), tok, TEXTS[row], 3)
        assert gens.completions[row] == want
    # routing weights are the router's, served top-1
    w = rt.route(TEXTS)
    assert w.shape == (4, 4) and torch.equal(w.argmax(-1), torch.arange(4))
    # the CLI runs the same path
    from polymerge.cli import main

    assert main(["run", str(store), "apple pear", "--expert", "expert0",
                 "--max-new-tokens", "2"]) == 0


def test_encoder_forward_module_and_token_batches(bert, bert_store):
    _, experts, _, _ = bert
    rt = polymerge.load_store(bert_store)
    assert not rt.is_causal
    with pytest.raises(PolymergeError, match="does not generate text"):
        rt.generate(TEXTS[:1], "expert0")
    tok = tokenizer(bert_store)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    models = [_expert_model(e) for e in experts]
    module = rt.as_module(expert="expert3")
    got = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    with torch.inference_mode():
        want = models[3](**enc).last_hidden_state
    assert_close(got.last_hidden_state, want, rtol=1e-5, atol=1e-5)
    assert module.last_routes == ["expert3"] * 4
    # per-row routing reassembles the batch in order
    routes = ["expert2", "expert0", "expert2", "expert1"]
    mixed = rt.as_module(routes)(input_ids=enc["input_ids"],
                                 attention_mask=enc["attention_mask"])
    batch = rt.forward(dict(enc), routes)  # a tokenized batch: each row's own tokens
    for row, name in enumerate(routes):
        single = main_output(models[int(name[-1])], tok, TEXTS[row])
        n = single.shape[0]
        assert_close(mixed.last_hidden_state[row, :n], single, rtol=1e-5, atol=1e-5)
        assert_close(batch.outputs[row], single, rtol=1e-5, atol=1e-5)
    # the zoo sets the module's expert per task; None routes (no router here)
    module.expert = None
    with pytest.raises(PolymergeError, match="no router"):
        module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def test_apply_into_a_model_with_a_head(bert, bert_store):
    """A bare encoder's store fills the ``bert.`` part of a classifier and leaves the head."""
    from transformers import BertConfig, BertForSequenceClassification

    _, _, _, expert_sd = bert
    store = open_store(bert_store)
    clf = BertForSequenceClassification(BertConfig.from_pretrained(bert_store))
    head = clf.classifier.weight.detach().clone()
    store.apply(clf, "expert1")
    name = "encoder.layer.1.attention.self.query.weight"
    assert_close(clf.bert.state_dict()[name], expert_sd[1][name], rtol=0, atol=1e-6)
    assert torch.equal(clf.classifier.weight, head)


def test_memory_accounting(llama_store):
    rt = polymerge.load_store(llama_store)
    rt.switch("expert0")
    mem = rt.memory()
    model_bytes = sum(p.numel() * 4 for p in rt.model.parameters())
    assert mem["working_model"] >= model_bytes
    assert mem["store"] == rt.store.nbytes()
    assert mem["total"] == mem["store"] + mem["working_model"] + mem["feature_model"]


# ----------------------------------------------------------------------------- checkpoints


def test_a_plain_checkpoint_is_one_expert(llama, bert):
    _, experts, _, _ = llama
    rt = load_runtime(experts[2])
    assert isinstance(rt, CheckpointRuntime) and rt.experts == ["expert2"] and rt.is_causal
    tok = tokenizer(experts[2])
    model = _expert_model(experts[2])
    out = rt(TEXTS[:2], max_new_tokens=3)  # causal: generate
    assert out.completions == [greedy(model, tok, t, 3) for t in TEXTS[:2]]
    fwd = rt.forward(TEXTS, batch_size=3)
    for row, text in enumerate(TEXTS):
        assert_close(fwd.outputs[row], main_output(model, tok, text), rtol=1e-5, atol=1e-5)
    assert torch.equal(fwd.weights, torch.ones(4, 1)) and fwd.chosen == ["expert2"] * 4
    assert torch.equal(rt.route(TEXTS), torch.ones(4, 1))
    with pytest.raises(PolymergeError, match="do not apply"):
        load_runtime(experts[2], top_k=2)
    enc = bert[1][0]
    assert not load_runtime(enc).is_causal
    with pytest.raises(PolymergeError, match="neither an expert store nor a model folder"):
        load_runtime(enc.parent / "nope")


# ----------------------------------------------------------------------------- routing specs


def test_routing_specs():
    experts = ["a", "b", "c"]

    def route() -> torch.Tensor:
        return torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])

    assert torch.equal(routing_weights(None, 2, experts, route), route())
    assert torch.equal(routing_weights("route", 2, experts, route), route())
    assert torch.equal(routing_weights("b", 2, experts, route),
                       torch.tensor([[0.0, 1, 0], [0, 1, 0]]))
    assert torch.equal(routing_weights(["c", "a"], 2, experts, route),
                       torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    assert torch.equal(routing_weights({"c": 0.25, "a": 0.75}, 2, experts, route),
                       torch.tensor([[0.75, 0, 0.25]] * 2))
    assert torch.equal(routing_weights([0.5, 0.5, 0.0], 2, experts, route),
                       torch.tensor([[0.5, 0.5, 0.0]] * 2))
    rows = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]])
    assert torch.equal(routing_weights(rows, 2, experts, route), rows)
    assert torch.equal(routing_weights(rows.tolist(), 2, experts, route), rows)
    with pytest.raises(PolymergeError, match=r"no expert named 'z' in s; experts: a, b, c"):
        routing_weights("z", 2, experts, route, where=" in s")
    with pytest.raises(PolymergeError, match="3 experts for 2 inputs"):
        routing_weights(["a", "b", "c"], 2, experts, route)
    with pytest.raises(PolymergeError, match=r"weights must have shape \(3,\) or \(2, 3\)"):
        routing_weights(torch.ones(2, 4), 2, experts, route)
    with pytest.raises(PolymergeError, match="finite"):
        routing_weights([float("nan"), 0, 1], 2, experts, route)
    out = RunOutput(experts, torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]))
    assert out.chosen == ["b", "a"] and len(out) == 2
    assert out.routings[0] == {"a": 0.2, "b": 0.5, "c": 0.3}
