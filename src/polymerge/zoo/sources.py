"""The zoo's suites as data sources of the learned merges, and a merge that knows them.

A learned merge's recipe may say ``data: cls``: tuning looks the name up in the data sources
its caller passes (it imports no zoo). :func:`data_sources` gives each suite's tuning data (its
validation split, or the gen suite's training windows; never its test data), and
:func:`run_merge` runs any recipe with them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polymerge.registry import RunOptions, parse_size, run
from polymerge.tuning.data import DataError, DataSource, Example, TaskSpec
from polymerge.zoo.suites import get_suite, suite_names


def open_suite(name: str, base_model: Path) -> Any:
    """The zoo suite ``name``, in the cache and at the scale the base model lives in.

    A suite keeps its base under ``<cache>/<name>[-<scale>]/base``; when the recipe's base is
    there, that cache and scale are used, else the default cache at full scale.
    """
    root = base_model.expanduser().resolve().parent
    if root.name == name:
        return get_suite(name, root.parent, scale="full")
    if root.name.startswith(f"{name}-"):
        return get_suite(name, root.parent, scale=root.name[len(name) + 1:])
    return get_suite(name)


def _suite_task(suite: Any, spec: TaskSpec) -> str:
    for task in suite.tasks:
        if Path(suite.expert_dir(task)).resolve() == spec.path.resolve():
            return str(task)
    for name in (*spec.aliases, spec.expert):
        if name in suite.tasks:
            return name
    raise DataError(f"expert {spec.expert!r} ({spec.path}) is not an expert of the "
                    f"{suite.name} suite, whose tasks are {', '.join(suite.tasks)}")


SUITE_WINDOWS = 64
"""Token windows per domain taken from a suite that has no validation text (see below)."""


def _window_examples(suite: Any, task: str, expert: str) -> list[Example]:
    """A seeded sample of the domain's *training* windows.

    The gen suite keeps its held-out windows for evaluation only, and has no separate
    validation split; its training windows are what the expert already saw, so tuning on them
    uses no test data.
    """
    windows = suite.windows(task)["train"]
    g = torch.Generator().manual_seed(zlib.crc32(f"{suite.name}:{task}".encode()))
    pick = torch.randperm(len(windows), generator=g)[:SUITE_WINDOWS].tolist()
    return [Example("", expert, None, f"suite {suite.name}, task {task}, train window {i}",
                    tuple(int(t) for t in windows[i].tolist())) for i in pick]


def suite_examples(suite: Any, specs: Sequence[TaskSpec]) -> list[Example]:
    """Each expert's task's tuning data from a zoo suite; its test data is never used.

    In order of preference: the suite's ``tuning_examples(task) -> [(text, label index or
    None)]``; its ``splits(task).validation`` (examples with ``text`` and ``label``: the cls
    suite); a sample of its ``windows(task)["train"]`` token windows (the gen suite).
    """
    examples: list[Example] = []
    for spec in specs:
        task = _suite_task(suite, spec)
        custom = getattr(suite, "tuning_examples", None)
        if custom is not None:
            rows = [(t, y) for t, y in custom(task)]
        elif hasattr(suite, "splits"):
            splits = suite.splits(task)
            if spec.labels is not None and tuple(splits.labels) != tuple(spec.labels):
                raise DataError(f"expert {spec.expert!r}: its head's labels {spec.labels} "
                                f"differ from the suite's {tuple(splits.labels)}")
            rows = [(e.text, e.label) for e in splits.validation]
        elif hasattr(suite, "windows"):
            examples += _window_examples(suite, task, spec.expert)
            continue
        else:
            raise DataError(f"the {suite.name} suite offers no tuning data (no "
                            "tuning_examples, splits or windows)")
        for i, (text, label) in enumerate(rows):
            examples.append(Example(text, spec.expert,
                                    None if spec.labels is None else label,
                                    f"suite {suite.name}, task {task}, validation #{i}"))
    return examples


def data_sources() -> dict[str, DataSource]:
    """Every suite by name, as a source of tuning examples."""

    def source(name: str) -> DataSource:
        return lambda specs, base: suite_examples(open_suite(name, base), specs)

    return {name: source(name) for name in suite_names()}


def run_merge(recipe: Any, out: str | Path, *, force: bool = False, device: str = "cpu",
              dtype: str | None = None, shard_size: str | int = "5GB",
              allow_pickle: bool = False, progress: bool = True) -> Path:
    """Run a recipe of any kind (what ``polymerge merge`` does), with the suites as data."""
    options = RunOptions(force=force, device=device, dtype=dtype,
                         shard_size=parse_size(shard_size), allow_pickle=allow_pickle,
                         progress=progress, data_sources=data_sources())
    return run(recipe, out, options)
