"""A task head kept beside an encoder expert: a linear layer over mean-pooled token vectors.

Layout (the zoo's cls experts): ``heads/head.safetensors`` (``weight``, optional ``bias``) and
``heads/labels.json`` (``labels``, ``task``, ``pooling``: only ``mean``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import CheckpointError

HEAD_FILE = "heads/head.safetensors"
LABELS_FILE = "heads/labels.json"


def has_head(expert: Path) -> bool:
    return (expert / HEAD_FILE).is_file()


def load_head(expert: Path, name: str | None = None) -> tuple[torch.nn.Linear, dict[str, Any]]:
    """The expert's head (in eval mode) and its label file; CheckpointError names the expert."""
    from safetensors.torch import load_file

    who = f"expert {name}" if name else str(expert)
    try:
        sd = load_file(str(expert / HEAD_FILE))
        meta = json.loads((expert / LABELS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{who}: no readable task head in {expert / 'heads'} "
                              f"({exc})") from None
    if not isinstance(meta, dict) or "weight" not in sd or sd["weight"].dim() != 2:
        raise CheckpointError(f"{who}: the task head in {expert / 'heads'} is malformed")
    if meta.get("pooling", "mean") != "mean":
        raise CheckpointError(f"{who}: pooling {meta['pooling']!r} is not supported "
                              "(mean pooling only)")
    w = sd["weight"]
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias="bias" in sd)
    head.load_state_dict(sd)
    return head.eval(), meta
