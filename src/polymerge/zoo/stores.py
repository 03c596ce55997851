"""Expert stores on the zoo: per-task weights with oracle or trained routing, report rows.

* :func:`store_weights` turns a store into the zoo's ``WeightsFn``: one routed module (one
  working model, weights switched by lookup) whose expert is each task's own (``oracle``) or
  chosen per input by the store's router (``router``).
* :func:`store_target` lets ``polymerge eval STORE --suite ...`` score a store with oracle
  routing and ``polymerge eval STORE/router --suite ...`` with its trained router.
* :func:`store_rows` builds TIES-CM and DARE-CM stores of a suite's experts (or Twin-Merging
  stores, :data:`TWIN_VARIANTS`), trains their routers on the suite's validation queries, and
  scores both routings, as report rows. A twin store's oracle routing is each task's one-hot
  weights; its router routing mixes the experts with the router's soft weights.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polymerge import registry
from polymerge.errors import PolymergeError
from polymerge.stores import ROUTER_DIR, is_store, read_manifest

ORACLE = "oracle"
ROUTER = "router"
ZOO_SCOPE = "."
"""Every 2-D weight is channel-merged in the zoo, embeddings included: in these small models
the embeddings are 21-51% of the parameters, so keeping them per expert (the recipe default's
scope is the transformer blocks) would cost 60-77% of the ensemble instead of about half."""
CM_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("TIES-CM", {"group_method": "ties", "scope": ZOO_SCOPE}),
    ("DARE-CM", {"group_method": "dare_ties", "scope": ZOO_SCOPE}),
)
"""The paper's two variants, with its defaults (K = 2, 30% trimmed or dropped, lambda 0.5)."""
TWIN_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Twin", {"merge_method": "twin", "shared_method": "task_arithmetic", "shared_lambda": 0.3,
              "rank": 0.1, "scope": ZOO_SCOPE}),
)
"""Twin-Merging: task-arithmetic shared expert (lambda 0.3), exclusive parts of every 2-D
weight at 10% of the full rank. A variant's ``merge_method`` (default ``channel``) picks the
store method."""
REPORT_VARIANTS = CM_VARIANTS + TWIN_VARIANTS
"""The stores ``polymerge report --stores`` builds and scores."""


def store_weights(path: str | Path, suite: Any, routing: str = ORACLE, *,
                  device: str = "cpu") -> Any:
    """The suite's ``WeightsFn`` for a store: the same routed module for every task.

    With ``oracle`` routing the module uses the task's own expert (set when the suite asks for
    that task's weights); with ``router`` it routes every input with the store's router. For a
    twin store, oracle means the task's one-hot mixing weights, router the router's soft
    weights computed per input on the store's shared model.
    """
    from polymerge.runtime import load_store

    if routing not in (ORACLE, ROUTER):
        raise PolymergeError(f"routing must be {ORACLE} or {ROUTER}, got {routing!r}")
    rt = load_store(path, device=device)
    missing = [t for t in suite.tasks if t not in rt.experts]
    if missing:
        raise PolymergeError(f"{Path(path).name}: no expert for task(s) {missing}; the store's "
                             f"experts are {rt.experts} (name each expert after its task)")
    if routing == ROUTER and rt.router is None:
        raise PolymergeError(f"{Path(path).name} has no router; train one with `polymerge "
                             f"router train {path} --suite {suite.name}`")
    module = rt.as_module()

    def weights(task: str) -> Any:
        module.expert = task if routing == ORACLE else None
        return module

    weights.runtime = rt  # type: ignore[attr-defined]
    weights.routing = routing  # type: ignore[attr-defined]
    return weights


def store_target(path: Path, suite: Any) -> Any:
    """``STORE`` -> oracle routing; ``STORE/router`` -> the store's trained router."""
    if is_store(path):
        return store_weights(path, suite, ORACLE)
    if path.name == ROUTER_DIR and is_store(path.parent):
        return store_weights(path.parent, suite, ROUTER)
    return None


def store_params_ratio(suite: Any, store: str | Path) -> float:
    """Stored parameters (plus the experts' private parts, e.g. heads) over the ensemble's."""
    shared, private = suite.expert_parameters()
    stored = read_manifest(store)["parameter_counts"]["stored"]
    ensemble = len(suite.tasks) * shared + private
    return (stored + private) / ensemble if ensemble else float("nan")


