"""Twin-Merging stores: exactness at full rank, reconstruction error against rank, accounting,
LoRA experts, export, CLI, the zoo path and refusals (the runtime serving them is tested in
test_runtime_mix.py and test_runtime_mixing_layers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_lora
from test_store_common import FAMILIES, make_family
from torch.testing import assert_close

import polymerge
from polymerge.cli import main as cli_main
from polymerge.errors import RecipeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.routing import LabelledTexts
from polymerge.stores import export_expert, open_store, piece_name
from polymerge.stores.twin import TwinStore, lowrank_svd_of_product, resolve_rank, truncated_svd

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


# ----------------------------------------------------------------------------- refusals


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
    assert_close(rt.forward(TEXTS[:1], "expert2").outputs[0], logits, rtol=1e-5, atol=1e-5)


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

