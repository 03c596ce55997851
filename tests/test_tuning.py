"""Learned merges end to end on tiny real models: BERT sequence classifiers with per-task heads
(the zoo's cls layout), whose learned merge is a store of the merged body plus each head, and a
Llama with LoRA experts, through ``polymerge merge``'s builder path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tuning_fixtures import ClsZoo, LmZoo, make_cls_zoo, make_lm_zoo, write_jsonl

from polymerge import merge
from polymerge.errors import PolymergeError
from polymerge.recipe import load_recipe
from polymerge.tuning.coefficients import Coefficients, layer_of, layer_order
from polymerge.tuning.objectives import make_objective, mean_over_tasks, task_losses
from polymerge.tuning.task_vectors import leaf, load_task_vectors, plan_for
from polymerge.tuning.trainer import base_tensors, merged_weights

FAST = {"steps": 12, "eval_every": 4, "batch_size": 6, "lr": 0.1}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Tiny models run faster on one thread, and far faster on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cls_zoo(tmp_path_factory: pytest.TempPathFactory) -> ClsZoo:
    return make_cls_zoo(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory) -> LmZoo:
    return make_lm_zoo(tmp_path_factory.mktemp("lm"))


def recipe(zoo: ClsZoo | LmZoo, method: str = "supermerge", tasks: list[str] | None = None,
           **params: object) -> dict:
    names = tasks or list(zoo.experts)
    return {"merge_method": method, "base_model": str(zoo.base),
            "models": [{"model": str(zoo.experts[t]), "name": t} for t in names],
            "parameters": {"data": str(zoo.val), **FAST, **params}}


def info(out: Path) -> dict:
    return json.loads((out / "coefficients.json").read_text())


def body(out: Path) -> dict[str, torch.Tensor]:
    """The merged body: the store's shared tensors (experts with heads), else the checkpoint."""
    from polymerge.stores import is_store, open_store

    if not is_store(out):
        return load_file(str(out / "model.safetensors"))
    store = open_store(out)
    assert store.method == "merged" and store.has_heads
    return {n: store.tensor(n, 0) for n in store.entries}


def expert_body(path: Path) -> dict[str, torch.Tensor]:
    """An expert's encoder under the base's names (its ``bert.`` tensors)."""
    return {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors"))
            .items() if k.startswith("bert.")}


