"""Channel Merging stores: exactness (K = 1, K = N), clustering, index dtype, accounting,
export, save/load, and refusal of broken or future stores."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_store_common import make_family, recipe
from torch.testing import assert_close

import polymerge
from polymerge.cli import main as cli_main
from polymerge.errors import CheckpointError, RecipeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.stores import MANIFEST_NAME, PIECES_DIR, export_expert, open_store, read_manifest
from polymerge.stores.channel import (
    _exact_kmeans,
    _kernel_kmeans,
    cluster_rows,
    index_dtype,
    partitions,
    row_gram,
    stirling2,
)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def store2(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, experts = family
    out = tmp_path_factory.mktemp("stores") / "k2"
    polymerge.merge(recipe(base, experts, preset="paper"), out, progress=False)
    return out


def _read(path: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    try:
        return {n: ckpt.read(n) for n in ckpt.tensors()}
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method,params", [
    ("ties", {}),
    ("dare_ties", {}),
    ("task_arithmetic", {}),
    ("dare_linear", {"density": 0.5, "lambda": 0.8}),
])
def test_k1_equals_plain_merge(family, tmp_path, method, params):
    base, experts = family
    out = tmp_path / "k1"
    polymerge.merge(recipe(base, experts, groups=1, group_method=method, others="merged",
                           preset="paper", **params), out, progress=False)
    store = open_store(out)
    b = _read(base)
    ex = [_read(e) for e in experts]
    inner = {"density": 0.7, "lambda": 0.5} if method != "task_arithmetic" else {"lambda": 0.5}
    inner.update(params)
    kinds = set()
    for name, entry in store.entries.items():
        if not entry.dtype.is_floating_point:
            continue
        kinds.add(entry.kind)
        ref = polymerge.merge_tensors(method, b[name], [e[name] for e in ex], _name=name,
                                      **inner)
        for i in range(len(experts)):  # every expert looks up the same single group
            assert torch.equal(store.tensor(name, i), ref), (method, name)
    assert kinds == {"channel", "merged"}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_k_equals_n_rebuilds_every_expert(family, tmp_path, method):
    base, experts = family
    out = tmp_path / "kn"
    polymerge.merge(recipe(base, experts, groups=len(experts), group_method=method,
                           density=1.0, **{"lambda": 1.0}) if method != "task_arithmetic"
                    else recipe(base, experts, groups=len(experts), group_method=method,
                                **{"lambda": 1.0}), out, progress=False)
    store = open_store(out)
    for i, e in enumerate(experts):
        want = _read(e)
        got = store.expert_state_dict(e.name)
        assert set(got) == set(want)
        for name in want:
            assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
            assert got[name].dtype == want[name].dtype
        assert store.expert_index(e.name) == i


def test_k_equals_n_is_bit_exact_in_bfloat16(tmp_path):
    base, experts = make_family(tmp_path, "llama", n=3, dtype=torch.bfloat16)
    out = tmp_path / "kn"
    polymerge.merge(recipe(base, experts, groups=3, density=1.0, **{"lambda": 1.0}), out,
                    progress=False)
    store = open_store(out)
    assert store.dtype == torch.bfloat16
    for e in experts:
        want = _read(e)
        got = store.expert_state_dict(e.name)
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_build_is_deterministic_for_a_seed(family, tmp_path):
    base, experts = family
    pieces = []
    for run in range(2):
        out = tmp_path / f"s{run}"
        polymerge.merge(recipe(base, experts, group_method="dare_ties") | {"seed": 7}, out,
                        progress=False)
        pieces.append(open_store(out).pieces)
    assert pieces[0].keys() == pieces[1].keys()
    for k in pieces[0]:
        assert torch.equal(pieces[0][k], pieces[1][k]), k


# ----------------------------------------------------------------------------- clustering


def _brute_force(gram: torch.Tensor, k: int) -> list[float]:
    """Best k-means objective per row by enumerating label tuples in pure Python."""
    rows, n, _ = gram.shape
    best = []
    for r in range(rows):
        g = gram[r].tolist()
        top = -1e30
        for labels in itertools.product(range(k), repeat=n):
            if len(set(labels)) != k:
                continue
            score = 0.0
            for c in range(k):
                members = [i for i in range(n) if labels[i] == c]
                score += sum(g[i][j] for i in members for j in members) / len(members)
            top = max(top, score)
        best.append(top)
    return best


def _objective(gram: torch.Tensor, assign: torch.Tensor, k: int) -> list[float]:
    out = []
    for r in range(gram.shape[0]):
        g = gram[r].tolist()
        labels = assign[:, r].tolist()
        score = 0.0
        for c in range(k):
            members = [i for i in range(len(labels)) if labels[i] == c]
            if members:
                score += sum(g[i][j] for i in members for j in members) / len(members)
        out.append(score)
    return out


@pytest.mark.parametrize("n,k", [(4, 2), (5, 3), (6, 2)])
def test_exact_clustering_finds_the_kmeans_optimum(n, k):
    deltas = torch.randn(n, 40, 12, generator=torch.Generator().manual_seed(n * 10 + k))
    for similarity in ("cosine", "euclidean"):
        gram = row_gram(deltas, similarity)
        assign = cluster_rows(deltas, k, similarity)
        assert assign.shape == (n, 40)
        assert_close(torch.tensor(_objective(gram, assign, k)),
                     torch.tensor(_brute_force(gram, k)), rtol=1e-5, atol=1e-5)
        # every group is used on every row
        for r in range(40):
            assert set(assign[:, r].tolist()) == set(range(k))


def test_partitions_and_stirling_numbers():
    assert stirling2(4, 2) == 7 and stirling2(6, 3) == 90 and stirling2(5, 5) == 1
    p = partitions(4, 2)
    assert p.shape == (7, 4)
    assert p[0].tolist() == [0, 0, 0, 1]  # lexicographic, first expert always in group 0
    assert all(row[0] == 0 for row in p.tolist())


def test_clustering_recovers_families_and_separates_by_similarity():
    g = torch.Generator().manual_seed(0)
    rows, cols = 64, 24
    a, b = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    # experts 0, 2 point along a (different magnitudes), 1, 3 along b
    deltas = torch.stack([a, b, 5 * a, 5 * b]) + 0.01 * torch.randn(4, rows, cols, generator=g)
    cos = cluster_rows(deltas, 2, "cosine")
    assert (cos[0] == cos[2]).all() and (cos[1] == cos[3]).all() and (cos[0] != cos[1]).all()
    # Euclidean k-means cares about magnitude: the two large deltas are far from the small ones
    euc = cluster_rows(deltas, 2, "euclidean")
    assert (euc[0] == euc[1]).all() and (euc[2] != euc[0]).any()


def test_kernel_kmeans_fallback_for_many_experts():
    g = torch.Generator().manual_seed(3)
    n, rows, cols = 12, 32, 16
    centers = torch.randn(3, rows, cols, generator=g) * 3
    truth = [i % 3 for i in range(n)]
    deltas = torch.stack([centers[t] for t in truth]) + 0.1 * torch.randn(n, rows, cols,
                                                                           generator=g)
    assert stirling2(n, 3) > 4096  # the exact search is skipped
    assign = cluster_rows(deltas, 3, "cosine")
    for r in range(rows):
        labels = assign[:, r].tolist()
        for i in range(n):
            for j in range(n):
                assert (labels[i] == labels[j]) == (truth[i] == truth[j])
    # the fallback agrees with the exact search on a small case
    small = torch.randn(5, 20, 8, generator=g)
    gram = row_gram(small, "cosine")
    exact = _objective(gram, _exact_kmeans(gram, 2), 2)
    approx = _objective(gram, _kernel_kmeans(gram, 2), 2)
    assert sum(approx) >= 0.9 * sum(exact)


def test_index_dtype_and_shapes(store2, family):
    _, experts = family
    store = open_store(store2)
    assert index_dtype(2) == torch.uint8 and index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16 and index_dtype(40000) == torch.int32
    name = "model.layers.0.mlp.up_proj.weight"
    entry = store.entries[name]
    assert entry.kind == "channel"
    idx = store.pieces[f"{name}@index"]
    assert idx.dtype == torch.uint8 and tuple(idx.shape) == (len(experts), entry.shape[0])
    assert tuple(store.pieces[f"{name}@groups"].shape) == (2, *entry.shape)
    assert int(idx.max()) <= 1
    # families (0, 1) and (2, 3) share groups on every channel of this synthetic set
    assert (idx[0] == idx[1]).all() and (idx[2] == idx[3]).all() and (idx[0] != idx[2]).all()
    # instant lookup is a gather of rows
    groups = store.pieces[f"{name}@groups"]
    rows = torch.arange(entry.shape[0])
    assert torch.equal(store.tensor(name, 2), groups[idx[2].long(), rows])


# ----------------------------------------------------------------------------- accounting


def test_parameter_accounting_by_hand(store2, family):
    base, experts = family
    n = len(experts)
    store = open_store(store2)
    infos = open_checkpoint(base).tensors()
    model = sum(i.numel for i in infos.values())
    channel = sum(i.numel for name, i in infos.items()
                  if ".layers." in name and len(i.shape) == 2)
    others = model - channel
    rows = sum(i.shape[0] for name, i in infos.items()
               if ".layers." in name and len(i.shape) == 2)
    counts = store.parameter_counts()
    assert counts["model"] == model
    assert counts["ensemble"] == n * model
    assert counts["stored"] == 2 * channel + n * others
    assert store.stored_parameters() == 2 * channel + n * others
    assert counts["index_entries"] == n * rows and counts["index_bytes"] == n * rows
    assert counts["ratio"] == pytest.approx((2 * channel + n * others) / (n * model))
    assert read_manifest(store2)["parameter_counts"]["stored"] == counts["stored"]
    # bytes held in memory = stored float32 numbers + one byte per index entry
    assert store.nbytes() == 4 * counts["stored"] + counts["index_bytes"]


def test_default_preset_keeps_half_at_n4(family, tmp_path):
    """No parameters: K = half the experts, every 2-D weight channel-merged, lambda 1 with the
    group mean; the paper's setting stays one parameter away."""
    from polymerge.stores.channel import resolve_groups

    base, experts = family
    out = tmp_path / "defaults"
    polymerge.merge(recipe(base, experts), out, progress=False)
    store = open_store(out)
    p = store.manifest["parameters"]
    assert (p["preset"], p["groups"], p["scope"], p["lambda"], p["density"], p["normalize"]) \
        == ("polymerge", 0.5, ".", 1.0, 0.7, True)
    assert store.summary["rows_by_groups"].keys() == {"2"}
    assert store.entries["model.embed_tokens.weight"].kind == "channel"
    counts = store.parameter_counts()
    assert 0.5 < counts["ratio"] <= 0.55
    paper = tmp_path / "paper"
    polymerge.merge(recipe(base, experts, preset="paper"), paper, progress=False)
    p = open_store(paper).manifest["parameters"]
    assert (p["groups"], p["lambda"], p["density"]) == (2, 0.5, 0.7)
    assert open_store(paper).entries["model.embed_tokens.weight"].kind == "expert"
    assert open_store(paper).parameter_counts()["ratio"] > 0.6
    # K from a fraction: rounded up, at least 1
    assert [resolve_groups(0.5, n) for n in (1, 2, 3, 4, 5, 6)] == [1, 1, 2, 2, 3, 3]
    assert resolve_groups(0.01, 6) == 1 and resolve_groups(3, 6) == 3
    with pytest.raises(RecipeError, match="neither a fraction"):
        resolve_groups(2.5, 6)


