"""The one JSONL format for labelled text: router training, learned merges and evaluation.

One JSON object per non-blank line::

    {"text": "a great film", "expert": "sentiment", "label": "positive"}

``text`` is a non-empty string; ``expert`` names the expert (task) the line belongs to, and
``task`` is accepted as an alias with the same meaning; ``label`` is used where a consumer needs
one. Other keys are ignored. Every problem is a one-line error naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymerge.errors import PolymergeError


class DataError(PolymergeError):
    """Labelled data does not parse or does not fit the experts."""


@dataclass(frozen=True)
class Record:
    """One line: its text, expert (None when absent), label (None when absent) and place."""

    text: str
    expert: str | None
    label: Any
    where: str


def read_records(path: str | Path) -> Iterator[Record]:
    """Every record of a JSONL file, checked for shape; raises DataError naming the line."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read the data file ({exc})") from None
    seen = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        except RecursionError:
            raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
        yield parse_record(raw, where)
        seen = True
    if not seen:
        raise DataError(f"{file}: the data file has no examples")


def parse_record(raw: Any, where: str) -> Record:
    """One record from a decoded JSON value (``task`` is an alias of ``expert``)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: 'text' must be a non-empty string")
    expert = raw.get("expert", raw.get("task"))
    if "expert" in raw and "task" in raw and raw["expert"] != raw["task"]:
        raise DataError(f"{where}: 'expert' and its alias 'task' disagree")
    if expert is not None and not isinstance(expert, str):
        raise DataError(f"{where}: 'expert' must be a string, got {expert!r}")
    return Record(text, expert, raw.get("label"), where)
