"""A PEFT LoRA adapter seen as a full expert of its base: W = W_base + scale * B @ A.

The adapter never becomes a full model in memory: each covered weight is rebuilt when the engine
asks for it. Tensors the adapter saves in full (``modules_to_save``, e.g. a classifier head)
replace the base's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from polymerge.errors import CheckpointError
from polymerge.io.checkpoint import Checkpoint, TensorInfo, read_safetensors_header

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


@dataclass
class _Factors:
    a_key: str | None = None
    b_key: str | None = None
    embedding: bool = False


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern: a key matches a module name by its suffix."""
    for key, value in patterns.items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class LoraCheckpoint:
    """Expert = base + LoRA update, computed per tensor on read."""

    def __init__(self, path: Path, base: Checkpoint, label: str | None = None) -> None:
        self.path = path
        self.label = label or path.name
        self.base = base
        try:
            self.adapter_config: dict[str, Any] = json.loads(
                (path / "adapter_config.json").read_text())
        except ValueError as exc:
            raise CheckpointError(f"{self.label}: invalid adapter_config.json ({exc})") from exc
        weights = path / "adapter_model.safetensors"
        if not weights.exists():
            if (path / "adapter_model.bin").exists():
                raise CheckpointError(f"{self.label}: adapter_model.bin is a pickle; convert the "
                                      "adapter to safetensors")
            raise CheckpointError(f"{self.label}: {path} has no adapter_model.safetensors")
        self._weights = weights
        self._header = read_safetensors_header(weights)
        self._handle: Any = None
        self._factors, self._full = self._map_keys()

    @property
    def config(self) -> dict[str, Any] | None:
        return self.base.config

    def _base_name(self, module_weight: str) -> str:
        names = self.base.tensors()
        if module_weight in names:
            return module_weight
        # Adapters made on a task model (e.g. ``bert.encoder...``) over a bare-backbone base.
        tail = module_weight.split(".", 1)[-1]
        if tail in names:
            return tail
        raise CheckpointError(f"{self.label}: adapter covers {module_weight!r}, which the base "
                              f"model {self.base.label} does not have")

    def _map_keys(self) -> tuple[dict[str, _Factors], dict[str, str]]:
        factors: dict[str, _Factors] = {}
        full: dict[str, str] = {}
        for key in self._header:
            stripped = key.removeprefix(_PREFIX)
            match = _LORA_KEY.match(stripped)
            if match is None:
                name = stripped.replace(".modules_to_save.default", "").replace(
                    ".modules_to_save", "")
                # PEFT saves a targeted embedding itself as ``<module>.base_layer.weight``.
                name = re.sub(r"\.base_layer(?=\.|$)", "", name)
                full[self._base_name(name)] = key
                continue
            module = match["module"]
            target = self._base_name(module + ".weight")
            entry = factors.setdefault(target, _Factors())
            entry.embedding = match["kind"].startswith("lora_embedding")
            if match["kind"].endswith("A"):
                entry.a_key = key
            else:
                entry.b_key = key
        for target, entry in factors.items():
            if entry.a_key is None or entry.b_key is None:
                raise CheckpointError(f"{self.label}: adapter has only one LoRA factor for "
                                      f"{target!r}")
        return factors, full

    def scale(self, target: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring per-module patterns."""
        cfg = self.adapter_config
        module = target.removesuffix(".weight")
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def covered(self) -> list[str]:
        """Base tensor names the adapter changes."""
        return sorted(set(self._factors) | set(self._full))

    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors()

    def _get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self._weights), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B, A, scale) with delta = scale * B @ A in the base weight's layout, or None."""
        entry = self._factors.get(name)
        if entry is None:
            return None
        a = self._get(entry.a_key).float()  # type: ignore[arg-type]
        b = self._get(entry.b_key).float()  # type: ignore[arg-type]
        # Embeddings and GPT-2 style Conv1D layers store the update transposed: (B @ A)^T.
        if entry.embedding or self.adapter_config.get("fan_in_fan_out"):
            a, b = b.T, a.T
        return b, a, self.scale(name)

    def read(self, name: str) -> torch.Tensor:
        """The expert's tensor, in the base's dtype (the update is added in float32)."""
        base = self._get(self._full[name]) if name in self._full else self.base.read(name)
        factors = self.lora_factors(name)
        if factors is None:
            return base
        b, a, scale = factors
        delta = (b @ a).mul_(scale)
        if delta.shape != base.shape:
            raise CheckpointError(f"{self.label}: LoRA update for {name!r} has shape "
                                  f"{tuple(delta.shape)}, base has {tuple(base.shape)}")
        return base.float().add_(delta).to(base.dtype)

    def close(self) -> None:
        self._handle = None
