"""The command line, in process through ``polymerge.cli.main`` (and once as a subprocess)."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ModelSet, leftovers, load_state, make_lora, ref_task_arithmetic

from polymerge.cli import build_parser, main
from polymerge.registry import method_names


def write_recipe(ms: ModelSet, path: Path, **extra: object) -> Path:
    data = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in ms.experts],
            **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``polymerge ARGS`` in process; (exit code, stdout, stderr) of that run alone."""
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("polymerge: error: "), stderr
    return lines[0]


def subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


# --------------------------------------------------------------------------- help


def test_help_as_subprocess():
    proc = subprocess.run([sys.executable, "-m", "polymerge.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("merge", "inspect", "methods"):
        assert command in proc.stdout


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "usage: polymerge" in capsys.readouterr().out


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: polymerge {command}")


def test_core_subcommands_present():
    assert {"merge", "inspect", "methods"} <= set(subcommands())


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


# --------------------------------------------------------------------------- methods


def test_methods_lists_every_method(capsys):
    code, out, _ = cli(capsys, "methods")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()
              and not line.startswith("*")}
    assert set(method_names()) <= listed
    for name in ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                 "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock"):
        assert name in listed
    assert re.search(r"parameters: .*density", out)
    assert "t=required" in out  # slerp's t has no default


# --------------------------------------------------------------------------- merge


def test_dry_run_prints_plan_and_writes_nothing(make_models, outs, capsys):
    ms = make_models("llama", 2)
    recipe = write_recipe(ms, ms.root / "r.yaml")
    before = ms.hashes()
    code, out, _ = cli(capsys, "merge", str(recipe), "-o", str(outs / "merged"), "--dry-run")
    assert code == 0
    assert "method: task_arithmetic" in out
    n = len(ms.base_state())
    assert f"tensors: {n} ({n} merged, 0 copied)" in out
    assert "output dtype: float32" in out
    assert "estimated peak memory" in out
    assert str(ms.experts[1]) in out
    assert leftovers(outs) == []
    assert ms.hashes() == before


def test_merge_writes(make_models, outs, capsys):
    ms = make_models("gpt2", 2)
    recipe = write_recipe(ms, ms.root / "r.yaml", parameters={"lambda": 1.5})
    target = outs / "merged"
    code, out, err = cli(capsys, "merge", str(recipe), "-o", str(target), "-q", "--dtype",
                         "bfloat16", "--shard-size", "12KB")
    assert code == 0, err
    assert f"wrote {target}" in out
    assert len(list(target.glob("model-*.safetensors"))) > 1
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [0.5, 0.5], 1.5)
    merged = load_state(target)
    for name, want in expected.items():
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], want.to(torch.bfloat16))
    assert leftovers(outs) == ["merged"]


def test_merge_force(make_models, outs, capsys):
    ms = make_models("llama", 1)
    recipe = write_recipe(ms, ms.root / "r.yaml")
    target = outs / "merged"
    assert cli(capsys, "merge", str(recipe), "-o", str(target), "-q")[0] == 0
    (target / "old.txt").write_text("old")  # --force replaces only polymerge's own outputs
    code, _, err = cli(capsys, "merge", str(recipe), "-o", str(target), "-q")
    assert code == 2
    line = error_line(err)
    assert "--force" in line
    assert (target / "old.txt").exists()
    assert cli(capsys, "merge", str(recipe), "-o", str(target), "-q", "--force")[0] == 0
    assert not (target / "old.txt").exists()
    assert (target / "model.safetensors").exists()


def test_merge_allow_pickle(make_models, outs, capsys):
    ms = make_models("llama", 1)
    pickled = ms.root / "pickled"
    pickled.mkdir()
    torch.save(ms.expert_states()[0], pickled / "pytorch_model.bin")
    recipe = ms.root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic",
                                      "base_model": str(ms.base),
                                      "models": [{"model": str(pickled)}]}))
    code, _, err = cli(capsys, "merge", str(recipe), "-o", str(outs / "m"), "-q")
    assert code == 2
    assert "--allow-pickle" in error_line(err)
    assert leftovers(outs) == []
    assert cli(capsys, "merge", str(recipe), "-o", str(outs / "m"), "-q",
               "--allow-pickle")[0] == 0
    merged = load_state(outs / "m")
    for name, want in ms.expert_states()[0].items():
        torch.testing.assert_close(merged[name], want)


@pytest.mark.parametrize("case", ["missing_recipe", "missing_model", "bad_param",
                                  "bad_dtype", "bad_shard"])
def test_errors_are_one_line_exit_2(make_models, outs, capsys, case):
    ms = make_models("llama", 1)
    recipe = write_recipe(ms, ms.root / "r.yaml")
    args = ["merge", str(recipe), "-o", str(outs / "m"), "-q"]
    fragment = {"missing_recipe": "does not exist", "missing_model": "ghost",
                "bad_param": "densty", "bad_dtype": "int3", "bad_shard": "size"}[case]
    if case == "missing_recipe":
        args[1] = str(ms.root / "nothing.yaml")
    elif case == "missing_model":
        write_recipe(ms, recipe)
        recipe.write_text(recipe.read_text().replace(str(ms.experts[0]),
                                                     str(ms.root / "ghost")))
    elif case == "bad_param":
        write_recipe(ms, recipe, parameters={"densty": 0.3})
    elif case == "bad_dtype":
        args += ["--dtype", "int3"]
    else:
        args += ["--shard-size", "huge"]
    code, _, err = cli(capsys, *args)
    assert code == 2
    line = error_line(err)
    assert fragment in line
    assert "Traceback" not in err
    assert leftovers(outs) == []


