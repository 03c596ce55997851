"""The examples coefficients are trained on: a JSONL file or a named data source.

The JSONL format is polymerge's one format for labelled text (:mod:`polymerge.io.jsonl`):
``{"text": ..., "expert": ..., "label": ...}`` with ``task`` accepted as an alias of
``expert``. ``expert`` names the expert as in the recipe (``name``, or the last part of its
path) or, for classification experts, the task name of its head; required with more than one
expert. ``label``: one of the head's label names or an index; required by SuperMerge on
classification experts, ignored by AdaMerging, refused for causal LMs (their targets are the
text's own next tokens).

Anything else ``data`` names is looked up in the data sources the caller passes (the package
API adds the zoo's suites): tuning never imports the zoo.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymerge.io.jsonl import DataError, Record, read_records


@dataclass(frozen=True)
class TaskSpec:
    """One expert's task as the data and the objective see it."""

    expert: str
    """The expert's display name in the recipe: the key used everywhere."""
    path: Path
    aliases: tuple[str, ...] = ()
    """Other names data may use for this task (the task name in the head's labels.json)."""
    labels: tuple[str, ...] | None = None
    """Label names of a classification head; None for language modelling."""


@dataclass(frozen=True)
class Example:
    """One training or held-out input; ``task`` is an expert name, ``label`` an index."""

    text: str
    task: str
    label: int | None
    where: str
    """Where it came from (``file.jsonl:12``), for error messages."""
    ids: tuple[int, ...] | None = None
    """Token ids when the source is already tokenized (the gen suite's windows)."""


DataSource = Callable[[Sequence["TaskSpec"], Path], list["Example"]]
"""``source(specs, base_model) -> examples``: each expert's tuning examples."""


def _task_lookup(specs: Sequence[TaskSpec]) -> dict[str, TaskSpec]:
    lookup: dict[str, TaskSpec] = {}
    for spec in specs:
        for key in (spec.expert, *spec.aliases):
            lookup.setdefault(key, spec)
    return lookup


def _label_index(value: Any, spec: TaskSpec, where: str) -> int:
    assert spec.labels is not None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label must be a label name or an index, got {value!r}")
    if isinstance(value, str):
        if value in spec.labels:
            return spec.labels.index(value)
        raise DataError(f"{where}: unknown label {value!r} for task {spec.expert!r}; its "
                        f"labels are {', '.join(spec.labels)}")
    if not 0 <= value < len(spec.labels):
        raise DataError(f"{where}: label index {value} is out of range for task "
                        f"{spec.expert!r}, which has {len(spec.labels)} labels")
    return value


def to_example(record: Record, specs: Sequence[TaskSpec], *, needs_labels: bool) -> Example:
    """Check one labelled-text record against the experts' tasks."""
    where, lookup = record.where, _task_lookup(specs)
    if record.expert is None:
        if len(specs) != 1:
            raise DataError(f"{where}: 'expert' is required with {len(specs)} experts (one of "
                            f"{', '.join(s.expert for s in specs)})")
        spec = specs[0]
    elif record.expert not in lookup:
        raise DataError(f"{where}: unknown expert {record.expert!r}; the experts' tasks are "
                        f"{', '.join(sorted(lookup))}")
    else:
        spec = lookup[record.expert]
    label = record.label
    if spec.labels is None:
        if label is not None:
            raise DataError(f"{where}: expert {spec.expert!r} is a causal LM; its examples "
                            "take no label (the targets are the text's next tokens)")
        return Example(record.text, spec.expert, None, where)
    if label is None:
        if needs_labels:
            raise DataError(f"{where}: 'label' is required (supervised training)")
        return Example(record.text, spec.expert, None, where)
    return Example(record.text, spec.expert, _label_index(label, spec, where), where)


def read_jsonl(path: Path, specs: Sequence[TaskSpec], *, needs_labels: bool) -> list[Example]:
    """Every example of a JSONL file, checked against the experts."""
    return [to_example(r, specs, needs_labels=needs_labels) for r in read_records(path)]


def split_heldout(examples: Sequence[Example], fraction: float, seed: int
                  ) -> tuple[list[Example], list[Example]]:
    """Per task, a seeded shuffle then ``fraction`` of it (at least one) held out.

    The split depends only on the seed and each task's examples, so every level of a
    hierarchical merge and every rerun sees the same held-out data.
    """
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    train: list[Example] = []
    held: list[Example] = []
    for task, items in by_task.items():
        if len(items) < 2:
            raise DataError(f"task {task!r} has {len(items)} example; at least 2 are needed "
                            "(one to train on, one held out for early stopping)")
        order = list(range(len(items)))
        random.Random(f"polymerge-tuning:{seed}:{task}").shuffle(order)
        n_held = min(len(items) - 1, max(1, round(fraction * len(items))))
        held += [items[i] for i in order[:n_held]]
        train += [items[i] for i in order[n_held:]]
    return train, held


def check_coverage(examples: Sequence[Example], specs: Sequence[TaskSpec], source: str) -> None:
    """Every expert needs data for its task, or its coefficients would learn nothing."""
    have = {ex.task for ex in examples}
    missing = [s.expert for s in specs if s.expert not in have]
    if missing:
        raise DataError(f"{source}: no examples for the task of expert(s) "
                        f"{', '.join(missing)}")


def load_examples(data: str, specs: Sequence[TaskSpec], base_model: Path, *,
                  needs_labels: bool, sources: Mapping[str, DataSource] | None = None
                  ) -> list[Example]:
    """The examples ``data`` names: a JSONL path, or one of the caller's ``sources``."""
    sources = sources or {}
    path = Path(data).expanduser()
    if data in sources and not path.is_file():
        examples = sources[data](specs, base_model)
        source = f"data source {data}"
    elif path.is_file() or path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        examples = read_jsonl(path, specs, needs_labels=needs_labels)
        source = str(path)
    else:
        raise DataError(f"data {data!r} is neither a file nor a known data source (sources: "
                        f"{', '.join(sorted(sources)) or 'none'})")
    if needs_labels and any(e.label is None for e in examples
                            if _spec(specs, e.task).labels is not None):
        bad = next(e for e in examples if e.label is None)
        raise DataError(f"{bad.where}: no label (supervised training needs one)")
    check_coverage(examples, specs, source)
    return examples


def _spec(specs: Sequence[TaskSpec], expert: str) -> TaskSpec:
    for s in specs:
        if s.expert == expert:
            return s
    raise KeyError(expert)


def by_task(examples: Sequence[Example]) -> Mapping[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for ex in examples:
        out.setdefault(ex.task, []).append(ex)
    return out
