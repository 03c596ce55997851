"""EMR-Merging stores: election, masks and rescalers by hand, bit packing, size accounting, one
expert rebuilt exactly, and the store served through export, the switch runtime with a router
and the CLI, each checked against plain-torch references computed from the experts' files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_state
from safetensors.torch import save_file
from test_runtime_common import TEXTS, family, main_output, model_with, store_recipe, tokenizer
from test_store_common import FAMILIES
from torch.testing import assert_close

import polymerge
from polymerge.errors import CheckpointError, RecipeError
from polymerge.routing import LabelledTexts
from polymerge.runtime import SwitchRuntime, train_store_router
from polymerge.stores import MANIFEST_NAME, export_expert, open_store, read_manifest
from polymerge.stores.bits import pack_bits, packed_size, unpack_bits
from polymerge.stores.emr import elect

# ----------------------------------------------------------------------------- references


def emr_reference(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                  rescaler: str = "model") -> list[dict[str, torch.Tensor]]:
    """Every expert rebuilt by EMR, entry by entry in Python floats (float64 arithmetic)."""
    n = len(experts)
    elected: dict[str, tuple[list[float], list[list[bool]]]] = {}
    num = {name: [0.0] * n for name in base}
    den = {name: [0.0] * n for name in base}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        bl = b.double().reshape(-1).tolist()
        taus = [[x - y for x, y in zip(e[name].double().reshape(-1).tolist(), bl, strict=True)]
                for e in experts]
        unified, masks = [], [[] for _ in range(n)]
        for j in range(len(bl)):
            col = [taus[t][j] for t in range(n)]
            total = sum(col)
            sign = (total > 0) - (total < 0)
            agree = [sign != 0 and v * sign > 0 for v in col]
            mag = max([abs(v) for v, a in zip(col, agree, strict=True) if a], default=0.0)
            unified.append(sign * mag)
            for t in range(n):
                masks[t].append(agree[t])
                num[name][t] += abs(col[t])
                den[name][t] += abs(unified[-1]) if agree[t] else 0.0
        elected[name] = (unified, masks)

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else 0.0

    totals = [ratio(sum(num[k][t] for k in elected), sum(den[k][t] for k in elected))
              for t in range(n)]
    out = []
    for t in range(n):
        state = {}
        for name, b in base.items():
            if name not in elected:
                state[name] = experts[t][name].clone()
                continue
            unified, masks = elected[name]
            scale = totals[t] if rescaler == "model" else ratio(num[name][t], den[name][t])
            vals = [x + scale * (u if m else 0.0) for x, u, m in
                    zip(b.double().reshape(-1).tolist(), unified, masks[t], strict=True)]
            state[name] = torch.tensor(vals, dtype=torch.float64).reshape(b.shape)
        out.append(state)
    return out


def write_bare(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _emr(base: Path, experts: list[Path], **params) -> dict:  # type: ignore[no-untyped-def]
    return store_recipe("emr", base, experts, **params)


# ----------------------------------------------------------------------------- by hand


TAUS = torch.tensor([[1.0, -2.0, 3.0, 0.0],
                     [2.0, 1.0, -1.0, 0.0],
                     [-0.5, -3.0, 2.0, 1.0]])


def test_election_and_masks_by_hand():
    unified, masks = elect(TAUS)
    # sums 2.5, -4, 4, 1: signs +, -, +, +; largest magnitude among the agreeing experts
    assert unified.tolist() == [2.0, -3.0, 3.0, 1.0]
    assert masks.tolist() == [[True, True, True, False],
                              [True, False, False, False],
                              [False, True, True, True]]
    # a zero sum elects nothing: unified 0 and every mask 0
    u, m = elect(torch.tensor([[1.0], [-1.0]]))
    assert u.tolist() == [0.0] and not m.any()


@pytest.fixture()
def hand_store(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two tensors; the first holds TAUS (base 0.5), the second (2 entries) adds to the sums."""
    base = {"a.weight": torch.full((2, 2), 0.5), "b.bias": torch.tensor([1.0, -1.0])}
    second = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 1.0])]
    b = write_bare(tmp_path / "base", base)
    experts = []
    for t in range(3):
        experts.append(write_bare(tmp_path / f"e{t}", {
            "a.weight": base["a.weight"] + TAUS[t].reshape(2, 2),
            "b.bias": base["b.bias"] + second[t]}))
    return b, experts


