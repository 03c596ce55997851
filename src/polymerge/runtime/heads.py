"""Task heads at run time: the routed expert's label and score for every row.

A runtime whose experts have task heads (a store built from ``...ForSequenceClassification``
experts, or a plain checkpoint of such a class) runs its working model as the *backbone* only
(the body: switched, mixed or plain) and then each row's head on the backbone's output
(:class:`polymerge.io.heads.HeadModule`: the expert's own class, so BERT pools [CLS], GPT-2 and
Llama take the last non-padding token, the zoo's experts mean-pool):

* every row gets the head of its routed expert (top-1: the largest weight): its logits become
  the row's ``outputs``, and its top label (by the head's ``id2label``) and score (what
  transformers' text-classification pipeline reports: softmax, or sigmoid for multi-label and
  one-output heads) the row's ``labels`` and ``scores``;
* with soft weights (a mixing store routing with the router's weights), the body is the
  mixture and every expert whose weight is above zero also answers with its own head on its
  own label space, reported per expert (``RunOutput.expert_answers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from polymerge.errors import PolymergeError
from polymerge.io.heads import HeadModule, checkpoint_head, select_rows, task_class


@dataclass
class Answers:
    """Per row of a batch: the routed expert's head logits, label and score; per expert
    answers where the row mixes several experts."""

    logits: list[torch.Tensor]
    labels: list[str | None]
    scores: list[float | None]
    per_expert: list[dict[str, dict[str, Any]]]


class Heads:
    """The task heads of a runtime's experts (by expert name)."""

    def __init__(self, modules: Mapping[str, HeadModule]) -> None:
        self.modules = dict(modules)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {len(m.labels)} labels" for k, m in self.modules.items())
        return f"<Heads {shown}>"

    @classmethod
    def from_store(cls, store: Any, device: str | torch.device = "cpu") -> Heads:
        """The heads recorded in a store (format version 2)."""
        modules = {}
        for expert, head in store.heads.items():
            tensors = {n: store.pieces[p.name] for n, p in head.tensors.items()}
            modules[expert] = HeadModule(head.config, tensors, name=expert).to(device).eval()
        return cls(modules)

    @classmethod
    def split_model(cls, model: torch.nn.Module, config: Mapping[str, Any], name: str
                    ) -> tuple[torch.nn.Module, Heads]:
        """A loaded task-class model as its backbone and its one head (named ``name``)."""
        state = model.state_dict()
        head = checkpoint_head(config, state, name=name)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        backbone = getattr(model, model.base_model_prefix)  # type: ignore[arg-type]
        return backbone, cls({name: head.to(device).eval()})

    def labels(self, expert: str) -> list[str]:
        return list(self.modules[expert].labels)

    @torch.inference_mode()
    def answer(self, output: Any, inputs: Mapping[str, torch.Tensor], weights: torch.Tensor,
               experts: Sequence[str]) -> Answers:
        """Each row's answer from the backbone ``output`` of the batch ``inputs`` run with
        ``weights`` (rows, N) over ``experts``."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        batch = ids.shape[0]
        w = weights.detach().float().cpu()
        top = w.argmax(-1).tolist() if batch else []
        soft = bool(((w > 0).sum(-1) > 1).any()) if batch else False
        logits: list[torch.Tensor | None] = [None] * batch
        labels: list[str | None] = [None] * batch
        scores: list[float | None] = [None] * batch
        per: list[dict[str, dict[str, Any]]] = [{} for _ in range(batch)]
        for e, name in enumerate(experts):
            rows = [r for r in range(batch) if top[r] == e or (soft and w[r, e] > 0)]
            if not rows:
                continue
            head = self.modules.get(name)
            if head is None:
                raise PolymergeError(f"expert {name!r} has no task head to answer with")
            index = torch.tensor(rows, device=ids.device)
            out = head(select_rows(output, rows, batch), ids.index_select(0, index),
                       mask.index_select(0, index)).float()
            names, values = head.predict(out) if head.sequence and out.dim() == 2 else \
                ([None] * len(rows), [None] * len(rows))
            for k, r in enumerate(rows):
                if top[r] == e:
                    logits[r] = out[k].cpu()
                    labels[r], scores[r] = names[k], values[k]
                if soft and w[r, e] > 0:
                    per[r][name] = {"label": names[k], "score": values[k],
                                    "weight": round(float(w[r, e]), 6)}
        return Answers([t for t in logits if t is not None], labels, scores, per)


def is_task_checkpoint(config: Mapping[str, Any] | None) -> bool:
    return task_class(config) is not None