def test_debug_shows_traceback(make_models, outs, capsys):
    ms = make_models("llama", 1)
    recipe = write_recipe(ms, ms.root / "r.yaml", parameters={"densty": 0.3})
    code, _, err = cli(capsys, "--debug", "merge", str(recipe), "-o", str(outs / "m"), "-q")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("polymerge: error: ")
    assert "densty" in err.strip().splitlines()[-1]


def test_error_as_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "polymerge.cli", "merge",
                           str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    error_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("before", ["enabled", "disabled"])
def test_importing_polymerge_leaves_the_garbage_collector_as_it_found_it(before):
    """The package turns the collector off while it imports (start-up time) and back on only
    if it was on: a program that imports polymerge keeps collecting, or not, as it chose."""
    code = ("import gc\n"
            f"{'gc.disable()' if before == 'disabled' else ''}\n"
            "import polymerge\n"
            "print(gc.isenabled())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert proc.stdout.strip() == str(before == "enabled")


def test_the_command_exits_with_its_code_and_output_after_freezing(tmp_path, make_models):
    """``polymerge`` (the entry point ``run``) skips the last collection at exit, not the
    work: the merge is in place, the summary printed, and a failure still exits 2."""
    ms = make_models("llama", 2)
    recipe = write_recipe(ms, tmp_path / "r.yaml")
    proc = subprocess.run([sys.executable, "-m", "polymerge.cli", "merge", str(recipe), "-o",
                           str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'out'}" in proc.stdout
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [0.5, 0.5])
    merged = load_state(tmp_path / "out")
    for name, want in expected.items():
        torch.testing.assert_close(merged[name], want.to(merged[name].dtype))
    again = subprocess.run([sys.executable, "-m", "polymerge.cli", "merge", str(recipe), "-o",
                            str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2  # the output exists and --force was not given
    error_line(again.stderr)


# --------------------------------------------------------------------------- inspect


def _table(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\s+(layer \d+|other)\s+(\S+)\s+(\S+)\s*$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_inspect_checkpoint(make_models, capsys):
    ms = make_models("llama", 1)
    code, out, _ = cli(capsys, "inspect", str(ms.base))
    assert code == 0
    base = ms.base_state()
    assert "architecture: LlamaForCausalLM (model_type=llama)" in out
    assert f"tensors: {len(base)}" in out
    assert f"parameters: {sum(t.numel() for t in base.values()):,}" in out
    assert "model.layers.1.mlp.down_proj.weight" in out
    assert "float32" in out
    assert _table(out) == {}


def test_inspect_max_tensors(make_models, capsys):
    ms = make_models("bert", 0)
    n = len(ms.base_state())
    code, out, _ = cli(capsys, "inspect", str(ms.base), "--max-tensors", "5")
    assert code == 0
    assert f"... {n - 5} more" in out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inspect_with_base_prints_layer_delta_norms(make_models, capsys, arch):
    ms = make_models(arch, 1)
    code, out, _ = cli(capsys, "inspect", str(ms.experts[0]), "--base", str(ms.base))
    assert code == 0
    rows = _table(out)
    base, expert = ms.base_state(), ms.expert_states()[0]
    marker = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}."}[arch]
    assert sorted(rows) == ["layer 0", "layer 1", "layer 2", "other"]
    for i in range(3):
        names = [n for n in base if n.startswith(marker.format(i))]
        delta = math.sqrt(sum(float(((expert[n].double() - base[n].double()) ** 2).sum())
                              for n in names))
        size = math.sqrt(sum(float((base[n].double() ** 2).sum()) for n in names))
        norm, rel = rows[f"layer {i}"]
        assert norm == pytest.approx(delta, rel=1e-4)
        assert rel == pytest.approx(delta / size, rel=1e-4)
    others = [n for n in base if not any(n.startswith(marker.format(i)) for i in range(3))]
    delta = math.sqrt(sum(float(((expert[n].double() - base[n].double()) ** 2).sum())
                          for n in others))
    assert rows["other"][0] == pytest.approx(delta, rel=1e-4)


def test_inspect_lora_adapter_against_base(make_models, capsys):
    ms = make_models("llama", 0)
    lora = make_lora(ms, "adapter")
    code, out, _ = cli(capsys, "inspect", str(lora.adapter), "--base", str(ms.base))
    assert code == 0
    rows = _table(out)
    base = ms.base_state()
    for i in range(3):
        names = [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "v_proj")]
        delta = math.sqrt(sum(float(((lora.merged_state[n].double() - base[n].double()) ** 2)
                                    .sum()) for n in names))
        assert rows[f"layer {i}"][0] == pytest.approx(delta, rel=1e-4)
    assert rows["other"][0] == 0


def test_inspect_errors(make_models, tmp_path, capsys):
    code, _, err = cli(capsys, "inspect", str(tmp_path / "nothing"))
    assert code == 2
    assert "does not exist" in error_line(err)
    ms = make_models("llama", 0)
    other = make_models("llama", 0, hidden_size=32, name="big")
    code, _, err = cli(capsys, "inspect", str(other.base), "--base", str(ms.base))
    assert code == 2
    assert "shape" in error_line(err)
