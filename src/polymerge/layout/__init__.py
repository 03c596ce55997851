"""Recipes whose output is laid out differently from their inputs: ``slices`` (layer stacking,
per-slice gradients) and merged vocabularies (``tokenizer:``, ``tokenizer_source``), planned
as :mod:`polymerge.plan` plans every other recipe and run by the same engine; and the extras
such outputs need (config with the new layer count and vocabulary size, the merged tokenizer,
the chat template).

This package sits beside :mod:`polymerge.engine` (it imports the plan, the engine does not
import it); the registry chooses between it and :func:`polymerge.plan.build_plan`.
"""

from __future__ import annotations

from pathlib import Path

from polymerge.io.chat_template import resolve_chat_template, write_chat_template
from polymerge.io.hf_files import write_config
from polymerge.layout.planner import (
    LayoutPlan,
    aligns_vocabulary,
    build_layout_plan,
    needs_layout,
)
from polymerge.layout.vocab import Vocabulary, save_tokenizer, tokenizer_folder
from polymerge.plan import MergePlan
from polymerge.recipe import warn_recipe


def write_layout_extras(plan: MergePlan, folder: Path) -> None:
    """After the usual side files: the layout's config and merged tokenizer, and the recipe's
    ``chat_template`` (for every kind of output)."""
    recipe = plan.recipe
    folders = [f for f in (tokenizer_folder(p) for p in recipe.referenced_models())
               if f is not None] if recipe.chat_template == "auto" else []
    template = resolve_chat_template(recipe.chat_template, folders)
    if isinstance(plan, LayoutPlan):
        if plan.out_config is not None:
            write_config(folder, plan.out_config, plan.out_dtype)
        if plan.vocabulary is not None:
            save_tokenizer(plan.vocabulary, folder, template)
            return
    if template and not write_chat_template(folder, template):
        warn_recipe("chat_template: the output has no tokenizer config to hold it, so it was "
                    "not saved (mergekit does the same)")


__all__ = ["LayoutPlan", "Vocabulary", "aligns_vocabulary", "build_layout_plan",
           "needs_layout", "write_layout_extras"]
