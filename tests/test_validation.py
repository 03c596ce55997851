"""Every bad input fails with a PolymergeError naming the model (and tensor) at fault, before
anything is written, and leaves no output nor temporary folder behind."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelSet, leftovers, load_state, ref_task_arithmetic, tree_hashes
from safetensors.torch import save_file

import polymerge
from polymerge import dry_run, registry
from polymerge.errors import CheckpointError, PolymergeError, RecipeError

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def run(recipe: Any, out: Path, **kw: Any) -> Path:
    return polymerge.merge(recipe, out, progress=False, **kw)


def ta(ms: ModelSet, experts: list[Path | str] | None = None, **extra: Any) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(ms.base),
            "models": [{"model": str(e)} for e in (experts or ms.experts)], **extra}


def variant(ms: ModelSet, name: str, mutate: Callable[[dict[str, torch.Tensor]], None] | None,
            config: Callable[[dict], None] | None = None) -> Path:
    """A copy of expert0 with its state dict (and config) changed."""
    folder = ms.root / name
    folder.mkdir()
    state = dict(ms.expert_states()[0])
    if mutate is not None:
        mutate(state)
    save_file(state, folder / "model.safetensors")
    cfg = json.loads((ms.experts[0] / "config.json").read_text())
    if config is not None:
        config(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def expect_error(recipe: Any, outs: Path, *fragments: str, kind: type = PolymergeError,
                 **kw: Any) -> str:
    """The merge fails with ``kind`` whose message holds every fragment; nothing is left."""
    with pytest.raises(kind) as info:
        run(recipe, outs / "merged", **kw)
    assert isinstance(info.value, PolymergeError)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert "\n" not in msg
    assert leftovers(outs) == []
    return msg


# --------------------------------------------------------------------------- inputs


def test_missing_path(make_models, outs):
    ms = make_models("llama", 1)
    expect_error(ta(ms, [ms.experts[0], ms.root / "nope"]), outs, "nope", "does not exist",
                 kind=CheckpointError)
    expect_error({**ta(ms), "base_model": str(ms.root / "nobase")}, outs, "base_model",
                 "does not exist", kind=CheckpointError)


def test_missing_tensor(make_models, outs):
    ms = make_models("llama", 1)
    bad = variant(ms, "holey", lambda s: s.pop(UP1))
    expect_error(ta(ms, [ms.experts[0], bad]), outs, "holey", UP1, "missing",
                 kind=CheckpointError)


def test_extra_tensor(make_models, outs):
    ms = make_models("llama", 1)
    bad = variant(ms, "extra", lambda s: s.__setitem__("model.bonus.weight", torch.ones(3)))
    expect_error(ta(ms, [bad]), outs, "extra", "model.bonus.weight", kind=CheckpointError)


def test_shape_mismatch(make_models, outs):
    ms = make_models("llama", 1)
    bad = variant(ms, "wide", lambda s: s.__setitem__(Q0, torch.zeros(16, 8)))
    expect_error(ta(ms, [bad]), outs, "wide", Q0, "[16, 8]", "[16, 16]", kind=CheckpointError)


def test_dtype_mismatch(make_models, outs):
    ms = make_models("llama", 1)
    bad = variant(ms, "halfway", lambda s: s.__setitem__(UP1, s[UP1].half()))
    expect_error(ta(ms, [bad]), outs, "halfway", UP1, "float16", "float32",
                 kind=CheckpointError)


def test_different_hidden_size(make_models, outs):
    ms = make_models("llama", 1)
    other = make_models("llama", 0, hidden_size=32, intermediate_size=32, name="big")
    expect_error(ta(ms, [other.base]), outs, "hidden_size", "32", "16", "architectures",
                 kind=CheckpointError)


def test_different_model_type(make_models, outs):
    ms = make_models("llama", 1)
    other = make_models("gpt2", 0, name="gpt")
    msg = expect_error(ta(ms, [ms.experts[0], other.base]), outs, "architectures",
                       kind=CheckpointError)
    assert "model base" in msg  # the offending model's name (gpt/base)


def test_different_vocab_size_config(make_models, outs):
    ms = make_models("llama", 1)
    other = make_models("llama", 0, vocab_size=80, name="bigvocab")
    msg = expect_error(ta(ms, [other.base]), outs, "vocabulary", "80", "64",
                       kind=CheckpointError)
    assert "base" in msg


def test_different_vocab_rows_without_config(make_models, tmp_path, outs):
    """Bare files: the embedding's row count tells the vocabularies apart."""
    ms = make_models("llama", 1)
    big = make_models("llama", 0, vocab_size=80, name="bigvocab")
    base_file, big_file = tmp_path / "b.safetensors", tmp_path / "wide.safetensors"
    save_file(ms.base_state(), base_file)
    save_file(big.base_state(), big_file)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base_file),
              "models": [{"model": str(big_file)}]}
    msg = expect_error(recipe, outs, "wide.safetensors", "vocabulary", "80", "64",
                       kind=CheckpointError)
    assert "lm_head.weight" in msg or "model.embed_tokens.weight" in msg