def test_half_the_ensemble_at_n4_k2(family, tmp_path):
    """Every 2-D weight channel-merged, norms kept per expert: the paper's ~53% regime."""
    base, experts = family
    out = tmp_path / "half"
    polymerge.merge(recipe(base, experts, scope="."), out, progress=False)
    counts = open_store(out).parameter_counts()
    assert 0.5 < counts["ratio"] <= 0.53
    assert set(counts["stored_by_kind"]) == {"channel", "expert"}


# ----------------------------------------------------------------------------- I/O, CLI


def test_export_writes_a_standalone_checkpoint(store2, tmp_path):
    store = open_store(store2)
    out = export_expert(store, "expert1", tmp_path / "e1")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    got = _read(out)
    want = store.expert_state_dict("expert1")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k])
    # the CLI does the same, and inspect describes the store
    assert cli_main(["export", str(store2), "--expert", "expert2", "-o",
                     str(tmp_path / "e2")]) == 0
    assert torch.equal(_read(tmp_path / "e2")["model.layers.1.self_attn.q_proj.weight"],
                       store.tensor("model.layers.1.self_attn.q_proj.weight", "expert2"))


def test_cli_inspect_and_dry_run(store2, family, tmp_path, capsys):
    assert cli_main(["inspect", str(store2)]) == 0
    text = capsys.readouterr().out
    assert "expert store: channel" in text and "of the ensemble" in text
    assert "expert0, expert1, expert2, expert3" in text
    base, experts = family
    rec = tmp_path / "r.yaml"
    import yaml

    rec.write_text(yaml.safe_dump(recipe(base, experts, groups=3)))
    assert cli_main(["merge", str(rec), "-o", str(tmp_path / "x"), "--dry-run"]) == 0
    assert "method: channel" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


