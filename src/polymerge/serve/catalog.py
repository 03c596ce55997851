"""Model names and routing: what ``model`` and ``routing`` in a request mean for one runtime.

The runtime being served has one name (``--name``, default its folder's name) and its experts'
names. ``model`` = the store's name routes each row with the store's router (or with the
request's ``routing``: explicit weights, or the router with ``top_k``/``temperature``);
``model`` = an expert's name (or ``STORE/EXPERT``) forces that expert. A plain checkpoint is
one expert named after it. Everything is checked here, before a row is queued, so a bad
request never reaches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polymerge.serve.errors import APIError, bad_request, not_found_model
from polymerge.serve.schemas import RoutingBody


@dataclass(frozen=True)
class RowRouting:
    """How one row is routed: explicit ``weights`` (one per expert), else the router with
    ``top_k`` and ``temperature`` (None: the runtime's defaults)."""

    weights: tuple[float, ...] | None = None
    top_k: int | None = None
    temperature: float | None = None

    @property
    def routed(self) -> bool:
        return self.weights is None


class Catalog:
    """The names a runtime answers to (see the module docstring)."""

    def __init__(self, runtime: Any, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.experts: list[str] = list(runtime.experts)
        self.serving: str = runtime.serving
        self.has_router = len(self.experts) == 1 or getattr(runtime, "router", None) is not None
        self.router_error: str | None = None
        """Why the router cannot run (set when warming it up failed)."""

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``: the store (routes) and each expert (forces it)."""
        out = [{"id": self.name, "object": "model", "owned_by": "polymerge",
                "polymerge": {"kind": "store" if self.serving != "plain" else "checkpoint",
                              "serving": self.serving, "experts": self.experts,
                              "router": self.has_router,
                              "generates": bool(self.runtime.is_causal)}}]
        if self.serving != "plain":
            out += [{"id": e, "object": "model", "owned_by": "polymerge",
                     "polymerge": {"kind": "expert", "store": self.name}}
                    for e in self.experts]
        return out

    def names(self) -> list[str]:
        return [m["id"] for m in self.models()]

    def one_hot(self, expert: str) -> tuple[float, ...]:
        return tuple(1.0 if e == expert else 0.0 for e in self.experts)

    def resolve(self, model: str, routing: RoutingBody | None) -> RowRouting:
        """The routing of a request's rows, or a 4xx."""
        expert = self._expert_named(model)
        if expert is None and model != self.name:
            raise not_found_model(model, self.names())
        if self.serving == "plain":
            expert = self.experts[0]
        if routing is not None:
            given = routing.model_dump(exclude_none=True)
            if expert is not None and self.serving != "plain" and given:
                raise bad_request(f"model {model!r} names one expert; routing applies to the "
                                  f"store's name {self.name!r}", param="routing")
            if routing.weights is not None and (routing.top_k is not None
                                                or routing.temperature is not None
                                                or routing.expert is not None):
                raise bad_request("routing: give weights, or top_k/temperature, or expert",
                                  param="routing")
            if routing.expert is not None:
                if routing.top_k is not None or routing.temperature is not None:
                    raise bad_request("routing: give weights, or top_k/temperature, or expert",
                                      param="routing")
                named = self._expert_named(routing.expert, aliases=False)
                if named is None:
                    raise self._unknown(routing.expert, "routing.expert")
                return RowRouting(self.one_hot(named))
            if routing.weights is not None:
                return RowRouting(self._weights(routing.weights))
            if routing.top_k is not None and routing.top_k > len(self.experts):
                raise bad_request(f"routing.top_k must be at most {len(self.experts)} (the "
                                  "number of experts)", param="routing.top_k")
            if expert is None and (routing.top_k is not None or routing.temperature is not None):
                self._require_router()
                return RowRouting(None, routing.top_k, routing.temperature)
        if expert is not None:
            return RowRouting(self.one_hot(expert))
        self._require_router()
        return RowRouting()

    def _expert_named(self, name: str, aliases: bool = True) -> str | None:
        if self.serving == "plain":
            return self.experts[0] if name in (self.name, self.experts[0]) else None
        if name in self.experts and name != self.name:
            return name
        if aliases and name.startswith(self.name + "/") and name[len(self.name) + 1:] \
                in self.experts:
            return name[len(self.name) + 1:]
        return None

    def _unknown(self, name: str, param: str) -> APIError:
        return bad_request(f"no expert named {name!r}; experts: {', '.join(self.experts)}",
                           param=param, code="unknown_expert")

    def _weights(self, weights: dict[str, float] | list[float]) -> tuple[float, ...]:
        if isinstance(weights, list):
            if len(weights) != len(self.experts):
                raise bad_request(f"routing.weights: {len(weights)} weights for "
                                  f"{len(self.experts)} experts ({', '.join(self.experts)})",
                                  param="routing.weights")
            return tuple(float(w) for w in weights)
        out = [0.0] * len(self.experts)
        for name, w in weights.items():
            if name not in self.experts:
                raise self._unknown(name, "routing.weights")
            out[self.experts.index(name)] = float(w)
        if not any(w > 0 for w in out):
            raise bad_request("routing.weights: at least one weight must be > 0",
                              param="routing.weights")
        return tuple(out)

    def _require_router(self) -> None:
        if self.router_error is not None:
            raise bad_request(f"{self.name}: routing is unavailable ({self.router_error}); name "
                              "an expert as the model, or give routing.weights", param="model",
                              code="no_router")
        if not self.has_router:
            raise bad_request(f"{self.name} has no router: name an expert as the model, or "
                              "give routing.weights", param="model", code="no_router")
