"""The one registry: every kind of method is listed, planned and dry-run the same way; a plugin
package adds a method through the ``polymerge.methods`` entry point group; CLI flags that every
command shares."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import load_state

import polymerge
from polymerge import registry
from polymerge.cli import main

PLUGIN = '''
import torch
from polymerge.methods.schema import MergeMethod, Param


def _keep_first(base, experts, *, generator, scale):
    return experts[0] * scale


METHOD = MergeMethod(name="plugin_keep_first", fn=_keep_first,
                     params=(Param("scale", float, default=1.0),),
                     description="test plugin: the first expert times scale")
'''


def _plugin_path(tmp_path: Path) -> Path:
    """A plugin distribution on a path: a module and its entry point metadata."""
    root = tmp_path / "site"
    (root / "pm_plugin").mkdir(parents=True)
    (root / "pm_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "pm_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pm-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[polymerge.methods]\nkeep_first = pm_plugin:METHOD\n")
    return root


def _run(args: list[str], *, env_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(env_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "polymerge.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_every_kind_is_in_one_registry() -> None:
    kinds = {m.name: m.kind for m in registry.all_methods()}
    assert kinds["ties"] == "tensor" and kinds["channel"] == "store"
    assert kinds["twin"] == "store"
    assert kinds["supermerge"] == "learned" and kinds["adamerging"] == "learned"
    with pytest.raises(polymerge.RecipeError, match="supermerge"):
        registry.get("no_such_method")
    with pytest.raises(polymerge.RecipeError, match="learned merge, not a per-tensor"):
        registry.get_tensor_method("supermerge")


def test_methods_lists_learned_and_stores(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("supermerge", "adamerging", "channel", "twin", "ties"):
        assert f"\n{name} " in f"\n{out}", name
    assert "[learned merge]" in out and "[expert store]" in out


def test_dry_run_of_a_learned_merge(make_models, tmp_path, capsys) -> None:
    ms = make_models("llama", 2)
    recipe = tmp_path / "learned.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "supermerge", "base_model": str(ms.base),
        "models": [{"model": str(e)} for e in ms.experts],
        "parameters": {"data": "cls", "granularity": "block"}}))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: supermerge" in out and "input expert1" in out
    assert not (tmp_path / "out").exists()
    # the learned schema is checked before anything is loaded
    bad = yaml.safe_load(recipe.read_text())
    bad["parameters"]["granularity"] = "row"
    recipe.write_text(yaml.safe_dump(bad))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"]) == 2
    assert "granularity 'row'" in capsys.readouterr().err


def test_store_dry_run_plans_against_its_schema(make_models, tmp_path) -> None:
    ms = make_models("llama", 3)
    plan = polymerge.dry_run({"merge_method": "channel", "base_model": str(ms.base),
                              "models": [{"model": str(e)} for e in ms.experts],
                              "parameters": {"groups": 2, "density": 0.5}})
    assert plan.schema.name == "channel"
    assert {"groups", "density", "group_method"} <= plan.schema.param_names
    assert all(job.params.get("density") == [0.5] * 3 for job in plan.jobs if job.merge)


def test_plugin_entry_point_adds_a_method(make_models, tmp_path) -> None:
    site = _plugin_path(tmp_path)
    listed = _run(["methods"], env_path=site)
    assert listed.returncode == 0, listed.stderr
    assert "plugin_keep_first" in listed.stdout
    ms = make_models("llama", 2)
    recipe = tmp_path / "plugin.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "plugin_keep_first", "base_model": str(ms.base),
        "models": [{"model": str(e)} for e in ms.experts], "parameters": {"scale": 2.0}}))
    done = _run(["merge", str(recipe), "-o", str(tmp_path / "merged"), "-q"], env_path=site)
    assert done.returncode == 0, done.stderr
    merged, first = load_state(tmp_path / "merged"), load_state(ms.experts[0])
    for name, tensor in first.items():
        expected = tensor * 2.0 if tensor.is_floating_point() else tensor
        assert (merged[name] == expected.to(merged[name].dtype)).all(), name
    # without the plugin on the path the method is unknown, with a one-line error
    missing = _run(["merge", str(recipe), "-o", str(tmp_path / "m2")])
    assert missing.returncode == 2
    assert "unknown merge_method 'plugin_keep_first'" in missing.stderr


def test_debug_after_the_subcommand_and_version(tmp_path, capsys) -> None:
    args = ["merge", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")]
    assert main([*args, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"polymerge {polymerge.__version__}"