def store_recipe(suite: Any, method: str = "channel", **params: Any) -> dict[str, Any]:
    """A store recipe (``method``: channel, twin, ...) over the suite's experts, each named
    after its task."""
    return {"merge_method": method, "base_model": str(suite.base_dir),
            "models": [{"model": str(suite.expert_dir(t)), "name": t} for t in suite.tasks],
            "parameters": dict(params), "dtype": "float32", "seed": 0}


def channel_recipe(suite: Any, **params: Any) -> dict[str, Any]:
    """A channel-store recipe over the suite's experts, each named after its task."""
    return store_recipe(suite, "channel", **params)


def _mixes(method: str) -> bool:
    """True for a store that mixes experts per input (served by soft weights), not switches."""
    return getattr(registry.get(method), "serving", "switch") == "mix"


def _variant_note(method: str, manifest: dict[str, Any], params: dict[str, Any]) -> str:
    p = manifest["parameters"]
    if _mixes(method):
        err = manifest.get("summary", {}).get("recon_error", {}).get("mean", float("nan"))
        return (f"twin store, rank {p.get('rank')}, {p.get('shared_method')} shared "
                f"(lambda {p.get('shared_lambda')}), exclusive-part error {err:.3f}")
    return f"store, K={p.get('groups')}, {params.get('group_method', 'ties')} within groups"


def train_suite_router(store: str | Path, suite: Any, **kwargs: Any) -> dict[str, Any]:
    """Train the store's router on the suite's validation queries; score its test queries."""
    from polymerge.routing import suite_texts
    from polymerge.runtime import train_store_router

    data = suite_texts(suite, "validation")
    test = suite_texts(suite, "test")
    result = train_store_router(store, data, test=test, source=f"suite:{suite.name}",
                                **kwargs)
    return result.metrics


def store_rows(suite: Any, variants: Sequence[tuple[str, dict[str, Any]]] = CM_VARIANTS, *,
               routers: bool = True, progress: bool = True, keep: bool = True,
               out_root: Path | None = None) -> list[Any]:
    """Build, route and score each store variant; two rows each (oracle, router).

    A variant's parameters may name its store method as ``merge_method`` (default
    ``channel``; :data:`TWIN_VARIANTS` are ``twin``).
    """
    from polymerge.zoo.sources import run_merge as merge
    from polymerge.zoo.suite import Row

    rows: list[Any] = []
    root = Path(out_root) if out_root else suite.root / "stores"
    for label, variant in variants:
        params = dict(variant)
        method = str(params.pop("merge_method", "channel"))
        out = root / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        recipe = store_recipe(suite, method, **params)
        start = time.time()
        try:
            merge(recipe, out, force=True, progress=False)
        except PolymergeError as exc:
            rows.append(Row(label, {}, note=f"failed: {exc}"))
            continue
        build = time.time() - start
        ratio = store_params_ratio(suite, out)
        note = _variant_note(method, read_manifest(out), params)
        oracle = "one-hot weights of each task's expert" if _mixes(method) else \
            "each task's own expert"
        scores = suite.evaluate(store_weights(out, suite, ORACLE), progress=progress)
        rows.append(Row(f"{label} (oracle)", scores, note=f"{note}; {oracle}",
                        params_ratio=ratio, build_seconds=build,
                        extra={"path": str(out), "recipe": recipe, "routing": ORACLE}))
        if routers:
            start = time.time()
            metrics = train_suite_router(out, suite)
            router_s = time.time() - start
            scores = suite.evaluate(store_weights(out, suite, ROUTER), progress=progress)
            acc = metrics.get("test_accuracy", float("nan"))
            how = "trained router's soft weights" if _mixes(method) else "trained router"
            rows.append(Row(f"{label} (router)", scores,
                            note=f"{note}; {how}, test routing accuracy {acc:.3f}",
                            params_ratio=ratio, build_seconds=build + router_s,
                            extra={"path": str(out), "recipe": recipe, "routing": ROUTER,
                                   "router": metrics}))
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows
