"""Which layer feeds which: the traced graph (``torch.fx.symbolic_trace``) that folding reads.

Folding a BatchNorm into a convolution, or two Linears into one, is exact only when the second
module reads the first's output and nothing else does; module order or names cannot say that
(a residual block's ``bn2`` follows ``conv2`` but the sum comes after). The traced graph can.
"""

from __future__ import annotations

from collections import Counter

import torch.fx
from torch import nn

from ...errors import UserError, first_line


class TraceError(UserError):
    """The model does not trace with torch.fx."""


def trace(model: nn.Module, what: str) -> torch.fx.Graph:
    """The model's forward as an fx graph (leaf modules are torch.nn's own: Conv, Linear,
    BatchNorm, ... appear as ``call_module`` nodes named by their qualified names).

    Raises
    ------
    TraceError
        the forward has data-dependent control flow or other code torch.fx cannot trace.
    """
    try:
        return torch.fx.Tracer().trace(model)
    except Exception as exc:  # the tracer raises many kinds (TraceError, TypeError, ...)
        raise TraceError(f"{what}: the model does not trace with torch.fx ({type(exc).__name__}: "
                         f"{first_line(exc)[:200]}); folding reads the traced graph to know which layer "
                         "feeds which, so this model cannot be folded") from None


def direct_pairs(graph: torch.fx.Graph, model: nn.Module, first: tuple[type, ...],
                 second: tuple[type, ...]) -> list[tuple[str, str]]:
    """``(a, b)`` module-name pairs where module ``b`` (an instance of ``second``) takes the output
    of module ``a`` (an instance of ``first``) as its only input, no other node reads ``a``'s
    output, and each of the two modules is called once in the forward. In graph order."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        if not isinstance(model.get_submodule(node.target), first) or len(node.users) != 1:
            continue
        (user,) = node.users
        if (user.op == "call_module" and calls[user.target] == 1 and list(user.args) == [node] and not user.kwargs
                and isinstance(model.get_submodule(user.target), second)):
            pairs.append((str(node.target), str(user.target)))
    return pairs


def chains(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Maximal chains ``[a, b, c, ...]`` joined from ``pairs`` (a -> b, b -> c), in order."""
    nxt = dict(pairs)
    heads = [a for a, _ in pairs if a not in {b for _, b in pairs}]
    out = []
    for a in heads:
        chain = [a]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        out.append(chain)
    return out