def test_rescalers_by_hand_on_three_experts(hand_store, tmp_path):
    base, experts = hand_store
    # tensor a: |tau| sums 6, 4, 6.5; |mask * unified| sums 8, 2, 7 (unified 2, -3, 3, 1).
    # tensor b: taus [1, 0], [-1, 2], [0.5, 1]: sums 0.5, 3 -> unified [1, 2];
    #   masks [1, 0], [0, 1], [1, 1]; |tau| sums 1, 3, 1.5; |mask * unified| 1, 2, 3.
    want_model = [(6 + 1) / (8 + 1), (4 + 3) / (2 + 2), (6.5 + 1.5) / (7 + 3)]
    want_a = [6 / 8, 4 / 2, 6.5 / 7]
    want_b = [1 / 1, 3 / 2, 1.5 / 3]
    for mode in ("model", "tensor"):
        out = tmp_path / mode
        polymerge.merge(_emr(base, experts, rescaler=mode), out, progress=False)
        store = open_store(out)
        for t in range(3):
            a, b = store.scale("a.weight", t), store.scale("b.bias", t)
            if mode == "model":
                assert a == b == pytest.approx(want_model[t], rel=1e-6)
            else:
                assert (a, b) == (pytest.approx(want_a[t], rel=1e-6),
                                  pytest.approx(want_b[t], rel=1e-6))
        assert store.mask("a.weight", 2).reshape(-1).tolist() == [False, True, True, True]
        assert store.mask("b.bias", 1).tolist() == [False, True]
        unified = store.pieces["a.weight@unified"]
        assert unified.reshape(-1).tolist() == [2.0, -3.0, 3.0, 1.0]
        # expert t = base + scale_t * mask_t * unified, by hand for expert 1 (mask 1, 0, 0, 0)
        s = want_model[1] if mode == "model" else want_a[1]
        assert_close(store.tensor("a.weight", 1).reshape(-1),
                     torch.tensor([0.5 + s * 2.0, 0.5, 0.5, 0.5]))
    summary = read_manifest(tmp_path / "model")["summary"]
    assert summary["model_rescalers"]["e1"] == pytest.approx(7 / 4)
    assert summary["mask_density"]["e0"] == pytest.approx(4 / 6)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000])
def test_packing_round_trips(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(3, n, generator=g) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(n))
    assert torch.equal(unpack_bits(packed, n), bits)


def test_packing_layout_by_hand():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [1, 1 + 2 + 128, 1]
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


# ----------------------------------------------------------------------------- a real family


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("emr_llama"), "llama")


