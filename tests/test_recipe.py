"""Recipe parameters as they reach each tensor: scalars, depth gradients, filters, global
defaults; YAML loading and relative paths. Checked end to end against plain-torch references."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ModelSet, leftovers, load_state, ref_task_arithmetic
from safetensors.torch import save_file

import polymerge
from polymerge.errors import RecipeError
from polymerge.recipe import Recipe, depth_position, layer_index, load_recipe


def run(recipe: Any, out: Path, **kw: Any) -> Path:
    return polymerge.merge(recipe, out, progress=False, **kw)


def one_expert(ms: ModelSet, weight: Any, **extra: Any) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(ms.base),
            "models": [{"model": str(ms.experts[0]), "parameters": {"weight": weight}}],
            **extra}


def check_weights(ms: ModelSet, merged: dict[str, torch.Tensor],
                  weight_of: Callable[[str], float]) -> None:
    """merged == base + w(name) * (expert - base) for every tensor."""
    base, expert = ms.base_state(), ms.expert_states()[0]
    assert sorted(merged) == sorted(base)
    for name in base:
        want = base[name].double() + weight_of(name) * (expert[name].double()
                                                        - base[name].double())
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


# Where each architecture's tensors sit in depth, written out by hand, as mergekit 0.1.5 places
# them: block i of 3 at i/2, every tensor outside the blocks (embeddings, final norm, head,
# pooler) at 0, the gradient's first value.
def llama_position(name: str) -> float:
    m = re.match(r"model\.layers\.(\d)\.", name)
    if m:
        return int(m.group(1)) / 2
    return 0.0


def bert_position(name: str) -> float:
    m = re.match(r"encoder\.layer\.(\d)\.", name)
    if m:
        return int(m.group(1)) / 2
    return 0.0


def gpt2_position(name: str) -> float:
    m = re.match(r"transformer\.h\.(\d)\.", name)
    if m:
        return int(m.group(1)) / 2
    return 0.0


POSITIONS = {"llama": llama_position, "bert": bert_position, "gpt2": gpt2_position}


# --------------------------------------------------------------------------- values per tensor


def test_scalar_parameter(make_models, outs):
    ms = make_models("llama", 1)
    check_weights(ms, load_state(run(one_expert(ms, 0.35), outs / "m")), lambda n: 0.35)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_gradient_over_depth(make_models, outs, arch):
    """weight [0, 1] over 3 layers: layer 1 0.5, last layer 1, outside the layers 0."""
    ms = make_models(arch, 1)
    merged = load_state(run(one_expert(ms, [0.0, 1.0]), outs / "m"))
    pos = POSITIONS[arch]
    check_weights(ms, merged, pos)
    # spelled out for the middle layer, the first and the last tensors
    base, expert = ms.base_state(), ms.expert_states()[0]
    middle = {"llama": "model.layers.1.mlp.down_proj.weight",
              "bert": "encoder.layer.1.output.dense.weight",
              "gpt2": "transformer.h.1.mlp.c_fc.weight"}[arch]
    torch.testing.assert_close(merged[middle], base[middle] + 0.5 * (expert[middle]
                                                                     - base[middle]))
    first = {"llama": "model.embed_tokens.weight", "bert": "embeddings.word_embeddings.weight",
             "gpt2": "transformer.wte.weight"}[arch]
    assert torch.equal(merged[first], base[first])
    last = {"llama": "lm_head.weight", "bert": "pooler.dense.weight",
            "gpt2": "transformer.ln_f.weight"}[arch]
    assert torch.equal(merged[last], base[last])  # after the layers, still t = 0 (mergekit)
    block = {"llama": "model.layers.2.mlp.down_proj.weight",
             "bert": "encoder.layer.2.output.dense.weight",
             "gpt2": "transformer.h.2.mlp.c_fc.weight"}[arch]
    torch.testing.assert_close(merged[block], expert[block])


def test_three_point_gradient(make_models, outs):
    ms = make_models("llama", 1)
    merged = load_state(run(one_expert(ms, [0.2, 1.0, 0.4]), outs / "m"))
    values = {0.0: 0.2, 0.5: 1.0, 1.0: 0.4}
    check_weights(ms, merged, lambda n: values[llama_position(n)])


def test_gradient_on_four_layers(make_models, outs):
    ms = make_models("llama", 1, num_hidden_layers=4)
    merged = load_state(run(one_expert(ms, [0.0, 1.0]), outs / "m"))

    def weight(name: str) -> float:
        m = re.match(r"model\.layers\.(\d)\.", name)
        if m:
            return int(m.group(1)) / 3
        return 0.0

    check_weights(ms, merged, weight)


def test_shared_parameter_gradient(make_models, outs):
    """lambda (shared by all experts) as a gradient, with a filter for the head."""
    ms = make_models("llama", 2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
              "models": [{"model": str(e)} for e in ms.experts],
              "parameters": {"lambda": [{"filter": "lm_head", "value": 0.0},
                                        {"value": [1.0, 0.0]}]}}
    merged = load_state(run(recipe, outs / "m"))
    base, experts = ms.base_state(), ms.expert_states()
    for name in base:
        lam = 0.0 if name == "lm_head.weight" else 1.0 - llama_position(name)
        want = ref_task_arithmetic({name: base[name]}, [{name: e[name]} for e in experts],
                                   [1.0, 1.0], lam)[name]
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)


def test_filters_first_match_wins_with_fallback(make_models, outs):
    ms = make_models("llama", 1)
    weight = [{"filter": "self_attn", "value": 0.3},
              {"filter": "q_proj", "value": 0.9},  # shadowed by self_attn above
              {"filter": r"mlp\.(up|gate)_proj", "value": [0.0, 1.0]},  # a regex, a gradient
              {"value": 0.5}]
    merged = load_state(run(one_expert(ms, weight), outs / "m"))

    def w(name: str) -> float:
        if "self_attn" in name:
            return 0.3
        if ".mlp.up_proj" in name or ".mlp.gate_proj" in name:
            return llama_position(name)
        return 0.5

    check_weights(ms, merged, w)


def test_filter_without_fallback_uses_default(make_models, outs):
    """An optional parameter falls back to its default where no filter matches (weight=1)."""
    ms = make_models("llama", 1)
    merged = load_state(run(one_expert(ms, [{"filter": "mlp", "value": 0.0}]), outs / "m"))
    check_weights(ms, merged, lambda n: 0.0 if ".mlp." in n else 1.0)


def test_required_parameter_without_matching_filter(make_models, outs):
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ms.experts[0]),
                          "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}},
                         {"model": str(ms.experts[1]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(RecipeError) as info:
        run(recipe, outs / "m")
    msg = str(info.value)
    assert "expert0" in msg and "weight" in msg and "no filter matches" in msg
    named = re.search(r"tensor '(\S+)'", msg)
    assert named and named.group(1) in ms.base_state() and "mlp" not in named.group(1), msg
    assert leftovers(outs) == []


def test_global_parameters_are_per_model_defaults(make_models, outs):
    ms = make_models("llama", 3)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
              "models": [{"model": str(ms.experts[0])},
                         {"model": str(ms.experts[1]), "parameters": {"weight": 1.5}},
                         {"model": str(ms.experts[2])}],
              "parameters": {"weight": 0.25, "lambda": 0.8}}
    merged = load_state(run(recipe, outs / "m"))
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [0.25, 1.5, 0.25], 0.8)
    for name, want in expected.items():
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)


def test_linear_global_weight_gradient(make_models, outs):
    """A per-model gradient given once globally applies to each model separately."""
    ms = make_models("llama", 2)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ms.experts[0])},
                         {"model": str(ms.experts[1]), "parameters": {"weight": 1.0}}],
              "parameters": {"weight": [1.0, 3.0]}}
    merged = load_state(run(recipe, outs / "m"))
    e0, e1 = ms.expert_states()
    for name in e0:
        w0 = 1.0 + 2.0 * llama_position(name)
        want = (w0 * e0[name].double() + e1[name].double()) / (w0 + 1.0)
        torch.testing.assert_close(merged[name].double(), want, atol=1e-6, rtol=1e-5)


def test_gradient_on_bare_files_without_config(make_models, tmp_path, outs):
    """Without a config.json the layer count must come from the tensor names: weight [0, 1]
    still gives the middle layer 0.5 (not the first value for every layer)."""
    ms = make_models("llama", 1)
    base_file, expert_file = tmp_path / "base.safetensors", tmp_path / "expert.safetensors"
    save_file(ms.base_state(), base_file)
    save_file(ms.expert_states()[0], expert_file)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base_file),
              "models": [{"model": str(expert_file), "parameters": {"weight": [0.0, 1.0]}}]}
    merged = load_state(run(recipe, outs / "m"))
    check_weights(ms, merged, llama_position)


def test_mergekit_int8_mask_is_accepted_and_changes_nothing(make_models, outs):
    ms = make_models("llama", 1)
    merged = load_state(run(one_expert(ms, 0.5, parameters={"int8_mask": True}), outs / "m"))
    check_weights(ms, merged, lambda n: 0.5)


# --------------------------------------------------------------------------- YAML files


def test_yaml_relative_paths_resolve_against_its_folder(make_models, tmp_path, outs,
                                                        monkeypatch):
    ms = make_models("llama", 2)
    recipe_file = ms.root / "recipe.yaml"
    recipe_file.write_text(
        "merge_method: task_arithmetic\n"
        "base_model: base\n"
        "models:\n"
        "  - model: ./expert0\n"
        "    parameters: {weight: 0.5}\n"
        "  - model: expert1\n"
        "    parameters:\n"
        "      weight: 0.25\n"
        "parameters:\n"
        "  lambda: 2.0\n"
        "dtype: bfloat16\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    loaded = load_recipe(recipe_file)
    assert Path(loaded.base_model).resolve() == ms.base.resolve()
    assert [Path(m.model).resolve() for m in loaded.models] == [e.resolve()
                                                                for e in ms.experts]
    out = run(recipe_file, outs / "m")
    expected = ref_task_arithmetic(ms.base_state(), ms.expert_states(), [0.5, 0.25], 2.0)
    merged = load_state(out)
    for name, want in expected.items():
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name], want.to(torch.bfloat16))
    assert list(elsewhere.iterdir()) == []
    # the saved recipe is loadable and points at the same inputs from anywhere
    saved = load_recipe(out / "polymerge_recipe.yaml")
    assert Path(saved.base_model).resolve() == ms.base.resolve()
    assert saved.merge_method == "task_arithmetic"


def test_yaml_absolute_paths_untouched(make_models, tmp_path):
    ms = make_models("llama", 1)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(one_expert(ms, 1.0)))
    loaded = load_recipe(recipe_file)
    assert loaded.base_model == str(ms.base)
    assert loaded.models[0].model == str(ms.experts[0])


def test_load_recipe_accepts_dict_and_recipe_and_round_trips():
    data = {"merge_method": "ties", "base_model": "/x/base",
            "models": [{"model": "/x/a", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
                       {"model": "/x/b", "name": "bee",
                        "parameters": {"weight": [{"filter": "mlp", "value": 1.0},
                                                  {"value": 0.5}]}}],
            "parameters": {"normalize": True}, "seed": 3, "dtype": "bfloat16"}
    recipe = load_recipe(data)
    assert isinstance(recipe, Recipe)
    assert load_recipe(recipe) is recipe
    assert [m.display_name for m in recipe.models] == ["a", "bee"]
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert recipe.output_dtype_name == "bfloat16"
    assert [m.model for m in recipe.experts()] == ["/x/a", "/x/b"]


def test_base_listed_among_models_is_not_an_expert():
    recipe = load_recipe({"merge_method": "task_arithmetic", "base_model": "/x/base",
                          "models": [{"model": "/x/base"}, {"model": "/x/a"}]})
    assert [m.model for m in recipe.experts()] == ["/x/a"]


@pytest.mark.parametrize(("data", "fragment"), [
    ({"merge_method": "linear", "modles": []}, "modles"),
    ({"merge_method": "linear", "slices": []}, "slices"),
    ({"merge_method": "linear", "models": [{"model": "/a/x"}, {"model": "/b/x"}]}, "named 'x'"),
    ({"models": []}, "merge_method"),
    ({"merge_method": "linear", "models": [{"model": "a", "params": {}}]}, "params"),
])
def test_malformed_recipes(data, fragment):
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        load_recipe(data)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(listy)


# --------------------------------------------------------------------------- depth helpers


def test_depth_positions_of_real_tensor_names(make_models):
    """The helpers agree with the hand-written positions on every tensor of every arch."""
    for arch, pos in POSITIONS.items():
        ms = make_models(arch, 0, tokenizer=False)
        for name in ms.base_state():
            assert depth_position(name, 3) == pos(name), (arch, name)
            m = re.search(r"\.(\d)\.", name)
            assert layer_index(name) == (int(m.group(1)) if m else None), name
