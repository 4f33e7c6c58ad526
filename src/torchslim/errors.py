"""Errors that torchslim raises on purpose.

`UserError` (and its subclasses) mean the *input* was wrong: a recipe, a spec, a data file,
a checkpoint. The CLI turns them into one ``error:`` line and exit code 2. Anything else that
escapes is an internal failure (exit code 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input: the message says what was wrong, where, and what is accepted."""


class RecipeError(UserError):
    """A recipe (YAML or Python) that does not validate."""


class SpecError(UserError):
    """A model or task spec that cannot be resolved."""


class DataError(UserError):
    """Missing or malformed data files."""


class ArtifactError(UserError):
    """A saved model or weights file that cannot be trusted or read."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choices, or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
