"""Parameter schemas, and the shape of a static merge method: a pure tensor function.

Every static method is a function ``fn(base, experts, *, generator, **params) -> Tensor`` over
float32 tensors of one weight: ``base`` is the base model's tensor (``None`` for methods that do
not use one), ``experts`` the experts' tensors in recipe order. Per-model parameters arrive as a
list with one value per expert; shared parameters as scalars. ``generator`` is a
``torch.Generator`` seeded per tensor by the engine, so random methods are deterministic for a
seed whatever the order in which tensors are processed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from polymerge.errors import RecipeError

REQUIRED: Any = object()
"""Sentinel default: the parameter has no default and must be given in the recipe."""

Scope = Literal["shared", "per_model"]
BasePolicy = Literal["required", "input", "optional"]
"""``required``: base is passed separately and experts are the other models.
``input``: the method ignores the base as such; every listed model (base included, if listed)
is an input (linear).
``optional``: like ``required`` when the recipe names a base_model, else like ``input`` with
``base=None`` (nuslerp, multislerp)."""

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


@dataclass(frozen=True, kw_only=True)
class Schema:
    """What a method accepts, checked before any tensor is read: its parameters, whether the
    base is separate from the inputs, how many inputs it takes, and a per-tensor check of a
    combination of parameters. Every kind of method (tensor, store, learned) plans against
    one of these."""

    name: str
    params: tuple[Param, ...]
    description: str = ""
    base_policy: BasePolicy = "required"
    min_experts: int = 1
    max_experts: int | None = None
    reference: str = ""
    check_params: Callable[[dict[str, Any]], None] | None = None
    """Checks a combination of resolved parameters for one tensor (e.g. weights that sum to 0)
    and raises RecipeError; the plan calls it for every tensor before any tensor is read."""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> set[str]:
        return {p.name for p in self.params}


@dataclass(frozen=True, kw_only=True)
class MergeMethod(Schema):
    """A static (per-tensor) merge method: its schema and the pure function that merges."""

    fn: MethodFn
    random: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    elementwise: Callable[[dict[str, Any]], bool] | None = None
    """With a tensor's resolved parameters, whether ``fn`` is elementwise for it: its result at
    each position depends only on the inputs at that position, so the engine may run it on
    chunks of the flattened tensors (faster, less memory). Never true for a random method (its
    draws would depend on the chunking)."""

    converts_inputs: bool = False
    """``fn`` converts the base and each input to float32 itself, one at a time or a chunk at a
    time, so the engine hands them over as stored: a float32 copy of every input at once is
    not needed."""

    propagates_nonfinite: bool = False
    """A NaN or Inf in any input gives a NaN or Inf in ``fn``'s result, or ``fn`` stops with
    an error; where ``fn`` is elementwise, at that position (sums of weighted inputs:
    linear, task arithmetic; linear combinations with coefficients from the inputs' dot
    products: Model Stock, Multi-SLERP, Karcher). The engine then checks results instead of
    every input (a chunk's, or a whole tensor's), and the inputs only to name the one at
    fault."""

    def is_elementwise(self, params: dict[str, Any]) -> bool:
        return self.elementwise is not None and not self.random and self.elementwise(params)


def with_defaults(params: tuple[Param, ...], **defaults: Any) -> tuple[Param, ...]:
    """The same parameters with some defaults changed (a store's own defaults)."""
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p
                 for p in params)
