"""The expert zoo: real experts built offline from packaged weights and data, and the harness
that scores merged models against them (``polymerge zoo``, ``eval``, ``report``, ``demo``)."""

from polymerge.zoo.suite import Suite
from polymerge.zoo.suites import get_suite, suite_names

__all__ = ["Suite", "get_suite", "suite_names"]
