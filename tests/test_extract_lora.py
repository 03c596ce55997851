"""``polymerge extract-lora``: full rank reproduces the fine-tune; PEFT loads the adapter and
its outputs are those of base + B A (computed here from the saved factors); energy fractions
choose per-module ranks; include/exclude; tied embeddings and Conv1D layers (GPT-2); errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import forward, load_state
from safetensors.torch import load_file, save_file

from polymerge.cli import main
from polymerge.errors import PolymergeError, RecipeError
from polymerge.io.checkpoint import open_checkpoint
from polymerge.methods import lowrank
from polymerge.stores import twin
from polymerge.stores.extract_lora import extract_lora, parse_rank


def peft_model(ms, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(ms.load(ms.base), str(adapter)).eval()


def base_plus_ba(ms, adapter: Path) -> dict[str, torch.Tensor]:
    """The base's state with every saved factor pair added (scale lora_alpha / r, per module),
    and the whole tensors replaced, written out from the adapter's own files."""
    state = {k: v.double() for k, v in ms.base_state().items()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    saved = load_file(adapter / "adapter_model.safetensors")
    for key, value in saved.items():
        name = key.removeprefix("base_model.model.")
        m = re.match(r"(.+)\.lora_(embedding_)?A(\.weight)?$", name)
        if m is None:
            if ".lora_" not in name:
                state[name] = value.double()
            continue
        module, embedding = m.group(1), m.group(2)
        b = saved[key.replace("lora_embedding_A", "lora_embedding_B").replace("lora_A",
                                                                              "lora_B")]
        pattern = {k: v for k, v in config["rank_pattern"].items()
                   if re.fullmatch(k, module)}
        r = next(iter(pattern.values()), config["r"])
        alpha = next((v for k, v in config["alpha_pattern"].items() if re.fullmatch(k, module)),
                     config["lora_alpha"])
        delta = (b.double() @ value.double()) * (alpha / r)
        state[module + ".weight"] += delta.T if embedding or config["fan_in_fan_out"] else delta
    return state


def test_full_rank_reproduces_the_fine_tune(make_models, tmp_path, capsys):
    ms = make_models("llama", 1)
    adapter = tmp_path / "adapter"
    assert main([ "extract-lora", str(ms.experts[0]), "--base", str(ms.base), "-o",
                 str(adapter), "--rank", "64", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj: linear rank 16/16, relative error" in printed
    readme = (adapter / "README.md").read_text()
    assert "| `model.layers.2.mlp.down_proj` | linear | [16, 32] | 16 | 16 |" in readme
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and config["rank_pattern"] == {}
    assert "model.norm" in config["modules_to_save"]
    combined = open_checkpoint(f"{ms.base}+{adapter}")
    for name, want in ms.expert_states()[0].items():
        torch.testing.assert_close(combined.read(name), want, atol=2e-6, rtol=1e-5)
    combined.close()
    with torch.no_grad():
        torch.testing.assert_close(forward(peft_model(ms, adapter)),
                                   forward(ms.load(ms.experts[0])), atol=1e-5, rtol=1e-4)


def test_energy_ranks_and_peft_outputs_equal_base_plus_ba(make_models, tmp_path):
    ms = make_models("llama", 1)
    report = extract_lora(ms.experts[0], ms.base, tmp_path / "a", rank="0.8", progress=False)
    base, expert = ms.base_state(), ms.expert_states()[0]
    for module in report.lora_modules:
        name = module.module + ".weight"
        delta = (expert[name] - base[name]).double()
        energy = torch.linalg.svdvals(delta) ** 2
        kept = torch.cumsum(energy, 0) / energy.sum()
        assert module.rank == int((kept < 0.8 - 1e-12).sum()) + 1, name
        assert module.error <= (1 - 0.8) ** 0.5 + 1e-6
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    model = ms.model_from_state({k: v.float() for k, v in base_plus_ba(ms, tmp_path / "a")
                                 .items()})
    with torch.no_grad():
        torch.testing.assert_close(forward(peft_model(ms, tmp_path / "a")), forward(model),
                                   atol=1e-5, rtol=1e-4)


def test_include_exclude_and_what_is_not_captured(make_models, tmp_path):
    ms = make_models("llama", 1)
    report = extract_lora(ms.experts[0], ms.base, tmp_path / "a", rank=2,
                          include="self_attn", exclude="k_proj", progress=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"q_proj", "v_proj",
                                                                        "o_proj"}
    assert config["modules_to_save"] is None
    assert "model.layers.0.mlp.up_proj.weight" in report.not_captured
    assert "model.layers.1.self_attn.k_proj.weight" in report.not_captured
    assert all(m.rank == 2 for m in report.lora_modules)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 16)


def test_gpt2_conv1d_and_tied_embedding(make_models, tmp_path):
    """GPT-2: Conv1D blocks (fan_in_fan_out) and the LM head tied to wte; a fine-tune that
    changed the 2-D weights is reproduced by PEFT's (unmerged) outputs at full rank."""
    ms = make_models("gpt2", 1)
    base, expert = ms.base_state(), ms.expert_states()[0]
    save_file({k: (v if v.dim() == 2 else base[k]).contiguous() for k, v in expert.items()},
              ms.experts[0] / "model.safetensors", metadata={"format": "pt"})
    extract_lora(ms.experts[0], ms.base, tmp_path / "a", rank=1.0, progress=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["ensure_weight_tying"]
    assert "lm_head" in config["target_modules"]
    with torch.no_grad():
        torch.testing.assert_close(forward(peft_model(ms, tmp_path / "a")),
                                   forward(ms.load(ms.experts[0])), atol=1e-5, rtol=1e-4)
    assert load_state(ms.experts[0]).keys() == expert.keys()


def test_ranks_and_errors(make_models, tmp_path):
    assert parse_rank("16") == 16 and parse_rank(8) == 8
    assert parse_rank("0.9") == 0.9 and parse_rank("1.0") == 1.0
    for bad in ("0", "1.5", "abc", "-2"):
        with pytest.raises(RecipeError):
            parse_rank(bad)
    assert twin.truncated_svd is lowrank.truncated_svd
    ms = make_models("llama", 1, tokenizer=False)
    with pytest.raises(PolymergeError, match="overlaps"):
        extract_lora(ms.experts[0], ms.base, ms.base / "inside", rank=4, progress=False)
    with pytest.raises(RecipeError, match="no tensor is selected"):
        extract_lora(ms.experts[0], ms.base, tmp_path / "x", rank=4, include="nothing",
                     progress=False)
    assert not (tmp_path / "x").exists()
