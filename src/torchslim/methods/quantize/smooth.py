"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models", ICML 2023): per input channel ``j`` of the linear layers reading one
tensor ``X``, divide ``X`` by ``s_j`` where it is produced and multiply the layers' weight
columns by ``s_j`` (:func:`.primitives.smooth_scales`). The float model computes the same
function; activation outliers move into the weights, which quantize per channel.

A smoothing *group* is a producer whose output channels can carry ``1/s`` exactly (a LayerNorm
with an affine scale and shift, or a Linear: its rows and bias) and the Linear layers that are the
only readers of that output, possibly through ops with ``f(x / s) = f(x) / s`` for ``s > 0``
(ReLU, LeakyReLU; Dropout and Identity in eval). Groups are found by module structure:

- ``nn.Sequential`` chains: ``LayerNorm|Linear [ReLU|LeakyReLU|Dropout|Identity]* Linear``;
- ``nn.TransformerEncoderLayer`` with ``norm_first=True``: ``norm2 -> linear1``, and
  ``linear1 -> linear2`` when its activation is ReLU;
- Hugging Face BERT-style layers (``attention.self.value``, ``attention.output.dense``): the
  value projection into the attention output projection (the context is a per-channel linear
  mix of the values). The LayerNorms of a BERT layer are *not* folded into the query/key/value
  or intermediate projections: BERT normalizes after the residual sum (post-LN), so those
  LayerNorms' outputs are also the residual stream, which ``1/s`` would change.

A group is left out when one of its tensors is shared with another module (tied weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import primitives as P
from .calibration import token_rows

log = logging.getLogger(__name__)

SMOOTH_NEEDS = "SmoothQuant (the ranges of the activations)"

#: modules with f(x / s) = f(x) / s for every s > 0 (Dropout and Identity: the identity in eval)
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class SmoothGroup:
    """``producer`` (a LayerNorm or Linear name) whose output only ``readers`` (Linear names) read."""

    producer: str
    readers: tuple[str, ...]


def _is_producer(m: nn.Module) -> bool:
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine and m.weight is not None and m.bias is not None
    return type(m) is nn.Linear


def _sequential_groups(prefix: str, seq: nn.Sequential) -> list[SmoothGroup]:
    found, items = [], list(seq.named_children())
    for i, (name, m) in enumerate(items):
        if not _is_producer(m):
            continue
        k = i + 1
        while k < len(items) and isinstance(items[k][1], HOMOGENEOUS):
            k += 1
        if k < len(items) and type(items[k][1]) is nn.Linear:
            found.append(SmoothGroup(prefix + name, (prefix + items[k][0],)))
    return found


def _bert_value_group(prefix: str, layer: nn.Module) -> SmoothGroup | None:
    att = getattr(layer, "attention", None)
    value = getattr(getattr(att, "self", None), "value", None)
    dense = getattr(getattr(att, "output", None), "dense", None)
    if type(value) is nn.Linear and type(dense) is nn.Linear and value.out_features == dense.in_features:
        return SmoothGroup(prefix + "attention.self.value", (prefix + "attention.output.dense",))
    return None


def smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    """Every smoothing group of ``model`` (see the module docstring), in model order, tied ones
    left out."""
    groups: list[SmoothGroup] = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Sequential):
            groups += _sequential_groups(prefix, m)
        elif isinstance(m, nn.TransformerEncoderLayer) and m.norm_first:
            groups.append(SmoothGroup(prefix + "norm2", (prefix + "linear1",)))
            if m.activation is nn.functional.relu or isinstance(m.activation, nn.ReLU):
                groups.append(SmoothGroup(prefix + "linear1", (prefix + "linear2",)))
        else:
            group = _bert_value_group(prefix, m)
            if group is not None:
                groups.append(group)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    modules = dict(model.named_modules())

    def untied(g: SmoothGroup) -> bool:
        return all(uses.get(id(p), 0) == 1 for n in (g.producer, *g.readers) for p in modules[n].parameters())

    kept = [g for g in groups if untied(g) and all(type(modules[r]) is nn.Linear for r in g.readers)]
    if len(kept) < len(groups):
        log.info("smooth: %d group(s) with tied or already quantized tensors left as they are", len(groups) - len(kept))
    return kept


@torch.no_grad()
def fold_scales(model: nn.Module, group: SmoothGroup, s: torch.Tensor) -> None:
    """Divide ``group.producer``'s output channels by ``s`` (in,) and multiply its readers' weight
    columns by ``s``: the model's function is unchanged up to float rounding."""
    modules = dict(model.named_modules())
    producer = modules[group.producer]
    s = s.to(producer.weight.device)
    if isinstance(producer, nn.LayerNorm):
        producer.weight.div_(s.to(producer.weight.dtype))
        producer.bias.div_(s.to(producer.bias.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))    # rows: (out, in) / (out, 1)
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
    for r in group.readers:
        w = modules[r].weight
        w.mul_(s.to(w.dtype).unsqueeze(0))                                 # columns: (out, in) * (1, in)


@torch.no_grad()
def smooth_model(model: nn.Module, alpha: float, session, batches: list, names: set[str] | None = None) -> int:
    """Smooth every group of ``model`` whose readers are all in ``names`` (all groups when None):
    activation maxima from ``batches`` through the float model, then :func:`fold_scales`.
    Returns the number of groups smoothed."""
    groups = [g for g in smooth_groups(model) if names is None or set(g.readers) <= names]
    if not groups:
        return 0
    task = session.require_task("smooth")
    firsts = [g.readers[0] for g in groups]
    act_max = {n: None for n in firsts}
    was_training = model.training
    model.eval()
    try:
        with session.capture(model, firsts) as got:
            for batch in batches:
                task.forward(model, batch)
                for n in firsts:      # one input per call; fold the maxima in as they come
                    for x in got[n]["inputs"]:
                        m = token_rows(task, batch, x).abs().amax(dim=0).float()
                        act_max[n] = m if act_max[n] is None else torch.maximum(act_max[n], m)
                    got[n]["inputs"].clear()
    finally:
        model.train(was_training)
    modules, done = dict(model.named_modules()), 0
    for g in groups:
        a = act_max[g.readers[0]]
        if a is None:
            log.info("smooth: %s received no calibration inputs; left as it is", g.readers[0])
            continue
        w_max = torch.stack([modules[r].weight.detach().abs().amax(dim=0).float() for r in g.readers]).amax(dim=0)
        fold_scales(model, g, P.smooth_scales(a, w_max.to(a.device), alpha))
        done += 1
    return done
