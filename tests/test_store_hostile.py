"""Tampered and hostile stores: names that are paths, pieces that disagree with the manifest,
outputs that overlap the store. Each fails with one line and touches nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tree_hashes
from safetensors.torch import load_file, save_file

import polymerge
from polymerge.cli import main
from polymerge.stores import MANIFEST_NAME, PIECES_DIR, export_expert, open_store


@pytest.fixture
def store(make_models, tmp_path) -> Path:
    ms = make_models("llama", 2)
    return polymerge.merge({"merge_method": "channel", "base_model": str(ms.base),
                            "models": [{"model": str(e), "name": f"e{i}"}
                                       for i, e in enumerate(ms.experts)],
                            "parameters": {"groups": 1}}, tmp_path / "store", progress=False)


def _edit_manifest(store: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    edit(manifest)
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def test_expert_name_that_is_a_path_is_refused_at_open(store, tmp_path, capsys):
    victim = tmp_path / "victim_a"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    before = tree_hashes(victim)
    bad = _edit_manifest(store, tmp_path, lambda m: m["experts"].__setitem__(0, "../../victim_a"))
    out = tmp_path / "out" / "sub"
    code = main(["export", str(bad), "--expert", "all", "-o", str(out), "--force"])
    assert code == 2
    assert "not a plain name" in capsys.readouterr().err
    assert tree_hashes(victim) == before
    assert not out.exists()


def test_expert_name_that_is_a_path_is_refused_at_build(make_models, tmp_path):
    ms = make_models("llama", 1)
    with pytest.raises(polymerge.PolymergeError, match="not a plain name"):
        polymerge.merge({"merge_method": "channel", "base_model": str(ms.base),
                         "models": [{"model": str(ms.experts[0]), "name": "../x"}]},
                        tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("tensors"), "no tensors"),
    (lambda m: m.__setitem__("tensors", {"w": 3}), "malformed entry"),
    (lambda m: m["files"].append("../../etc/passwd"), "not inside pieces/"),
    (lambda m: m.__setitem__("experts", "e0"), "no experts"),
    (lambda m: m.__setitem__("experts", ["e0", "e0"]), "twice"),
])
def test_malformed_manifest_is_one_line(store, tmp_path, edit, message):
    bad = _edit_manifest(store, tmp_path, edit)
    with pytest.raises(polymerge.PolymergeError, match=message):
        open_store(bad)


def _rewrite_piece(store: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "altered"
    shutil.copytree(store, copy)
    file = next((copy / PIECES_DIR).glob("*.safetensors"))
    pieces = load_file(str(file))
    name = next(n for n in pieces if n.endswith("@groups"))
    pieces[name] = change(pieces[name])
    save_file(pieces, str(file))
    return copy


def test_piece_with_another_shape_is_refused(store, tmp_path):
    bad = _rewrite_piece(store, tmp_path, lambda t: t[..., :1].contiguous())
    with pytest.raises(polymerge.PolymergeError, match="the store was altered"):
        open_store(bad)


def test_piece_holding_nan_is_refused(store, tmp_path):
    bad = _rewrite_piece(store, tmp_path, lambda t: t * float("nan"))
    with pytest.raises(polymerge.PolymergeError, match="NaN or Inf"):
        open_store(bad)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_export_into_the_store_is_refused(store, where):
    before = tree_hashes(store)
    target = store if where == "same" else store / PIECES_DIR / "x"
    with pytest.raises(polymerge.PolymergeError, match="overlaps the store"):
        export_expert(store, "e0", target, force=True)
    assert tree_hashes(store) == before
