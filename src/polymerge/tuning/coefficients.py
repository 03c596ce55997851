"""The trainable coefficients: one raw scalar per expert per layer, and what a layer is.

A "layer" is chosen by the granularity: every weight tensor (``tensor``), every transformer
block with the embeddings and the final head/norm as two more blocks (``block``), or the whole
model (``expert``, AdaMerging's task-wise variant). The raw scalars ``w`` live in one
``[experts, layers]`` parameter; the weight an expert's task vector gets is ``tanh(w)``
(SuperMerge, in (-1, 1)) or ``clamp(w, 0, 1)`` (AdaMerging).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from polymerge.recipe import layer_index
from polymerge.tuning.params import Activation, Granularity

_EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings",
                    "token_type")


def layer_of(name: str, granularity: Granularity) -> str:
    """The coefficient group a tensor belongs to under ``granularity``."""
    if granularity == "tensor":
        return name
    if granularity == "expert":
        return "all"
    idx = layer_index(name)
    if idx is not None:
        return f"block.{idx}"
    return "embeddings" if any(h in name for h in _EMBEDDING_HINTS) else "head"


def depth_key(name: str) -> tuple[int, int]:
    """Embeddings first, then blocks by index, then everything after the last block."""
    idx = layer_index(name)
    if idx is not None:
        return (1, idx)
    return (0, 0) if any(h in name for h in _EMBEDDING_HINTS) else (2, 0)


def layer_order(names: Iterable[str], granularity: Granularity) -> list[str]:
    """Layers in depth order (checkpoints list tensors alphabetically, which puts block 10
    before block 2), ties kept in their given order; for coefficients, tables and heatmaps."""
    seen: dict[str, None] = {}
    for name in sorted(names, key=depth_key):
        seen.setdefault(layer_of(name, granularity), None)
    return list(seen)


def raw_from_value(value: float, activation: Activation) -> float:
    """The raw scalar whose activation is ``value`` (the inverse of tanh, or the identity)."""
    return math.atanh(value) if activation == "tanh" else value


class Coefficients(torch.nn.Module):
    """``[experts, layers]`` raw scalars; ``present[i, l]`` is False where expert i's task
    vector is zero throughout layer l (that entry is then neither trained nor reported)."""

    def __init__(self, experts: Sequence[str], layers: Sequence[str], activation: Activation,
                 init: float, present: torch.Tensor | None = None) -> None:
        super().__init__()
        self.experts = list(experts)
        self.layers = list(layers)
        self.activation: Activation = activation
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        shape = (len(self.experts), len(self.layers))
        self.raw = torch.nn.Parameter(torch.full(shape, raw_from_value(init, activation),
                                                 dtype=torch.float32))
        mask = torch.ones(shape, dtype=torch.bool) if present is None else present.bool()
        self.register_buffer("present", mask.clone())

    def values(self) -> torch.Tensor:
        """The weights the task vectors are scaled by, differentiable in ``raw``."""
        if self.activation == "tanh":
            return torch.tanh(self.raw)
        return torch.clamp(self.raw, 0.0, 1.0)

    @torch.no_grad()
    def project(self) -> None:
        """Keep clamped raw values inside [0, 1] after an optimiser step, so a coefficient
        pushed past a bound is not stuck where the clamp has no gradient."""
        if self.activation == "clamp":
            self.raw.clamp_(0.0, 1.0)

    @property
    def trainable(self) -> int:
        """How many coefficients are actually learned (entries with a non-zero task vector)."""
        return int(self.present.sum())

    def as_table(self) -> dict[str, dict[str, float | None]]:
        """expert -> layer -> weight (None where the expert has no task vector)."""
        vals = self.values().detach().cpu()
        return {e: {layer: (float(vals[i, j]) if bool(self.present[i, j]) else None)
                    for j, layer in enumerate(self.layers)}
                for i, e in enumerate(self.experts)}
