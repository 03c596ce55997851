"""Expert stores on the zoo: per-task weights with oracle or trained routing, report rows.

* :func:`store_weights` turns a store into the zoo's ``WeightsFn``: one routed module (one
  working model, weights switched by lookup) whose expert is each task's own (``oracle``) or
  chosen per input by the store's router (``router``).
* :func:`store_target` lets ``polymerge eval STORE --suite ...`` score a store with oracle
  routing and ``polymerge eval STORE/router --suite ...`` with its trained router.
* :func:`store_rows` builds store variants of a suite's experts (:data:`REPORT_VARIANTS`: the
  channel store with its defaults and at the paper's setting, Twin-Merging, EMR-Merging and
  1bit-Merging), trains their routers on the suite's validation queries, and scores both
  routings, as report rows. A twin store's oracle routing is each task's one-hot weights; its
  router routing mixes the experts with the router's soft weights.
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
"""Every 2-D weight channel-merged, embeddings included (the channel store's default scope):
in these small models the embeddings are 21-51% of the parameters, so keeping them per expert
(the paper's setting: only the transformer blocks) costs 60-77% of the ensemble instead of
about half."""
CM_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("channel (defaults)", {}),
    ("TIES-CM (paper setting)", {"preset": "paper", "group_method": "ties", "scope": ZOO_SCOPE}),
    ("DARE-CM (paper setting)", {"preset": "paper", "group_method": "dare_ties",
                                 "scope": ZOO_SCOPE}),
)
"""The channel store as a user gets it (no parameters), and the paper's two variants at its
setting (K = 2, 30% trimmed or dropped, lambda 0.5; every 2-D weight merged, as the zoo
always measured them)."""
TWIN_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("Twin", {"merge_method": "twin", "shared_method": "task_arithmetic", "shared_lambda": 0.3,
              "rank": 0.1, "scope": ZOO_SCOPE}),
)
"""Twin-Merging: task-arithmetic shared expert (lambda 0.3), exclusive parts of every 2-D
weight at 10% of the full rank. A variant's ``merge_method`` (default ``channel``) picks the
store method."""
EMR_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (("EMR", {"merge_method": "emr"}),)
"""EMR-Merging with its defaults (one rescaler per expert over the whole model)."""
ONEBIT_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("1bit", {"merge_method": "onebit"}),)
"""1bit-Merging with the paper's split (MLP weights per expert for non-chat experts)."""
REPORT_VARIANTS = CM_VARIANTS + TWIN_VARIANTS + EMR_VARIANTS + ONEBIT_VARIANTS
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
    rt = load_store(path, device=device, base=suite_base(path, suite))
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


def suite_base(store: str | Path, suite: Any) -> Path | None:
    """The base a switching store's router reads features of: the suite's own base model
    (a store refers only to files inside itself; the zoo names the base it built). None for
    a store served by mixing (its router reads its own shared model)."""
    return None if _mixes(read_manifest(store)["method"]) else suite.base_dir


def score_store(suite: Any, path: str | Path, routing: str = ORACLE, *,
                progress: bool = True) -> Any:
    """A store's scores on the suite's test data (``{task: {metric: value}}``).

    A store of classifiers holding every task's expert is scored end to end by the code of
    ``polymerge eval STORE --data`` (:mod:`polymerge.zoo.data_eval`) on the suite's test split:
    each text answered by the head of the expert it is routed to, at the suite's length and
    batching. Otherwise (a causal LM suite; a ``merged`` store of fewer experts than tasks,
    whose one body serves every task) the suite's own evaluation: the routed body with each
    task's own head.
    """
    from polymerge.registry import HEADS_METHOD

    manifest = read_manifest(path)
    experts = list(manifest["experts"])
    missing = [t for t in suite.tasks if t not in experts]
    if manifest.get("heads") and hasattr(suite, "splits") and not missing:
        from polymerge.zoo.data_eval import evaluate_data, write_suite_data

        cfg = getattr(suite, "config", None)
        res = evaluate_data(path, write_suite_data(suite), routings=(routing,),
                            max_length=getattr(cfg, "max_len", None),
                            batch_size=int(getattr(cfg, "eval_batch", 32)),
                            base=suite_base(path, suite))
        return {t: {suite.primary: res.routings[routing][t]} for t in suite.tasks}
    if missing and manifest["method"] == HEADS_METHOD and routing == ORACLE:
        from polymerge.runtime import load_store

        module = load_store(path).as_module(expert=experts[0])  # the one body
        return suite.evaluate(lambda _t: module, progress=progress)
    return suite.evaluate(store_weights(path, suite, routing), progress=progress)


def _mean_primary(suite: Any, scores: Any) -> float:
    m = suite.metric(suite.primary)
    values = [scores[t][m.name] for t in suite.tasks if t in scores]
    return sum(values) / len(values) * m.scale if values else float("nan")


def store_target(path: Path, suite: Any) -> Any:
    """``STORE`` -> oracle routing; ``STORE/router`` -> the store's trained router."""
    if is_store(path):
        return store_weights(path, suite, ORACLE)
    if path.name == ROUTER_DIR and is_store(path.parent):
        return store_weights(path.parent, suite, ROUTER)
    return None


def store_params_ratio(suite: Any, store: str | Path) -> float:
    """Stored parameters (plus the experts' private parts, e.g. heads) over the ensemble's."""
    counts = read_manifest(store)["parameter_counts"]
    shared, private = suite.expert_parameters()
    stored = counts["stored"] - counts.get("heads", 0)  # the suite's private parts, once
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


mixes = _mixes


def _variant_note(method: str, manifest: dict[str, Any], params: dict[str, Any]) -> str:
    """One line saying what a store variant is, from its manifest."""
    p = manifest["parameters"]
    s = manifest.get("summary", {})
    if _mixes(method):
        err = s.get("recon_error", {}).get("mean", float("nan"))
        return (f"twin store, rank {p.get('rank')}, {p.get('shared_method')} shared "
                f"(lambda {p.get('shared_lambda')}), exclusive-part error {err:.3f}")
    if method == "emr":
        scales = s.get("model_rescalers", {})
        return (f"emr store, rescaler per {p.get('rescaler')}, whole-model rescalers "
                + ", ".join(f"{v:.2f}" for v in scales.values()))
    if method == "onebit":
        kept = sum(v.get("tensors", 0) for v in s.get("experts", {}).values())
        return (f"onebit store, modules {p.get('modules')}, {kept} 1-bit task vectors, "
                f"{p.get('merged_method')} for the rest")
    ks = sorted(int(k) for k in s.get("rows_by_groups", {})) or [p.get("groups")]
    return (f"channel store ({p.get('preset', 'paper')} preset), K={'/'.join(map(str, ks))}, "
            f"{p.get('group_method', params.get('group_method', 'ties'))} within groups, "
            f"lambda {p.get('lambda')}, density {p.get('density', 1.0)}")


def suite_max_length(suite: Any) -> int | None:
    """The tokens the suite's experts read per text (cls: ``max_len``, gen: ``seq_len``): the
    router reads as many. The zoo's evaluation hands a routed module token ids cut to that
    length, so a router trained on longer texts would route on inputs unlike its training
    data; it is also several times cheaper to compute."""
    config = getattr(suite, "config", None)
    for key in ("max_len", "seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def train_suite_router(store: str | Path, suite: Any, **kwargs: Any) -> dict[str, Any]:
    """Train the store's router on the suite's validation queries; score its test queries."""
    from polymerge.routing import suite_texts
    from polymerge.runtime import train_store_router

    data = suite_texts(suite, "validation")
    test = suite_texts(suite, "test")
    kwargs.setdefault("base", suite_base(store, suite))
    length = suite_max_length(suite)
    if length:
        kwargs.setdefault("max_length", length)
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
        scores = score_store(suite, out, ORACLE, progress=progress)
        rows.append(Row(f"{label} (oracle)", scores, note=f"{note}; {oracle}",
                        params_ratio=ratio, build_seconds=build,
                        extra={"path": str(out), "recipe": recipe, "routing": ORACLE}))
        if routers:
            start = time.time()
            if _mixes(method):
                metrics = train_suite_router(out, suite)
            else:  # base-model features: one router per suite, copied into each store
                from polymerge.zoo.sweep import switch_router

                metrics = switch_router(out, suite, suite.root / "sweep")
            router_s = time.time() - start
            scores = score_store(suite, out, ROUTER, progress=progress)
            acc = metrics.get("test_accuracy", float("nan"))
            how = "trained router's soft weights" if _mixes(method) else "trained router"
            if read_manifest(out).get("heads"):  # end to end: the routed expert's head answers
                body = suite.evaluate(store_weights(out, suite, ROUTER), progress=progress)
                how += (", each text answered by its routed expert's head (routed body with "
                        f"the task's own head: mean {_mean_primary(suite, body):.1f})")
            rows.append(Row(f"{label} (router)", scores,
                            note=f"{note}; {how}, test routing accuracy {acc:.3f}",
                            params_ratio=ratio, build_seconds=build + router_s,
                            extra={"path": str(out), "recipe": recipe, "routing": ROUTER,
                                   "router": metrics}))
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows
