"""Task heads: what an ``XFor...`` classification expert holds beyond its backbone, and running it.

An expert fine-tuned for a task is an ordinary transformers checkpoint of a *task class*
(``BertForSequenceClassification``, ``RobertaForSequenceClassification``,
``GPT2ForSequenceClassification``, ``LlamaForSequenceClassification``, ...). Its *body* is the
backbone it shares with the base model (``bert.*``, ``roberta.*``, ``transformer.*``,
``model.*``: the class's ``base_model_prefix``); its *head* is the rest (``classifier.*``,
``score.*``, ``qa_outputs.*``, a pooler the base lacks), described by its config
(``num_labels``, ``id2label``, ``label2id``, ``problem_type``). Which tensors are the head is
decided by the plan (:mod:`polymerge.plan`) against the base, before any tensor is read.

:class:`HeadModule` runs one expert's head on its backbone's output, exactly as the expert's own
class would: the class is instantiated without weights, its backbone replaced by a stand-in
that returns the given output (applying the expert's own pooler when the pooler is part of the
head), and its remaining modules loaded from the head tensors; the class's own ``forward`` does
the rest (BERT's pooled [CLS], RoBERTa's dense + tanh, GPT-2's and Llama's last non-padding
token). So the backbone runs once per batch, whatever the number of heads.

``classifier_pooling: "mean"`` in an expert's config (the zoo's experts: heads trained on the
mean of the token vectors, the sentence-transformers way) applies the class's ``classifier`` to
the mean-pooled last hidden state instead, for classes whose own config does not define that
key. Transformers ignores the key for such classes: its own forward pools the [CLS] token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polymerge.errors import CheckpointError

TASK_CLASS = re.compile(r"For(?:SequenceClassification|TokenClassification|QuestionAnswering|"
                        r"MultipleChoice)$")
"""Architectures whose checkpoints carry a task head kept per expert."""
MEAN_POOLING = "mean"


def task_class(config: Mapping[str, Any] | None) -> str | None:
    """The config's task-head architecture (``...ForSequenceClassification``...), or None."""
    for arch in (config or {}).get("architectures") or []:
        if isinstance(arch, str) and TASK_CLASS.search(arch):
            return arch
    return None


def is_sequence_classifier(config: Mapping[str, Any] | None) -> bool:
    arch = task_class(config)
    return bool(arch and arch.endswith("ForSequenceClassification"))


def label_names(config: Mapping[str, Any] | None) -> list[str]:
    """The head's label names in index order (``id2label``; ``LABEL_i`` when absent)."""
    cfg = config or {}
    id2label = cfg.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            pairs = sorted((int(k), str(v)) for k, v in id2label.items())
        except (TypeError, ValueError):
            raise CheckpointError(f"id2label {dict(id2label)!r} has keys that are not label "
                                  "indices") from None
        if [k for k, _ in pairs] == list(range(len(pairs))):
            return [v for _, v in pairs]
        raise CheckpointError(f"id2label keys {[k for k, _ in pairs]} are not 0..n-1")
    n = cfg.get("num_labels")
    return [f"LABEL_{i}" for i in range(int(n))] if isinstance(n, int) and n > 0 else []


def head_config(config: Mapping[str, Any], labels: Sequence[str], *,
                problem_type: str | None = "single_label_classification",
                **extra: Any) -> dict[str, Any]:
    """``config`` with a sequence-classification head's label fields set."""
    out = dict(config)
    out["id2label"] = {str(i): str(name) for i, name in enumerate(labels)}
    out["label2id"] = {str(name): i for i, name in enumerate(labels)}
    out["num_labels"] = len(labels)
    if problem_type is not None:
        out["problem_type"] = problem_type
    out.update(extra)
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where ``mask`` is 1 (padding ignored)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def select_rows(output: Any, rows: torch.Tensor | Sequence[int], batch: int) -> Any:
    """The given rows of a model output (every tensor field whose first dimension is the
    batch; other fields dropped), as an output of the same type."""
    if isinstance(output, torch.Tensor):
        index = torch.as_tensor(rows, device=output.device, dtype=torch.long)
        return output.index_select(0, index)
    fields: dict[str, Any] = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            index = torch.as_tensor(rows, device=value.device, dtype=torch.long)
            fields[key] = value.index_select(0, index)
    return type(output)(**fields)


