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


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without what C++ libraries append (``Exception
    raised from ...`` frames), cut to ``limit`` characters.

    Examples
    --------
    >>> first_line(RuntimeError("bad shape Exception raised from f at a.cpp:1\\nframe #0"))
    'bad shape'
    """
    text = (str(exc).strip().splitlines() or [""])[0].split(" Exception raised from ")[0]
    return text[:limit]


class Problems:
    """Collects the UserErrors of independent checks so that all are reported at once.

    Examples
    --------
    >>> p = Problems()
    >>> with p.check():
    ...     raise RecipeError("train.lr: must be > 0")
    >>> with p.check():
    ...     raise RecipeError("steps.0.prune.sparsity: must be < 1")
    >>> p.raise_all()
    Traceback (most recent call last):
    ...
    torchslim.errors.RecipeError: train.lr: must be > 0
    steps.0.prune.sparsity: must be < 1
    """

    def __init__(self) -> None:
        self.errors: list[UserError] = []

    def check(self) -> "_Catch":
        """A context manager that records a UserError raised inside it and goes on."""
        return _Catch(self)

    def __bool__(self) -> bool:
        return bool(self.errors)

    def raise_all(self, locate=lambda message: message) -> None:
        """Raise nothing when no check failed; the one error as it was; else a RecipeError (the
        first error's class when all share it) whose message has one line per problem, each
        passed through ``locate``; a line two checks found (the same teacher checked by two
        hooks) is given once."""
        if not self.errors:
            return
        lines = list(dict.fromkeys(locate(line) for exc in self.errors for line in str(exc).splitlines()
                                   if line.strip()))
        kinds = {type(e) for e in self.errors}
        cls = kinds.pop() if len(kinds) == 1 else RecipeError
        raise cls("\n".join(lines))


class _Catch:
    def __init__(self, owner: Problems) -> None:
        self.owner = owner

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        if exc is not None and isinstance(exc, UserError):
            self.owner.errors.append(exc)
            return True
        return False
