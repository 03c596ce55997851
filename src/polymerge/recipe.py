"""The YAML recipe: mergekit's core format, validated by pydantic before any tensor is read.

A parameter value may be a scalar, a list interpolated across layer depth (a "gradient"), or a
list of ``{filter: <substring or regex of tensor name>, value: ...}`` entries where the first
matching filter wins and an entry without a filter is the fallback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from polymerge.errors import RecipeError
from polymerge.io.chat_template import check_chat_template
from polymerge.io.checkpoint import split_model_ref

Scalar = bool | int | float | str
LOG = logging.getLogger("polymerge")


def warn_recipe(message: str) -> None:
    """A one-line warning about a recipe (printed on stderr unless logging is configured)."""
    LOG.warning("polymerge: warning: %s", message.replace("\n", " "))

NonEmptyFloats = Annotated[list[float], Field(min_length=1)]


class FilterEntry(BaseModel):
    """One ``{filter, value}`` entry of a parameter (its pattern is compiled once, here)."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | NonEmptyFloats
    _matcher: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        self._matcher = None if self.filter is None else _Filter(self.filter)

    def matches(self, tensor_name: str) -> bool:
        """True for the fallback entry, else whether the filter matches the tensor name."""
        # The private dict directly: pydantic's attribute lookup would cost more than the match.
        matcher = (self.__pydantic_private__ or {}).get("_matcher")
        if matcher is None:
            return self.filter is None or _Filter(self.filter)(tensor_name)
        return matcher(tensor_name)


ParamValue = Scalar | Annotated[list[FilterEntry], Field(min_length=1)] | NonEmptyFloats


def _check_path(value: str | None) -> str | None:
    if value is not None and (not value.strip() or "\0" in value):
        raise ValueError("a model path must be a non-empty path without NUL characters")
    return value


class ModelEntry(BaseModel):
    """One input model: a path (HF folder, safetensors file or LoRA adapter) and its parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    name: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str) -> str | None:
        return _check_path(value)

    @property
    def display_name(self) -> str:
        """The expert's name: ``name`` if given, else the last part of its path."""
        return self.name or Path(self.model.rstrip("/")).name


class SliceSource(BaseModel):
    """One source of an output slice: layers ``[start, end)`` of a model (mergekit's
    ``layer_range``), with per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str) -> str | None:
        return _check_path(value)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range [{start}, {end}] must be [start, end) with "
                             "0 <= start < end")
        return value

    @property
    def display_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class SliceEntry(BaseModel):
    """One output slice: its sources (the same number of layers each) are merged layer by
    layer with the recipe's method; ``base_model`` overrides the recipe's for this slice."""

    model_config = ConfigDict(extra="forbid")
    sources: Annotated[list[SliceSource], Field(min_length=1)]
    base_model: str | None = None
    residual_weight: float | None = None  # accepted as mergekit does; it uses it nowhere
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("base_model")
    @classmethod
    def _base_path(cls, value: str | None) -> str | None:
        return _check_path(value)


class TokenSource(BaseModel):
    """Where a token's embedding comes from: ``{kind: zero}`` or ``{kind: model_token, model,
    token_id | token}`` (a row of that model's own vocabulary)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TokenSource:
        if self.kind == "zero":
            if self.model is not None or self.token_id is not None or self.token is not None:
                raise ValueError("a zero token source takes no model, token or token_id")
        else:
            if self.model is None:
                raise ValueError("a model_token source needs a model")
            if (self.token_id is None) == (self.token is None):
                raise ValueError("a model_token source needs exactly one of token_id or token")
        return self


class TokenSetting(BaseModel):
    """A token of the ``tokenizer:`` section: its embedding's source (a model path, or a
    :class:`TokenSource`) and whether it replaces the models' own rows (``force``)."""

    model_config = ConfigDict(extra="forbid")
    source: TokenSource | str | None = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary (``union`` of every model's,
    the ``base``'s, or a model's), tokens to add or whose embedding to choose, and padding of
    the vocabulary size."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return value if value in ("union", "base") else str(_check_path(value))


class Recipe(BaseModel):
    """A merge recipe; ``dtype``/``out_dtype`` choose the output dtype (compute is float32).

    Either ``models`` or ``slices`` (layer ranges of models stacked into the output, mergekit's
    frankenmerges), not both.
    """

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    seed: int = 0
    name: str | None = None

    @field_validator("base_model", "tokenizer_source")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return _check_path(value)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)

    @field_validator("slices")
    @classmethod
    def _some_slices(cls, value: list[SliceEntry] | None) -> list[SliceEntry] | None:
        if value is not None and not value:
            raise ValueError("slices is empty; list at least one slice, or use models")
        return value

    @model_validator(mode="after")
    def _mergekit_rules(self) -> Recipe:
        problem = mergekit_conflict(self.models, self.slices, self.tokenizer_source,
                                    self.tokenizer)
        if problem:
            raise ValueError(problem)
        return self

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

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names (base, models, slice sources and bases), once
        each, in recipe order."""
        found = [self.base_model, *(m.model for m in self.models)]
        for piece in self.slices or []:
            found += [s.model for s in piece.sources] + [piece.base_model]
        return list(dict.fromkeys(p for p in found if p is not None))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=True),
                              sort_keys=False)


def _expand(path: str) -> Path:
    """``~`` expanded when it can be (``~nosuchuser`` stays as it is)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _same_path(a: str, b: str) -> bool:
    return _expand(a).resolve() == _expand(b).resolve()


