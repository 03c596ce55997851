"""A task router: a small MLP from a query's features to the expert that should answer it.

Trained with cross-entropy on queries labelled with their expert, with early stopping on a
held-out part of them (the weights of the best held-out loss are kept). Saved as
``router.safetensors`` plus ``router.json`` (labels, feature model, training metrics).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.checkpoint import contained_file, read_json_file, read_safetensors_header

ROUTER_FORMAT_VERSION = 1
WEIGHTS_FILE = "router.safetensors"
INFO_FILE = "router.json"


class Router(torch.nn.Module):
    """Standardized features -> Linear -> GELU -> Dropout -> Linear -> one logit per expert."""

    def __init__(self, in_features: int, experts: Sequence[str], hidden: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if len(experts) < 1:
            raise PolymergeError("a router needs at least one expert")
        self.experts = list(experts)
        self.in_features = in_features
        self.hidden = hidden
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, len(self.experts)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x)

    @torch.inference_mode()
    def predict(self, features: torch.Tensor) -> list[str]:
        """The expert chosen for each row of ``features``."""
        if features.shape[0] == 0:
            return []
        was = self.training
        self.eval()
        idx = self(features.to(self.mean.device)).argmax(-1).tolist()
        self.train(was)
        return [self.experts[i] for i in idx]

    @torch.inference_mode()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        p = torch.softmax(self(features.to(self.mean.device)), dim=-1)
        self.train(was)
        return p

    @torch.inference_mode()
    def weights(self, features: torch.Tensor, temperature: float = 1.0,
                top_k: int | None = None) -> torch.Tensor:
        """Soft mixing weights (batch, N): ``softmax(logits / temperature)``.

        With ``top_k`` only the k largest weights of each row are kept and renormalized to sum
        to 1. A small temperature approaches one-hot routing.
        """
        n = len(self.experts)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise PolymergeError(f"router temperature must be a number > 0, got "
                                 f"{temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= n):
            raise PolymergeError(f"router top_k must be an integer from 1 to {n} (the number "
                                 f"of experts), got {top_k!r}")
        was = self.training
        self.eval()
        logits = self(features.to(self.mean.device)).float()
        self.train(was)
        p = torch.softmax(logits / float(temperature), dim=-1)
        if top_k is not None and top_k < n:
            values, index = p.topk(top_k, dim=-1)
            p = torch.zeros_like(p).scatter_(-1, index, values)
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        return p


@dataclass
class TrainResult:
    """What router training reports."""

    router: Router
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def stratified_split(labels: Sequence[int], fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Indices (train, held-out): ``fraction`` of each label held out (at least one when a label
    has two or more examples)."""
    g = torch.Generator().manual_seed(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(int(y), []).append(i)
    train: list[int] = []
    held: list[int] = []
    for y in sorted(by_label):
        idx = by_label[y]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held += perm[:k]
        train += perm[k:]
    return sorted(train), sorted(held)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_train_settings(*, hidden: Any = 256, val_fraction: Any = 0.2, max_epochs: Any = 300,
                         patience: Any = 25, batch_size: Any = 64) -> None:
    """Router training settings, checked before any work: one line naming the bad one."""
    for name, value in (("hidden", hidden), ("max_epochs", max_epochs),
                        ("patience", patience), ("batch_size", batch_size)):
        if not _whole(value, 1):
            raise PolymergeError(f"router training: {name} must be a whole number >= 1, got "
                                 f"{value!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 <= val_fraction < 1:
        raise PolymergeError(f"router training: val_fraction must be a number in [0, 1), got "
                             f"{val_fraction!r}")


def train_router(features: torch.Tensor, labels: Sequence[str], experts: Sequence[str], *,
                 hidden: int = 256, dropout: float = 0.1, val_fraction: float = 0.2,
                 max_epochs: int = 300, patience: int = 25, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0
                 ) -> TrainResult:
    """Train a router on ``features`` (n, d) labelled with expert names.

    Deterministic for a seed. Early stopping watches the held-out loss; the returned router has
    the weights of the best held-out epoch (the last epoch when nothing is held out). Runs on
    one CPU thread: the MLP is tiny, and intra-op threads only add contention.
    """
    check_train_settings(hidden=hidden, val_fraction=val_fraction, max_epochs=max_epochs,
                         patience=patience, batch_size=batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_router(features, labels, experts, hidden=hidden, dropout=dropout,
                             val_fraction=val_fraction, max_epochs=max_epochs,
                             patience=patience, lr=lr, weight_decay=weight_decay,
                             batch_size=batch_size, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train_router(features: torch.Tensor, labels: Sequence[str], experts: Sequence[str], *,
                  hidden: int, dropout: float, val_fraction: float, max_epochs: int,
                  patience: int, lr: float, weight_decay: float, batch_size: int, seed: int
                  ) -> TrainResult:
    experts = list(experts)
    index = {e: i for i, e in enumerate(experts)}
    unknown = sorted({y for y in labels if y not in index})
    if unknown:
        raise PolymergeError(f"router data names unknown expert(s) {unknown}; experts: "
                             f"{', '.join(experts)}")
    if features.dim() != 2 or features.shape[0] != len(labels):
        raise PolymergeError(f"router features must be (examples, dims); got "
                             f"{tuple(features.shape)} for {len(labels)} labels")
    if len(labels) == 0:
        raise PolymergeError("router training needs at least one labelled query")
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)
    x = features.float().cpu()
    train_idx, val_idx = stratified_split(y.tolist(), val_fraction, seed)
    xt, yt = x[train_idx], y[train_idx]
    xv, yv = x[val_idx], y[val_idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(x.shape[1], experts, hidden=hidden, dropout=dropout)
    router.mean.copy_(xt.mean(0))
    router.std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6) if len(xt) > 1
                     else torch.ones(x.shape[1]))
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best_state = {k: v.clone() for k, v in router.state_dict().items()}
    best_loss, best_epoch, bad = math.inf, 0, 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    loss_fn = torch.nn.functional.cross_entropy
    for epoch in range(max_epochs):
        router.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + epoch)
            for s in range(0, len(perm), batch_size):
                b = perm[s:s + batch_size]
                loss = loss_fn(router(xt[b]), yt[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
        router.eval()
        with torch.no_grad():
            row = {"epoch": epoch + 1, "train_loss": total / max(1, len(xt)),
                   "train_accuracy": _acc(router, xt, yt)}
            if len(xv):
                row["val_loss"] = float(loss_fn(router(xv), yv))
                row["val_accuracy"] = _acc(router, xv, yv)
        history.append(row)
        watch = row.get("val_loss", row["train_loss"])
        if watch < best_loss - 1e-6:
            best_loss, best_epoch, bad = watch, epoch + 1, 0
            best_state = {k: v.clone() for k, v in router.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    router.load_state_dict(best_state)
    router.eval()
    with torch.no_grad():
        metrics: dict[str, Any] = {
            "examples": len(labels), "train_examples": len(xt), "val_examples": len(xv),
            "train_accuracy": _acc(router, xt, yt),
            "val_accuracy": _acc(router, xv, yv) if len(xv) else float("nan"),
            "best_epoch": best_epoch, "epochs_run": len(history),
            "seconds": round(time.perf_counter() - start, 3)}
    return TrainResult(router, metrics, history)


def _acc(router: Router, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    return float((router(x).argmax(-1) == y).float().mean())


def accuracy(router: Router, features: torch.Tensor, labels: Sequence[str]) -> float:
    """Share of queries routed to their labelled expert."""
    if len(labels) == 0:
        return float("nan")
    got = router.predict(features)
    return sum(a == b for a, b in zip(got, labels, strict=True)) / len(labels)


def per_expert_accuracy(router: Router, features: torch.Tensor, labels: Sequence[str]
                        ) -> dict[str, float]:
    got = router.predict(features)
    out: dict[str, float] = {}
    for e in router.experts:
        idx = [i for i, y in enumerate(labels) if y == e]
        if idx:
            out[e] = sum(got[i] == e for i in idx) / len(idx)
    return out


def save_router(folder: str | Path, router: Router, info: dict[str, Any]) -> Path:
    """Write the router into ``folder`` (replaced atomically if it exists). An existing
    ``folder`` must be a real folder (not a link, not a file): only it is replaced."""
    target = Path(folder).expanduser().absolute()
    if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
        raise CheckpointError(f"{target} exists and is not a folder polymerge wrote (a link or "
                              "a file); remove it to save the router there")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise PolymergeError(f"cannot write the router into {target.parent} "
                             f"({exc.strerror or exc})") from None
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()},
                  str(tmp / WEIGHTS_FILE))
        meta = {"format_version": ROUTER_FORMAT_VERSION, "experts": router.experts,
                "in_features": router.in_features, "hidden": router.hidden,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        (tmp / INFO_FILE).write_text(json.dumps(meta, indent=2, default=float) + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise PolymergeError(f"cannot write the router into {target} "
                                 f"({exc.strerror or exc})") from None
        raise
    return target


def read_router_info(folder: str | Path) -> dict[str, Any]:
    """A router's ``router.json``, checked: a regular file inside the folder holding a JSON
    object whose fields have the types polymerge writes (its ``feature`` record is data only:
    the model path in it is never opened)."""
    path = Path(folder).expanduser()
    info = read_json_file(contained_file(path, INFO_FILE, "router record"), "router record")
    where = path / INFO_FILE
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    version = info.get("format_version", 0)
    if not _whole(version, 0):
        raise CheckpointError(f"{where}: format_version {version!r} is not a whole number")
    if version > ROUTER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: router format version {version} is newer than this "
                              f"polymerge reads ({ROUTER_FORMAT_VERSION}); upgrade polymerge")
    names = info.get("experts")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: 'experts' is not a list of names")
    for key in ("in_features", "hidden"):
        if not _whole(info.get(key), 1):
            raise CheckpointError(f"{where}: {key!r} is not a whole number >= 1")
    for key in ("feature", "training", "metrics"):
        if not isinstance(info.get(key, {}), dict):
            raise CheckpointError(f"{where}: {key!r} is not a JSON object")
    length = info.get("feature", {}).get("max_length")
    if length is not None and not _whole(length, 1):
        raise CheckpointError(f"{where}: feature max_length {length!r} is not a whole "
                              "number >= 1")
    return info


def load_router(folder: str | Path, *, experts: Sequence[str] | None = None) -> Router:
    """Load a saved router; with ``experts``, check it routes to exactly those, in order.
    Every file is checked first (:func:`read_router_info`; weights of the recorded shapes)."""
    path = Path(folder).expanduser()
    info = read_router_info(path)
    if experts is not None and list(experts) != list(info["experts"]):
        raise CheckpointError(f"{path}: the router routes to {info['experts']}, the store has "
                              f"{list(experts)}; retrain it with `polymerge router train`")
    weights = contained_file(path, WEIGHTS_FILE, "router weights")
    with torch.device("meta"):
        expected = Router(info["in_features"], info["experts"],
                          hidden=info["hidden"]).state_dict()
    have = read_safetensors_header(weights)
    for name, t in expected.items():
        got = have.get(name)
        if got is None or tuple(got.shape) != tuple(t.shape) or not got.dtype.is_floating_point:
            raise CheckpointError(f"{weights}: tensor {name!r} is missing or not of shape "
                                  f"{list(t.shape)}; the router was altered")
    if set(have) != set(expected):
        raise CheckpointError(f"{weights}: unexpected tensor(s) "
                              f"{sorted(set(have) - set(expected))[:3]}")
    state = load_file(str(weights))
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise CheckpointError(f"{weights}: the router's weights hold NaN or Inf")
    router = Router(info["in_features"], info["experts"], hidden=info["hidden"])
    router.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    router.info = info  # type: ignore[attr-defined]
    return router.eval()
