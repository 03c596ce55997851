"""One map of score against size: every method and setting on a suite, cell by cell.

A *cell* is one artifact: a static merge, a learned merge or an expert store, given by its
recipe. Running a cell builds the artifact, scores it on the suite (a store with oracle routing,
each task's own expert, and with its trained router) and returns its rows; a cell that fails
returns rows that say why, and the other cells go on. :func:`grid` lists the cells of the map
(static merges, SuperMerge, channel stores for K = 1..N, twin stores at several ranks, EMR and
1bit-Merging stores, and the channel store at the Channel Merging paper's setting),
:func:`run_cells` runs them one after the other or as Ray tasks (``ray=True``: a local Ray, or
the cluster at ``address``, whose nodes must see the zoo cache at the same path), and
:func:`run_sweep` writes the table and the picture.

*Size* is what the artifact stores, in bytes, relative to the ensemble (N full experts), the
experts' private parts (task heads) added to both: a checkpoint's tensors, a store's pieces
(1-bit masks by their bytes, channel indexes included).

Rows are cached per cell under ``<suite>/sweep/cells`` by a fingerprint of the recipe, the
method's resolved defaults, the routings, the suite's evaluation fingerprint (its experts and
settings) and the polymerge version, so a second run (the demo's warm start) only reads them;
``fresh=True`` recomputes. A run gives the same rows whether cells run in this process or on
Ray, given the same torch thread count per cell (``threads``; a Ray task has one CPU).

The router of a store served by switching reads features of the base model, the same for
every such store of a suite; it is trained once per suite (same data, seed and settings as
``polymerge router train --suite``) and copied into each switching store.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from polymerge.errors import PolymergeError
from polymerge.zoo.cache import fingerprint, load_json, save_json
from polymerge.zoo.suite import Row, Suite

SWEEP_VERSION = 1
ORACLE, ROUTER = "oracle", "router"
DEFAULT_RANKS = (0.02, 0.05, 0.1, 0.3)
"""Twin ranks of the map (fractions of each weight's full rank)."""
STATIC_SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("task_arithmetic", "defaults (lambda 1)", {}),
    ("task_arithmetic", "lambda 0.3", {"lambda": 0.3}),
    ("ties", "defaults", {}),
    ("ties", "density 0.2", {"density": 0.2}),
    ("dare_ties", "density 0.7, lambda 0.5", {"density": 0.7, "lambda": 0.5}),
    ("linear", "defaults", {}),
)
"""Static merges of the map: registered defaults and the papers' settings."""
FAMILIES = ("static", "supermerge", "channel", "twin", "emr", "onebit")
_OBJECT_STORE_BYTES = 128 * 2**20
"""Object store of a local Ray: cells pass rows, not tensors."""


@dataclass(frozen=True)
class Cell:
    """One artifact of the map: its recipe and how to score it."""

    label: str
    family: str
    setting: str
    recipe: dict[str, Any] | None
    routings: tuple[str, ...] = ()
    """Stores: ``oracle`` and/or ``router``; checkpoints: none."""
    note: str = ""

    @property
    def method(self) -> str:
        return str((self.recipe or {}).get("merge_method", "?"))


# ----------------------------------------------------------------------------- the grid


def _store_recipe(suite: Suite, method: str, **params: Any) -> dict[str, Any]:
    from polymerge.zoo.stores import store_recipe

    return store_recipe(suite, method, **params)


