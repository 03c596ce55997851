"""Learned merge coefficients: SuperMerge and AdaMerging on one machinery, with hierarchical
merging. Importing this package registers both as checkpoint builders of ``polymerge merge``.
"""

from __future__ import annotations

from polymerge.builders import Builder, register_builder
from polymerge.tuning.builder import dry_plan, learned_merge, make_build_fn
from polymerge.tuning.params import ADAMERGING, METHODS, SUPERMERGE, LearnedMethod

for _method in (SUPERMERGE, ADAMERGING):
    register_builder(Builder(_method.name, make_build_fn(_method), _method.description,
                             kind="checkpoint"))

__all__ = ["ADAMERGING", "METHODS", "SUPERMERGE", "LearnedMethod", "dry_plan", "learned_merge"]
