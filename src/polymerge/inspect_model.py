"""What is in a checkpoint, and how far an expert moved from its base, layer by layer."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polymerge.engine import check_finite
from polymerge.errors import CheckpointError
from polymerge.io.checkpoint import TensorInfo, open_checkpoint
from polymerge.io.dtypes import dtype_name
from polymerge.recipe import layer_index


@dataclass
class Inspection:
    """A checkpoint's architecture and tensors, and (with a base) its per-layer delta norms."""

    path: Path
    architecture: str
    tensors: list[TensorInfo]
    delta_norms: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def render(self, *, max_tensors: int = 40) -> str:
        lines = [f"path: {self.path}", f"architecture: {self.architecture}",
                 f"tensors: {len(self.tensors)}", f"parameters: {self.parameters:,}",
                 f"size: {self.nbytes / 1e6:,.1f} MB"]
        dtypes: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            dtypes[dtype_name(t.dtype)] += t.numel
        lines.append("dtypes: " + ", ".join(f"{k} ({v:,})" for k, v in sorted(dtypes.items())))
        lines.append("")
        for t in self.tensors[:max_tensors]:
            lines.append(f"  {t.name:60s} {dtype_name(t.dtype):9s} {list(t.shape)}")
        if len(self.tensors) > max_tensors:
            lines.append(f"  ... {len(self.tensors) - max_tensors} more")
        if self.delta_norms:
            lines += ["", f"  {'layer':10s} {'|delta|':>12s} {'|delta|/|base|':>15s}"]
            for layer, (norm, rel) in self.delta_norms.items():
                lines.append(f"  {layer:10s} {norm:12.5g} {rel:15.5g}")
        return "\n".join(lines)


def _architecture(config: dict | None) -> str:
    if not config:
        return "unknown (no config.json)"
    arch = ",".join(config.get("architectures") or []) or "?"
    return f"{arch} (model_type={config.get('model_type', '?')})"


def inspect_checkpoint(path: str | Path, base: str | Path | None = None, *,
                       allow_pickle: bool = False) -> Inspection:
    """Read headers (and, with a base, stream both models once to measure the delta)."""
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base") if base else None
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle, base=base_ckpt)
    try:
        infos = list(ckpt.tensors().values())
        result = Inspection(Path(path), _architecture(ckpt.config), infos)
        if base_ckpt is not None:
            result.delta_norms = _delta_norms(ckpt, base_ckpt)
        return result
    finally:
        ckpt.close()
        if base_ckpt is not None:
            base_ckpt.close()


def _delta_norms(ckpt, base) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    base_infos = base.tensors()
    sq_delta: dict[str, float] = defaultdict(float)
    sq_base: dict[str, float] = defaultdict(float)
    for name, info in ckpt.tensors().items():
        if name not in base_infos:
            raise CheckpointError(f"tensor {name!r} is not in the base")
        if base_infos[name].shape != info.shape:
            raise CheckpointError(f"tensor {name!r}: shape {list(info.shape)} differs from the "
                                  f"base's {list(base_infos[name].shape)}")
        if not info.dtype.is_floating_point:
            continue
        a = ckpt.read(name).float()
        b = base.read(name).float()
        check_finite(a, ckpt.label, name)
        idx = layer_index(name)
        key = f"layer {idx}" if idx is not None else "other"
        sq_delta[key] += float(torch.sum((a - b) ** 2))
        sq_base[key] += float(torch.sum(b**2))

    def order(k: str) -> tuple[int, int]:
        return (1, 0) if k == "other" else (0, int(k.split()[1]))

    return {k: (math.sqrt(sq_delta[k]), math.sqrt(sq_delta[k]) / max(math.sqrt(sq_base[k]),
                                                                      1e-12))
            for k in sorted(sq_delta, key=order)}
