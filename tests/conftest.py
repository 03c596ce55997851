"""Shared fixtures: tiny Llama / BERT / GPT-2 families (a base and experts = base + small seeded
deltas) built from transformers configs, an independent safetensors reader, reference merges in
plain torch and a real PEFT LoRA adapter maker. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "bert", "gpt2")
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 64
LAYERS = 3


# --------------------------------------------------------------------------- tiny models


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config small enough that a model is a few KB."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=LAYERS, num_attention_heads=2,
                                  num_key_value_heads=2, max_position_embeddings=32,
                                  bos_token_id=1, eos_token_id=2)
        return LlamaConfig(**{**kw, **overrides})
    if arch == "bert":
        kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=LAYERS, num_attention_heads=2, max_position_embeddings=32)
        return BertConfig(**{**kw, **overrides})
    if arch == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=32,
                  bos_token_id=0, eos_token_id=0)
        return GPT2Config(**{**kw, **overrides})
    raise ValueError(arch)


def model_class(arch: str) -> type:
    from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

    return {"llama": LlamaForCausalLM, "bert": BertModel, "gpt2": GPT2LMHeadModel}[arch]


def auto_class(arch: str) -> type:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if arch == "bert" else AutoModelForCausalLM


def build_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(arch)(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


def forward(model: Any) -> torch.Tensor:
    """A deterministic forward pass; logits (causal LMs) or the last hidden state (BERT)."""
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------- independent I/O


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder / shards / bare file, read with safetensors itself."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            part = load_file(path / shard)
            assert not set(part) & set(out), f"tensor saved twice in {shard}"
            out.update(part)
        return out
    return load_file(path / "model.safetensors")


def tree_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (or of the file itself)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder) if p != folder else p.name):
            hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(parent: Path) -> list[str]:
    """What is in ``parent`` (outputs and hidden temp folders included)."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


# --------------------------------------------------------------------------- reference merges


def ref_task_arithmetic(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                        weights: Sequence[float], lam: float = 1.0) -> dict[str, torch.Tensor]:
    """base + lambda * sum_i w_i (expert_i - base), in float64."""
    out = {}
    for name, b in base.items():
        b64 = b.double()
        acc = torch.zeros_like(b64)
        for w, e in zip(weights, experts, strict=True):
            acc += w * (e[name].double() - b64)
        out[name] = b64 + lam * acc
    return out


def ref_linear(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
               normalize: bool = True) -> dict[str, torch.Tensor]:
    """sum_i w_i x_i (/ sum_i w_i), in float64."""
    total = sum(weights)
    out = {}
    for name in states[0]:
        acc = sum(w * s[name].double() for w, s in zip(weights, states, strict=True))
        out[name] = acc / total if normalize else acc
    return out


def assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                        dtype: torch.dtype | None = None, atol: float = 1e-6,
                        rtol: float = 1e-5) -> None:
    """Same names; every tensor close to the reference (cast to ``dtype`` when given)."""
    assert sorted(actual) == sorted(expected)
    for name, exp in expected.items():
        got = actual[name]
        if dtype is not None:
            assert got.dtype == dtype, name
            exp = exp.to(dtype)
            torch.testing.assert_close(got, exp, msg=lambda m, n=name: f"{n}: {m}")
        else:
            torch.testing.assert_close(got.double(), exp.double(), atol=atol, rtol=rtol,
                                       msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- model families


@dataclass
class ModelSet:
    """A tiny base model and experts saved as HF folders under ``root``."""

    arch: str
    root: Path
    base: Path
    experts: list[Path]
    dtype: torch.dtype

    def base_state(self) -> dict[str, torch.Tensor]:
        return load_state(self.base)

    def expert_states(self) -> list[dict[str, torch.Tensor]]:
        return [load_state(e) for e in self.experts]

    def hashes(self) -> dict[str, dict[str, str]]:
        return {str(p): tree_hashes(p) for p in [self.base, *self.experts]}

    def load(self, folder: Path) -> Any:
        return auto_class(self.arch).from_pretrained(folder).eval()

    def model_from_state(self, state: dict[str, torch.Tensor]) -> Any:
        """An independent model with ``state`` loaded (ties restored by transformers)."""
        model = build_model(self.arch, seed=123)
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected
        assert all("lm_head" in k for k in missing), missing
        return model.float().eval()


def write_tokenizer(folder: Path, marker: str) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(VOCAB - 5)]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32,
         "marker": marker}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
         "sep_token": "[SEP]", "mask_token": "[MASK]", "marker": marker}))