def expected_output(zoo: ClsZoo | LmZoo, coefs: dict[str, dict[str, float | None]],
                    granularity: str, experts: dict[str, dict[str, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """base + sum_i c(i, layer) * (expert_i - base), computed from the files independently."""
    base = load_file(str(zoo.base / "model.safetensors"))
    out = {}
    for name, b in base.items():
        w = b.clone()
        for e, sd in experts.items():
            c = coefs[e].get(layer_of(name, granularity))
            if c is not None:
                w += c * (sd[name] - b)
        out[name] = w
    return out


def test_gradients_reach_every_coefficient_of_a_real_encoder(cls_zoo: ClsZoo) -> None:
    r = load_recipe(recipe(cls_zoo))
    names = list(cls_zoo.experts)
    plan = plan_for(r, names)
    tv = load_task_vectors(plan, [leaf(n) for n in names], "tensor")
    layers = layer_order(tv.names, "tensor")
    coefs = Coefficients(names, layers, "tanh", 0.3, tv.present(layers, "tensor"))
    assert coefs.trainable == len(names) * len(layers)  # full fine-tunes touch every tensor
    obj = make_objective(cls_zoo.base, list(cls_zoo.experts.items()), cls_zoo.base, None,
                         plan.heads)
    plan.close()
    from polymerge.tuning.data import read_jsonl

    items = obj.prepare(read_jsonl(cls_zoo.val, obj.specs, needs_labels=True))
    weights = merged_weights(base_tensors(obj.model, tv.names), tv, coefs,
                             {n: coefs.index[n] for n in tv.names})
    from torch.func import functional_call

    out = obj.outputs(lambda **kw: functional_call(obj.model, weights, args=(), kwargs=kw),
                      items)
    mean_over_tasks(task_losses(out, "cross_entropy")).backward()
    assert coefs.raw.grad is not None
    assert int((coefs.raw.grad == 0).sum()) == 0


def test_one_expert_moves_toward_one_and_the_output_is_base_plus_scaled_vector(
        cls_zoo: ClsZoo, tmp_path: Path) -> None:
    records = [json.loads(x) for x in cls_zoo.val.read_text().splitlines()]
    data = write_jsonl(tmp_path / "pol.jsonl", [x for x in records if x["task"] == "polarity"])
    out = merge(recipe(cls_zoo, tasks=["polarity"], data=str(data), granularity="expert",
                       steps=30, lr=0.2), tmp_path / "out", progress=False)
    got = info(out)
    c = got["coefficients"]["polarity"]["all"]
    assert c > 0.6, c  # from 0.3
    group = got["levels"][0]["groups"][0]
    assert group["best_heldout_loss"] < group["initial_heldout_loss"]
    assert got["trainable_coefficients"] == 1
    merged = body(out)
    ref = expected_output(cls_zoo, got["coefficients"], "expert",
                          {"polarity": expert_body(cls_zoo.experts["polarity"])})
    for name, tensor in ref.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_hierarchical_with_one_group_of_n_equals_flat_and_is_deterministic(
        cls_zoo: ClsZoo, tmp_path: Path) -> None:
    flat = merge(recipe(cls_zoo), tmp_path / "flat", progress=False)
    tree = merge(recipe(cls_zoo, group_size=3), tmp_path / "tree", progress=False)
    assert info(flat)["coefficients"] == info(tree)["coefficients"]
    assert not info(tree)["hierarchical"]
    flat_body, tree_body = body(flat), body(tree)
    assert all(torch.equal(v, tree_body[k]) for k, v in flat_body.items())
    other = merge(recipe(cls_zoo) | {"seed": 1}, tmp_path / "seed1", progress=False)
    assert info(other)["coefficients"] != info(flat)["coefficients"]


def test_hierarchical_tree_bounds_resident_vectors_and_composes_coefficients(
        cls_zoo: ClsZoo, tmp_path: Path) -> None:
    flat = info(merge(recipe(cls_zoo, granularity="block"), tmp_path / "flat", progress=False))
    out = merge(recipe(cls_zoo, granularity="block", group_size=2), tmp_path / "tree",
                progress=False)
    tree = info(out)
    assert tree["hierarchical"] and len(tree["levels"]) == 2
    low, top = tree["levels"][0]["groups"], tree["levels"][1]["groups"]
    assert [g["members"] for g in low] == [["polarity", "color"]]  # "size" moves up alone
    assert top[0]["members"] == ["level0.group0", "size"]
    for layer in tree["layers"]:
        c_top = top[0]["coefficients"]["level0.group0"][layer]
        for e in ("polarity", "color"):
            assert tree["coefficients"][e][layer] == pytest.approx(
                c_top * low[0]["coefficients"][e][layer])
        assert tree["coefficients"]["size"][layer] == pytest.approx(
            top[0]["coefficients"]["size"][layer])
    # two task vectors resident at a time instead of three
    mem_tree = tree["memory"]["peak_task_vector_bytes"]
    mem_flat = flat["memory"]["peak_task_vector_bytes"]
    assert mem_tree == pytest.approx(mem_flat * 2 / 3, rel=1e-6)
    assert tree["layers"] == ["embeddings", "block.0", "block.1"]
    assert tree["trainable_coefficients"] == 2 * 3 + 2 * 3  # two groups of two experts
    experts = {t: expert_body(p) for t, p in cls_zoo.experts.items()}
    merged = body(out)
    ref = expected_output(cls_zoo, tree["coefficients"], "block", experts)
    for name, tensor in ref.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_adamerging_through_the_cli_writes_checkpoint_coefficients_and_heatmap(
        cls_zoo: ClsZoo, tmp_path: Path) -> None:
    from polymerge.cli import main

    records = [{"text": json.loads(x)["text"], "task": json.loads(x)["task"]}
               for x in cls_zoo.val.read_text().splitlines()]
    data = write_jsonl(tmp_path / "unlabelled.jsonl", records)
    r = recipe(cls_zoo, "adamerging", data=str(data), granularity="block", lr=0.5)
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(r))
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    out = tmp_path / "out"
    got = info(out)
    values = [v for row in got["coefficients"].values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 1
    assert (out / "coefficients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"config.json", "polymerge_store.json", "pieces", "README.md", "tokenizer.json",
            "polymerge_recipe.yaml"} <= {p.name for p in out.iterdir()}
    assert "adamerging" in (out / "README.md").read_text()
    assert main(["export", str(out), "--expert", "color", "-o", str(tmp_path / "color")]) == 0
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tmp_path / "color")  # ordinary HF
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}


def test_bad_data_fails_before_any_output(cls_zoo: ClsZoo, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "good w1", "task": "polarity", "label": "pos"},
        {"text": "red w2", "task": "color", "label": "purple"}])
    with pytest.raises(PolymergeError, match=r"bad.jsonl:2: unknown label 'purple'"):
        merge(recipe(cls_zoo, data=str(bad)), tmp_path / "out", progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PolymergeError, match="no examples"):
        merge(recipe(cls_zoo, data=str(empty)), tmp_path / "out", progress=False)
    with pytest.raises(PolymergeError,
                       match=r"neither a file nor a known data source \(sources: cls, gen\)"):
        merge(recipe(cls_zoo, data="no-such-suite"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_supermerge_on_lora_causal_lm_experts(lm_zoo: LmZoo, tmp_path: Path) -> None:
    out = merge(recipe(lm_zoo, steps=20, lr=0.2), tmp_path / "out", progress=False)
    got = info(out)
    # LoRA touched q, v and up projections of 2 layers: 6 tensors per expert, nothing else
    assert got["trainable_coefficients"] == 2 * 6
    assert all(any(k in layer for k in ("q_proj", "v_proj", "up_proj"))
               for layer in got["layers"])
    group = got["levels"][0]["groups"][0]
    assert group["best_heldout_loss"] < group["initial_heldout_loss"]
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], merged[name])