_UNSUPPORTED = {
    "modules": "per-module merges (mergekit's modules:) are not supported; use models or "
               "slices",
}


def mergekit_conflict(models: Any, slices: Any, tokenizer_source: Any, tokenizer: Any
                      ) -> str | None:
    """The one-line reason a combination of recipe sections is refused (as mergekit refuses
    it), or None."""
    if models and slices:
        return ("the recipe lists both models and slices; use one (mergekit refuses both too): "
                "slices to stack layer ranges, models to merge whole models")
    if tokenizer_source is not None and tokenizer is not None:
        return ("the recipe has both tokenizer_source and a tokenizer section; use one "
                "(mergekit refuses both too): tokenizer: {source: ...} covers both")
    return None


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """Parse and validate a recipe from a YAML path, a dict, or pass a Recipe through.

    Relative model paths in a YAML file are resolved against the file's folder, and only
    there: one that is not there is an error naming the recipe line.
    """
    if isinstance(source, Recipe):
        return source
    path: Path | None = None
    text = ""
    if isinstance(source, (str, Path)):
        path = _expand(str(source))
        text = _read_recipe_text(path)
        data = _parse_yaml(text, path)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise RecipeError(f"a recipe must be a YAML file or a mapping, not "
                          f"{type(source).__name__}")
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping with at least merge_method")
    for key, why in _UNSUPPORTED.items():
        if key in data:
            raise RecipeError(f"recipe key {key!r}: {why}")
    conflict = mergekit_conflict(data.get("models"), data.get("slices"),
                                 data.get("tokenizer_source"), data.get("tokenizer"))
    if conflict:
        raise RecipeError(conflict)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(_one_line(f"recipe field {where or '(top)'}: {first['msg']}")) \
            from None
    except RecursionError:
        raise RecipeError("recipe is nested too deeply") from None
    if path is not None:
        recipe = _resolve_paths(recipe, path, text)
    return recipe


