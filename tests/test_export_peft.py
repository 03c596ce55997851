"""A twin store exported as a shared checkpoint plus one PEFT LoRA adapter per expert: peft
loads every adapter, each adapter's outputs equal the store's top-1 expert, and a mixed batch
with ``adapter_names=`` equals the runtime row by row."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime_common import TEXTS, build, family, store_recipe
from torch.testing import assert_close

import polymerge
from polymerge.cli import main as cli
from polymerge.errors import PolymergeError
from polymerge.stores.export_peft import MANIFEST, export_peft


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return family(tmp_path_factory.mktemp("peft_llama"), "llama", scale=0.0, noise=0.05,
                  seed=5)


def _peft(out: Path, experts: list[str], causal: bool) -> Any:
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = AutoModelForCausalLM if causal else AutoModel
        base = cls.from_pretrained(out / "base").eval()
        model = PeftModel.from_pretrained(base, out / "adapters" / experts[0],
                                          adapter_name=experts[0])
        for name in experts[1:]:
            model.load_adapter(out / "adapters" / name, adapter_name=name)
    return model.eval()


def _outputs(model: Any, texts: list[str], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.base_model.model.name_or_path)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**enc, **kwargs)
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return main, enc["attention_mask"]


def _check(model: Any, rt: Any, routing: Any, **kwargs: Any) -> None:
    got, mask = _outputs(model, TEXTS, **kwargs)
    want = rt.forward(TEXTS, routing)
    for row, w in enumerate(want.outputs):
        assert_close(got[row][mask[row].bool()], w, rtol=1e-5, atol=2e-5)


def test_each_adapter_equals_the_store_top1(llama, tmp_path):
    base, experts, _, _ = llama
    store = build(store_recipe("twin", base, experts, rank=0.5), tmp_path / "store")
    result = export_peft(store, tmp_path / "out")
    rt = polymerge.load_store(store)
    assert result.mode == "exact" and not result.approximated
    assert "model.norm" in result.modules_to_save  # per-expert RMSNorm weights, saved whole
    assert set(result.targets) >= {"model.embed_tokens", "lm_head",
                                   "model.layers.0.self_attn.q_proj"}
    config = json.loads((tmp_path / "out" / "adapters" / "expert1" /
                         "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["base_model_name_or_path"] \
        == str(tmp_path / "out" / "base")
    model = _peft(tmp_path / "out", rt.experts, causal=True)
    for name in rt.experts:
        model.set_adapter(name)
        _check(model, rt, name)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["experts"] == rt.experts and manifest["mode"] == "exact"


def test_mixed_batch_with_adapter_names(llama, tmp_path):
    """A store with shared norms (others: shared) is pure LoRA: exact in ``lora`` mode, and
    peft mixes adapters per row."""
    base, experts, _, _ = llama
    store = build(store_recipe("twin", base, experts, rank=0.5, others="shared"),
                  tmp_path / "store")
    result = export_peft(store, tmp_path / "out", mode="lora")
    assert not result.approximated and not result.modules_to_save and not result.lora_bias
    rt = polymerge.load_store(store)
    model = _peft(tmp_path / "out", rt.experts, causal=True)
    names = ["expert2", "expert0", "expert3", "expert1"]
    _check(model, rt, names, adapter_names=names)


def test_lora_mode_names_what_it_approximates(llama, tmp_path):
    base, experts, _, _ = llama
    store = build(store_recipe("twin", base, experts, rank=0.5), tmp_path / "store")
    result = export_peft(store, tmp_path / "out", mode="lora")
    assert "model.norm.weight" in result.approximated and not result.modules_to_save
    assert all(v > 0 for v in result.approximated.values())
    from polymerge.stores.export_peft import describe

    assert "approximated" in describe(result) and "others: shared" in describe(result)
    rt = polymerge.load_store(store)
    model = _peft(tmp_path / "out", rt.experts, causal=True)  # loads; outputs approximate
    model.set_adapter("expert0")
    got, _ = _outputs(model, TEXTS[:1])
    assert torch.isfinite(got).all()


def test_bert_biases_and_layer_norms(tmp_path):
    """BERT: per-expert biases ride in lora_bias (embeddings then saved whole, peft refuses
    lora_bias there), LayerNorms saved whole; every adapter equals its expert."""
    base, experts, _, _ = family(tmp_path / "bert", "bert", scale=0.0, noise=0.05, seed=6)
    store = build(store_recipe("twin", base, experts, rank=0.5), tmp_path / "store")
    result = export_peft(store, tmp_path / "out")
    assert result.lora_bias and "embeddings.word_embeddings" in result.modules_to_save
    rt = polymerge.load_store(store)
    model = _peft(tmp_path / "out", rt.experts, causal=False)
    for name in rt.experts:
        model.set_adapter(name)
        _check(model, rt, name)


def test_cli_and_refusals(llama, tmp_path, capsys):
    base, experts, _, _ = llama
    twin = build(store_recipe("twin", base, experts, rank=0.5), tmp_path / "twin")
    assert cli(["export", str(twin), "--format", "peft", "-o", str(tmp_path / "out")]) == 0
    assert "LoRA adapter(s)" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapters" / "expert3" / "adapter_model.safetensors").is_file()
    assert cli(["export", str(twin), "--format", "peft", "--expert", "expert0", "-o",
                str(tmp_path / "o2")]) == 2
    channel = build(store_recipe("channel", base, experts, groups=2), tmp_path / "channel")
    with pytest.raises(PolymergeError, match="takes a twin store"):
        export_peft(channel, tmp_path / "o3")
    with pytest.raises(PolymergeError, match="overlaps the store"):
        export_peft(twin, twin / "inside")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
