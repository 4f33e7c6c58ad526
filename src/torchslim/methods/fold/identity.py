"""``fold: {method: identity}``: Dropout layers and Identity placeholders removed for inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ...config import option
from ...edits import delete_module, replace_module
from ...modules import check_patterns, matches
from ...registry import register_method
from .base import FoldConfig, OutputCheck

log = logging.getLogger(__name__)

DROPOUT = (nn.modules.dropout._DropoutNd,)          # Dropout, Dropout1d/2d/3d, AlphaDropout, ...


@dataclass(frozen=True)
class IdentityFoldConfig(FoldConfig):
    """Remove layers that do nothing at inference: every Dropout (an identity in eval mode) is
    replaced by ``nn.Identity``, then every ``nn.Identity`` that is a numbered entry of an
    ``nn.Sequential`` (e.g. left by ``fold: {method: batchnorm}``) is deleted, which renumbers
    the entries after it (``features.2`` becomes ``features.1``): name modules of later steps
    as they are after this one. An Identity held by name (``model.fc = Identity()``) stays,
    since the forward calls it. Outputs in eval mode are unchanged exactly; training after
    this step trains without dropout. Needs no tracing.

    Examples
    --------
    >>> import torch, torchslim
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.Linear(4, 2))
    >>> len(torchslim.apply(m, IdentityFoldConfig()))
    2
    """

    CHANGES_NAMES = True

    remove: tuple[str, ...] = option(("dropout", "identity"), choices=("dropout", "identity"),
                                     doc="dropout: Dropout -> Identity; identity: Identity entries of a "
                                         "Sequential deleted")


def _chosen(model: nn.Module, config: IdentityFoldConfig, kinds: tuple[type, ...]) -> list[str]:
    check_patterns(model, (*config.targets, *config.ignore), "fold.targets")
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds)
            and any(matches(n, p) for p in config.targets) and not any(matches(n, p) for p in config.ignore)]


@register_method("fold.identity", IdentityFoldConfig)
def _fold_identity(model: nn.Module, config: IdentityFoldConfig, session) -> nn.Module:
    """Remove Dropout and Identity layers (inference-only model)."""
    check = OutputCheck(model, session)
    removed = []
    if "dropout" in config.remove:
        for name in _chosen(model, config, DROPOUT):
            replace_module(model, name, nn.Identity())
            removed.append(name)
    if "identity" in config.remove:
        entries = [n for n in _chosen(model, config, (nn.Identity,))
                   if n.rpartition(".")[2].isdigit()
                   and isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Sequential)]
        # deepest first, and the last entries of a Sequential first, so that the numbers of those
        # still to delete do not move
        for name in sorted(entries, key=lambda n: (-n.count("."), n.rpartition(".")[0], -int(n.rpartition(".")[2]))):
            delete_module(model, name)
            removed.append(name)
    if not removed:
        session.warn("nothing_folded", "fold.identity: no targeted Dropout or Sequential Identity entry; "
                                       "the model is unchanged")
    session.info.setdefault("metrics", {})["folded"] = sorted(set(removed))
    check.record(model)
    return model