def test_lora_without_base(make_models, outs):
    ms = make_models("llama", 0)
    from conftest import make_lora

    lora = make_lora(ms, "adapter")
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ms.base), "parameters": {"weight": 1.0}},
                         {"model": str(lora.adapter), "parameters": {"weight": 1.0}}]}
    expect_error(recipe, outs, "adapter", "LoRA", "base_model", kind=CheckpointError)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1])
def test_density_out_of_range(make_models, outs, density):
    ms = make_models("llama", 2)
    recipe = ta(ms, merge_method="dare_ties")
    recipe["models"][1]["parameters"] = {"density": density}
    recipe["parameters"] = {"density": 0.5}
    expect_error(recipe, outs, "expert1", "density", "(0, 1]", kind=RecipeError)


def test_density_out_of_range_globally_and_in_a_gradient(make_models, outs):
    ms = make_models("llama", 2)
    expect_error({**ta(ms, merge_method="ties"), "parameters": {"density": 1.5}}, outs,
                 "density", kind=RecipeError)
    expect_error({**ta(ms, merge_method="ties"), "parameters": {"density": [0.5, 1.2]}},
                 outs, "density", "1.2", kind=RecipeError)
    expect_error({**ta(ms, merge_method="ties"),
                  "parameters": {"density": [{"filter": "mlp", "value": 0.0},
                                             {"value": 0.5}]}},
                 outs, "density", kind=RecipeError)


def test_linear_weights_all_zero(make_models, outs):
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(e), "parameters": {"weight": 0.0}} for e in ms.experts]}
    expect_error(recipe, outs, "linear", "sum to 0", kind=RecipeError)


def test_linear_weights_cancelling_fail_cleanly(make_models, outs):
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ms.experts[0]), "parameters": {"weight": 1.0}},
                         {"model": str(ms.experts[1]), "parameters": {"weight": -1.0}}]}
    expect_error(recipe, outs, "linear", kind=RecipeError)
    # without normalization a zero sum is fine: e0 - e1
    recipe["parameters"] = {"normalize": False}
    merged = load_state(run(recipe, outs / "ok"))
    e0, e1 = ms.expert_states()
    for name in e0:
        torch.testing.assert_close(merged[name], e0[name] - e1[name])


def test_linear_weights_cancelling_caught_before_any_tensor(make_models):
    """A plan whose linear weights sum to 0 must be rejected by validation (dry run), like an
    all-zero one, rather than mid-merge after the output was started."""
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ms.experts[0]), "parameters": {"weight": 1.0}},
                         {"model": str(ms.experts[1]), "parameters": {"weight": -1.0}}]}
    with pytest.raises(RecipeError, match="sum"):
        dry_run(recipe)


def test_slerp_with_three_models(make_models, outs):
    ms = make_models("llama", 3)
    expect_error({**ta(ms, merge_method="slerp"), "parameters": {"t": 0.5}}, outs, "slerp",
                 "at most 1", "3", kind=RecipeError)


def test_slerp_t_out_of_range_and_missing(make_models, outs):
    ms = make_models("llama", 1)
    expect_error({**ta(ms, merge_method="slerp"), "parameters": {"t": 1.5}}, outs, "'t'",
                 kind=RecipeError)
    expect_error(ta(ms, merge_method="slerp"), outs, "'t'", "required", kind=RecipeError)


def test_missing_base_for_base_method(make_models, outs):
    ms = make_models("llama", 1)
    recipe = ta(ms)
    del recipe["base_model"]
    expect_error(recipe, outs, "task_arithmetic", "base_model", kind=RecipeError)


def test_unknown_parameter(make_models, outs):
    ms = make_models("llama", 1)
    expect_error({**ta(ms), "parameters": {"densty": 0.5}}, outs, "densty",
                 kind=RecipeError)
    recipe = ta(ms)
    recipe["models"][0]["parameters"] = {"wieght": 0.5}
    expect_error(recipe, outs, "expert0", "wieght", kind=RecipeError)