def _one_line(message: str) -> str:
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _read_recipe_text(path: Path) -> str:
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist")
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder, not a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path} ({exc.strerror or exc})") from None


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on big files


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        why = exc.problem or exc.context or "syntax error"
        raise RecipeError(_one_line(f"recipe {path} is not valid YAML: {why}{at}")) from None
    except yaml.YAMLError as exc:
        raise RecipeError(_one_line(f"recipe {path} is not valid YAML: "
                                    f"{str(exc).splitlines()[0] if str(exc) else exc!r}")) \
            from None
    except RecursionError:
        raise RecipeError(f"recipe {path} is not valid YAML: nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. an impossible date
        raise RecipeError(_one_line(f"recipe {path} is not valid YAML: {exc}")) from None


def _line_of(text: str, keys: tuple[str | int, ...]) -> int | None:
    """1-based line of the value at ``keys`` in the YAML ``text`` (None if not found)."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
        for key in keys:
            if isinstance(key, int) and isinstance(node, yaml.SequenceNode):
                node = node.value[key]
            elif isinstance(node, yaml.MappingNode):
                node = next(v for k, v in node.value if getattr(k, "value", None) == key)
            else:
                return None
        return node.start_mark.line + 1
    except Exception:  # only a nicety for the message
        return None


def _resolve_paths(recipe: Recipe, recipe_path: Path, text: str) -> Recipe:
    folder = recipe_path.parent.absolute()

    def fix(value: str, keys: tuple[str | int, ...], what: str) -> str:
        q = _expand(value)
        if not os.path.lexists(q if q.is_absolute() else folder / q):
            lora = _split_or_none(value)
            if lora is not None:  # mergekit's model+lora: each part resolved on its own
                return "+".join(fix(part, keys, what) for part in lora)
        if q.is_absolute():
            return str(q)
        resolved = folder / q
        if not os.path.lexists(resolved):
            line = _line_of(text, keys)
            at = f"{recipe_path}:{line}" if line else str(recipe_path)
            raise RecipeError(_one_line(
                f"{at}: {what} {value!r} not found beside the recipe (looked for {resolved}); "
                "relative paths are resolved against the recipe's folder"))
        return str(resolved)

    def fix_slice(i: int, piece: SliceEntry) -> SliceEntry:
        sources = [s.model_copy(update={"model": fix(s.model, ("slices", i, "sources", j,
                                                                "model"),
                                                     f"slice {i} source {s.display_name!r}")})
                   for j, s in enumerate(piece.sources)]
        base = (fix(piece.base_model, ("slices", i, "base_model"), f"slice {i} base_model")
                if piece.base_model else None)
        return piece.model_copy(update={"sources": sources, "base_model": base})

    def fix_tokenizer(section: TokenizerSection | None) -> TokenizerSection | None:
        if section is None:
            return None
        source = section.source if section.source in ("union", "base") else fix(
            section.source, ("tokenizer", "source"), "tokenizer source")
        tokens = None
        if section.tokens is not None:
            tokens = {}
            for token, setting in section.tokens.items():
                where = ("tokenizer", "tokens", token, "source")
                src = setting.source
                if isinstance(src, str):
                    src = fix(src, where, f"source of token {token!r}")
                elif isinstance(src, TokenSource) and src.model is not None:
                    src = src.model_copy(update={"model": fix(
                        src.model, (*where, "model"), f"source of token {token!r}")})
                tokens[token] = setting.model_copy(update={"source": src})
        return section.model_copy(update={"source": source, "tokens": tokens})

    return recipe.model_copy(update={
        "base_model": (fix(recipe.base_model, ("base_model",), "base_model")
                       if recipe.base_model else None),
        "models": [m.model_copy(update={"model": fix(m.model, ("models", i, "model"),
                                                     f"model {m.display_name!r}")})
                   for i, m in enumerate(recipe.models)],
        "slices": (None if recipe.slices is None
                   else [fix_slice(i, piece) for i, piece in enumerate(recipe.slices)]),
        "tokenizer_source": (fix(recipe.tokenizer_source, ("tokenizer_source",),
                                 "tokenizer_source")
                             if recipe.tokenizer_source not in (None, "base", "union")
                             else recipe.tokenizer_source),
        "tokenizer": fix_tokenizer(recipe.tokenizer),
    })


def _split_or_none(value: str) -> tuple[str, str] | None:
    try:
        model, adapter = split_model_ref(value)
    except Exception:  # not two parts: reported as a missing path
        return None
    return None if adapter is None else (model, adapter)


# ---------------------------------------------------------------------------------------------
# Per-tensor parameter values

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_EARLY = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, from its name, or None."""
    match = _LAYER.search(tensor_name)
    return int(match.group(1)) if match else None


def split_layer_name(tensor_name: str) -> tuple[str, int, str] | None:
    """``(prefix, index, suffix)`` of a tensor inside a transformer block
    (``model.layers.`` / 3 / ``.mlp.up_proj.weight``), or None outside the blocks."""
    match = _LAYER.search(tensor_name)
    if match is None:
        return None
    return (tensor_name[:match.start(1)], int(match.group(1)),
            tensor_name[match.end(1):])


def is_before_layers(tensor_name: str) -> bool:
    """Whether a tensor outside the blocks comes before them (embeddings) rather than after
    (final norm, LM head, pooler)."""
    return layer_index(tensor_name) is None and _EARLY.search(tensor_name) is not None


def depth_position(tensor_name: str, num_layers: int | None) -> float:
    """Where a tensor sits in depth, the ``t`` at which a gradient is read, as mergekit 0.1.5
    places it: block ``i`` of ``n`` at ``i / (n - 1)`` (1 for a single block), and every tensor
    outside the blocks (embeddings, final norm, LM head) at 0, the gradient's first value."""
    idx = layer_index(tensor_name)
    if idx is None or not num_layers:
        return 0.0
    if num_layers == 1:
        return 1.0
    return min(1.0, idx / (num_layers - 1))


def _interpolate(values: list[float], position: float) -> float:
    if len(values) == 1:
        return float(values[0])
    grid = np.linspace(0.0, 1.0, len(values))
    return float(np.interp(position, grid, values))


_REGEX_CHARS = frozenset(".^$*+?{}[]\\|()")


@functools.lru_cache(maxsize=4096)
def _compile_filter(pattern: str) -> re.Pattern[str] | None:
    """The regex of a filter, or None when it is a plain substring or not a valid regex."""
    if _REGEX_CHARS.isdisjoint(pattern):
        return None
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None


class _Filter:
    """A filter: a substring of the tensor name, or else a regex searched in it (an invalid
    regex is only a substring). Built once per entry and compiled at most once, when first
    needed; a pattern whose only regex character is ``.`` is compiled only for names that hold
    its longest literal piece, so thousands of such filters cost little."""

    __slots__ = ("pattern", "plain", "required", "regex", "compiled")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        special = _REGEX_CHARS.intersection(pattern)
        self.plain = not special
        self.required = (max(pattern.split("."), key=len) if special == {"."} else None)
        self.regex: re.Pattern[str] | None = None
        self.compiled = False

    def __call__(self, tensor_name: str) -> bool:
        if self.pattern in tensor_name:
            return True
        if self.plain or (self.required is not None and self.required not in tensor_name):
            return False
        if not self.compiled:
            self.regex = _compile_filter(self.pattern)
            self.compiled = True
        return self.regex is not None and self.regex.search(tensor_name) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Filter) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def _matches(pattern: str, tensor_name: str) -> bool:
    return _Filter(pattern)(tensor_name)


def resolve_value(value: ParamValue, tensor_name: str, position: float) -> Scalar | None:
    """The scalar a parameter takes for one tensor; None when no filter entry matches."""
    if isinstance(value, list):
        if value and isinstance(value[0], FilterEntry):
            for entry in value:  # type: ignore[assignment]
                assert isinstance(entry, FilterEntry)
                if entry.matches(tensor_name):
                    inner = entry.value
                    return _interpolate(inner, position) if isinstance(inner, list) else inner
            return None
        return _interpolate([float(v) for v in value], position)  # type: ignore[arg-type]
    return value


def resolve_first(values: list[ParamValue | None], tensor_name: str, position: float
                  ) -> Scalar | None:
    """The first of several settings of one parameter (most specific first: a model's, the
    slice's, the recipe's) that has a value for this tensor; mergekit falls through a filter
    list that matches nothing to the next setting in the same way."""
    for value in values:
        if value is None:
            continue
        resolved = resolve_value(value, tensor_name, position)
        if resolved is not None:
            return resolved
    return None


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
