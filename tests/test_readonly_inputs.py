"""Every command that reads inputs, run against a read-only copy of them (issue 14): nothing
outside the output it names changes. The inputs are ``chmod -R a-w``, and since the tests may
run as root (who ignores modes), every file is also hashed, and every entry listed, before and
after each command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import _perturb, build_model, make_lora, tree_hashes, write_tokenizer

import polymerge
from polymerge.cli import main
from polymerge.routing import read_labelled_jsonl
from polymerge.runtime import train_store_router

pytestmark = pytest.mark.filterwarnings("ignore")


class Family:
    """What make_lora needs of conftest's ModelSet: a base folder and a loader."""

    arch = "llama"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "base"

    def load(self, folder: Path) -> Any:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(folder).eval()


def build_inputs(root: Path) -> dict[str, Path]:
    """Base, two experts, a LoRA adapter, a pickled checkpoint, recipes (static and store), a
    channel store with a router, labelled data and an empty zoo cache, all under ``root``."""
    model = build_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "base")
        write_tokenizer(root / "base", "base")
        experts = []
        for i in range(2):
            model.load_state_dict(state)
            _perturb(model, i + 1, 0.05)
            model.save_pretrained(root / f"e{i}")
            write_tokenizer(root / f"e{i}", f"e{i}")
            experts.append(root / f"e{i}")
    lora = make_lora(Family(root), "lora").adapter  # type: ignore[arg-type]
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "base" / "config.json", pickled / "config.json")
    torch.save(state, pickled / "pytorch_model.bin")
    models = [{"model": str(e), "name": e.name} for e in experts]
    recipe = root / "ta.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(root / "base"),
        "models": [{"model": str(experts[0]), "parameters": {"weight": 0.5}},
                   {"model": str(lora), "parameters": {"weight": 0.5}}]}))
    store_recipe = root / "store.yaml"
    store_recipe.write_text(yaml.safe_dump({"merge_method": "channel",
                                            "base_model": str(root / "base"), "models": models,
                                            "parameters": {"groups": 1}}))
    store = polymerge.merge(store_recipe, root / "store", progress=False)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"tok{3 * j + i} tok{3 * j + i + 1}",
                                        "expert": f"e{i}"}) + "\n"
                            for j in range(8) for i in range(2)))
    train_store_router(store, read_labelled_jsonl(data), base=root / "base", max_epochs=5,
                       patience=5)
    (root / "zoo").mkdir()
    return {"base": root / "base", "e0": experts[0], "lora": lora, "pickled": pickled,
            "recipe": recipe, "store_recipe": store_recipe, "store": store, "data": data,
            "zoo": root / "zoo"}


def listing(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: files by content hash, the rest by kind and mode."""
    out: dict[str, Any] = dict(tree_hashes(root))
    for p in root.rglob("*"):
        if not p.is_file() or p.is_symlink():
            st = p.lstat()
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o777)
    return out


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP
                                                                | stat.S_IWOTH))


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    set_writable(root, False)
    try:
        yield
    finally:
        set_writable(root, True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("readonly_inputs"))


def cli(*argv: Any) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def commands(f: dict[str, Path], out: Path) -> list[tuple[list[Any], Path | None]]:
    """(argv, the output it names: None when it writes nothing)."""
    return [
        (["methods"], None),
        (["merge", f["recipe"], "-o", out / "merged", "-q"], out / "merged"),
        (["merge", f["recipe"], "-o", out / "dry", "--dry-run"], None),
        (["merge", f["store_recipe"], "-o", out / "store2", "-q"], out / "store2"),
        (["inspect", f["e0"], "--base", f["base"]], None),
        (["inspect", f["lora"], "--base", f["base"]], None),
        (["inspect", f["pickled"], "--allow-pickle"], None),
        (["inspect", f["store"]], None),
        (["export", f["store"], "--expert", "e0", "-o", out / "exported"], out / "exported"),
        (["export", f["store"], "--expert", "all", "-o", out / "all"], out / "all"),
        (["run", f["store"], "tok1 tok2", "--expert", "e1", "--max-new-tokens", 2], None),
        (["run", f["store"], "tok1 tok2", "tok4 tok5", "--base", f["base"], "--json"], None),
        (["run", f["store"], "tok1", "--base", f["pickled"], "--allow-pickle"], None),
        (["eval", f["e0"], "--data", f["data"], "-q"], None),
        (["eval", f["store"], "--data", f["data"], "--base", f["base"], "--experts",
          f"e0={f['e0']}", "--json", out / "scores.json", "-q"], out / "scores.json"),
        (["zoo", "list", "--cache", f["zoo"]], None),
        (["zoo", "path", "cls", "--cache", f["zoo"]], None),
    ]


def test_commands_change_nothing_but_their_output(inputs, tmp_path):
    root = inputs["base"].parent
    out = tmp_path / "outs"
    out.mkdir()
    with read_only(root):
        before = listing(root)
        for argv, target in commands(inputs, out):
            rc, err = cli(*argv)
            assert rc == 0, (argv, err)
            assert listing(root) == before, argv
            made = sorted(p.name for p in out.iterdir())
            assert made == sorted({t.name for _, t in commands(inputs, out)
                                   if t is not None and t.exists()}), (argv, made)
            if target is not None and target.suffix != ".json":
                assert (target / ".polymerge-output").is_file() or target.name == "all"


def test_router_train_writes_only_the_router(inputs, tmp_path):
    """``router train`` writes into the store it names (``STORE/router``) and nothing else;
    its other inputs (data, base) are read-only."""
    root = inputs["base"].parent
    store = Path(shutil.copytree(inputs["store"], tmp_path / "store"))
    kept = {k: v for k, v in listing(store).items() if not k.startswith("router")}
    with read_only(root):
        before = listing(root)
        rc, err = cli("router", "train", store, "--data", inputs["data"], "--base",
                      inputs["base"], "--epochs", 3)
        assert rc == 0, err
        assert listing(root) == before
    after = listing(store)
    assert {k: v for k, v in after.items() if not k.startswith("router")} == kept
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert sorted(os.listdir(store / "router")) == ["router.json", "router.safetensors"]
