"""The examples coefficients are trained on: a JSONL file or a zoo suite's validation split.

JSONL format, one JSON object per non-blank line::

    {"text": "a great film", "label": "fresh", "task": "sentiment"}

- ``text`` (string, required, not empty): the input; for a causal LM the text whose next
  tokens are predicted.
- ``task`` (string): which expert's task the example belongs to, as the expert's ``name`` in
  the recipe (or the last part of its path) or, for classification experts, the task name in
  its ``heads/labels.json``. Required when the recipe has more than one expert.
- ``label``: the class, as one of the task head's label names or its index. Required by
  SuperMerge on classification experts; optional (and ignored) for AdaMerging, which trains
  without labels; not allowed for causal LMs, whose targets are the text's own next tokens.

Other keys are ignored. Problems (invalid JSON, a missing text, an unknown task or label, an
empty file) raise a PolymergeError naming the file and line.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import PolymergeError


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


class DataError(PolymergeError):
    """The validation data does not fit the experts."""


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


def parse_record(record: Any, specs: Sequence[TaskSpec], where: str, *,
                 needs_labels: bool) -> Example:
    """Check one JSONL record against the experts' tasks and turn it into an Example."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'text' must be a non-empty string")
    task = record.get("task")
    lookup = _task_lookup(specs)
    if task is None:
        if len(specs) != 1:
            raise DataError(f"{where}: 'task' is required with {len(specs)} experts (one of "
                            f"{', '.join(s.expert for s in specs)})")
        spec = specs[0]
    elif not isinstance(task, str) or task not in lookup:
        raise DataError(f"{where}: unknown task {task!r}; the experts' tasks are "
                        f"{', '.join(sorted(lookup))}")
    else:
        spec = lookup[task]
    label = record.get("label")
    if spec.labels is None:
        if label is not None:
            raise DataError(f"{where}: expert {spec.expert!r} is a causal LM; its examples "
                            "take no label (the targets are the text's next tokens)")
        return Example(text, spec.expert, None, where)
    if label is None:
        if needs_labels:
            raise DataError(f"{where}: 'label' is required (supervised training)")
        return Example(text, spec.expert, None, where)
    return Example(text, spec.expert, _label_index(label, spec, where), where)


def read_jsonl(path: Path, specs: Sequence[TaskSpec], *, needs_labels: bool) -> list[Example]:
    """Every example of a JSONL file, checked (see the module docstring for the format)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the data file ({exc})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        examples.append(parse_record(record, specs, where, needs_labels=needs_labels))
    if not examples:
        raise DataError(f"{path}: the data file has no examples")
    return examples


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


# ----------------------------------------------------------------------------- zoo suites


def open_suite(name: str, base_model: Path) -> Any:
    """The zoo suite ``name``, in the cache and at the scale the base model lives in.

    A suite keeps its base under ``<cache>/<name>[-<scale>]/base``; when the recipe's base is
    there, that cache and scale are used, else the default cache at full scale.
    """
    from polymerge.zoo import get_suite

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


def load_examples(data: str, specs: Sequence[TaskSpec], base_model: Path, *,
                  needs_labels: bool) -> list[Example]:
    """The examples ``data`` names: a JSONL path, or a zoo suite's validation splits."""
    path = Path(data).expanduser()
    if path.is_file() or path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        examples = read_jsonl(path, specs, needs_labels=needs_labels)
        source = str(path)
    else:
        from polymerge.zoo import suite_names

        if data not in suite_names():
            raise DataError(f"data {data!r} is neither a file nor a zoo suite (suites: "
                            f"{', '.join(suite_names())})")
        suite = open_suite(data, base_model)
        examples = suite_examples(suite, specs)
        source = f"suite {data}"
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
