"""A PEFT LoRA adapter seen as a full expert of its base: W = W_base + scale * B @ A.

The adapter never becomes a full model in memory: each covered weight is rebuilt when the engine
asks for it. Tensors the adapter saves in full (``modules_to_save``, e.g. a classifier head)
replace the base's.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError
from polymerge.io.checkpoint import (
    Checkpoint,
    SafetensorsCheckpoint,
    TensorInfo,
    contained_file,
    read_json_file,
    read_safetensors_header,
)
from polymerge.io.patterns import PatternError, SafePattern, compile_safe

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class _Factors:
    module: str = ""  # the module's name as PEFT saw it (what its patterns are matched to)
    a_key: str | None = None
    b_key: str | None = None
    embedding: bool = False


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class _Patterns:
    """PEFT's ``rank_pattern``/``alpha_pattern``: the first key (a regex) that matches the
    module name, or its end after a dot, gives the value. Keys are run by
    :mod:`polymerge.io.patterns`, which cannot backtrack."""

    def __init__(self, where: str, field: str, raw: Any, valid: Any, expected: str) -> None:
        self.items: list[tuple[str, SafePattern, Any]] = []
        if raw is None:
            return
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: {field} must be an object of pattern: value")
        for key, value in raw.items():
            shown = repr(key) if len(key) <= 60 else repr(key[:56]) + "..."
            if not valid(value):
                raise CheckpointError(f"{where}: {field} {shown} must be {expected}, got "
                                      f"{value!r:.40}")
            try:
                pattern = compile_safe(key)
            except PatternError as exc:
                raise CheckpointError(f"{where}: {field} key {shown} is not a pattern "
                                      f"polymerge can use ({exc})") from None
            self.items.append((key, pattern, value))

    def value(self, module: str, default: Any) -> Any:
        for key, pattern, value in self.items:
            if module == key or pattern.match_module(module):
                return value
        return default


class LoraCheckpoint:
    """Expert = base + LoRA update, computed per tensor on read."""

    def __init__(self, path: Path, base: Checkpoint, label: str | None = None) -> None:
        self.path = path
        self.label = label or path.name
        self.base = base
        config = read_json_file(contained_file(path, CONFIG_NAME, "adapter config"), CONFIG_NAME)
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.label}: {CONFIG_NAME} is not a JSON object")
        self.adapter_config: dict[str, Any] = config
        self._read_settings()
        if not os.path.lexists(path / WEIGHTS_NAME):
            if os.path.lexists(path / "adapter_model.bin"):
                raise CheckpointError(f"{self.label}: adapter_model.bin is a pickle; convert the "
                                      "adapter to safetensors")
            raise CheckpointError(f"{self.label}: {path} has no {WEIGHTS_NAME}")
        weights = contained_file(path, WEIGHTS_NAME, "adapter weights")
        self._weights = weights
        self._header = read_safetensors_header(weights)
        self._reader = SafetensorsCheckpoint(weights, dict.fromkeys(self._header, weights),
                                             label=self.label)
        self._scales: dict[str, float] = {}
        self._factors, self._full = self._map_keys()

    def _read_settings(self) -> None:
        """Validate the numbers the update depends on: one-line errors, never a traceback."""
        cfg = self.adapter_config
        where = f"{self.label}: {CONFIG_NAME}"
        self._r = cfg.get("r", 8)
        if not _is_rank(self._r):
            raise CheckpointError(f"{where}: r must be a positive integer, got {self._r!r:.40}")
        self._alpha = cfg.get("lora_alpha", self._r)
        if not _is_number(self._alpha):
            raise CheckpointError(f"{where}: lora_alpha must be a finite number, got "
                                  f"{self._alpha!r:.40}")
        for flag in ("use_rslora", "fan_in_fan_out"):
            if cfg.get(flag) not in (None, True, False):
                raise CheckpointError(f"{where}: {flag} must be true or false, got "
                                      f"{cfg.get(flag)!r:.40}")
        self._rslora = bool(cfg.get("use_rslora"))
        self._fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self._rank_pattern = _Patterns(where, "rank_pattern", cfg.get("rank_pattern"),
                                       _is_rank, "a positive integer")
        self._alpha_pattern = _Patterns(where, "alpha_pattern", cfg.get("alpha_pattern"),
                                        _is_number, "a finite number")

    @property
    def config(self) -> dict[str, Any] | None:
        return self.base.config

    def _base_name(self, module_weight: str, names: dict[str, TensorInfo]) -> str:
        if module_weight in names:
            return module_weight
        # Adapters made on a task model (e.g. ``bert.encoder...``) over a bare-backbone base.
        tail = module_weight.split(".", 1)[-1]
        if tail in names:
            return tail
        raise CheckpointError(f"{self.label}: adapter covers {module_weight!r:.120}, which the "
                              f"base model {self.base.label} does not have")

    def _map_keys(self) -> tuple[dict[str, _Factors], dict[str, str]]:
        factors: dict[str, _Factors] = {}
        full: dict[str, str] = {}
        base_infos = self.base.tensors()
        for key, info in self._header.items():
            stripped = key.removeprefix(_PREFIX)
            match = _LORA_KEY.match(stripped)
            if match is None:
                name = stripped.replace(".modules_to_save.default", "").replace(
                    ".modules_to_save", "")
                # PEFT saves a targeted embedding itself as ``<module>.base_layer.weight``.
                name = re.sub(r"\.base_layer(?=\.|$)", "", name)
                target = self._base_name(name, base_infos)
                if info.shape != base_infos[target].shape:
                    raise CheckpointError(f"{self.label}: adapter saves {key!r:.120} with shape "
                                          f"{info.shape}, base has "
                                          f"{base_infos[target].shape}")
                full[target] = key
                continue
            module = match["module"]
            target = self._base_name(module + ".weight", base_infos)
            entry = factors.setdefault(target, _Factors(module=module))
            entry.embedding = match["kind"].startswith("lora_embedding")
            if match["kind"].endswith("A"):
                entry.a_key = key
            else:
                entry.b_key = key
        for target, entry in factors.items():
            if entry.a_key is None or entry.b_key is None:
                raise CheckpointError(f"{self.label}: adapter has only one LoRA factor for "
                                      f"{target!r}")
            self._check_factors(target, entry, base_infos[target])
        return factors, full

    def _check_factors(self, target: str, entry: _Factors, base: TensorInfo) -> None:
        """A (r, in) and B (out, r) must multiply to the base weight's shape, with the rank the
        config gives that module."""
        a = self._header[entry.a_key].shape  # type: ignore[index]
        b = self._header[entry.b_key].shape  # type: ignore[index]
        if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
            raise CheckpointError(f"{self.label}: LoRA factors for {target!r} have shapes "
                                  f"A {a} and B {b}, which do not multiply (only linear and "
                                  "embedding LoRA is supported)")
        transposed = entry.embedding or self._fan_in_fan_out
        delta = (a[1], b[0]) if transposed else (b[0], a[1])
        if delta != base.shape:
            raise CheckpointError(f"{self.label}: LoRA update for {target!r} has shape "
                                  f"{delta}, base has {base.shape}")
        rank = self._rank_pattern.value(entry.module, self._r)
        if rank != a[0]:
            raise CheckpointError(f"{self.label}: {CONFIG_NAME} gives rank {rank} for "
                                  f"{entry.module!r}, but its factors have rank {a[0]}")

    def scale(self, target: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring per-module patterns."""
        found = self._scales.get(target)
        if found is None:
            entry = self._factors.get(target)
            module = entry.module if entry is not None else target.removesuffix(".weight")
            r = self._rank_pattern.value(module, self._r)
            alpha = self._alpha_pattern.value(module, self._alpha)
            found = alpha / math.sqrt(r) if self._rslora else alpha / r
            self._scales[target] = found
        return found

    def covered(self) -> list[str]:
        """Base tensor names the adapter changes."""
        return sorted(set(self._factors) | set(self._full))

    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors()

    def _get(self, key: str) -> torch.Tensor:
        return self._reader.read(key)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B, A, scale) with delta = scale * B @ A in the base weight's layout, or None."""
        entry = self._factors.get(name)
        if entry is None:
            return None
        a = self._get(entry.a_key).float()  # type: ignore[arg-type]
        b = self._get(entry.b_key).float()  # type: ignore[arg-type]
        # Embeddings and GPT-2 style Conv1D layers store the update transposed: (B @ A)^T.
        if entry.embedding or self._fan_in_fan_out:
            a, b = b.T, a.T
        return b, a, self.scale(name)

    def read(self, name: str) -> torch.Tensor:
        """The expert's tensor, in the base's dtype (the update is added in float32)."""
        if name in self._full:
            base = self._get(self._full[name]).to(self.base.tensors()[name].dtype)
        else:
            base = self.base.read(name)
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
        self._reader.close()
        if getattr(self, "owns_base", False):  # ``model+adapter``: the model is its own
            self.base.close()