def test_shared_parameter_set_per_model(make_models, outs, caplog):
    """mergekit ignores a shared parameter set per model; so does polymerge, with a one-line
    warning naming the model, the parameter and where it belongs."""
    ms = make_models("llama", 1)
    recipe = ta(ms)
    recipe["models"][0]["parameters"] = {"lambda": 0.5}
    with caplog.at_level("WARNING", logger="polymerge"):
        merged = load_state(run(recipe, outs / "m"))
    [warning] = [r.getMessage() for r in caplog.records if "lambda" in r.getMessage()]
    assert "expert0" in warning and "top-level" in warning and "\n" not in warning
    assert all(torch.equal(merged[k], v) for k, v in load_state(run(ta(ms), outs / "n")).items())


def test_wrong_parameter_type(make_models, outs):
    ms = make_models("llama", 1)
    recipe = ta(ms)
    recipe["models"][0]["parameters"] = {"weight": "heavy"}
    expect_error(recipe, outs, "expert0", "weight", "number", kind=RecipeError)
    expect_error({**ta(ms), "parameters": {"normalize": 1.0}}, outs, "normalize",
                 kind=RecipeError)


def test_empty_gradient_list(make_models, outs):
    """``weight: []`` is a recipe mistake; it must be a RecipeError, not a numpy ValueError."""
    ms = make_models("llama", 1)
    recipe = ta(ms)
    recipe["models"][0]["parameters"] = {"weight": []}
    expect_error(recipe, outs, "weight", kind=RecipeError)


def test_unknown_method(make_models, outs):
    ms = make_models("llama", 1)
    expect_error({**ta(ms), "merge_method": "frankenmerge"}, outs, "frankenmerge",
                 "unknown merge_method", "task_arithmetic", "ties", kind=RecipeError)


def test_unknown_dtype(make_models, outs):
    ms = make_models("llama", 1)
    expect_error({**ta(ms), "dtype": "int3"}, outs, "int3", kind=RecipeError)


# --------------------------------------------------------------------------- pickles


def _pickled_expert(ms: ModelSet, folder_name: str) -> Path:
    folder = ms.root / folder_name
    folder.mkdir()
    torch.save(ms.expert_states()[0], folder / "pytorch_model.bin")
    shutil.copy(ms.experts[0] / "config.json", folder / "config.json")
    return folder


def test_pickle_refused_by_default(make_models, outs):
    ms = make_models("llama", 1)
    pickled = _pickled_expert(ms, "pickled")
    expect_error(ta(ms, [pickled]), outs, "pickled", "pytorch_model.bin", "--allow-pickle",
                 kind=CheckpointError)
    expect_error(ta(ms, [pickled / "pytorch_model.bin"]), outs, "--allow-pickle",
                 kind=CheckpointError)


def test_pickle_loaded_when_allowed(make_models, outs):
    ms = make_models("llama", 1)
    pickled = _pickled_expert(ms, "pickled")
    before = tree_hashes(pickled)
    merged = load_state(run({**ta(ms, [pickled]), "parameters": {"lambda": 0.5}},
                            outs / "m", allow_pickle=True))
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [1.0], 0.5)
    for name, want in expected.items():
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)
    assert tree_hashes(pickled) == before


# --------------------------------------------------------------------------- output folder


def test_existing_output_needs_force(make_models, outs):
    ms = make_models("llama", 1)
    target = outs / "merged"
    run(ta(ms), target)  # a polymerge output (--force replaces only those) ...
    (target / "keep.txt").write_text("old")  # ... with a file added since
    with pytest.raises(PolymergeError, match="--force"):
        run(ta(ms), target)
    assert (target / "keep.txt").read_text() == "old"
    assert leftovers(outs) == ["merged"]

    run(ta(ms), target, force=True)
    assert not (target / "keep.txt").exists()
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [1.0])
    merged = load_state(target)
    for name, want in expected.items():
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)
    assert leftovers(outs) == ["merged"]  # no .old- or .tmp- folder


def test_empty_existing_output_is_fine(make_models, outs):
    ms = make_models("llama", 1)
    (outs / "merged").mkdir()
    run(ta(ms), outs / "merged")
    assert (outs / "merged" / "model.safetensors").exists()
    assert leftovers(outs) == ["merged"]