def _perturb(model: Any, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.copy_((p.float() + noise).to(p.dtype))


@pytest.fixture
def make_models(tmp_path: Path) -> Callable[..., ModelSet]:
    """Factory: ``make_models(arch, n_experts, dtype=..., max_shard_size=...)``.

    Experts are the base plus seeded Gaussian deltas, so every call with the same arguments
    builds the same weights. The base folder gets a tiny tokenizer (vocab.txt, ...); experts get
    tokenizer files with a different marker, to tell which one an output copied.
    """
    counter = itertools.count()

    def factory(arch: str = "llama", n_experts: int = 2, *, dtype: torch.dtype = torch.float32,
                seed: int = 0, scale: float = 0.02, max_shard_size: str | None = None,
                tokenizer: bool = True, name: str | None = None,
                **config_overrides: Any) -> ModelSet:
        root = tmp_path / (name or f"{arch}-{next(counter)}")
        root.mkdir(parents=True)
        model = build_model(arch, seed=seed, dtype=dtype, **config_overrides)
        base_sd = {k: v.clone() for k, v in model.state_dict().items()}
        save_kw: dict[str, Any] = {}
        if max_shard_size is not None:
            save_kw["max_shard_size"] = max_shard_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(root / "base", **save_kw)
            if tokenizer:
                write_tokenizer(root / "base", "base")
            experts = []
            for i in range(n_experts):
                model.load_state_dict(base_sd)
                _perturb(model, seed * 1000 + i + 1, scale)
                folder = root / f"expert{i}"
                model.save_pretrained(folder, **save_kw)
                if tokenizer:
                    write_tokenizer(folder, f"expert{i}")
                experts.append(folder)
        return ModelSet(arch, root, root / "base", experts, dtype)

    return factory


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoraExpert:
    """A PEFT adapter folder, and PEFT's own merge_and_unload() of it (state + saved folder)."""

    adapter: Path
    merged_state: dict[str, torch.Tensor]
    full: Path


def make_lora(ms: ModelSet, name: str, *, target_modules: Sequence[str] = ("q_proj", "v_proj"),
              r: int = 4, lora_alpha: int = 8, seed: int = 7, save_kwargs: dict | None = None,
              **lora_kwargs: Any) -> LoraExpert:
    """A real PEFT LoRA adapter on ``ms``'s base with random nonzero A and B factors."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ms.load(ms.base).float()
        config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                            **lora_kwargs)
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:  # both factors: PEFT zero-inits B (or A, embeddings)
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif "modules_to_save" in pname:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        adapter = ms.root / name
        peft_model.save_pretrained(adapter, **(save_kwargs or {}))
        merged = peft_model.merge_and_unload()
        merged_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        full = ms.root / f"{name}-merged"
        merged.save_pretrained(full)
    return LoraExpert(adapter, merged_state, full)


# --------------------------------------------------------------------------- misc


@pytest.fixture
def outs(tmp_path: Path) -> Path:
    """An empty parent folder for outputs, to check nothing is left behind in it."""
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


def iter_shards(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.safetensors"))


@pytest.fixture(params=["whole tensors", "small chunks", "chunks of panels"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a method test three times: on whole tensors, with chunks of 5 entries so the
    chunked whole-tensor statistics of :mod:`polymerge.methods.chunks` are exercised too, and
    with chunks of 16 entries in panels of 8, so their products also run as batches of panels
    (and a last chunk that is not a whole number of panels as one product)."""
    from polymerge.methods import chunks

    if request.param == "small chunks":
        monkeypatch.setattr(chunks, "CHUNK", 5)
    elif request.param == "chunks of panels":
        monkeypatch.setattr(chunks, "CHUNK", 16)
        monkeypatch.setattr(chunks, "PANEL", 8)
    return request.param
