"""Scoring any checkpoint or store on the user's own data: ``polymerge eval TARGET --data F``.

The data is polymerge's one JSONL format (:mod:`polymerge.io.jsonl`), one record per line:

* classifiers (experts with task heads): ``{"text": ..., "expert": ..., "label": ...}``, the
  label by name (the head's ``id2label``) or by index; scored by accuracy per expert;
* causal LMs: ``{"text": ..., "expert": ...}``; scored by perplexity per expert (the text's
  own next tokens).

``task`` is an alias of ``expert``. A record whose expert is not one of the target's, or whose
label is not one of that expert's, is a one-line error naming the file and line.

Routings: ``oracle`` runs each record with its own expert; ``router`` with the store's router
(when it has one); a plain checkpoint is one expert and one routing. Answers are end to end:
each row is answered by the head of the expert it was routed to, so a row routed to the wrong
expert gets that expert's label (wrong, unless the label names coincide). With ``experts``
(each expert alone, as a checkpoint), every score is also normalized: score / the expert's own
score x 100 (perplexity: the expert's / the score x 100).

Batching is fixed and deterministic: per expert, records in file order, sorted by token count,
right-padded batches of ``batch_size``, truncated to ``max_length`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.io.jsonl import DataError, read_records

ORACLE = "oracle"
ROUTER = "router"
ROUTINGS = (ORACLE, ROUTER)


@dataclass(frozen=True)
class DataRecord:
    """One checked record: its text, expert, gold label name (classifiers) and line."""

    text: str
    expert: str
    label: str | None
    where: str


@dataclass
class DataScores:
    """What :func:`evaluate_data` measured."""

    target: str
    metric: str
    """``accuracy`` (higher is better) or ``perplexity`` (lower is better)."""
    experts: list[str]
    counts: dict[str, int]
    routings: dict[str, dict[str, float]] = field(default_factory=dict)
    """routing -> expert -> score."""
    alone: dict[str, float] = field(default_factory=dict)
    """expert -> its own score as a checkpoint (with ``experts``)."""
    routing_accuracy: dict[str, float] = field(default_factory=dict)
    """routing -> share of records routed (top-1) to their own expert."""

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    def normalized(self, routing: str) -> dict[str, float]:
        """Per expert: score / the expert's own score x 100 (perplexity: inverted)."""
        out = {}
        for e, v in self.routings[routing].items():
            a = self.alone.get(e)
            if a is None:
                continue
            num, den = (v, a) if self.higher_is_better else (a, v)
            out[e] = num / den * 100.0 if den and math.isfinite(num) and math.isfinite(den) \
                else float("nan")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "metric": self.metric, "records": self.counts,
                "experts_alone": self.alone,
                "routings": {r: {"per_expert": v, "mean": _mean(v),
                                 "routing_accuracy": self.routing_accuracy.get(r),
                                 **({"normalized": self.normalized(r),
                                     "normalized_mean": _mean(self.normalized(r))}
                                    if self.alone else {})}
                             for r, v in self.routings.items()}}


def _mean(values: Mapping[str, float]) -> float:
    xs = [v for v in values.values() if math.isfinite(v)]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- records


def read_data(path: str | Path, runtime: Any) -> list[DataRecord]:
    """The records of a JSONL file, checked against the runtime's experts and heads."""
    heads = runtime.heads if runtime.classifies else None
    experts = list(runtime.experts)
    plain = runtime.serving == "plain"
    out = []
    for record in read_records(path):
        where = record.where
        expert = record.expert
        if expert is None:
            if len(experts) > 1:
                raise DataError(f"{where}: 'expert' is required: the target has "
                                f"{len(experts)} experts ({', '.join(experts)})")
            expert = experts[0]
        elif not plain and expert not in experts:
            raise DataError(f"{where}: unknown expert {expert!r}; the target's experts are "
                            f"{', '.join(experts)}")
        if heads is None:
            if record.label is not None:
                raise DataError(f"{where}: a causal LM's records take no label (they are "
                                "scored by the perplexity of their own text)")
            out.append(DataRecord(record.text, expert, None, where))
            continue
        labels = heads.labels(experts[0] if plain else expert)
        out.append(DataRecord(record.text, expert, _label(record.label, labels, expert, where),
                              where))
    return out


