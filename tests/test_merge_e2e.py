"""End to end: recipes merged into HF folders that transformers reloads, checked tensor by tensor
against plain-torch reference merges of the inputs' state dicts; sharding, bare files, LoRA
experts, low-precision inputs, seeds and the in-memory ``merge_tensors`` API."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import (
    ARCHS,
    TOKENIZER_FILES,
    ModelSet,
    assert_states_close,
    forward,
    leftovers,
    load_state,
    make_lora,
    ref_linear,
    ref_task_arithmetic,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import polymerge
from polymerge.errors import RecipeError
from polymerge.registry import parse_size
from polymerge.registry import tensor_methods as all_methods


def run(recipe: Any, out: Path, **kw: Any) -> Path:
    return polymerge.merge(recipe, out, progress=False, **kw)


def ta_recipe(ms: ModelSet, weights: list[float], lam: float = 1.0, **extra: Any) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(ms.base),
            "models": [{"model": str(e), "parameters": {"weight": w}}
                       for e, w in zip(ms.experts, weights, strict=True)],
            "parameters": {"lambda": lam}, **extra}


# --------------------------------------------------------------------------- full HF round trip


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_merge_matches_reference_and_reloads(make_models, outs, arch, method):
    ms = make_models(arch, 2)
    before = ms.hashes()
    base, experts = ms.base_state(), ms.expert_states()
    if method == "task_arithmetic":
        recipe = ta_recipe(ms, [0.7, 0.4], lam=0.9)
        expected = ref_task_arithmetic(base, experts, [0.7, 0.4], 0.9)
    else:  # the base listed as an input, as mergekit allows
        recipe = {"merge_method": "linear", "base_model": str(ms.base),
                  "models": [{"model": str(ms.base), "parameters": {"weight": 1.0}},
                             {"model": str(ms.experts[0]), "parameters": {"weight": 2.0}},
                             {"model": str(ms.experts[1]), "parameters": {"weight": 3.0}}]}
        expected = ref_linear([base, *experts], [1.0, 2.0, 3.0])

    out = run(recipe, outs / "merged")

    assert out == outs / "merged"
    assert leftovers(outs) == ["merged"]
    merged = load_state(out)
    assert_states_close(merged, expected, atol=2e-6)
    assert all(t.dtype == torch.float32 for t in merged.values())
    # inputs untouched, byte for byte
    assert ms.hashes() == before
    # config: the base's, with the output dtype
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((ms.base / "config.json").read_text())
    assert cfg["model_type"] == base_cfg["model_type"]
    assert cfg["architectures"] == base_cfg["architectures"]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    # tokenizer (and generation config) copied from the base, not from an expert
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (ms.base / name).read_bytes(), name
    if (ms.base / "generation_config.json").exists():
        assert (out / "generation_config.json").read_bytes() == \
            (ms.base / "generation_config.json").read_bytes()
    # the recipe and the model card
    saved = yaml.safe_load((out / "polymerge_recipe.yaml").read_text())
    assert saved["merge_method"] == method
    assert len(saved["models"]) == len(recipe["models"])
    card = (out / "README.md").read_text()
    assert method in card
    assert ms.experts[0].name in card
    # transformers reloads it and computes what a model holding the reference weights computes
    model = ms.load(out)
    got = forward(model)
    want = forward(ms.model_from_state({k: v.float() for k, v in expected.items()}))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_every_method_runs_end_to_end(make_models, outs):
    """Every registered static method merges a tiny Llama into a loadable, finite model."""
    ms = make_models("llama", 2)
    base = ms.base_state()
    for method in all_methods():
        params: dict[str, Any] = {}
        names = {p.name for p in method.params}
        if "density" in names:
            params["density"] = 0.5
        if "t" in names:
            params["t"] = 0.3
        if "weight" in names and method.param("weight").required:
            params["weight"] = 1.0
        experts = ms.experts[:1] if method.max_experts == 1 else ms.experts
        recipe = {"merge_method": method.name, "base_model": str(ms.base),
                  "models": [{"model": str(e)} for e in experts], "parameters": params}
        out = run(recipe, outs / method.name)
        merged = load_state(out)
        assert sorted(merged) == sorted(base), method.name
        assert all(torch.isfinite(t).all() for t in merged.values()), method.name
        assert torch.isfinite(forward(ms.load(out))).all(), method.name
    assert leftovers(outs) == sorted(m.name for m in all_methods())


def test_slerp_endpoints_are_the_inputs(make_models, outs):
    ms = make_models("llama", 1)
    base, expert = ms.base_state(), ms.expert_states()[0]
    for t, want in ((0.0, base), (1.0, expert)):
        recipe = {"merge_method": "slerp", "base_model": str(ms.base),
                  "models": [{"model": str(ms.experts[0])}], "parameters": {"t": t}}
        assert_states_close(load_state(run(recipe, outs / f"t{t}")), want, atol=1e-6)


# --------------------------------------------------------------------------- sharding, bare files


def test_sharded_inputs_and_sharded_output(make_models, outs):
    ms = make_models("llama", 2, max_shard_size="8KB")
    for folder in (ms.base, *ms.experts):
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    base, experts = ms.base_state(), ms.expert_states()
    expected = ref_task_arithmetic(base, experts, [0.5, 1.0])

    out = run(ta_recipe(ms, [0.5, 1.0]), outs / "merged", shard_size="10KB")

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                        for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        part = load_file(shard)
        assert part, f"{shard.name} is empty"
        for name, tensor in part.items():
            assert name not in seen, f"{name} in {seen.get(name)} and {shard.name}"
            seen[name] = shard.name
            total += tensor.numel() * tensor.element_size()
        assert shard.stat().st_size <= 10_000 + 8 + 4096  # shard limit + header
    assert seen == index["weight_map"]
    assert sorted(seen) == sorted(base)
    assert index["metadata"]["total_size"] == total
    assert_states_close(load_state(out), expected)
    torch.testing.assert_close(
        forward(ms.load(out)),
        forward(ms.model_from_state({k: v.float() for k, v in expected.items()})),
        atol=1e-5, rtol=1e-4)


def test_one_shard_when_it_fits(make_models, outs):
    ms = make_models("gpt2", 1)
    out = run(ta_recipe(ms, [1.0]), outs / "merged", shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_bare_safetensors_inputs(make_models, tmp_path, outs):
    """Bare .safetensors files (no config) as base and experts; an int tensor is copied."""
    ms = make_models("bert", 2)
    states = [ms.base_state(), *ms.expert_states()]
    files = []
    for i, state in enumerate(states):
        state = dict(state)
        state["step"] = torch.tensor([17, 4], dtype=torch.int64)
        path = tmp_path / f"m{i}.safetensors"
        save_file(state, path)
        files.append(path)
    before = [path.read_bytes() for path in files]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(files[0]),
              "models": [{"model": str(files[1]), "parameters": {"weight": 0.3}},
                         {"model": str(files[2]), "parameters": {"weight": 0.6}}]}
    out = run(recipe, outs / "merged")
    merged = load_state(out)
    expected = ref_task_arithmetic(states[0], states[1:], [0.3, 0.6])
    assert torch.equal(merged.pop("step"), torch.tensor([17, 4]))
    assert_states_close(merged, expected)
    assert [path.read_bytes() for path in files] == before
    assert not (out / "config.json").exists()  # there was none to copy


def test_expert_as_bare_file_beside_hf_base(make_models, tmp_path, outs):
    ms = make_models("llama", 1)
    bare = tmp_path / "expert.safetensors"
    save_file(ms.expert_states()[0], bare)
    out = run({"merge_method": "task_arithmetic", "base_model": str(ms.base),
               "models": [{"model": str(bare), "parameters": {"weight": 0.5}}]}, outs / "m")
    assert_states_close(load_state(out),
                        ref_task_arithmetic(ms.base_state(), ms.expert_states(), [0.5]))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_tokenizer_source_path(make_models, outs):
    ms = make_models("llama", 2)
    recipe = ta_recipe(ms, [1.0, 1.0], tokenizer_source=str(ms.experts[1]))
    out = run(recipe, outs / "m")
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (ms.experts[1] / name).read_bytes(), name
    with pytest.raises(polymerge.PolymergeError, match="tokenizer_source"):
        run(ta_recipe(ms, [1.0, 1.0], tokenizer_source=str(ms.root / "nope")), outs / "n")
    assert leftovers(outs) == ["m"]


# --------------------------------------------------------------------------- LoRA experts


def test_lora_expert_equals_its_merged_checkpoint(make_models, outs):
    ms = make_models("llama", 1)
    lora = make_lora(ms, "adapter")
    base, full0 = ms.base_state(), ms.expert_states()[0]
    recipe_lora = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
                   "models": [{"model": str(ms.experts[0]), "parameters": {"weight": 0.6}},
                              {"model": str(lora.adapter), "parameters": {"weight": 0.8}}]}
    recipe_full = json.loads(json.dumps(recipe_lora))
    recipe_full["models"][1]["model"] = str(lora.full)

    with_lora = load_state(run(recipe_lora, outs / "lora"))
    with_full = load_state(run(recipe_full, outs / "full"))

    assert_states_close(with_lora, with_full, atol=1e-6)
    merged = {k: v for k, v in lora.merged_state.items() if k in base}
    assert_states_close(with_lora, ref_task_arithmetic(base, [full0, merged], [0.6, 0.8]))
    # the adapter really moved q_proj / v_proj, and only them
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(3)
                       for p in ("q_proj", "v_proj")}


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(make_models, outs, dtype):
    ms = make_models("llama", 3, dtype=dtype, scale=0.05)
    base, experts = ms.base_state(), ms.expert_states()
    assert all(t.dtype == dtype for t in base.values())
    weights = [0.37, 0.61, 0.83]
    ref32 = ref_task_arithmetic(base, experts, weights, lam=0.7)

    out = run(ta_recipe(ms, weights, lam=0.7), outs / "default")
    merged = load_state(out)
    name = str(dtype).removeprefix("torch.")
    assert json.loads((out / "config.json").read_text()).get("dtype") == name
    assert ms.load(out).dtype == dtype
    assert_states_close(merged, ref32, dtype=dtype)
    # Rounded once from float32: nearly every entry is exactly the reference cast.
    same = sum(int((merged[k] == ref32[k].to(dtype)).sum()) for k in merged)
    assert same >= 0.99 * sum(t.numel() for t in merged.values())

    # Asking for float32 output shows the float32 computation itself.
    wide = load_state(run(ta_recipe(ms, weights, lam=0.7, dtype="float32"), outs / "wide"))
    assert all(t.dtype == torch.float32 for t in wide.values())
    assert_states_close(wide, ref32, atol=1e-6)


def test_dtype_argument_overrides_recipe(make_models, outs):
    ms = make_models("gpt2", 1, dtype=torch.bfloat16)
    recipe = ta_recipe(ms, [1.0], out_dtype="bfloat16")
    out = run(recipe, outs / "m", dtype="float16")
    merged = load_state(out)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [1.0])
    assert_states_close(merged, expected, dtype=torch.float16)


def test_recipe_out_dtype(make_models, outs):
    ms = make_models("bert", 1)
    out = run(ta_recipe(ms, [0.5], out_dtype="bfloat16"), outs / "m")
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- seeds


def _dare(ms: ModelSet, seed: int | None) -> dict:
    recipe = {"merge_method": "dare_linear", "base_model": str(ms.base),
              "models": [{"model": str(e)} for e in ms.experts],
              "parameters": {"density": 0.5, "weight": 1.0}}
    if seed is not None:
        recipe["seed"] = seed
    return recipe


def test_seed_makes_random_methods_deterministic(make_models, outs):
    ms = make_models("llama", 2)
    a = load_state(run(_dare(ms, 11), outs / "a"))
    b = load_state(run(_dare(ms, 11), outs / "b"))
    c = load_state(run(_dare(ms, 12), outs / "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (outs / "a" / "model.safetensors").read_bytes() == \
        (outs / "b" / "model.safetensors").read_bytes()
    big = [k for k in a if a[k].numel() >= 64]
    assert all(not torch.equal(a[k], c[k]) for k in big)
    # DARE keeps each delta entry or drops it: every entry is base or base + 2*delta_i sums.
    base = ms.base_state()
    name = "model.layers.1.mlp.up_proj.weight"
    d = [e[name] - base[name] for e in ms.expert_states()]
    got = a[name] - base[name]
    options = torch.stack([0 * d[0], 2 * d[0], 2 * d[1], 2 * d[0] + 2 * d[1]])
    err = (options - got).abs().min(dim=0).values
    assert float(err.max()) < 1e-6
    # and it actually dropped about half
    assert 0.2 < float((options[0] - got).abs().lt(1e-9).float().mean()) < 0.5


def test_random_merge_same_in_memory_and_on_disk(make_models, outs):
    """Seeds are per tensor name: the streamed merge equals merge_tensors on state dicts."""
    ms = make_models("gpt2", 2)
    recipe = {"merge_method": "dare_ties", "base_model": str(ms.base), "seed": 5,
              "models": [{"model": str(e)} for e in ms.experts],
              "parameters": {"density": 0.4, "weight": 0.7}}
    on_disk = load_state(run(recipe, outs / "m"))
    in_memory = polymerge.merge_tensors("dare_ties", ms.base_state(), ms.expert_states(),
                                        seed=5, density=0.4, weight=0.7)
    assert sorted(on_disk) == sorted(in_memory)
    for name in on_disk:
        torch.testing.assert_close(on_disk[name], in_memory[name], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- in-memory API


def test_merge_tensors_on_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, generator=g)
    experts = [base + 0.1 * torch.randn(5, 4, generator=g) for _ in range(3)]
    got = polymerge.merge_tensors("task_arithmetic", base, experts, weight=[0.2, 0.5, 1.0],
                                  **{"lambda": 0.5})
    want = base + 0.5 * sum(w * (e - base) for w, e in zip([0.2, 0.5, 1.0], experts,
                                                           strict=True))
    torch.testing.assert_close(got, want)
    # a scalar per-model parameter is broadcast to every expert
    got = polymerge.merge_tensors("task_arithmetic", base, experts, weight=0.3)
    torch.testing.assert_close(got, base + 0.3 * sum(e - base for e in experts))
    # linear (no base)
    got = polymerge.merge_tensors("linear", None, experts, weight=[1.0, 1.0, 2.0])
    torch.testing.assert_close(got, (experts[0] + experts[1] + 2 * experts[2]) / 4)
    got = polymerge.merge_tensors("linear", None, experts, weight=1.0)
    torch.testing.assert_close(got, sum(experts) / 3)


def test_merge_tensors_on_state_dicts_and_dtype():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(3, 3, generator=g), "b": torch.randn(7, generator=g)}
    experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for _ in range(2)]
    got = polymerge.merge_tensors("task_arithmetic", base, experts, weight=[1.0, -0.5])
    assert sorted(got) == ["a", "b"]
    for k in base:
        torch.testing.assert_close(got[k], base[k] + (experts[0][k] - base[k])
                                   - 0.5 * (experts[1][k] - base[k]))
    half = {k: v.to(torch.bfloat16) for k, v in base.items()}
    half_experts = [{k: v.to(torch.bfloat16) for k, v in e.items()} for e in experts]
    got = polymerge.merge_tensors("linear", None, half_experts, weight=[1.0, 3.0])
    for k in base:
        assert got[k].dtype == torch.bfloat16
        want = (half_experts[0][k].float() + 3 * half_experts[1][k].float()) / 4
        torch.testing.assert_close(got[k], want.to(torch.bfloat16))
    assert polymerge.merge_tensors("task_arithmetic", half, half_experts)["a"].dtype == \
        torch.bfloat16


def test_merge_tensors_seed():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 40, generator=g)
    experts = [base + torch.randn(40, 40, generator=g) for _ in range(2)]
    a = polymerge.merge_tensors("dare_ties", base, experts, density=0.3, seed=5)
    b = polymerge.merge_tensors("dare_ties", base, experts, density=0.3, seed=5)
    c = polymerge.merge_tensors("dare_ties", base, experts, density=0.3, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_merge_tensors_errors():
    base = torch.zeros(4, 4)
    experts = [torch.ones(4, 4), torch.ones(4, 4)]
    with pytest.raises(RecipeError, match="3 values for 2 experts"):
        polymerge.merge_tensors("task_arithmetic", base, experts, weight=[1.0, 1.0, 1.0])
    with pytest.raises(RecipeError, match="shape"):
        polymerge.merge_tensors("task_arithmetic", base, [torch.ones(4, 4), torch.ones(4, 5)])
    with pytest.raises(RecipeError, match="shape"):
        polymerge.merge_tensors("task_arithmetic", torch.zeros(2, 4), experts)
    with pytest.raises(RecipeError, match="no parameter 'wieght'"):
        polymerge.merge_tensors("task_arithmetic", base, experts, wieght=1.0)
    with pytest.raises(RecipeError, match="needs a base"):
        polymerge.merge_tensors("task_arithmetic", None, experts)
    with pytest.raises(RecipeError, match="required"):
        polymerge.merge_tensors("linear", None, experts)
    with pytest.raises(RecipeError, match="no experts"):
        polymerge.merge_tensors("linear", None, [], weight=1.0)
    with pytest.raises(RecipeError, match="density"):
        polymerge.merge_tensors("dare_linear", base, experts, density=1.5)
    with pytest.raises(RecipeError, match="unknown merge_method"):
        polymerge.merge_tensors("nope", base, experts)
    with pytest.raises(RecipeError, match="keys differ"):
        polymerge.merge_tensors("linear", None, [{"a": base}, {"b": base}], weight=1.0)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "value"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 2**30), ("10KB", 10_000),
    ("2KiB", 2048), ("1.5MB", 1_500_000), ("123", 123), (4096, 4096), (" 7 kb ", 7000),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(polymerge.PolymergeError, match="size"):
        parse_size("five gigabytes")


def test_output_metadata_names_method(make_models, outs):
    ms = make_models("llama", 1)
    out = run(ta_recipe(ms, [1.0]), outs / "m")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert re.search("task_arithmetic", json.dumps(meta))
