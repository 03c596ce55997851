"""The Suite interface and registry: one place that says what a suite of experts must offer.

A suite owns a base model, a set of tasks with one expert each, a way to build them into the
cache, and one evaluation entry point. Evaluation takes a ``WeightsFn``: a function from task
name to the weights to use for that task (a model folder, a state dict, or a ready module).
A merged checkpoint gives the same folder for every task, an expert gives its own folder, the
ensemble gives each task its own expert, and expert stores can give rebuilt weights or a routed
module; all of them share the same code path and the same numbers.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.zoo.cache import default_cache, entry_ok, read_manifest

Weights = Path | Mapping[str, torch.Tensor] | torch.nn.Module
WeightsFn = Callable[[str], Weights]
Scores = dict[str, dict[str, float]]
"""task -> metric -> value."""


@dataclass(frozen=True)
class Metric:
    """A metric a suite reports per task; ``higher_is_better`` orients normalized scores."""

    name: str
    higher_is_better: bool = True
    fmt: str = ".1f"
    scale: float = 1.0
    """Multiply before display (accuracy 0.83 shows as 83.0)."""


@dataclass
class BuildReport:
    """What ``Suite.build`` did: which experts it built, reused, and how long it took."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    """Cached experts rewritten from an older layout (same weights, no retraining)."""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Suite(abc.ABC):
    """A base model, its tasks and their experts, stored under ``cache/<name>``."""

    name: str = ""
    description: str = ""
    metrics: tuple[Metric, ...] = ()
    primary: str = ""
    """The metric used for the mean and the normalized score."""
    extra_columns: tuple[tuple[str, str], ...] = ()
    """(task, metric) pairs shown as extra columns in comparison tables."""

    def __init__(self, cache: Path | str | None = None, *, scale: str = "full") -> None:
        self.cache = Path(cache).expanduser() if cache is not None else default_cache()
        self.scale = scale
        self.root = self.cache / (self.name if scale == "full" else f"{self.name}-{scale}")

    # -- layout
    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Task names, one expert per task, in a fixed order."""

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    def expert_dir(self, task: str) -> Path:
        return self.experts_dir / task

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    # -- building
    @abc.abstractmethod
    def build(self, *, progress: bool = True) -> BuildReport:
        """Build the base folder and every expert not already built (resumable)."""

    def status(self) -> dict[str, dict[str, Any]]:
        """Per entry (``base`` and each task): built or not, and the manifest's info."""
        out: dict[str, dict[str, Any]] = {}
        for name, path in [("base", self.base_dir)] + [
                (t, self.expert_dir(t)) for t in self.tasks]:
            ok = entry_ok(path, deep=False)
            man = read_manifest(path) if ok else None
            out[name] = {"built": ok, "path": str(path),
                         "info": man.get("info", {}) if man else {},
                         "build_seconds": man.get("build_seconds") if man else None}
        return out

    def export(self, task: str, out: Path) -> Path:
        """The expert of ``task`` as a standalone HF checkpoint folder at ``out`` (created, or
        an existing empty folder)."""
        import shutil

        from polymerge.zoo.cache import MANIFEST

        self.require_built()
        shutil.copytree(self.expert_dir(task), out, ignore=shutil.ignore_patterns(MANIFEST),
                        dirs_exist_ok=True)
        return Path(out)

    def is_built(self) -> bool:
        return all(v["built"] for v in self.status().values())

    def require_built(self) -> None:
        missing = [k for k, v in self.status().items() if not v["built"]]
        if missing:
            raise PolymergeError(
                f"the {self.name} zoo is not built in {self.root} (missing: "
                f"{', '.join(missing)}); run `polymerge zoo build {self.name} "
                f"--cache {self.cache}`")

    # -- evaluation
    @abc.abstractmethod
    def evaluate(self, weights: WeightsFn, *, tasks: tuple[str, ...] | None = None,
                 progress: bool = True) -> Scores:
        """Score the weights ``weights(task)`` on each task's test data."""

    def eval_fingerprint(self) -> Any:
        """Everything that changes reference scores: expert fingerprints and eval settings."""
        return {t: (read_manifest(self.expert_dir(t)) or {}).get("fingerprint")
                for t in ("base",) + self.tasks} | {"scale": self.scale}

    def expert_parameters(self) -> tuple[int, int]:
        """(parameters of one shared model, parameters private to each expert in total).

        Used for "stored parameters relative to the ensemble": the ensemble stores N models
        plus the private parts; a merged checkpoint stores one model plus the private parts.
        """
        return 0, 0


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up then linear decay to zero."""
    w = max(1, int(total * warmup))
    if warmup > 0 and step < w:
        return (step + 1) / w
    return max(0.0, (total - step) / max(1, total - (w if warmup > 0 else 0)))


@dataclass
class Row:
    """One line of a comparison: a name, its raw scores and what it costs."""

    name: str
    scores: Scores
    kind: str = "method"
    """base | expert | ensemble | method"""
    note: str = ""
    params_ratio: float | None = None
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