@pytest.fixture(scope="module")
def emr_store(llama, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base, experts, _, _ = llama
    out = tmp_path_factory.mktemp("emr_stores") / "emr"
    polymerge.merge(_emr(base, experts), out, progress=False)
    return out


@pytest.mark.parametrize("mode", ["model", "tensor"])
def test_every_expert_matches_the_reference_formula(llama, tmp_path, mode):
    base, experts, b, ex = llama
    out = tmp_path / mode
    polymerge.merge(_emr(base, experts, rescaler=mode), out, progress=False)
    store = open_store(out)
    want = emr_reference(b, ex, mode)
    for t, e in enumerate(experts):
        got = store.expert_state_dict(e.name)
        assert set(got) == set(want[t])
        for name in got:
            assert got[name].dtype == b[name].dtype
            assert_close(got[name].double(), want[t][name].double(), rtol=1e-5, atol=1e-6,
                         msg=name)


def test_one_expert_rebuilds_it_exactly(llama, tmp_path):
    base, experts, b, ex = llama
    out = tmp_path / "one"
    polymerge.merge(_emr(base, experts[2:3]), out, progress=False)
    store = open_store(out)
    assert store.summary["model_rescalers"] == {"expert2": 1.0}
    got = store.expert_state_dict(0)
    for name, want in ex[2].items():
        if want.is_floating_point():  # bit for bit: base + (expert - base) in float32
            assert torch.equal(got[name], b[name] + (want - b[name])), name
        assert_close(got[name], want, rtol=0, atol=1e-6)


def test_one_half_precision_expert_rebuilds_bit_for_bit(tmp_path):
    base, experts, b, ex = family(tmp_path, "llama", n=1, dtype=torch.bfloat16)
    out = tmp_path / "one"
    polymerge.merge(_emr(base, experts) | {"dtype": "float32"}, out, progress=False)
    got = open_store(out).expert_state_dict(0)
    for name, want in ex[0].items():
        assert torch.equal(got[name], want.float() if want.is_floating_point() else want), name


def test_size_accounting(emr_store, llama):
    _, experts, b, _ = llama
    n = len(experts)
    store = open_store(emr_store)
    counts = store.parameter_counts()
    model = sum(t.numel() for t in b.values())
    floats = [t for t in b.values() if t.is_floating_point()]
    ints = model - sum(t.numel() for t in floats)
    # per float tensor: base + unified (float32), N masks of ceil(numel/8) bytes counted as
    # ceil(bytes / 4) float32 parameters, N float32 rescalers; buffers once
    want = ints + sum(2 * t.numel() + math.ceil(n * packed_size(t.numel()) / 4) + n
                      for t in floats)
    assert counts["stored"] == want
    assert counts["packed_bytes"] == sum(n * packed_size(t.numel()) for t in floats)
    assert counts["packed_bits"] == 8 * counts["packed_bytes"]
    assert counts["stored_bytes"] == store.nbytes() == \
        4 * (ints + sum(2 * t.numel() + n for t in floats)) + counts["packed_bytes"]
    assert counts["ratio"] == pytest.approx(want / (n * model))
    # two models plus N bits per entry: (2 + 4/32) / 4 of the ensemble
    assert counts["ratio"] == pytest.approx((2 + n / 32) / n, rel=0.01)
    assert read_manifest(emr_store)["parameter_counts"] == counts
    text = store.describe()
    assert "expert store: emr" in text and "packed 8 to a byte" in text


def test_a_tampered_packed_piece_is_refused(emr_store, tmp_path):
    import shutil

    copy = tmp_path / "bad"
    shutil.copytree(emr_store, copy)
    man = json.loads((copy / MANIFEST_NAME).read_text())
    name = next(iter(k for k, v in man["tensors"].items() if v["kind"] == "emr"))
    man["tensors"][name]["packed"] = [f"{name}@base"]
    (copy / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="packed piece"):
        open_store(copy)


@pytest.mark.parametrize("params,match", [
    ({"rescaler": "layer"}, "rescaler must be one of"),
    ({"scope": "(unclosed"}, "not a valid regular expression"),
    ({"density": 0.5}, "no parameter 'density'"),
])
def test_bad_recipes_are_refused(llama, tmp_path, params, match):
    base, experts, _, _ = llama
    with pytest.raises(RecipeError, match=match):
        polymerge.merge(_emr(base, experts, **params), tmp_path / "x", progress=False)


def test_scope_keeps_other_tensors_per_expert(llama, tmp_path):
    base, experts, b, ex = llama
    out = tmp_path / "scoped"
    polymerge.merge(_emr(base, experts, scope=r"\.mlp\."), out, progress=False)
    store = open_store(out)
    kinds = {e.kind for e in store.entries.values()}
    assert kinds == {"emr", "expert"}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(store.tensor(name, 3), ex[3][name])


# ----------------------------------------------------------------------------- serving


def test_export_equals_the_reference(emr_store, llama, tmp_path):
    _, experts, b, ex = llama
    want = emr_reference(b, ex)[1]
    out = export_expert(emr_store, "expert1", tmp_path / "e1")
    got = load_state(out)
    assert set(got) == set(want)
    for name in got:
        assert_close(got[name].double(), want[name].double(), rtol=1e-5, atol=1e-6)


def _router_data() -> LabelledTexts:
    g = torch.Generator().manual_seed(0)
    data = LabelledTexts()
    for i in range(4):
        for _ in range(25):
            words = FAMILIES[i]
            data.add(" ".join(words[j] for j in torch.randint(0, 10, (4,), generator=g)
                              .tolist()), f"expert{i}")
    return data


def test_switch_runtime_with_its_router_serves_the_reference(emr_store, llama, tmp_path):
    import shutil

    base, experts, b, ex = llama
    store = tmp_path / "routed"
    shutil.copytree(emr_store, store)
    train_store_router(store, _router_data(), base=base, max_epochs=80, patience=15)
    rt = polymerge.load_store(store, base=base)
    assert isinstance(rt, SwitchRuntime)
    want = emr_reference(b, ex)
    tok = tokenizer(store)
    out = rt.forward(TEXTS)  # routed by the store's router
    assert out.chosen == ["expert0", "expert1", "expert2", "expert3"]
    oracle = rt.forward(TEXTS, ["expert1", "expert0", "expert3", "expert2"])
    for row, text in enumerate(TEXTS):
        ref = main_output(model_with(base, {k: v.float() for k, v in want[row].items()}), tok,
                          text)
        assert_close(out.outputs[row], ref, rtol=1e-4, atol=1e-4)
        other = row ^ 1  # the oracle gave each row its neighbour's expert
        ref = main_output(model_with(base, {k: v.float() for k, v in want[other].items()}),
                          tok, text)
        assert_close(oracle.outputs[row], ref, rtol=1e-4, atol=1e-4)
    module = rt.as_module()  # token ids in, routed per row
    enc = tok([TEXTS[2]], return_tensors="pt")
    with torch.inference_mode():
        logits = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert_close(logits[0].float(), out.outputs[2], rtol=1e-4, atol=1e-4)
    from polymerge.cli import main

    assert main(["run", str(store), "apple pear", "--base", str(base),
                 "--max-new-tokens", "2"]) == 0
    assert main(["inspect", str(store)]) == 0