def test_dry_plan_validates_without_loading_a_model(cls_zoo: ClsZoo) -> None:
    from polymerge import dry_run

    plan = dry_run(load_recipe(recipe(cls_zoo)))
    try:
        assert plan.schema.name == "supermerge"
        assert plan.input_names == list(cls_zoo.experts)
        assert "method: supermerge" in plan.summary()
    finally:
        plan.close()
    with pytest.raises(PolymergeError, match="granularity"):
        dry_run(load_recipe(recipe(cls_zoo, granularity="row")))


def test_hierarchical_on_bf16_experts_keeps_group_results_in_float32(
        cls_zoo: ClsZoo, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    def to_bf16(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        sd = load_file(str(src / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()},
                  str(dst / "model.safetensors"))
        return dst

    zoo = ClsZoo(tmp_path, to_bf16(cls_zoo.base, tmp_path / "base"),
                 {t: to_bf16(p, tmp_path / t) for t, p in cls_zoo.experts.items()}, cls_zoo.val)
    out = merge(recipe(zoo, granularity="expert", group_size=2, steps=6), tmp_path / "out",
                progress=False)
    got = info(out)
    assert len(got["levels"]) == 2
    merged = body(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    f32 = {t: {k: v.float() for k, v in expert_body(p).items()}
           for t, p in zoo.experts.items()}
    base = {k: v.float() for k, v in load_file(str(zoo.base / "model.safetensors")).items()}
    for name, b in base.items():
        ref = b + sum(got["coefficients"][e]["all"] * (sd[name] - b) for e, sd in f32.items())
        torch.testing.assert_close(merged[name].float(), ref, rtol=8e-3, atol=1e-5)
    assert not list(tmp_path.glob(".out.levels-*"))  # scratch removed
