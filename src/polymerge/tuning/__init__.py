"""Learned merge coefficients: SuperMerge and AdaMerging on one machinery, with hierarchical
merging. Importing this package registers both in :mod:`polymerge.registry` (kind
``learned``)."""

from __future__ import annotations

from polymerge.registry import register
from polymerge.tuning.builder import LearnedMerge
from polymerge.tuning.data import DataSource, Example, TaskSpec
from polymerge.tuning.params import ADAMERGING, METHODS, SUPERMERGE, LearnedMethod

for _method in (SUPERMERGE, ADAMERGING):
    register(LearnedMerge(_method))

__all__ = ["ADAMERGING", "METHODS", "SUPERMERGE", "DataSource", "Example", "LearnedMerge",
           "LearnedMethod", "TaskSpec"]
