"""Request bodies: OpenAI's fields (those a store can honour), polymerge's ``routing``, and
the checks that turn anything else into a 400.

Bodies are parsed strictly: a field OpenAI defines but a store cannot honour (``n`` > 1,
``logprobs``, penalties, ``logit_bias``, ``echo``, ``suffix``) is refused unless it has its
neutral value; a field nobody defines is refused; types are not coerced (``"5"`` is not a
number).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polymerge.serve.errors import APIError, bad_request

MAX_STOP = 4
"""Stop sequences per request (OpenAI's limit)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RoutingBody(Strict):
    """polymerge's ``routing`` field: explicit ``weights`` (a mapping expert -> weight, or one
    weight per expert in the store's order), or the router's with ``top_k`` and
    ``temperature``, or one ``expert``."""

    weights: dict[str, float] | list[float] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(gt=0)] | None = None
    expert: str | None = None

    @field_validator("weights")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, dict) else (value or [])
        for v in values:
            if not math.isfinite(v) or v < 0:
                raise ValueError("weights must be finite numbers >= 0")
        if value is not None and len(value) and not any(v > 0 for v in values):
            raise ValueError("at least one weight must be > 0")
        if value is not None and not len(value):
            raise ValueError("weights are empty")
        return value


class StreamOptions(Strict):
    include_usage: bool = False


Unit = Annotated[float, Field(ge=0, le=2)]


class Sampling(Strict):
    """Fields shared by completions and chat completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Unit | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logit_bias: dict[str, float] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    routing: RoutingBody | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class InputsRequest(Strict):
    """``/v1/classify`` and ``/v1/route``: ``input`` texts, ``routing`` as above."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[str]
    routing: RoutingBody | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse(raw: bytes, model: type[Strict]) -> Any:
    """The request body as ``model``, or a 400 naming the first problem."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise bad_request(f"The body is not valid JSON ({exc.__class__.__name__})",
                          code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if not isinstance(x, int)) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc}", param=loc,
                           code="unknown_parameter")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: {loc}", param=loc,
                           code="missing_parameter")
    msg = str(first.get("msg", "invalid value"))
    return bad_request(f"Invalid value for {loc}: {msg}", param=loc, code="invalid_value")