def _label(value: Any, labels: Sequence[str], expert: str, where: str) -> str:
    if value is None:
        raise DataError(f"{where}: 'label' is required (a name of {expert!r}'s labels or an "
                        "index)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label must be a label name or an index, got {value!r}")
    if isinstance(value, str):
        if value in labels:
            return value
        raise DataError(f"{where}: unknown label {value!r} for expert {expert!r}; its labels "
                        f"are {', '.join(labels)}")
    if not 0 <= value < len(labels):
        raise DataError(f"{where}: label index {value} is out of range for expert {expert!r}, "
                        f"which has {len(labels)} labels")
    return labels[value]


# ----------------------------------------------------------------------------- scoring


def _batches(runtime: Any, texts: Sequence[str], max_length: int, batch_size: int
             ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    tok = runtime.tokenizer
    ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = int(tok.pad_token_id)
    out = []
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        width = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        m = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            m[row, :len(ids[i])] = 1
        out.append((chunk, {"input_ids": x, "attention_mask": m}))
    return out


def score(runtime: Any, records: Sequence[DataRecord], routing: str, *, max_length: int,
          batch_size: int) -> tuple[dict[str, float], float]:
    """Per expert, accuracy (classifiers) or perplexity (causal LMs) of ``records`` run with
    ``routing`` (``oracle``: each record's expert; ``router``); and the share of records
    routed to their own expert."""
    classify = runtime.classifies
    plain = runtime.serving == "plain"
    by_expert: dict[str, list[DataRecord]] = {}
    for r in records:
        by_expert.setdefault(r.expert, []).append(r)
    scores: dict[str, float] = {}
    routed_right = total = 0
    for expert, group in by_expert.items():
        correct = 0
        nll = 0.0
        tokens = 0
        for chunk, batch in _batches(runtime, [r.text for r in group], max_length, batch_size):
            how: Any = None if routing == ROUTER else (runtime.experts[0] if plain else expert)
            out = runtime.forward(batch, how)
            chosen = out.chosen
            routed_right += sum(c == (runtime.experts[0] if plain else expert) for c in chosen)
            total += len(chunk)
            for row, i in enumerate(chunk):
                logits = out.outputs[row]
                if classify:
                    names = runtime.heads.labels(chosen[row])
                    correct += names[int(logits.argmax())] == group[i].label
                else:
                    ids = batch["input_ids"][row][: logits.shape[0]]
                    if ids.shape[0] < 2:
                        continue
                    nll += float(torch.nn.functional.cross_entropy(
                        logits[:-1].float(), ids[1:].to(logits.device), reduction="sum"))
                    tokens += int(ids.shape[0]) - 1
        if classify:
            scores[expert] = correct / len(group)
        else:
            scores[expert] = math.exp(nll / tokens) if tokens else float("nan")
    return scores, routed_right / total if total else float("nan")


def evaluate_data(target: str | Path, data: str | Path, *,
                  routings: Sequence[str] | None = None,
                  experts: Mapping[str, str | Path] | None = None,
                  max_length: int | None = None, batch_size: int = 32,
                  device: str = "cpu", base: str | Path | None = None,
                  progress: Any = None, allow_pickle: bool = False) -> DataScores:
    """Score ``target`` (a checkpoint or store folder) on the JSONL ``data``.

    ``routings``: ``oracle`` and/or ``router`` (default: both when the target has a router,
    else oracle); ``experts``: name -> checkpoint of each expert alone (for normalized
    scores); ``max_length``: tokens per text (default: the runtime's); ``base``: a switching
    store's router feature model (a store never names it itself); ``allow_pickle``: load
    pickled weights (target, experts, base). ``progress``: a callable told what runs next.
    """
    from polymerge.runtime import load_runtime

    rt = load_runtime(target, device=device, allow_pickle=allow_pickle,
                      **({"base": base} if base is not None else {}))
    records = read_data(data, rt)
    length = int(max_length or rt.max_length)
    has_router = getattr(rt, "router", None) is not None
    if routings is None:
        routings = (ORACLE, ROUTER) if has_router else (ORACLE,)
    for r in routings:
        if r not in ROUTINGS:
            raise PolymergeError(f"routing must be one of {', '.join(ROUTINGS)}, got {r!r}")
        if r == ROUTER and not has_router:
            raise PolymergeError(f"{Path(target).name} has no router: train one with "
                                 "`polymerge router train`, or score with oracle routing only")
    names = list(dict.fromkeys(r.expert for r in records))
    result = DataScores(str(target), "accuracy" if rt.classifies else "perplexity", names,
                        {e: sum(r.expert == e for r in records) for e in names})
    for r in routings:
        if progress:
            progress(f"{r} routing")
        result.routings[r], result.routing_accuracy[r] = score(
            rt, records, r, max_length=length, batch_size=batch_size)
    for name, path in (experts or {}).items():
        own = [r for r in records if r.expert == name]
        if not own:
            raise PolymergeError(f"--experts names {name!r}, but no record of the data is for "
                                 f"it (the data's experts: {', '.join(names)})")
        if progress:
            progress(f"expert {name} alone")
        alone = load_runtime(path, device=device, allow_pickle=allow_pickle)
        if alone.classifies != rt.classifies:
            raise PolymergeError(f"--experts {name}: {path} is a "
                                 f"{'classifier' if alone.classifies else 'causal LM'}, the "
                                 "target is not")
        if alone.classifies:  # the same label names, checked line by line
            labels = alone.heads.labels(alone.experts[0])
            own = [DataRecord(r.text, r.expert, _label(r.label, labels, name, r.where),
                              r.where) for r in own]
        result.alone[name] = score(alone, own, ORACLE, max_length=length,
                                   batch_size=batch_size)[0][name]
    return result


def write_suite_data(suite: Any, split: str = "test") -> Path:
    """A classification suite's ``split`` as this module's JSONL (label names), one file in
    the suite's cache: what its stores are scored on end to end."""
    import json
    import os

    path = Path(suite.root) / "data" / f"{split}.jsonl"
    lines = []
    for task in suite.tasks:
        splits = suite.splits(task)
        lines += [json.dumps({"text": e.text, "expert": task, "label": splits.labels[e.label]})
                  for e in getattr(splits, split)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".partial-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def parse_experts(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) for each expert alone."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).expanduser().name, spec
        if not name or not path:
            raise PolymergeError(f"--experts: {spec!r} is not NAME=PATH or PATH")
        out[name] = Path(path).expanduser()
    return out


# ----------------------------------------------------------------------------- output


def table(result: DataScores) -> str:
    """The scores as an aligned text table, one row per expert plus the mean."""
    routings = list(result.routings)
    scale = 100.0 if result.metric == "accuracy" else 1.0
    header = ["expert", "records"] + [f"{r} {result.metric}" for r in routings]
    if result.alone:
        header += ["alone"] + [f"{r} normalized" for r in routings]
    rows = []
    norm = {r: result.normalized(r) for r in routings} if result.alone else {}

    def fmt(v: float | None, s: float = scale) -> str:
        digits = 3 if result.metric == "perplexity" and s == scale else 1
        return "–" if v is None or not math.isfinite(v) else f"{v * s:.{digits}f}"

    for e in result.experts:
        row = [e, str(result.counts[e])] + [fmt(result.routings[r].get(e)) for r in routings]
        if result.alone:
            row += [fmt(result.alone.get(e))] + [fmt(norm[r].get(e), 1.0) for r in routings]
        rows.append(row)
    mean = ["mean", str(sum(result.counts.values()))] + \
        [fmt(_mean(result.routings[r])) for r in routings]
    if result.alone:
        mean += [fmt(_mean(result.alone))] + [fmt(_mean(norm[r]), 1.0) for r in routings]
    rows.append(mean)
    acc = [f"{r} {v:.3f}" for r, v in result.routing_accuracy.items() if r == ROUTER]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for i, r in enumerate([header] + rows):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if acc:
        lines.append(f"routing accuracy (records sent to their own expert): {', '.join(acc)}")
    return "\n".join(lines)


def bar_chart(result: DataScores, out: str | Path, title: str = "") -> Path:
    """Grouped bars per expert: each routing's score, and the expert alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {**{r: result.routings[r] for r in result.routings},
              **({"expert alone": result.alone} if result.alone else {})}
    scale = 100.0 if result.metric == "accuracy" else 1.0
    experts = result.experts
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(experts) + 3), 4.2))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [j + (k - (len(series) - 1) / 2) * width for j in range(len(experts))]
        ys = [values.get(e, float("nan")) * scale for e in experts]
        ax.bar(xs, [0 if not math.isfinite(y) else y for y in ys], width, label=name)
    ax.set_xticks(range(len(experts)), experts, rotation=20, ha="right")
    ax.set_ylabel(result.metric + (" (%)" if scale == 100 else ""))
    ax.set_title(title or Path(result.target).name)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
