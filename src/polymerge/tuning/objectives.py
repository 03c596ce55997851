"""Task objectives: what the merged model is asked to do while its coefficients are learned.

The training loop knows nothing about suites or architectures. An objective owns the model
(loaded once from the base; its own weights are never changed), turns examples into model
inputs once, and maps a batch to per-task logits and targets through ``forward``, which runs
the model with the merged weights (``torch.func.functional_call``). The method's criterion,
cross-entropy (SuperMerge) or prediction entropy (AdaMerging), is applied on top.

Two objectives: classification experts (``XForSequenceClassification`` checkpoints, the cls
suite's among them), whose bodies are merged while each task's own frozen head
(:class:`polymerge.io.heads.HeadModule`) classifies the merged backbone's output, and causal LMs
(next-token prediction of each domain's text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from polymerge.errors import CheckpointError
from polymerge.io.heads import HeadModule, is_sequence_classifier, select_rows
from polymerge.io.pretrained import check_folder_files, load_pretrained, quiet_loading
from polymerge.plan import HeadSpec
from polymerge.tuning.data import DataError, Example, TaskSpec
from polymerge.tuning.params import Criterion

Forward = Callable[..., Any]
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Item:
    """A tokenized example."""

    ids: tuple[int, ...]
    task: str
    label: int | None


@dataclass
class TaskOutput:
    """One task's rows of a batch: logits ``[n, classes]`` and targets ``[n]`` (or None)."""

    logits: torch.Tensor
    targets: torch.Tensor | None


class Objective(Protocol):
    """What the coefficient trainer needs from a suite or an architecture."""

    model: torch.nn.Module
    specs: tuple[TaskSpec, ...]

    def prepare(self, examples: Sequence[Example]) -> list[Item]:
        """Tokenize once; raise DataError naming the example when one cannot be used."""

    def outputs(self, forward: Forward, items: Sequence[Item]) -> dict[str, TaskOutput]:
        """Per task in the batch, its logits and targets, from one pass of ``forward``."""

    def to(self, device: torch.device) -> Objective:
        """Move the model (and heads) to the compute device."""


def task_losses(outputs: dict[str, TaskOutput], criterion: Criterion
                ) -> dict[str, tuple[torch.Tensor, int]]:
    """Per task the summed loss over its rows and the number of rows (to average later)."""
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for task, o in outputs.items():
        n = o.logits.shape[0]
        if n == 0:
            continue
        logits = o.logits.float()
        if criterion == "cross_entropy":
            if o.targets is None:
                raise DataError(f"task {task!r}: cross-entropy needs labels")
            loss = F.cross_entropy(logits, o.targets, reduction="sum")
        else:
            logp = F.log_softmax(logits, dim=-1)
            loss = -(logp.exp() * logp).sum()
        out[task] = (loss, n)
    return out


