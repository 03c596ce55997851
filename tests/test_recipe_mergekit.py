"""mergekit recipes as users write them: parameters a method ignores (a one-line warning) and
typos (refused), gradients outside the layers (t = 0, mergekit's rule), filter lists that fall
through to the next setting, ``model+lora`` inputs, ``chat_template``, and combinations
mergekit refuses (refused here too, in one line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import load_state, make_lora

import polymerge
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.chat_template import TEMPLATES
from polymerge.recipe import depth_position, load_recipe


def run(recipe: Any, out: Path) -> Path:
    return polymerge.merge(recipe, out, progress=False)


def warnings_of(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "polymerge"]


# --------------------------------------------------------------------------- parameters


def test_ignored_parameter_warns_and_a_typo_is_refused(make_models, outs, caplog):
    ms = make_models("llama", 1)
    b, e = str(ms.base), str(ms.experts[0])
    plain = {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": e}],
             "parameters": {"t": 0.4}}
    weighted = {**plain, "models": [{"model": b, "parameters": {"weight": 0.5}},
                                    {"model": e, "parameters": {"weight": 0.5}}]}
    with caplog.at_level("WARNING", logger="polymerge"):
        got = load_state(run(weighted, outs / "w"))
    said = [w for w in warnings_of(caplog) if "weight" in w]
    assert said and all("\n" not in w and "slerp ignores parameter 'weight'" in w for w in said)
    want = load_state(run(plain, outs / "p"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    typo = {"merge_method": "ties", "base_model": b,
            "models": [{"model": e, "parameters": {"weight": 1.0, "densty": 0.5}}]}
    with pytest.raises(RecipeError, match="no parameter 'densty'"):
        run(typo, outs / "t")


def test_gradients_outside_the_layers_take_the_first_value(make_models, outs):
    """mergekit plans embeddings, final norm and LM head at t = 0: with ties weight
    [0, 0.3, 0.7, 1] they are the base's; with slerp t [0, 0.3, 0.8, 1] the first model's."""
    assert depth_position("lm_head.weight", 4) == 0.0
    assert depth_position("model.norm.weight", 4) == 0.0
    assert depth_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert depth_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    ms = make_models("llama", 2, num_hidden_layers=4)
    b = str(ms.base)
    ties = {"merge_method": "ties", "base_model": b,
            "models": [{"model": str(e), "parameters": {"density": [1, 0.7, 0.1],
                                                        "weight": [0, 0.3, 0.7, 1]}}
                       for e in ms.experts]}
    merged, base = load_state(run(ties, outs / "ties")), ms.base_state()
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged[name], base[name]), name
    assert not torch.equal(merged["model.layers.3.mlp.up_proj.weight"],
                           base["model.layers.3.mlp.up_proj.weight"])
    slerp = {"merge_method": "slerp", "base_model": b,
             "models": [{"model": b}, {"model": str(ms.experts[0])}],
             "parameters": {"t": [0, 0.3, 0.8, 1]}}
    merged, expert = load_state(run(slerp, outs / "slerp")), ms.expert_states()[0]
    torch.testing.assert_close(merged["lm_head.weight"], base["lm_head.weight"])
    torch.testing.assert_close(merged["model.layers.3.self_attn.q_proj.weight"],
                               expert["model.layers.3.self_attn.q_proj.weight"])


def test_a_filter_list_without_a_match_falls_through(make_models, outs):
    """A model's ``weight: [{filter: mlp, value: 0.3}]`` leaves attention tensors to the
    recipe's ``weight: 0.7``, as mergekit resolves parameters."""
    ms = make_models("llama", 1)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
              "models": [{"model": str(ms.experts[0]),
                          "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]}}],
              "parameters": {"weight": 0.7}}
    merged, base, expert = load_state(run(recipe, outs / "m")), ms.base_state(), \
        ms.expert_states()[0]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        w = 0.3 if "mlp" in name else 0.7
        torch.testing.assert_close(merged[name].double(), base[name].double()
                                   + w * (expert[name].double() - base[name].double()))


# --------------------------------------------------------------------------- refused mixes


@pytest.mark.parametrize("extra, fragment", [
    ({"slices": [{"sources": [{"model": "B", "layer_range": [0, 1]}]}]}, "both models and slices"),
    ({"tokenizer_source": "base", "tokenizer": {"source": "union"}}, "tokenizer_source and a"),
    ({"modules": {"text": {}}}, "modules"),
])
def test_mixes_mergekit_refuses_are_one_line_errors(make_models, extra, fragment):
    ms = make_models("llama", 1, tokenizer=False)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
              "models": [{"model": str(ms.experts[0])}], **extra}
    with pytest.raises(RecipeError, match=fragment) as info:
        load_recipe(recipe)
    assert "\n" not in str(info.value)


def test_slices_and_vocabularies_need_a_static_method(make_models, outs):
    ms = make_models("llama", 2, tokenizer=False)
    recipe = {"merge_method": "twin", "base_model": str(ms.base),
              "slices": [{"sources": [{"model": str(p), "layer_range": [0, 3]}
                                      for p in [ms.base, *ms.experts]]}]}
    with pytest.raises(RecipeError, match="static merge methods only") as info:
        run(recipe, outs / "m")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- model+lora


def test_model_plus_lora_input(make_models, outs, tmp_path):
    """``base+adapter`` is the base with the adapter applied (PEFT's own merge), as an expert
    of a recipe; relative parts resolve against the recipe's folder."""
    ms = make_models("llama", 1)
    lora = make_lora(ms, "lora")
    recipe = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "base+lora", "parameters": {"weight": 1.0}}],
              "dtype": "float32"}
    path = ms.root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path).models[0].model == f"{ms.base}+{lora.adapter}"
    merged = load_state(run(path, outs / "m"))
    for name, want in lora.merged_state.items():
        if name in merged:
            torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=1e-5)
    with pytest.raises(PolymergeError, match="neither an existing path nor model"):
        run({**recipe, "base_model": str(ms.base),
             "models": [{"model": f"{ms.base}+{lora.adapter}+x"}]}, outs / "bad")


# --------------------------------------------------------------------------- chat templates


def chat(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_chat_templates(make_models, outs):
    ms = make_models("llama", 2)
    base = {"merge_method": "task_arithmetic", "base_model": str(ms.base),
            "models": [{"model": str(e)} for e in ms.experts]}
    out = run({**base, "chat_template": "chatml"}, outs / "named")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == \
        TEMPLATES["chatml"]
    assert chat(out) == "<|im_start|>user\nhi<|im_end|>\n"
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    assert chat(run({**base, "chat_template": inline}, outs / "inline")) == "[user] hi"
    for folder, template in [(ms.base, "{{ 'base' }}{# ......... #}"),
                             (ms.experts[0], inline), (ms.experts[1], inline)]:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg,
                                                                  "chat_template": template}))
    assert chat(run({**base, "chat_template": "auto"}, outs / "auto")) == "[user] hi"
    with pytest.raises(RecipeError, match="neither auto, a template name"):
        load_recipe({**base, "chat_template": "vicuna"})