def grid(suite: Suite, *, groups: Sequence[int] | None = None,
         ranks: Sequence[float] = DEFAULT_RANKS, routers: bool = True, static: bool = True,
         learned: bool = True, paper: bool = True,
         families: Sequence[str] | None = None) -> list[Cell]:
    """The cells of the score-against-size map of ``suite``.

    ``groups``: the channel stores' K values (default 1..N); ``ranks``: twin ranks;
    ``routers``: also score stores with trained routers; ``learned``: SuperMerge;
    ``paper``: the channel store at the Channel Merging paper's setting; ``families``: keep
    only these (of :data:`FAMILIES`).
    """
    from polymerge.registry import get_tensor_method
    from polymerge.stores.channel import PAPER_SETTING
    from polymerge.zoo.report import plan_method

    n = len(suite.tasks)
    routings = (ORACLE, ROUTER) if routers else (ORACLE,)
    cells: list[Cell] = []
    if static:
        for method, setting, params in STATIC_SETTINGS:
            plan = plan_method(get_tensor_method(method), suite, params)
            cells.append(Cell(f"{method}, {setting}", "static", setting, plan.recipe,
                              note=plan.note))
    if learned:
        try:
            from polymerge.zoo.learned import learned_recipes
        except ImportError:  # pragma: no cover - tuning not installed
            pass
        else:
            recipes = learned_recipes(suite)
            if "supermerge" in recipes:
                cells.append(Cell("SuperMerge", "supermerge", "tensor-wise",
                                  recipes["supermerge"]))
    for k in groups or range(1, n + 1):
        cells.append(Cell(f"channel K={k}", "channel", f"K={k}",
                          _store_recipe(suite, "channel", groups=k), routings))
    if paper:
        cells.append(Cell("channel, paper setting K=2", "channel", "paper: K=2, TIES "
                          "density 0.7, lambda 0.5, blocks only",
                          _store_recipe(suite, "channel", **PAPER_SETTING), routings))
    for rank in ranks:
        cells.append(Cell(f"twin rank {rank:g}", "twin", f"rank {rank:g}",
                          _store_recipe(suite, "twin", rank=rank), routings))
    cells.append(Cell("emr", "emr", "defaults", _store_recipe(suite, "emr"), routings))
    cells.append(Cell("onebit", "onebit", "modules auto (MLP)",
                      _store_recipe(suite, "onebit"), routings))
    cells.append(Cell("onebit, modules all", "onebit", "modules all",
                      _store_recipe(suite, "onebit", modules="all"), routings))
    if families is not None:
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise PolymergeError(f"unknown sweep families {unknown}; known: "
                                 f"{', '.join(FAMILIES)}")
        cells = [c for c in cells if c.family in families]
    return cells


# ----------------------------------------------------------------------------- sizes


def model_bytes(folder: Path) -> int:
    """Bytes of the tensors of a checkpoint folder (headers excluded)."""
    from polymerge.io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    try:
        return sum(info.nbytes for info in ckpt.tensors().values())
    finally:
        ckpt.close()


def ensemble_bytes(suite: Suite) -> tuple[int, int]:
    """(bytes of one shared model, bytes of every expert's private parts in float32)."""
    _shared, private = suite.expert_parameters()
    return model_bytes(suite.base_dir), 4 * private


def size_ratio(suite: Suite, folder: Path) -> float:
    """Stored bytes of a checkpoint or store (plus the private parts) over the ensemble's."""
    from polymerge.stores import is_store, read_manifest

    one, private = ensemble_bytes(suite)
    counts = read_manifest(folder)["parameter_counts"] if is_store(folder) else None
    stored = counts["stored_bytes"] - counts.get("head_bytes", 0) if counts is not None \
        else model_bytes(folder)  # the private parts (heads) are counted once, below
    ensemble = len(suite.tasks) * one + private
    return (stored + private) / ensemble if ensemble else float("nan")


def reference_sizes(suite: Suite) -> tuple[float, float]:
    """Sizes of the base (one model plus the private parts) and of the ensemble (1)."""
    one, private = ensemble_bytes(suite)
    ensemble = len(suite.tasks) * one + private
    return (one + private) / ensemble if ensemble else float("nan"), 1.0


