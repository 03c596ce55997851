"""Training a store's router from labelled queries: a JSONL file or a zoo suite's splits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polymerge.errors import PolymergeError
from polymerge.routing.features import DEFAULT_MAX_LENGTH, FeatureModel
from polymerge.routing.router import (
    TrainResult,
    accuracy,
    per_expert_accuracy,
    save_router,
    train_router,
)


@dataclass
class LabelledTexts:
    """Queries and the expert each belongs to."""

    texts: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, expert: str) -> None:
        self.texts.append(text)
        self.experts.append(expert)


def read_jsonl(path: str | Path) -> LabelledTexts:
    """Records ``{"text": ..., "expert": ...}``, one per line (blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PolymergeError(f"router data {file} does not exist")
    out = LabelledTexts()
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise PolymergeError(f"{file}:{n}: not a JSON record ({exc})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) \
                or not isinstance(rec.get("expert"), str):
            raise PolymergeError(f"{file}:{n}: each record needs a string \"text\" and a string "
                                 "\"expert\"")
        out.add(rec["text"], rec["expert"])
    if not out:
        raise PolymergeError(f"{file}: no records")
    return out


def suite_texts(suite: Any, split: str = "validation", *, limit: int = 300) -> LabelledTexts:
    """Each task's queries of one split of a zoo suite, labelled with the task (= expert) name.

    A suite may provide ``router_texts(split) -> {task: [text, ...]}``. Otherwise a suite of
    token windows (``windows(task)`` and ``tokenizer()``, the gen suite) gives its decoded
    ``train`` windows for ``validation`` and ``heldout`` windows for ``test`` (at most
    ``limit`` per task), and a suite of examples gives its ``splits(task).<split>`` texts.
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


def feature_model_for(store_path: Path, manifest: dict[str, Any], base: str | Path | None,
                      device: str, max_length: int) -> FeatureModel:
    path = Path(base).expanduser() if base else Path(manifest.get("base", {}).get("path") or "")
    if not str(path) or not (path / "config.json").is_file():
        raise PolymergeError(f"the router's feature model (the base model) was not found at "
                             f"{path or '(none recorded)'}; pass --base PATH")
    return FeatureModel(path, tokenizer_path=store_path, device=device, max_length=max_length)


def train_store_router(store: str | Path, data: LabelledTexts, *,
                       test: LabelledTexts | None = None, base: str | Path | None = None,
                       device: str = "cpu", max_length: int = DEFAULT_MAX_LENGTH,
                       seed: int = 0, hidden: int = 256, val_fraction: float = 0.2,
                       max_epochs: int = 300, patience: int = 25,
                       features: FeatureModel | None = None, source: str = "") -> TrainResult:
    """Train a router for ``store`` on ``data`` and save it inside the store (``router/``).

    Features come from the base model, except for twin stores, whose router reads the
    store's shared model (recorded as ``feature.model = "store:shared"``).

    ``test`` (optional) is scored after training and reported as ``test_accuracy``.
    """
    from polymerge.stores.base import ROUTER_DIR, read_manifest

    folder = Path(store).expanduser().absolute()
    manifest = read_manifest(folder)
    experts = list(manifest["experts"])
    unknown = sorted({e for e in data.experts if e not in experts})
    if unknown:
        raise PolymergeError(f"router data names expert(s) {unknown} not in the store; its "
                             f"experts are {', '.join(experts)}")
    missing = [e for e in experts if e not in set(data.experts)]
    if missing:
        raise PolymergeError(f"router data has no queries for expert(s) {missing}")
    twin = manifest.get("method") == "twin"
    if features is not None:
        fm = features
    elif twin:
        # A twin store routes on its shared model (what its runtime runs in pass 1).
        if base is not None:
            raise PolymergeError(f"{folder.name} is a twin store: its router's features come "
                                 "from the store's own shared model; --base does not apply")
        from polymerge.runtime.twin import shared_feature_model

        fm = shared_feature_model(folder, device=device, max_length=max_length)
    else:
        fm = feature_model_for(folder, manifest, base, device, max_length)
    feats = fm(data.texts)
    result = train_router(feats, data.experts, experts, hidden=hidden, seed=seed,
                          val_fraction=val_fraction, max_epochs=max_epochs, patience=patience)
    if test is not None and len(test):
        tf = fm(test.texts)
        result.metrics["test_examples"] = len(test)
        result.metrics["test_accuracy"] = accuracy(result.router, tf, test.experts)
        result.metrics["test_per_expert"] = per_expert_accuracy(result.router, tf, test.experts)
    from polymerge.runtime.twin import SHARED_FEATURES

    model_label = SHARED_FEATURES if twin and features is None else str(fm.path)
    info = {"feature": {"model": model_label, "pooling": "mean", "layer": "last",
                        "max_length": fm.max_length},
            "training": {"seed": seed, "hidden": hidden, "val_fraction": val_fraction,
                         "max_epochs": max_epochs, "patience": patience, "source": source},
            "metrics": result.metrics}
    save_router(folder / ROUTER_DIR, result.router, info)
    return result
