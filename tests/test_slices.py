"""Slices (mergekit's ``slices:`` with ``sources`` and ``layer_range``): layer stacking
(frankenmerges with passthrough), per-slice gradients and parameters (gradient slerp), layer
counts and renumbering in the config and the tensors, and layer ranges checked before any
tensor is read. Every merged tensor is checked against the source tensor it must come from, or
against a float64 slerp written here from its definition."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import leftovers, load_state

import polymerge
from polymerge.errors import RecipeError
from polymerge.io.checkpoint import SafetensorsCheckpoint


def run(recipe: Any, out: Path) -> Path:
    return polymerge.merge(recipe, out, progress=False)


def src(model: Path, start: int, end: int, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    if params:
        entry["parameters"] = params
    return entry


def layer_parts(name: str) -> tuple[int, str] | None:
    m = re.match(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else None


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (float64), lerp when nearly collinear."""
    va, vb = a.double().flatten(), b.double().flatten()
    na = float(va.norm()) or 1.0
    nb = float(vb.norm()) or 1.0
    dot = max(-1.0, min(1.0, float((va / na) @ (vb / nb))))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double())
    theta = math.acos(dot)
    ca = math.sin((1 - t) * theta) / math.sin(theta)
    cb = math.sin(t * theta) / math.sin(theta)
    return ca * a.double() + cb * b.double()


