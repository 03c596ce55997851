"""The registry of merge methods: a name, a pure tensor function and its parameter schema.

Every static method is a function ``fn(base, experts, *, generator, **params) -> Tensor`` over
float32 tensors of one weight: ``base`` is the base model's tensor (``None`` for methods that do
not use one), ``experts`` the experts' tensors in recipe order. Per-model parameters arrive as a
list with one value per expert; shared parameters as scalars. ``generator`` is a
``torch.Generator`` seeded per tensor by the engine, so random methods are deterministic for a
seed whatever the order in which tensors are processed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from polymerge.errors import RecipeError

REQUIRED: Any = object()
"""Sentinel default: the parameter has no default and must be given in the recipe."""

Scope = Literal["shared", "per_model"]
BasePolicy = Literal["required", "input"]
"""``required``: base is passed separately and experts are the other models.
``input``: the method ignores the base as such; every listed model (base included, if listed)
is an input (linear)."""

MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Param:
    """One parameter of a method, with its range so recipes are checked before any tensor."""

    name: str
    type: type
    default: Any = REQUIRED
    scope: Scope = "shared"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's type and check its range; raise RecipeError."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise RecipeError(f"{where}: parameter {self.name!r} must be true or false, "
                                  f"got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{where}: parameter {self.name!r} must be a number, "
                                  f"got {value!r}")
            if not math.isfinite(value):
                raise RecipeError(f"{where}: parameter {self.name!r} must be finite")
            if self.type is int and int(value) != value:
                raise RecipeError(f"{where}: parameter {self.name!r} must be an integer")
            value = self.type(value)
            lo_bad = self.low is not None and (
                value < self.low or (self.low_open and value == self.low))
            hi_bad = self.high is not None and (
                value > self.high or (self.high_open and value == self.high))
            if lo_bad or hi_bad:
                raise RecipeError(f"{where}: parameter {self.name!r}={value} is outside "
                                  f"{self.range_text()}")
            return value
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}" \
               f"{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True)
class MergeMethod:
    """A registered static merge method."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    description: str
    base_policy: BasePolicy = "required"
    min_experts: int = 1
    max_experts: int | None = None
    random: bool = False
    reference: str = ""
    check_params: Callable[[dict[str, Any]], None] | None = None
    """Checks a combination of resolved parameters for one tensor (e.g. weights that sum to 0)
    and raises RecipeError; the plan calls it for every tensor before any tensor is read."""
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> set[str]:
        return {p.name for p in self.params}


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method; names are unique."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, with the list of known names in the error."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        from polymerge.builders import all_builders

        known = ", ".join(sorted([*_REGISTRY, *(b.name for b in all_builders())]))
        raise RecipeError(f"unknown merge_method {name!r}; known methods: {known}") from None


def method_names() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def all_methods() -> Sequence[MergeMethod]:
    _ensure_loaded()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def _ensure_loaded() -> None:
    # Importing the package registers every built-in method module.
    import polymerge.methods  # noqa: F401