def test_output_may_not_replace_an_input(make_models):
    """Even with force, writing the output over an input folder would delete that input;
    it must be refused and the input left byte for byte as it was."""
    ms = make_models("llama", 2)
    before = ms.hashes()
    for target in (ms.experts[1], ms.base):
        with pytest.raises(PolymergeError):
            run(ta(ms), target, force=True)
        assert ms.hashes() == before


def test_output_is_a_file(make_models, outs):
    ms = make_models("llama", 1)
    (outs / "merged").write_text("x")
    with pytest.raises(PolymergeError, match="not a folder"):
        run(ta(ms), outs / "merged", force=True)
    assert (outs / "merged").read_text() == "x"


def test_not_enough_disk(make_models, outs, monkeypatch):
    ms = make_models("llama", 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    expect_error(ta(ms), outs, "disk", kind=CheckpointError)
    with pytest.raises(CheckpointError, match="disk"):
        dry_run(ta(ms), outs / "merged")
    dry_run(ta(ms))  # no output folder, no disk check


def test_invalid_shard_size(make_models, outs):
    ms = make_models("llama", 1)
    expect_error(ta(ms), outs, "size", shard_size="lots")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(make_models, outs):
    ms = make_models("llama", 1)
    expect_error(ta(ms), outs, "cuda", device="cuda")


# --------------------------------------------------------------------------- failures mid-merge


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_in_expert(make_models, outs, bad_value):
    ms = make_models("llama", 2)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state[UP1] = state[UP1].clone()
        state[UP1][3, 5] = bad_value

    bad = variant(ms, "poisoned", poison)
    expect_error(ta(ms, [ms.experts[0], bad]), outs, "poisoned", UP1, "NaN",
                 kind=CheckpointError)


def test_nan_in_base_bf16(make_models, outs):
    ms = make_models("llama", 1, dtype=torch.bfloat16)
    state = ms.base_state()
    state[UP1][0, 0] = float("nan")
    save_file(state, ms.base / "model.safetensors")
    expect_error(ta(ms), outs, "base_model", UP1, kind=CheckpointError)


def test_truncated_input(make_models, outs):
    ms = make_models("llama", 1)
    file = ms.experts[0] / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    expect_error(ta(ms), outs, "expert0", "truncated", kind=CheckpointError)


def _raising_method(monkeypatch, name: str, after: int, exc: BaseException) -> list[int]:
    original = registry.get_tensor_method(name)
    calls = [0]

    def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return original.fn(*args, **kwargs)

    monkeypatch.setitem(registry._REGISTRY, name,
                        registry.TensorMethod(dataclasses.replace(original, fn=fn)))
    return calls


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_merge_leaves_nothing(make_models, outs, monkeypatch, exc):
    ms = make_models("llama", 2)
    calls = _raising_method(monkeypatch, "task_arithmetic", 5, exc)
    with pytest.raises(type(exc)):
        run(ta(ms), outs / "merged")
    # it really failed mid-way (the workers may have begun a few more tensors meanwhile)
    merged = sum(job.merge for job in dry_run(ta(ms)).jobs)
    assert 6 <= calls[0] < merged, (calls, merged)
    assert leftovers(outs) == []


def test_failed_forced_merge_keeps_old_output(make_models, outs, monkeypatch):
    ms = make_models("llama", 1)
    target = outs / "merged"
    run(ta(ms), target)
    before = tree_hashes(target)
    _raising_method(monkeypatch, "task_arithmetic", 3, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        run({**ta(ms), "parameters": {"lambda": 0.5}}, target, force=True)
    assert tree_hashes(target) == before
    assert leftovers(outs) == ["merged"]


def test_nan_produced_by_the_method(make_models, outs, monkeypatch):
    ms = make_models("llama", 1)
    original = registry.get_tensor_method("task_arithmetic")

    def fn(base: torch.Tensor, experts: list[torch.Tensor], **kw: Any) -> torch.Tensor:
        out = original.fn(base, experts, **kw)
        return out / 0 if out.dim() == 1 else out

    # The function looks at the tensor's shape, so it is not elementwise (never chunked).
    monkeypatch.setitem(registry._REGISTRY, "task_arithmetic", registry.TensorMethod(
        dataclasses.replace(original, fn=fn, elementwise=None)))
    expect_error(ta(ms), outs, "merged output", "norm", kind=CheckpointError)


def test_validation_errors_do_not_create_the_parent(make_models, tmp_path):
    ms = make_models("llama", 1)
    target = tmp_path / "new" / "deeper" / "merged"
    with pytest.raises(CheckpointError):
        run(ta(ms, [ms.root / "nope"]), target)
    assert not (tmp_path / "new").exists()