def test_frankenmerge_stacks_and_renumbers_layers(make_models, outs):
    """passthrough of base layers 0-2 and expert layers 1-3: six output layers, numbered
    0..5, each the very tensor of its source layer; embeddings from the first slice's model,
    final norm and head from the last slice's; the config says 6 and the model runs."""
    ms = make_models("llama", 1, num_hidden_layers=4)
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [src(ms.base, 0, 3)]},
                         {"sources": [src(ms.experts[0], 1, 4)]}]}
    out = run(recipe, outs / "franken")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    merged, base, expert = load_state(out), ms.base_state(), ms.expert_states()[0]
    layers = {p[0] for p in map(layer_parts, merged) if p}
    assert layers == set(range(6))
    per_layer = {p[1] for p in map(layer_parts, base) if p and p[0] == 0}
    assert len(merged) == len(base) + 2 * len(per_layer)
    for o in range(6):
        source, i = (base, o) if o < 3 else (expert, o - 2)
        for suffix in per_layer:
            assert torch.equal(merged[f"model.layers.{o}.{suffix}"],
                               source[f"model.layers.{i}.{suffix}"]), (o, suffix)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[name], expert[name])
    model = ms.load(out)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 7, 11]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_gradient_slerp_restarts_in_every_slice(make_models, outs):
    """mergekit's gradient slerp: t runs 0..1 over each slice's layers; a slice's parameters
    come first, and a filter list that matches nothing falls through to the recipe's; tensors
    outside the layers take t = 0 (embeddings with the first slice, head with the last)."""
    ms = make_models("llama", 1, num_hidden_layers=4)
    b, e = ms.base, ms.experts[0]
    recipe = {"merge_method": "slerp", "base_model": str(b),
              "slices": [{"sources": [src(b, 0, 2), src(e, 0, 2)]},
                         {"sources": [src(b, 2, 4), src(e, 2, 4)],
                          "parameters": {"t": [{"filter": "mlp", "value": 0.25}]}}],
              "parameters": {"t": [0.0, 1.0]}}
    merged, base, expert = load_state(run(recipe, outs / "m")), ms.base_state(), \
        ms.expert_states()[0]
    assert json.loads((outs / "m" / "config.json").read_text())["num_hidden_layers"] == 4
    for name, value in merged.items():
        parts = layer_parts(name)
        if parts is None:
            t = 0.0
        else:
            layer, suffix = parts
            t = 0.25 if layer >= 2 and "mlp" in suffix else [0.0, 1.0, 0.0, 1.0][layer]
        want = ref_slerp(t, base[name], expert[name])
        torch.testing.assert_close(value.double(), want, atol=2e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_per_source_and_slice_parameters(make_models, outs):
    """Per-model parameters: the source's own, then the slice's, then the recipe's."""
    ms = make_models("llama", 2, num_hidden_layers=2)
    b, (e0, e1) = ms.base, ms.experts
    recipe = {"merge_method": "task_arithmetic", "base_model": str(b),
              "slices": [{"sources": [src(b, 0, 1), src(e0, 0, 1, weight=0.5), src(e1, 0, 1)],
                          "parameters": {"weight": 0.25}},
                         {"sources": [src(b, 1, 2), src(e0, 1, 2), src(e1, 1, 2)]}],
              "parameters": {"weight": 1.0}}
    merged = load_state(run(recipe, outs / "m"))
    base, ex = ms.base_state(), ms.expert_states()
    for name, value in merged.items():
        parts = layer_parts(name)
        first = parts is None and "embed" in name or (parts is not None and parts[0] == 0)
        w = (0.5, 0.25) if first else (1.0, 1.0)
        want = base[name].double() + sum(wi * (x[name].double() - base[name].double())
                                         for wi, x in zip(w, ex, strict=True))
        torch.testing.assert_close(value.double(), want, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_gpt2_slices_use_its_layer_names_and_key(make_models, outs):
    ms = make_models("gpt2", 1)
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [src(ms.base, 0, 2)]},
                         {"sources": [src(ms.experts[0], 0, 3)]}]}
    out = run(recipe, outs / "g")
    assert json.loads((out / "config.json").read_text())["n_layer"] == 5
    merged, expert = load_state(out), ms.expert_states()[0]
    assert {p[0] for p in map(layer_parts, merged) if p} == set(range(5))
    assert torch.equal(merged["transformer.h.4.mlp.c_fc.weight"],
                       expert["transformer.h.2.mlp.c_fc.weight"])
    with torch.no_grad():
        ms.load(out)(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("slices, fragment", [
    ([{"sources": [{"layer_range": [0, 5]}]}], "out of bounds"),
    ([{"sources": [{"layer_range": [0, 2]}, {"layer_range": [1, 4], "expert": True}]}],
     "same number of layers"),
    ([{"sources": [{"layer_range": [0, 2], "expert": True}]}], "not among its sources"),
])
def test_bad_slices_are_refused_before_any_tensor(make_models, outs, monkeypatch, slices,
                                                  fragment):
    ms = make_models("llama", 1, num_hidden_layers=4)

    def no_reads(self: Any, name: str) -> torch.Tensor:
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_reads)
    pieces = [{"sources": [{"model": str(ms.experts[0] if s.get("expert") else ms.base),
                            "layer_range": s["layer_range"]} for s in piece["sources"]]}
              for piece in slices]
    recipe = {"merge_method": "slerp", "base_model": str(ms.base), "slices": pieces,
              "parameters": {"t": 0.5}}
    with pytest.raises(RecipeError, match=fragment) as info:
        run(recipe, outs / "m")
    assert "\n" not in str(info.value)
    if fragment == "out of bounds":
        assert "[0, 5]" in str(info.value) and "4 layers" in str(info.value)
    assert leftovers(outs) == []


def test_dry_run_describes_the_slices(make_models):
    ms = make_models("llama", 1, num_hidden_layers=4)
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [src(ms.base, 0, 4)]}, {"sources": [src(ms.base, 2, 4)]}]}
    text = polymerge.dry_run(recipe).summary()
    assert "output layers 4-5" in text and "output layers: 6" in text


def test_one_slice_of_every_layer_equals_the_models_recipe(make_models, outs):
    """The whole model as one slice gives the same tensors as the plain models: recipe."""
    ms = make_models("llama", 1, num_hidden_layers=2)
    plain = {"merge_method": "slerp", "base_model": str(ms.base),
             "models": [{"model": str(ms.experts[0])}], "parameters": {"t": [0.2, 0.9]}}
    sliced = {"merge_method": "slerp", "base_model": str(ms.base),
              "slices": [{"sources": [src(ms.base, 0, 2), src(ms.experts[0], 0, 2)]}],
              "parameters": {"t": [0.2, 0.9]}}
    a, b = load_state(run(plain, outs / "a")), load_state(run(sliced, outs / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