def test_unknown_expert_is_named(store2):
    with pytest.raises(polymerge.PolymergeError, match="experts: expert0"):
        open_store(store2).expert_state_dict("nope")


# ----------------------------------------------------------------------------- refusals


def test_future_format_version_is_refused(store2, tmp_path):
    copy = tmp_path / "future"
    shutil.copytree(store2, copy)
    man = json.loads((copy / MANIFEST_NAME).read_text())
    man["format_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        open_store(copy)


def test_missing_file_is_refused(store2, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(store2, copy)
    (copy / PIECES_DIR / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete: pieces/model.safetensors is missing"):
        open_store(copy)


def test_missing_piece_is_refused(store2, tmp_path):
    copy = tmp_path / "broken2"
    shutil.copytree(store2, copy)
    man = json.loads((copy / MANIFEST_NAME).read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    man["tensors"][name]["pieces"]["extra@piece"] = {"shape": [1], "dtype": "float32"}
    (copy / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="piece 'extra@piece'"):
        open_store(copy)


def test_not_a_store(tmp_path):
    with pytest.raises(CheckpointError, match="not an expert store"):
        open_store(tmp_path)


@pytest.mark.parametrize("params,match", [
    ({"groups": 5}, "exceeds the number of experts"),
    ({"groups": 0}, "outside"),
    ({"groups": 1.5}, "neither a fraction"),
    ({"preset": "fast"}, "preset must be one of"),
    ({"group_method": "slerp"}, "not supported"),
    ({"similarity": "manhattan"}, "similarity must be one of"),
    ({"others": "drop"}, "others must be one of"),
    ({"scope": "(unclosed"}, "not a valid regular expression"),
    ({"density": 1.5}, "outside"),
    ({"epsilon": 0.1}, "no parameter 'epsilon'"),
])
def test_bad_recipes_are_refused_before_any_tensor(family, tmp_path, params, match):
    base, experts = family
    with pytest.raises(RecipeError, match=match):
        polymerge.merge(recipe(base, experts, **params), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def _ref_group_ties(base, experts, assign, k, density, lam):  # type: ignore[no-untyped-def]
    """Independent TIES-within-groups: trim each delta over the whole tensor (top-k magnitude),
    then per row and group elect a sign and take the disjoint mean, with Python loops."""
    rows, cols = base.shape
    trimmed = []
    for e in experts:
        d = (e - base).reshape(-1).tolist()
        keep = max(1, int(density * len(d)))
        order = sorted(range(len(d)), key=lambda i: -abs(d[i]))[:keep]
        kept = set(order)
        trimmed.append([d[i] if i in kept else 0.0 for i in range(len(d))])
    out = torch.empty(k, rows, cols)
    for g in range(k):
        for r in range(rows):
            members = [n for n in range(len(experts)) if int(assign[n, r]) == g]
            for c in range(cols):
                vals = [trimmed[n][r * cols + c] for n in members]
                sign = 1.0 if sum(vals) >= 0 else -1.0
                agree = [v for v in vals if v != 0 and (v > 0) == (sign > 0)]
                mean = sum(agree) / len(agree) if agree else 0.0
                out[g, r, c] = float(base[r, c]) + lam * mean
    return out


def test_group_merge_against_a_per_row_reference(monkeypatch):
    from polymerge.methods.sparsify import Sparsification
    from polymerge.stores import channel

    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 5, generator=g)
    experts = [base + torch.randn(6, 5, generator=g) for _ in range(4)]
    assign = cluster_rows(torch.stack([e - base for e in experts]), 2)
    kw = dict(sparsification=Sparsification.magnitude, consensus=True, density=0.6,
              normalize=True, lam=0.5)
    got = channel.group_merge(base, experts, assign, 2, **kw)
    assert_close(got, _ref_group_ties(base, experts, assign, 2, 0.6, 0.5), rtol=1e-5,
                 atol=1e-6)
    monkeypatch.setattr(channel, "MAX_PATTERNS", 0)  # the per-group mask path
    assert torch.equal(channel.group_merge(base, experts, assign, 2, **kw), got)