# ----------------------------------------------------------------------------- running a cell


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def cell_key(suite: Suite, cell: Cell, router_options: dict[str, Any] | None = None) -> str:
    """What decides a cell's rows: recipe, the method's resolved defaults, routings (and the
    router's training options), the suite's evaluation fingerprint, the polymerge version."""
    from polymerge.methods.schema import REQUIRED
    from polymerge.recipe import load_recipe
    from polymerge.registry import get
    from polymerge.version import __version__

    defaults: dict[str, Any] = {}
    if cell.recipe is not None:
        try:
            parsed = load_recipe(cell.recipe)
            schema = get(parsed.merge_method).schema(parsed)
            defaults = {p.name: ("required" if p.default is REQUIRED else p.default)
                        for p in schema.params}
        except PolymergeError:
            defaults = {}
    return fingerprint({"recipe": cell.recipe, "defaults": defaults, "routings": cell.routings,
                        "router": router_options or {}, "eval": suite.eval_fingerprint(),
                        "version": __version__, "sweep": SWEEP_VERSION})


def _row(cell: Cell, routing: str | None, scores: dict, *, size: float | None,
         seconds: float | None, note: str = "", **extra: Any) -> Row:
    name = cell.label + (f" ({routing})" if routing else "")
    return Row(name, scores, note=note, params_ratio=size, build_seconds=seconds,
               extra={"family": cell.family, "setting": cell.setting, "cell": cell.label,
                      "routing": routing or "", "recipe": cell.recipe, **extra})


def failed_rows(cell: Cell, reason: str) -> list[Row]:
    """The rows of a cell that could not run: one per routing, each saying why."""
    line = " ".join(str(reason).split())
    return [_row(cell, r, {}, size=None, seconds=None, note=f"failed: {line}", failed=True)
            for r in (cell.routings or (None,))]


