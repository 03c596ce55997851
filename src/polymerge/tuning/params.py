"""The two learned-merge methods as one schema: their parameters, defaults and checks.

SuperMerge and AdaMerging differ only in how a raw coefficient becomes a weight (``tanh`` or a
clamp to [0, 1]) and in the loss (supervised cross-entropy or prediction entropy). Everything
else is one machinery, so both share this parameter schema and are validated before any tensor
is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from polymerge.errors import RecipeError
from polymerge.methods.schema import Param

Granularity = Literal["tensor", "block", "expert"]
GRANULARITIES: tuple[str, ...] = ("tensor", "block", "expert")
Activation = Literal["tanh", "clamp"]
Criterion = Literal["cross_entropy", "entropy"]


@dataclass(frozen=True)
class LearnedMethod:
    """What distinguishes one learned merge from the other."""

    name: str
    activation: Activation
    criterion: Criterion
    description: str
    reference: str
    default_lr: float

    @property
    def needs_labels(self) -> bool:
        return self.criterion == "cross_entropy"


SUPERMERGE = LearnedMethod(
    "supermerge", "tanh", "cross_entropy",
    "Learned per-layer weights tanh(w) on task vectors, trained by cross-entropy on a small "
    "labelled validation set (optionally merged hierarchically in groups).",
    "https://arxiv.org/abs/2412.10416", default_lr=0.05)
ADAMERGING = LearnedMethod(
    "adamerging", "clamp", "entropy",
    "Learned task-wise or layer-wise weights in [0, 1] on task vectors, trained without labels "
    "by minimising the entropy of the merged model's predictions.",
    "https://arxiv.org/abs/2310.02575", default_lr=0.01)
METHODS = {m.name: m for m in (SUPERMERGE, ADAMERGING)}

PARAMS: tuple[Param, ...] = (
    Param("data", str, help="a JSONL file of labelled text, or a data source (a zoo suite)"),
    Param("steps", int, default=200, low=1, help="maximum optimisation steps"),
    Param("lr", float, default=None, low=0.0, low_open=True,
          help="Adam learning rate (default: the method's)"),
    Param("granularity", str, default="tensor",
          help="one coefficient per expert and: tensor | block (transformer block) | expert"),
    Param("group_size", int, default=None, low=2,
          help="hierarchical merging: experts merged in groups of this size (absent: flat)"),
    Param("init", float, default=0.3, help="initial coefficient value (after activation)"),
    Param("batch_size", int, default=8, low=1, help="examples per task per step"),
    Param("max_length", int, default=None, low=2,
          help="tokens per example (default 128)"),
    Param("holdout", float, default=0.2, low=0.0, high=1.0, low_open=True, high_open=True,
          help="fraction of each task's validation examples held out for early stopping"),
    Param("eval_every", int, default=10, low=1, help="steps between held-out evaluations"),
    Param("patience", int, default=5, low=1,
          help="held-out evaluations without improvement before stopping"),
)
PARAM_NAMES = frozenset(p.name for p in PARAMS)


@dataclass(frozen=True)
class TuningConfig:
    """Validated parameters of one learned merge."""

    method: LearnedMethod
    data: str
    steps: int
    lr: float
    granularity: Granularity
    group_size: int | None
    init: float
    batch_size: int
    max_length: int | None
    holdout: float
    eval_every: int
    patience: int
    seed: int


def parse_config(method: LearnedMethod, parameters: dict[str, Any], seed: int,
                 per_model: dict[str, dict[str, Any]] | None = None) -> TuningConfig:
    """Check a recipe's ``parameters`` against the schema; RecipeError names the culprit."""
    for name, params in (per_model or {}).items():
        if params:
            raise RecipeError(f"model {name}: {method.name} takes no per-model parameters "
                              f"(got {sorted(params)[0]!r}); its coefficients are learned")
    unknown = sorted(set(parameters) - PARAM_NAMES)
    if unknown:
        raise RecipeError(f"parameters: {method.name} has no parameter {unknown[0]!r}; it "
                          f"takes {', '.join(sorted(PARAM_NAMES))}")
    values: dict[str, Any] = {}
    for p in PARAMS:
        raw = parameters.get(p.name)
        if raw is None:
            if p.required:
                raise RecipeError(f"parameters: {method.name} needs {p.name!r} ({p.help})")
            values[p.name] = p.default
            continue
        if isinstance(raw, list):
            raise RecipeError(f"parameters: {p.name!r} must be a single value, not a list")
        if p.type is str and not isinstance(raw, str):
            raise RecipeError(f"parameters: {p.name!r} must be a string, got {raw!r}")
        values[p.name] = p.check(raw, "parameters")
    if values["granularity"] not in GRANULARITIES:
        raise RecipeError(f"parameters: granularity {values['granularity']!r} is not one of "
                          f"{', '.join(GRANULARITIES)}")
    init = values["init"]
    if method.activation == "tanh" and not -1.0 < init < 1.0:
        raise RecipeError(f"parameters: init {init} is outside (-1, 1), the range of tanh")
    if method.activation == "clamp" and not 0.0 <= init <= 1.0:
        raise RecipeError(f"parameters: init {init} is outside [0, 1], {method.name}'s range")
    return TuningConfig(method=method, data=values["data"], steps=values["steps"],
                        lr=values["lr"] if values["lr"] is not None else method.default_lr,
                        granularity=values["granularity"], group_size=values["group_size"],
                        init=init, batch_size=values["batch_size"],
                        max_length=values["max_length"], holdout=values["holdout"],
                        eval_every=values["eval_every"], patience=values["patience"],
                        seed=seed)
