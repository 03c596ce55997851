"""The YAML recipe: mergekit's core format, validated by pydantic before any tensor is read.

A parameter value may be a scalar, a list interpolated across layer depth (a "gradient"), or a
list of ``{filter: <substring or regex of tensor name>, value: ...}`` entries where the first
matching filter wins and an entry without a filter is the fallback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polymerge.errors import RecipeError

Scalar = bool | int | float | str
NonEmptyFloats = Annotated[list[float], Field(min_length=1)]


class FilterEntry(BaseModel):
    """One ``{filter, value}`` entry of a parameter."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | NonEmptyFloats


ParamValue = Scalar | Annotated[list[FilterEntry], Field(min_length=1)] | NonEmptyFloats


class ModelEntry(BaseModel):
    """One input model: a path (HF folder, safetensors file or LoRA adapter) and its parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    name: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """The expert's name: ``name`` if given, else the last part of its path."""
        return self.name or Path(self.model.rstrip("/")).name


class Recipe(BaseModel):
    """A merge recipe; ``dtype``/``out_dtype`` choose the output dtype (compute is float32)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    name: str | None = None

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        seen: set[str] = set()
        for entry in models:
            if entry.display_name in seen:
                raise ValueError(f"two models are named {entry.display_name!r}; give each a "
                                 "distinct `name`")
            seen.add(entry.display_name)
        return models

    @property
    def output_dtype_name(self) -> str | None:
        return self.out_dtype or self.dtype

    def experts(self) -> list[ModelEntry]:
        """Listed models other than the base (the base may be listed, as mergekit allows)."""
        return [m for m in self.models if not self.is_base(m)]

    def is_base(self, entry: ModelEntry) -> bool:
        return self.base_model is not None and _same_path(entry.model, self.base_model)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=True),
                              sort_keys=False)


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


_UNSUPPORTED = {
    "slices": "layer slices (passthrough/frankenmerges) are not supported",
    "tokenizer": "use tokenizer_source: base or a model path",
    "chat_template": "chat_template is not supported; copy it into the output by hand",
}


def load_recipe(source: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """Parse and validate a recipe from a YAML path, a dict, or pass a Recipe through.

    Relative model paths in a YAML file are resolved against the file's folder.
    """
    if isinstance(source, Recipe):
        return source
    folder: Path | None = None
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.exists():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
        folder = path.parent
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least merge_method")
    for key, why in _UNSUPPORTED.items():
        if key in data:
            raise RecipeError(f"recipe key {key!r}: {why}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"recipe field {where or '(top)'}: {first['msg']}") from None
    if folder is not None:
        recipe = _resolve_paths(recipe, folder)
    return recipe


def _resolve_paths(recipe: Recipe, folder: Path) -> Recipe:
    def fix(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or not (folder / q).exists() else folder / q)

    return recipe.model_copy(update={
        "base_model": fix(recipe.base_model) if recipe.base_model else None,
        "models": [m.model_copy(update={"model": fix(m.model)}) for m in recipe.models],
        "tokenizer_source": (fix(recipe.tokenizer_source) if recipe.tokenizer_source
                             not in (None, "base") else recipe.tokenizer_source),
    })


# ---------------------------------------------------------------------------------------------
# Per-tensor parameter values

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EARLY = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, from its name, or None."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def depth_position(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits in depth, in [0, 1]: embeddings 0, head and final norm 1."""
    idx = layer_index(tensor_name)
    if idx is not None and num_layers and num_layers > 1:
        return min(1.0, idx / (num_layers - 1))
    if idx is not None:
        return 0.0
    return 0.0 if _EARLY.search(tensor_name) else 1.0


def _interpolate(values: list[float], position: float) -> float:
    if len(values) == 1:
        return float(values[0])
    grid = np.linspace(0.0, 1.0, len(values))
    return float(np.interp(position, grid, values))


def _matches(pattern: str, tensor_name: str) -> bool:
    if pattern in tensor_name:
        return True
    try:
        return re.search(pattern, tensor_name) is not None
    except re.error:
        return False


def resolve_value(value: ParamValue, tensor_name: str, position: float) -> Scalar | None:
    """The scalar a parameter takes for one tensor; None when no filter entry matches."""
    if isinstance(value, list):
        if value and isinstance(value[0], FilterEntry):
            for entry in value:  # type: ignore[assignment]
                assert isinstance(entry, FilterEntry)
                if entry.filter is None or _matches(entry.filter, tensor_name):
                    inner = entry.value
                    return _interpolate(inner, position) if isinstance(inner, list) else inner
            return None
        return _interpolate([float(v) for v in value], position)  # type: ignore[arg-type]
    return value


def possible_values(value: ParamValue) -> list[Scalar]:
    """Every scalar a parameter can produce (for range checks before any tensor is read)."""
    if isinstance(value, list):
        out: list[Scalar] = []
        for item in value:
            if isinstance(item, FilterEntry):
                out.extend(item.value if isinstance(item.value, list) else [item.value])
            else:
                out.append(item)
        return out
    return [value]