def mean_over_tasks(losses: dict[str, tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Each task weighs the same, whatever its number of rows (tokens or examples)."""
    return torch.stack([s / n for s, n in losses.values()]).mean()


def pad(items: Sequence[Item], pad_id: int, device: torch.device | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    n = max(len(it.ids) for it in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids, dtype=torch.long)
        mask[i, : len(it.ids)] = 1
    return ids.to(device), mask.to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _pad_id(tokenizer: Any) -> int:
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tok_id is not None:
            return int(tok_id)
    return 0


class _Tokenized:
    """Shared tokenization for both objectives."""

    tokenizer: Any
    max_length: int
    min_tokens: int = 1

    def prepare(self, examples: Sequence[Example]) -> list[Item]:
        if not examples:
            return []
        texts = [e.text for e in examples if e.ids is None]
        encoded = iter(self.tokenizer(texts, truncation=True, max_length=self.max_length)[
            "input_ids"] if texts else [])
        items = []
        for ex in examples:
            ids = ex.ids[: self.max_length] if ex.ids is not None else next(encoded)
            if len(ids) < self.min_tokens:
                raise DataError(f"{ex.where}: the text has {len(ids)} token(s); at least "
                                f"{self.min_tokens} are needed")
            items.append(Item(tuple(int(i) for i in ids), ex.task, ex.label))
        return items


class ClassifierObjective(_Tokenized):
    """A body shared by all tasks (the base's model, run with the merged weights), each task
    classified by its expert's own frozen head on the body's backbone output."""

    def __init__(self, model: torch.nn.Module, heads: dict[str, torch.nn.Module],
                 specs: Sequence[TaskSpec], tokenizer: Any, max_length: int) -> None:
        self.model = _frozen(model)
        self.heads = {k: _frozen(h) for k, h in heads.items()}
        self.specs = tuple(specs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)

    def to(self, device: torch.device) -> ClassifierObjective:
        self.model.to(device)
        for head in self.heads.values():
            head.to(device)
        return self

    def outputs(self, forward: Forward, items: Sequence[Item]) -> dict[str, TaskOutput]:
        ids, mask = pad(items, self.pad_id, _device(self.model))
        bare = self.model.base_model is self.model
        kwargs = {} if bare else {"output_hidden_states": True}
        out = forward(input_ids=ids, attention_mask=mask, **kwargs)
        if not bare:  # a ...ForMaskedLM / ...ForCausalLM base: its backbone's last state
            from transformers.modeling_outputs import BaseModelOutput

            out = BaseModelOutput(last_hidden_state=out.hidden_states[-1])
        result: dict[str, TaskOutput] = {}
        batch = ids.shape[0]
        for task in dict.fromkeys(it.task for it in items):
            rows = [i for i, it in enumerate(items) if it.task == task]
            labels = [items[i].label for i in rows]
            targets = None if any(y is None for y in labels) else \
                torch.tensor(labels, device=ids.device)
            index = torch.tensor(rows, device=ids.device)
            logits = self.heads[task](select_rows(out, rows, batch), ids.index_select(0, index),
                                      mask.index_select(0, index))
            result[task] = TaskOutput(logits, targets)
        return result


class CausalLMObjective(_Tokenized):
    """Next-token prediction on each domain's text: rows are token positions."""

    min_tokens = 2

    def __init__(self, model: torch.nn.Module, specs: Sequence[TaskSpec], tokenizer: Any,
                 max_length: int) -> None:
        self.model = _frozen(model)
        self.specs = tuple(specs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)

    def to(self, device: torch.device) -> CausalLMObjective:
        self.model.to(device)
        return self

    def outputs(self, forward: Forward, items: Sequence[Item]) -> dict[str, TaskOutput]:
        ids, mask = pad(items, self.pad_id, _device(self.model))
        out = forward(input_ids=ids, attention_mask=mask)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        keep = mask[:, 1:].bool()
        result: dict[str, TaskOutput] = {}
        for task in dict.fromkeys(it.task for it in items):
            rows = torch.tensor([it.task == task for it in items], device=ids.device)
            sel = keep & rows.unsqueeze(1)
            result[task] = TaskOutput(logits[:, :-1][sel], ids[:, 1:][sel])
        return result


# ----------------------------------------------------------------------------- construction


def _architectures(base: Path) -> list[str]:
    cfg = base / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"base_model {base}: learned merges need an HF model folder with "
                              "config.json (the model is run while its coefficients train)")
    return list(json.loads(cfg.read_text()).get("architectures") or [])


def is_causal_lm(base: Path) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(base))


def make_objective(base: Path, experts: Sequence[tuple[str, Path]], tokenizer_dir: Path,
                   max_length: int | None, heads: Sequence[HeadSpec] = (), *,
                   allow_pickle: bool = False) -> Objective:
    """The objective the experts call for.

    Experts with sequence-classification heads (``heads``: the plan's, one per expert) give
    per-task classification by each expert's own head; a causal LM base whose experts have no
    heads gives next-token prediction. Anything else is refused with the reason.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    check_folder_files(tokenizer_dir, "tokenizer folder")  # no link out of it is read
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no tokenizer in {tokenizer_dir} ({exc}); set "
                              "tokenizer_source") from None
    if not heads and is_causal_lm(base):
        specs = [TaskSpec(name, path) for name, path in experts]
        with quiet_loading():
            model = load_pretrained(AutoModelForCausalLM, base, allow_pickle=allow_pickle,
                                    what="base model", dtype=torch.float32)
        return CausalLMObjective(model, specs, tokenizer, max_length or DEFAULT_MAX_LENGTH)
    by_name = {h.expert: h for h in heads}
    missing = [name for name, _ in experts
               if name not in by_name or not is_sequence_classifier(by_name[name].config)]
    if missing:
        raise CheckpointError(
            f"expert {missing[0]} has no sequence-classification head: learned merges need "
            "causal LM experts or ...ForSequenceClassification experts, each with its own head")
    modules: dict[str, torch.nn.Module] = {}
    specs = []
    for name, path in experts:
        spec = by_name[name]
        head = HeadModule(spec.config or {}, {n: spec.read(n) for n in spec.tensors}, name=name)
        modules[name] = head
        task = (spec.config or {}).get("finetuning_task")
        specs.append(TaskSpec(name, path, (task,) if isinstance(task, str) else (),
                              tuple(head.labels)))
    import transformers

    archs = _architectures(base)
    cls = getattr(transformers, archs[0], None) if archs else None
    with quiet_loading():  # the base's own class: its tensor names are the plan's
        model = load_pretrained(cls or AutoModel, base, allow_pickle=allow_pickle,
                                what="base model", dtype=torch.float32)
    return ClassifierObjective(model, modules, specs, tokenizer,
                               max_length or DEFAULT_MAX_LENGTH)
