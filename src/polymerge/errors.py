"""One exception type for every user-facing failure, so the CLI can print one clear line."""

from __future__ import annotations


class PolymergeError(Exception):
    """A problem with the user's inputs or environment, described in one line."""


class RecipeError(PolymergeError):
    """The recipe is malformed or asks for something impossible."""


class CheckpointError(PolymergeError):
    """A checkpoint is missing, unreadable, unsafe or incompatible with the others."""