def switch_router(store: Path, suite: Suite, root: Path, **options: Any) -> dict[str, Any]:
    """Give a switching store the suite's router (base-model features): trained once per suite
    under ``root/routers``, then copied. Returns its metrics. ``options``: passed to the
    router training."""
    import json

    from polymerge.stores import ROUTER_DIR, read_manifest
    from polymerge.zoo.stores import train_suite_router

    manifest = read_manifest(store)
    key = fingerprint({"base": manifest.get("base", {}).get("path"),
                       "experts": manifest["experts"], "eval": suite.eval_fingerprint(),
                       "options": options, "sweep": SWEEP_VERSION})
    cached = root / "routers" / key
    if not (cached / "router.json").is_file():
        metrics = train_suite_router(store, suite, **options)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{key}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(store / ROUTER_DIR, tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another cell saved the same router first
            shutil.rmtree(tmp, ignore_errors=True)
        return metrics
    shutil.rmtree(store / ROUTER_DIR, ignore_errors=True)
    shutil.copytree(cached, store / ROUTER_DIR)
    return dict(json.loads((cached / "router.json").read_text()).get("metrics", {}))


def run_cell(suite: Suite, cell: Cell, *, root: Path | None = None, keep: bool = False,
             threads: int | None = None, router_options: dict[str, Any] | None = None
             ) -> list[Row]:
    """Build the cell's artifact, score it (each routing), return its rows; never raises for
    a failure of the cell itself (its rows say why). ``router_options``: passed to the router
    training (``max_length``, ``max_epochs``, ...)."""
    import torch

    from polymerge.stores import is_store
    from polymerge.zoo.sources import run_merge
    from polymerge.zoo.stores import mixes, score_store, train_suite_router
    from polymerge.zoo.threads import use_threads

    if threads:
        torch.set_num_threads(threads)
    else:  # this process alone: follow the machine's load, cell by cell
        use_threads()
    if cell.recipe is None:
        return failed_rows(cell, cell.note or "not applicable")
    root = Path(root) if root else suite.root / "sweep"
    out = root / "artifacts" / _slug(cell.label)
    try:
        start = time.time()
        run_merge(cell.recipe, out, force=True, progress=False)
        build = time.time() - start
        size = size_ratio(suite, out)
        if not is_store(out) or not cell.routings:  # a merge (of experts with heads: a store)
            scores = score_store(suite, out, progress=False) if is_store(out) else \
                suite.evaluate(lambda _t: out, progress=False)
            return [_row(cell, None, scores, size=size, seconds=time.time() - start,
                         note=cell.note)]
        rows = []
        mixing = mixes(cell.method)
        for routing in cell.routings:
            begin = time.time()
            extra: dict[str, Any] = {}
            if routing == ROUTER:
                metrics = train_suite_router(out, suite, **(router_options or {})) \
                    if mixing else switch_router(out, suite, root, **(router_options or {}))
                extra["routing_accuracy"] = metrics.get("test_accuracy", float("nan"))
            scores = score_store(suite, out, routing, progress=False)
            note = cell.note
            if routing == ROUTER:
                note = (note + "; " if note else "") + \
                    f"routing accuracy {extra['routing_accuracy']:.3f}"
            rows.append(_row(cell, routing, scores, size=size,
                             seconds=build + time.time() - begin, note=note, **extra))
        return rows
    except Exception as exc:  # a failed cell is reported in its rows; the sweep goes on
        return failed_rows(cell, f"{type(exc).__name__}: {exc}")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def _row_json(row: Row) -> dict[str, Any]:
    return {"name": row.name, "scores": row.scores, "kind": row.kind, "note": row.note,
            "params_ratio": row.params_ratio, "build_seconds": row.build_seconds,
            "extra": row.extra}


def _row_from_json(data: dict[str, Any]) -> Row:
    return Row(data["name"], data["scores"], kind=data["kind"], note=data["note"],
               params_ratio=data["params_ratio"], build_seconds=data["build_seconds"],
               extra=dict(data["extra"]))


def _cached(suite: Suite, cell: Cell, root: Path, router: dict[str, Any] | None
            ) -> list[Row] | None:
    key = cell_key(suite, cell, router)
    value = load_json(root / "cells" / f"{key}.json", key)
    if value is None:
        return None
    # the key is the recipe, not the label: a cell run under another name (the demo's
    # "task arithmetic (lambda=0.3)" is the sweep's "task_arithmetic, lambda 0.3") keeps its
    # scores but takes this cell's name
    rows = []
    for data in value:
        row = _row_from_json(data)
        routing = row.extra.get("routing") or ""
        row.name = cell.label + (f" ({routing})" if routing else "")
        row.extra.update(family=cell.family, setting=cell.setting, cell=cell.label)
        rows.append(row)
    return rows


def _save(suite: Suite, cell: Cell, root: Path, rows: list[Row],
          router: dict[str, Any] | None) -> None:
    if any(r.extra.get("failed") for r in rows):
        return
    key = cell_key(suite, cell, router)
    save_json(root / "cells" / f"{key}.json", key, [_row_json(r) for r in rows])


def _remote_cell(suite: Suite, cell: Cell, root: str, keep: bool, threads: int | None,
                 router: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What a Ray task runs: one cell; rows as plain dicts."""
    return [_row_json(r) for r in run_cell(suite, cell, root=Path(root), keep=keep,
                                           threads=threads or 1, router_options=router)]


def run_cells(suite: Suite, cells: Sequence[Cell], *, ray: bool = False,
              address: str | None = None, num_cpus: int | None = None,
              root: Path | None = None, keep: bool = False, fresh: bool = False,
              threads: int | None = None, progress: bool = True,
              router_options: dict[str, Any] | None = None,
              on_rows: Callable[[Cell, list[Row]], None] | None = None) -> list[Row]:
    """Every cell's rows, in the cells' order: cached rows first, the others computed here one
    after the other or, with ``ray``, as Ray tasks (``address``: a cluster; else a local Ray
    with ``num_cpus`` CPUs, default all). The progress bar counts cells done; ``on_rows`` is
    called as each cell finishes."""
    root = Path(root) if root else suite.root / "sweep"
    results: dict[int, list[Row]] = {}
    todo: list[int] = []
    for i, cell in enumerate(cells):
        hit = None if fresh else _cached(suite, cell, root, router_options)
        if hit is not None:
            results[i] = hit
        else:
            todo.append(i)
    bar = tqdm(total=len(cells), initial=len(results), unit="cell", desc="sweep cells",
               disable=not progress, dynamic_ncols=True)

    def done(i: int, rows: list[Row]) -> None:
        results[i] = rows
        _save(suite, cells[i], root, rows, router_options)
        bar.update(1)
        bar.set_postfix_str(cells[i].label, refresh=False)
        if on_rows is not None:
            on_rows(cells[i], rows)

    try:
        if todo and ray:
            _run_on_ray(suite, cells, todo, done, address=address, num_cpus=num_cpus,
                        root=root, keep=keep, threads=threads, router=router_options)
        else:
            for i in todo:
                done(i, run_cell(suite, cells[i], root=root, keep=keep, threads=threads,
                                 router_options=router_options))
    finally:
        bar.close()
    return [row for i in range(len(cells)) for row in results[i]]


def _run_on_ray(suite: Suite, cells: Sequence[Cell], todo: list[int],
                done: Callable[[int, list[Row]], None], *, address: str | None,
                num_cpus: int | None, root: Path, keep: bool, threads: int | None,
                router: dict[str, Any] | None) -> None:
    try:
        import ray
    except ImportError:
        raise PolymergeError("--ray needs Ray: pip install 'polymerge[sweep]' (or "
                             "pip install ray)") from None
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                   "logging_level": "ERROR"}
        if address:
            options["address"] = address
        else:
            from polymerge.zoo.threads import available_cpus

            options.update(num_cpus=num_cpus or available_cpus(),
                           object_store_memory=_OBJECT_STORE_BYTES)
        ray.init(**options)
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_remote_cell)
        pending = {task.remote(suite, cells[i], str(root), keep, threads, router): i
                   for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    rows = [_row_from_json(r) for r in ray.get(ref)]
                except Exception as exc:  # the task itself died (worker crash, lost node)
                    rows = failed_rows(cells[i], f"Ray task failed: {type(exc).__name__}: "
                                                 f"{str(exc).splitlines()[0] if str(exc) else ''}")
                done(i, rows)
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- the map


PARETO_TOLERANCE = 0.05
"""Normalized points a larger artifact must gain to join the front: half the table's 0.1, so
a store that scores 100.0 like a smaller one (99.98 against 99.97) is not drawn as better."""


def pareto_front(points: Sequence[tuple[float, float]], tol: float = PARETO_TOLERANCE
                 ) -> list[int]:
    """Indices of the points (size, score) no other point beats: none is as small and as good
    (within ``tol``) with one of the two strictly better. Sorted by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        size, score = points[i]
        if not (math.isfinite(size) and math.isfinite(score)):
            continue
        if score > best + tol:
            front.append(i)
            best = score
    return front


@dataclass
class SweepResult:
    rows: list[Row]
    reference: dict[str, Any]
    base: Row
    ensemble: Row
    text: str = ""
    markdown: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0
    front: list[str] = field(default_factory=list)


def reference_map_rows(suite: Suite, refs: dict[str, Any]) -> tuple[Row, Row]:
    base_size, ens_size = reference_sizes(suite)
    base = Row("base", refs["base"], kind="base", params_ratio=base_size,
               extra={"family": "reference", "routing": ""})
    ensemble = Row("ensemble (own expert per task)", refs["ensemble"], kind="ensemble",
                   params_ratio=ens_size, extra={"family": "reference", "routing": ""})
    return base, ensemble


def normalized_of(suite: Suite, row: Row, ensemble: Any) -> float:
    from polymerge.zoo.evaluate import summary

    return float(summary(suite, row.scores, ensemble)["normalized_mean"]) if row.scores \
        else float("nan")


def render_sweep(suite: Suite, rows: list[Row], refs: dict[str, Any], *, command: str,
                 seconds: float, plot_name: str | None = None) -> tuple[str, list[str]]:
    """The markdown of a sweep: one table (every row, the Pareto front marked) and notes."""
    from polymerge.zoo.evaluate import fmt, markdown_table, primary
    from polymerge.zoo.report import machine_line

    base, ensemble = reference_map_rows(suite, refs)
    everything = [base, *rows, ensemble]
    points = [(r.params_ratio if r.params_ratio is not None else math.nan,
               normalized_of(suite, r, refs["ensemble"])) for r in everything]
    front = {everything[i].name for i in pareto_front(points)}
    header = ["model", "routing", *suite.tasks, "normalized", "size vs ensemble", "seconds",
              "Pareto"]
    cells = []
    for r, (size, norm) in zip(everything, points, strict=True):
        p = primary(suite, r.scores)
        cells.append([r.extra.get("cell", r.name), r.extra.get("routing", "") or "–",
                      *[fmt(suite, suite.primary, p.get(t)) for t in suite.tasks],
                      "–" if not math.isfinite(norm) else f"{norm:.1f}",
                      "–" if not math.isfinite(size) else f"{size:.3f}",
                      "–" if r.build_seconds is None else f"{r.build_seconds:.0f}",
                      "★" if r.name in front else ""])
    failed = [r for r in rows if r.extra.get("failed")]
    lines = [f"## {suite.name} suite ({suite.scale}): score against size, every method",
             "",
             f"{time.strftime('%Y-%m-%d')}, {machine_line()}. Command: `{command}` "
             f"({seconds:.0f} s).",
             "",
             f"*normalized*: mean over tasks of test {suite.primary} / own expert's x 100; "
             "*size vs ensemble*: bytes stored (1-bit masks by their bytes, indexes included, "
             "task heads added) over N full experts'; *oracle*: each task's own expert; "
             "*router*: the store's trained router; *seconds*: build (and router) plus "
             "evaluation; ★: on the Pareto front (nothing smaller scores as high, to 0.05).",
             "",
             markdown_table(header, cells), ""]
    notes = [f"- **{r.name}**: {r.note}" for r in rows if r.note and not r.extra.get("failed")]
    if failed:
        lines += ["Failed cells:", "", *[f"- **{r.name}**: {r.note}" for r in failed], ""]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    if plot_name:
        lines += [f"![{suite.name} score against size]({plot_name})", ""]
    return "\n".join(lines), sorted(front)


def run_sweep(suite: Suite, *, cells: Sequence[Cell] | None = None, ray: bool = False,
              ray_address: str | None = None, num_cpus: int | None = None,
              md_path: Path | None = None, png_path: Path | None = None,
              progress: bool = True, keep: bool = False, fresh: bool = False,
              threads: int | None = None, command: str = "", routers: bool = True,
              router_options: dict[str, Any] | None = None,
              title: str | None = None) -> SweepResult:
    """Build (or reuse) the zoo, run every cell of the map (:func:`grid` by default), write
    the markdown table and the score-against-size PNG; return rows and paths."""
    from polymerge.zoo.evaluate import reference_rows
    from polymerge.zoo.plot import score_size_map

    start = time.time()
    suite.build(progress=progress)
    refs = reference_rows(suite, progress=progress)
    cells = list(cells) if cells is not None else grid(suite, routers=routers)
    rows = run_cells(suite, cells, ray=ray, address=ray_address, num_cpus=num_cpus,
                     keep=keep, fresh=fresh, threads=threads, progress=progress,
                     router_options=router_options)
    seconds = time.time() - start
    out_dir = suite.root / "report"
    md_path = Path(md_path) if md_path else out_dir / f"sweep-{suite.name}.md"
    png_path = Path(png_path) if png_path else md_path.with_suffix(".png")
    text, front = render_sweep(suite, rows, refs, command=command or
                               f"polymerge report --suite {suite.name} --sweep",
                               seconds=seconds, plot_name=png_path.name)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    base, ensemble = reference_map_rows(suite, refs)
    score_size_map(suite, rows, base, ensemble, refs["ensemble"], png_path,
                   title or f"{suite.name} suite: normalized score against stored size")
    return SweepResult(rows, refs, base, ensemble, text=text, markdown=md_path, plot=png_path,
                       seconds=seconds, front=front)


def comparable(rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    """What two runs of the same cells must agree on: names, scores, sizes and notes (not the
    seconds they took)."""
    return [(r.name, r.scores, r.params_ratio, re.sub(r"\d+(\.\d+)? s\b", "", r.note),
             {k: v for k, v in r.extra.items()}) for r in rows]