def last_hidden_state(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else output[0]


class _Backbone(torch.nn.Module):
    """Stands in for a head class's backbone: returns the output it is given, with the
    expert's own pooler applied when the pooler belongs to the head."""

    def __init__(self, pooler: torch.nn.Module | None) -> None:
        super().__init__()
        self.pooler = pooler
        self.given: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.given
        if self.pooler is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            hidden = last_hidden_state(out)
            out = BaseModelOutputWithPooling(last_hidden_state=hidden,
                                             pooler_output=self.pooler(hidden))
        elif isinstance(out, torch.Tensor):
            from transformers.modeling_outputs import BaseModelOutput

            out = BaseModelOutput(last_hidden_state=out)
        return out


def _config_object(config: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError("the head's config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the head's config ({exc})") from None


class HeadModule(torch.nn.Module):
    """One expert's head, run on its backbone's output (see the module docstring).

    ``config``: the expert's config.json; ``tensors``: its head tensors under the names its
    own class uses. ``forward(backbone_output, input_ids, attention_mask)`` returns the logits
    (rows, num_labels) of a sequence classifier, or the class's own logits otherwise.
    """

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
                 name: str = "") -> None:
        super().__init__()
        import transformers

        who = f"expert {name}" if name else "the head"
        arch = task_class(config)
        if arch is None:
            raise CheckpointError(f"{who}: config names no task class "
                                  f"(architectures {config.get('architectures')!r})")
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise CheckpointError(f"{who}: transformers has no class {arch}")
        self.name = name
        self.architecture = arch
        self.config_dict = dict(config)
        cfg = _config_object(config)
        with torch.device("meta"):
            model = cls(cfg)
        prefix = model.base_model_prefix
        backbone = getattr(model, prefix, None)
        if not prefix or not isinstance(backbone, torch.nn.Module):
            raise CheckpointError(f"{who}: {arch} has no backbone attribute to run the head on")
        inner = sorted({n[len(prefix) + 1:].split(".")[0] for n in tensors
                        if n.startswith(prefix + ".")})
        unsupported = [m for m in inner if m != "pooler"]
        if unsupported:
            raise CheckpointError(f"{who}: head tensors inside the backbone ({prefix}."
                                  f"{unsupported[0]}.*) are not supported; only a pooler is")
        pooler = getattr(backbone, "pooler", None) if inner else None
        if inner and not isinstance(pooler, torch.nn.Module):
            raise CheckpointError(f"{who}: {arch}'s backbone has no pooler for the head's "
                                  f"{prefix}.pooler tensors")
        self.stub = _Backbone(pooler)
        setattr(model, prefix, self.stub)
        model.to_empty(device="cpu")
        expected = set(model.state_dict())
        given = {k: v for k, v in tensors.items()}
        missing = sorted(expected - set(given))
        unknown = sorted(set(given) - expected)
        if missing or unknown:
            what = (f"lacks {missing[0]!r}" if missing else f"has {unknown[0]!r}, which {arch} "
                    "does not")
            raise CheckpointError(f"{who}: the head {what}")
        with torch.no_grad():
            for key, target in model.state_dict(keep_vars=True).items():
                target.copy_(given[key].to(target.dtype))
        self.model = model.eval()
        self.prefix = prefix
        self.labels = label_names(config)
        self.problem_type = config.get("problem_type")
        pooling = config.get("classifier_pooling")
        native = hasattr(type(cfg)(), "classifier_pooling")
        self.mean_pooling = pooling == MEAN_POOLING and not native
        if self.mean_pooling and not isinstance(getattr(model, "classifier", None),
                                                torch.nn.Module):
            raise CheckpointError(f"{who}: classifier_pooling 'mean' needs a 'classifier' "
                                  f"module, which {arch} lacks")
        self.sequence = arch.endswith("ForSequenceClassification")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def forward(self, backbone_output: Any, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if self.mean_pooling:
            hidden = last_hidden_state(backbone_output)
            classifier = self.model.classifier
            pooled = mean_pool(hidden.to(self._dtype), mask.to(hidden.device))
            return classifier(pooled)
        self.stub.given = backbone_output
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            self.stub.given = None
        return out.logits if hasattr(out, "logits") else out[0]

    @property
    def _dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What transformers' text-classification pipeline reports: sigmoid for multi-label
        or one-output heads, softmax otherwise."""
        logits = logits.float()
        if self.problem_type == "multi_label_classification" or logits.shape[-1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def predict(self, logits: torch.Tensor) -> tuple[list[str], list[float]]:
        """Per row, the top label's name and score (a sequence classifier's logits)."""
        probs = self.probabilities(logits)
        score, index = probs.max(dim=-1)
        names = self.labels or [f"LABEL_{i}" for i in range(logits.shape[-1])]
        return [names[int(i)] for i in index.tolist()], [float(s) for s in score.tolist()]


def checkpoint_head(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                    name: str = "") -> HeadModule:
    """The head of a standalone task checkpoint: every tensor outside its class's backbone."""
    import transformers

    arch = task_class(config)
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise CheckpointError(f"{name or 'the checkpoint'}: not a task-head checkpoint "
                              f"(architectures {config.get('architectures')!r})")
    prefix = cls.base_model_prefix + "."
    return HeadModule(config, {k: v for k, v in state.items() if not k.startswith(prefix)},
                      name=name)
