"""The routed runtime: switching by lookup gives exactly the exported experts' outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_store_common import FAMILIES, make_family, recipe

import polymerge
from polymerge.errors import PolymergeError
from polymerge.routing import LabelledTexts, train_store_router
from polymerge.stores import export_expert, open_store

TEXTS = ["apple banana cherry", "car bus", "red blue green black", "one two three"]


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rt_llama")
    base, experts = make_family(root, "llama")
    polymerge.merge(recipe(base, experts), root / "store", progress=False)
    return root / "store"


@pytest.fixture(scope="module")
def bert_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rt_bert")
    base, experts = make_family(root, "bert")
    polymerge.merge(recipe(base, experts), root / "store", progress=False)
    return root / "store"


def _exported(store: Path, expert: str, tmp: Path, cls: type) -> torch.nn.Module:
    out = export_expert(open_store(store), expert, tmp / expert)
    return cls.from_pretrained(out, dtype=torch.float32).eval()


def _tok(store: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(store)


def test_forward_equals_exported_checkpoints_llama(llama_store, tmp_path):
    from transformers import LlamaForCausalLM

    rt = polymerge.load_store(llama_store)
    experts = ["expert0", "expert2", "expert1", "expert3"]
    outs = rt.forward(TEXTS, experts=experts)
    tok = _tok(llama_store)
    for text, expert, out in zip(TEXTS, experts, outs, strict=True):
        assert out.expert == expert and out.text == text
        model = _exported(llama_store, expert, tmp_path, LlamaForCausalLM)
        with torch.inference_mode():
            want = model(**tok([text], return_tensors="pt")).logits[0]
        torch.testing.assert_close(out.output, want, rtol=1e-5, atol=1e-5)
    # four experts, grouped: exactly one switch per distinct expert
    assert rt.switches == 4


def test_switch_only_when_the_expert_changes(llama_store):
    rt = polymerge.load_store(llama_store)
    assert rt.switch("expert1") is True
    assert rt.switch("expert1") is False
    rt.forward(TEXTS, experts=["expert1", "expert3", "expert1", "expert3"])
    # expert1 was active, so its group runs first: one more switch (to expert3)
    assert rt.switches == 2 and rt.active == "expert3"
    with pytest.raises(PolymergeError, match="no expert named"):
        rt.switch("nope")
    with pytest.raises(PolymergeError, match="no router"):
        rt.route(TEXTS)


def test_generate_matches_exported_and_routes_with_the_router(llama_store, tmp_path):
    from transformers import LlamaForCausalLM

    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    train_store_router(llama_store, data, max_epochs=80, patience=15)
    rt = polymerge.load_store(llama_store)
    gens = rt.generate(TEXTS, max_new_tokens=3)
    assert [r.expert for r in gens] == ["expert0", "expert1", "expert2", "expert3"]
    tok = _tok(llama_store)
    for r in gens[:2]:
        model = _exported(llama_store, r.expert, tmp_path, LlamaForCausalLM)
        enc = tok([r.text], return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(**enc, max_new_tokens=3, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert r.completion == tok.decode(seq[0, enc["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
    # the CLI runs the same path
    from polymerge.cli import main

    assert main(["run", str(llama_store), "apple pear", "--expert", "expert0",
                 "--max-new-tokens", "2"]) == 0


def test_encoder_runtime_and_routed_module(bert_store, tmp_path):
    from transformers import BertModel

    rt = polymerge.load_store(bert_store)
    tok = _tok(bert_store)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    module = rt.as_module(expert="expert3")
    got = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    model = _exported(bert_store, "expert3", tmp_path, BertModel)
    with torch.inference_mode():
        want = model(**enc)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5,
                               atol=1e-5)
    # per-row routing reassembles the batch in order
    routes = ["expert2", "expert0", "expert2", "expert1"]
    rt.route_ids = lambda ids, mask: routes  # type: ignore[method-assign]
    mixed = rt.as_module()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for row, expert in enumerate(routes):
        single = rt.forward([TEXTS[row]], expert=expert)[0].output
        n = single.shape[0]
        torch.testing.assert_close(mixed.last_hidden_state[row, :n], single, rtol=1e-5,
                                   atol=1e-5)


def test_apply_into_a_model_with_a_head(bert_store):
    """A bare encoder's store fills the ``bert.`` part of a classifier and leaves the head."""
    from transformers import BertConfig, BertForSequenceClassification

    store = open_store(bert_store)
    cfg = BertConfig.from_pretrained(bert_store)
    clf = BertForSequenceClassification(cfg)
    head = clf.classifier.weight.detach().clone()
    store.apply(clf, "expert1")
    name = "encoder.layer.1.attention.self.query.weight"
    assert torch.equal(clf.bert.state_dict()[name], store.tensor(name, "expert1"))
    assert torch.equal(clf.classifier.weight, head)


def test_memory_accounting(llama_store):
    rt = polymerge.load_store(llama_store)
    rt.switch("expert0")
    mem = rt.memory()
    model_bytes = sum(p.numel() * 4 for p in rt.model.parameters())
    assert mem["working_model"] >= model_bytes
    assert mem["store"] == rt.store.nbytes()
    assert mem["total"] == mem["store"] + mem["working_model"] + mem["feature_model"]


def test_switch_sequences_rebuild_every_expert_exactly(tmp_path):
    """Switching writes only rows whose group changes; every state must still be exact."""
    base, experts = make_family(tmp_path, "llama", scale=0.0, noise=0.05, seed=5)
    polymerge.merge(recipe(base, experts), tmp_path / "store", progress=False)
    rt = polymerge.load_store(tmp_path / "store")
    store = rt.store
    partial = 0
    for name in ["expert0", "expert1", "expert0", "expert2", "expert3", "expert1", "expert3",
                 "expert0", "expert2"]:
        before = rt.active
        rt.switch(name)
        state = rt.model.state_dict()
        want = store.expert_state_dict(name)
        for k, v in want.items():
            assert torch.equal(state[k], v), (before, name, k)
        if before is not None:
            for tname, entry in store.entries.items():
                if entry.kind == "channel":
                    idx = store.groups_of(tname)
                    i, j = store.expert_index(name), store.expert_index(before)
                    frac = float((idx[i] != idx[j]).float().mean())
                    partial += 0 < frac < 0.5
    assert partial > 0  # the row-by-row path was exercised
