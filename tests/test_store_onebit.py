"""1bit-Merging stores: sign and scale by hand, the paper's module split and its options, packed
bits, size accounting, and the store served through export, the switch runtime with a router
and the CLI, each checked against plain-torch references computed from the experts' files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import load_state
from safetensors.torch import save_file
from test_runtime_common import TEXTS, family, main_output, model_with, store_recipe, tokenizer
from test_store_common import FAMILIES
from torch.testing import assert_close

import polymerge
from polymerge.errors import RecipeError
from polymerge.routing import LabelledTexts
from polymerge.runtime import SwitchRuntime, train_store_router
from polymerge.stores import export_expert, open_store, read_manifest
from polymerge.stores.bits import packed_size
from polymerge.stores.onebit import ATTENTION, MLP, binarize, module_pattern

# ----------------------------------------------------------------------------- references

MLP_NAMES = re.compile(r"\.mlp\.")
ATTN_NAMES = re.compile(r"\.self_attn\.")


def ties_reference(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """TIES with density 1 and lambda 1: per entry the sign of the summed task vectors, the
    mean of the task vectors that share it (0 where none does)."""
    taus = torch.stack([e.double() - base.double() for e in experts])
    sign = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    count = agree.sum(0)
    total = (taus * agree).sum(0)
    return base.double() + torch.where(count > 0, total / count.clamp_min(1), 0.0)


def onebit_reference(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                     keeps: list[re.Pattern[str]], merged: str = "ties"
                     ) -> list[dict[str, torch.Tensor]]:
    """Expert t: ``base + mean|tau| * (+1 where tau >= 0, -1 elsewhere)`` on the 2-D weights
    its pattern matches; the static merge of every expert on all other float tensors."""
    out = []
    for t, e in enumerate(experts):
        state = {}
        for name, b in base.items():
            if not b.is_floating_point():
                state[name] = b.clone()
            elif b.dim() == 2 and keeps[t].search(name):
                tau = e[name].double() - b.double()
                scale = tau.abs().mean()
                state[name] = b.double() + torch.where(tau >= 0, scale, -scale)
            elif merged == "ties":
                state[name] = ties_reference(b, [x[name] for x in experts])
            else:
                state[name] = b.double() + sum(x[name].double() - b.double() for x in experts)
        out.append(state)
    return out


def _onebit(base: Path, experts: list[Path], names: list[str] | None = None,
            **params) -> dict:  # type: ignore[no-untyped-def]
    recipe = store_recipe("onebit", base, experts, **params)
    for m, name in zip(recipe["models"], names or [], strict=False):
        m["name"] = name
    return recipe


# ----------------------------------------------------------------------------- by hand


def test_sign_and_scale_by_hand(tmp_path):
    tau = torch.tensor([[0.5, -1.5], [0.0, 2.0]])
    sign, scale = binarize(tau)
    assert sign.tolist() == [[True, False], [True, True]] and float(scale) == 1.0
    base = {"model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 3.0),
            "model.norm.weight": torch.ones(2)}
    folders = []
    for name, state in (("base", base), ("e0", {k: v + (tau if v.dim() == 2 else 0.5)
                                                 for k, v in base.items()})):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
        folders.append(tmp_path / name)
    out = tmp_path / "store"
    polymerge.merge(_onebit(folders[0], folders[1:]), out, progress=False)
    store = open_store(out)
    w = "model.layers.0.mlp.up_proj.weight"
    assert store.entries[w].kind == "onebit" and store.keepers(w) == [0]
    assert store.pieces[f"{w}@bits"].tolist() == [[1 + 4 + 8]]  # bits 1, 0, 1, 1
    assert store.pieces[f"{w}@scale"].tolist() == [1.0]
    assert store.tensor(w, 0).tolist() == [[4.0, 2.0], [4.0, 4.0]]
    # one expert: the merged norm is the expert's own
    assert store.tensor("model.norm.weight", 0).tolist() == [1.5, 1.5]


@pytest.mark.parametrize("name,mlp,attention", [
    ("model.layers.3.mlp.down_proj.weight", True, False),
    ("model.layers.3.self_attn.o_proj.weight", False, True),
    ("encoder.layer.2.intermediate.dense.weight", True, False),
    ("encoder.layer.2.output.dense.weight", True, False),
    ("encoder.layer.2.attention.output.dense.weight", False, True),
    ("encoder.layer.2.attention.self.query.weight", False, True),
    ("transformer.h.1.mlp.c_fc.weight", True, False),
    ("transformer.h.1.attn.c_attn.weight", False, True),
    ("embeddings.word_embeddings.weight", False, False),
    ("model.embed_tokens.weight", False, False),
])
def test_module_patterns(name, mlp, attention):
    assert bool(re.search(MLP, name)) == mlp
    assert bool(re.search(ATTENTION, name)) == attention


def test_auto_is_the_papers_split():
    assert module_pattern("auto", "chat").pattern == ATTENTION
    assert module_pattern("auto", "Llama-2-7b-Instruct").pattern == ATTENTION
    assert module_pattern("auto", "math").pattern == MLP
    assert module_pattern("auto", "code").pattern == MLP
    assert module_pattern("none", "math") is None
    assert module_pattern(r"q_proj", "x").pattern == "q_proj"


# ----------------------------------------------------------------------------- a real family


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("onebit_llama"), "llama")


@pytest.fixture(scope="module")
def onebit_store(llama, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts, _, _ = llama
    out = tmp_path_factory.mktemp("onebit_stores") / "onebit"
    polymerge.merge(_onebit(base, experts), out, progress=False)
    return out


def test_default_store_matches_the_reference(onebit_store, llama):
    _, experts, b, ex = llama
    store = open_store(onebit_store)
    want = onebit_reference(b, ex, [MLP_NAMES] * 4)
    for t, e in enumerate(experts):
        got = store.expert_state_dict(e.name)
        assert set(got) == set(want[t])
        for name in got:
            assert_close(got[name].double(), want[t][name], rtol=1e-5, atol=1e-6, msg=name)
    kinds = {n: e.kind for n, e in store.entries.items()}
    assert all(k == "onebit" for n, k in kinds.items() if ".mlp." in n)
    assert all(k == "merged" for n, k in kinds.items() if ".mlp." not in n)


def test_the_split_per_expert_and_task_arithmetic(llama, tmp_path):
    """A chat expert keeps attention, math and code keep MLP; one expert keeps everything by a
    per-model override; the rest is task arithmetic."""
    base, experts, b, ex = llama
    recipe = _onebit(base, experts, ["chat", "math", "code", "german"],
                     merged_method="task_arithmetic")
    recipe["models"][3]["parameters"] = {"modules": "all"}
    out = tmp_path / "split"
    polymerge.merge(recipe, out, progress=False)
    store = open_store(out)
    q, up = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert store.keepers(q) == [0, 3] and store.keepers(up) == [1, 2, 3]
    assert {p.name.split("@")[1] for p in store.entries[q].pieces} == \
        {"base", "merged", "bits", "scale"}
    keeps = [ATTN_NAMES, MLP_NAMES, MLP_NAMES, re.compile(r"\.(mlp|self_attn)\.")]
    want = onebit_reference(b, ex, keeps, merged="task_arithmetic")
    for t in range(4):
        got = store.expert_state_dict(t)
        for name in got:
            assert_close(got[name].double(), want[t][name], rtol=1e-5, atol=1e-6, msg=name)
    assert store.signs(q, "math") is None and store.signs(q, "chat").dtype == torch.bool
    summary = read_manifest(out)["summary"]["experts"]
    assert summary["german"]["tensors"] == 2 * (4 + 3)  # 2 layers x (4 attention + 3 MLP)
    assert 0 < summary["chat"]["sign_error"] < 1


def test_size_accounting(onebit_store, llama):
    _, experts, b, _ = llama
    n = len(experts)
    counts = open_store(onebit_store).parameter_counts()
    model = sum(t.numel() for t in b.values())
    kept = [t for name, t in b.items() if ".mlp." in name]
    # kept tensors: base once + N x ceil(numel / 8) bytes of signs (as ceil(bytes / 4) float32
    # parameters) + N scales; every other tensor: one merged copy
    want = sum(t.numel() + math.ceil(n * packed_size(t.numel()) / 4) + n for t in kept) + \
        sum(t.numel() for name, t in b.items() if ".mlp." not in name)
    assert counts["stored"] == want
    assert counts["packed_bytes"] == sum(n * packed_size(t.numel()) for t in kept)
    assert counts["ratio"] == pytest.approx(want / (n * model))
    assert counts["ratio"] < (1 + n / 32) / n + 1e-9  # about one model plus N bits per weight


@pytest.mark.parametrize("params,match", [
    ({"merged_method": "slerp"}, "not supported"),
    ({"modules": "(unclosed"}, "not a valid regular expression"),
    ({"modules": 3}, "modules must be"),
])
def test_bad_recipes_are_refused(llama, tmp_path, params, match):
    base, experts, _, _ = llama
    with pytest.raises(RecipeError, match=match):
        polymerge.merge(_onebit(base, experts, **params), tmp_path / "x", progress=False)


# ----------------------------------------------------------------------------- serving


def test_export_equals_the_reference(onebit_store, llama, tmp_path):
    _, _, b, ex = llama
    want = onebit_reference(b, ex, [MLP_NAMES] * 4)[2]
    got = load_state(export_expert(onebit_store, "expert2", tmp_path / "e2"))
    assert set(got) == set(want)
    for name in got:
        assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6)


def test_switch_runtime_with_its_router_serves_the_reference(onebit_store, llama, tmp_path):
    import shutil

    base, _, b, ex = llama
    store = tmp_path / "routed"
    shutil.copytree(onebit_store, store)
    data = LabelledTexts()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        for _ in range(25):
            data.add(" ".join(FAMILIES[i][j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    train_store_router(store, data, base=base, max_epochs=80, patience=15)
    rt = polymerge.load_store(store, base=base)
    assert isinstance(rt, SwitchRuntime)
    want = onebit_reference(b, ex, [MLP_NAMES] * 4)
    tok = tokenizer(store)
    out = rt.forward(TEXTS)
    assert out.chosen == ["expert0", "expert1", "expert2", "expert3"]
    for row, text in enumerate(TEXTS):
        ref = main_output(model_with(base, {k: v.float() for k, v in want[row].items()}), tok,
                          text)
        assert_close(out.outputs[row], ref, rtol=1e-4, atol=1e-4)
    gen = rt.generate(TEXTS[:2], max_new_tokens=2)
    assert gen.chosen == ["expert0", "expert1"] and len(gen.token_ids[0]) == 2
    from polymerge.cli import main

    assert main(["run", str(store), "red blue", "--base", str(base),
                 "--max-new-tokens", "2"]) == 0
    assert main(["inspect", str(store)]) == 0
