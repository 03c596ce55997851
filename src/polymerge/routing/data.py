"""Labelled texts for routers: the one JSONL format (:mod:`polymerge.io.jsonl`), and a zoo
suite's splits.

Each record's ``expert`` (or its alias ``task``) names the expert whose task the text belongs
to: the label a router learns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polymerge.io.jsonl import DataError, read_records


@dataclass
class LabelledTexts:
    """Texts and the expert each belongs to; per text also the record's ``label`` (None when
    absent) and ``where`` it came from (``file:line``; empty for texts added in code)."""

    texts: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, expert: str, label: Any = None, where: str = "") -> None:
        self.texts.append(text)
        self.experts.append(expert)
        self.labels.append(label)
        self.where.append(where)


def read_labelled_jsonl(path: str | Path, *, default_expert: str | None = None
                        ) -> LabelledTexts:
    """Every record of a JSONL file of labelled texts; ``default_expert`` labels the records
    that name no expert (without it, each record must name one)."""
    out = LabelledTexts()
    for record in read_records(path):
        expert = record.expert if record.expert is not None else default_expert
        if not expert:
            raise DataError(f"{record.where}: 'expert' (or its alias 'task') is required")
        out.add(record.text, expert, record.label, record.where)
    return out


def suite_texts(suite: Any, split: str = "validation", *, limit: int = 300) -> LabelledTexts:
    """Each task's queries of one split of a zoo suite, labelled with the task (= expert) name.

    The suite is duck-typed. It may provide ``router_texts(split) -> {task: [text, ...]}``.
    Otherwise a suite of token windows (``windows(task)`` and ``tokenizer()``, the gen suite)
    gives its decoded ``train`` windows for ``validation`` and ``heldout`` windows for
    ``test`` (at most ``limit`` per task), and a suite of examples gives its
    ``splits(task).<split>`` texts.
    """
    out = LabelledTexts()
    own = getattr(suite, "router_texts", None)
    if own is not None:
        for task, texts in own(split).items():
            for t in texts:
                out.add(t, task)
        return out
    if hasattr(suite, "windows") and hasattr(suite, "tokenizer"):
        tok = suite.tokenizer()
        key = "heldout" if split == "test" else "train"
        for task in suite.tasks:
            for row in suite.windows(task)[key][:limit]:
                out.add(tok.decode(row.tolist(), skip_special_tokens=True), task)
        return out
    for task in suite.tasks:
        examples = getattr(suite.splits(task), split)
        for ex in examples:
            text = ex.text if hasattr(ex, "text") else ex["text"]
            out.add(text, task)
    return out
