"""Granularity ``channel``: conv filters and linear neurons physically removed, with every
coupled layer, on torch-pruning's ``DependencyGraph`` (Fang et al., "DepGraph: Towards Any
Structural Pruning", CVPR 2023).

The graph traces one forward pass on the task's example inputs and groups the channels that
must go together: a conv's filters, the BatchNorm/LayerNorm/GroupNorm entries and biases after
it, the input slices of every consumer, across residual additions (all the layers summed share
one group), concatenations (DenseNet), grouped and depthwise convs, channel shuffles,
flatten -> linear and squeeze-excite gates. Each group is scored by the chosen criterion
(:mod:`.criteria`; a :class:`~.criteria.Group` whose ``units`` are the group's channels and
whose ``weights`` hold, per member, each channel's values as a row: the filter flattened, the
consumers' input slices, the norm scale), the lowest-scoring channels are removed, and every
resized module is recorded in the edit log (``module`` for rebuilt Conv/Linear/norm layers,
``tensor`` for bare parameters such as convnext's ``layer_scale``), so :func:`torchslim.load`
rebuilds the smaller model.

Left as they are, without being asked: the layers whose output is the model's output (the
classifier keeps its classes), embeddings (their width is the model's width), the input
channels of the first layer (the data's), and anything in ``ignore``. A group is pruned when
one of the layers whose output channels it removes is a target and none is ignored. A layer
the graph cannot handle is skipped and reported (log, ``warnings``, ``skipped`` in the row).

Scope ``layer`` removes the same fraction of every group (``floor((1 - sparsity) * n)`` of its
``n`` channels kept, Torch-Pruning's rule: at least the asked fraction goes); scope ``global`` ranks all groups'
channels together after dividing each group's scores by their mean (Torch-Pruning's default
``normalizer="mean"``), so groups of different sizes and weight scales compete fairly.
A layer never loses every channel: it keeps its best one, and a ``layer_collapse`` warning
says so. Grouped convolutions and GroupNorm lose channels in equal numbers from each group
(scores averaged across the groups, as Torch-Pruning does); ``round_to`` rounds kept counts to
a multiple (e.g. 8, for tensor-core friendly widths).
"""

from __future__ import annotations

import contextlib

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...edits import replace_module, resize_tensor
from ...errors import RecipeError, UserError, first_line
from ...modules import build_from_record, eval_mode, matches, module_rebuild_record
from ...outputs import OutputError, output_tensors, prediction
from ...specs.tasks import to_device
from .criteria import CriterionEntry, Group, check_scores
from .primitives import global_masks, round_kept, units_kept
from .schedule import finetune_round, round_ratios

from .roots import _PRUNERS, ROOT_KINDS, channel_targets, register_pruner  # noqa: F401 (public here too)

if TYPE_CHECKING:
    from .base import PruneConfig

log = logging.getLogger(__name__)

# -- one group as the criteria see it -------------------------------------------------------
def _rows(t: torch.Tensor, module: Any, out: bool, dim: int | None = None) -> torch.Tensor | None:
    """``t`` (a member's weight, or its gradient) as one row per channel: ``[channels, k]``;
    None for a member whose values per channel are not known here (a custom layer)."""
    if isinstance(module, nn.Parameter):  # a bare parameter, pruned along ``dim``
        return t.movedim(dim if dim is not None and dim >= 0 else t.dim() - 1, 0).reshape(t.shape[dim], -1)
    if isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        if module.transposed:  # weight [in, out/g, *k]
            if out:
                return t.transpose(0, 1).flatten(1) if g == 1 else None
            return t.flatten(1)
        if out or g == module.in_channels == module.out_channels:  # weight [out, in/g, *k]
            return t.flatten(1)
        opg, ipg = t.shape[0] // g, t.shape[1]
        # input channel i = gi * ipg + j reads from the outputs of its group gi: t[gi*opg:(gi+1)*opg, j]
        return t.reshape(g, opg, ipg, -1).permute(0, 2, 1, 3).reshape(g * ipg, -1)
    if isinstance(module, nn.Linear):
        return t if out else t.t()
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
        return t.reshape(-1, t.shape[-1]).t() if t.dim() > 1 else t.reshape(-1, 1)
    return None


def _take(rows: torch.Tensor, idxs: Sequence[int]) -> torch.Tensor:
    """``rows[idxs]``, without a copy when ``idxs`` is every row in order."""
    if len(idxs) == rows.shape[0] and idxs[0] == 0 and idxs[-1] == len(idxs) - 1 and list(idxs) == list(range(len(idxs))):
        return rows
    return rows[torch.as_tensor(list(idxs), dtype=torch.long)]


def _by_unit(rows: torch.Tensor, roots: list[int], units: int) -> torch.Tensor:
    """Rows of one member (``rows[i]`` belongs to unit ``roots[i]``) as ``[units, m * k]``: the
    ``m`` rows of each unit side by side (flatten -> linear: a channel owns ``m`` features),
    padded with zeros where a unit has fewer."""
    roots_t = torch.as_tensor(roots, dtype=torch.long)
    counts = torch.bincount(roots_t, minlength=units)
    m, k = int(counts.max()), rows.shape[1]
    if bool((roots_t[1:] >= roots_t[:-1]).all()) and bool((counts == m).all()):
        return rows.reshape(units, m * k)  # already in unit order: a view, no copy
    order = torch.sort(roots_t, stable=True).indices
    if bool((counts == m).all()):
        return rows[order].reshape(units, m * k)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(len(roots)) - starts[roots_t[order]]
    out = rows.new_zeros(units, m, k)
    out[roots_t[order], pos] = rows[order]
    return out.reshape(units, m * k)


@dataclass
class _Plan:
    """One dependency group and what is decided about it."""

    group: Any                    # torch-pruning's Group with full indices
    root: nn.Module
    name: str                     # the root's module name
    members: list[str]            # names of the modules whose output channels it removes
    channels: int                 # current channels of the root
    original: int                 # channels of the root before the first round
    per_group: int                # channel groups (grouped conv / GroupNorm): removed in equal numbers
    scores: torch.Tensor | None = None   # one per unit (channel of the first channel group)
    remove: list[int] = dataclasses.field(default_factory=list)   # units removed

    @property
    def units(self) -> int:
        return self.channels // self.per_group


@contextlib.contextmanager
def _guard_reshapes(tp: Any) -> Iterator[None]:
    """While torchslim prunes, make torch-pruning leave a reshape it cannot map (a channel
    shuffle's ``view`` into 5-D raises ZeroDivisionError in its index mapping) without a mapping,
    marked ``unmapped``: groups through it are skipped, not corrupted; and keep the mappings of a
    graph whose model has not changed (``frozen``). torch-pruning's functions are restored on
    exit, so its own users in the same process see it unchanged."""
    im = tp.dependency.index_mapping
    original, update_all = im.update_reshape_index_mapping, im.update_index_mapping
    if getattr(original, "_torchslim_guarded", False):   # nested: already installed
        yield
        return

    def update_unless_frozen(graph: Any) -> None:
        # every group is taken before any is pruned, and the update walks every concat each time
        if not getattr(graph, "frozen", False):
            update_all(graph)

    def guarded(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            node.unmapped = True

    guarded._torchslim_guarded = True  # type: ignore[attr-defined]
    im.update_reshape_index_mapping, im.update_index_mapping = guarded, update_unless_frozen
    try:
        yield
    finally:
        im.update_reshape_index_mapping, im.update_index_mapping = original, update_all


def _why(exc: Exception) -> str:
    if isinstance(exc, _Unmappable):
        return str(exc)
    return f"the graph cannot group its channels ({type(exc).__name__}: {first_line(exc, 120)})"


def _unmapped(node: Any, tp: Any) -> bool:
    """A reshape whose channel mapping is unknown: one that failed, or a view of other than a 2-D
    or 4-D tensor (torch-pruning maps those alone)."""
    if node.type != tp.ops.OPTYPE.RESHAPE:
        return False
    sizes = getattr(node.grad_fn, "_saved_self_sizes", None) or getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if getattr(node, "unmapped", False):
        return True
    if sizes is not None and len(sizes) == 3 and _flattens_into_linear(node, int(sizes[-1])):
        return False
    return sizes is not None and len(sizes) not in (1, 2, 4)


def _flattens_into_linear(node: Any, width: int) -> bool:
    """The view a Linear applied to a (B, L, width) input records first, (B, L, width) ->
    (B * L, width): its channels are the last dimension on both sides (a transformer's FFN)."""
    def feeds(n: Any) -> bool:
        if isinstance(n.module, nn.Linear):
            return n.module.in_features == width
        # the graph records the Linear's addmm/mm as an element-wise node before the module
        return type(n.grad_fn).__name__ in ("AddmmBackward0", "MmBackward0") and reaches(n)

    def reaches(n: Any) -> bool:
        outs = list(n.outputs)
        return bool(outs) and all(feeds(o) for o in outs)

    return reaches(node)


class _Unmappable(Exception):
    """Raised when a group's walk reaches a reshape whose channel mapping is unknown."""


def _stop(idxs: Any) -> Any:
    raise _Unmappable("its channels pass through a reshape the graph cannot map (a view that mixes channels "
                      "with another dimension, as a channel shuffle or a split into patches or heads does)")


class _Graph:
    """The dependency graph of the model as it is now, and its groups split three ways."""

    def __init__(self, model: nn.Module, inputs: tuple, config: PruneConfig, targets: set[str], ignore: set[str],
                 original: dict[str, int]) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        out_fn: dict[str, Any] = {}

        def forward(m: nn.Module, x: tuple) -> Any:
            ys = _predictions(m, m(*x))
            out_fn["grad_fn"] = {y.grad_fn for y in ys if y.grad_fn is not None}
            return ys[0] if len(ys) == 1 else ys

        with eval_mode(model), torch.enable_grad(), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=inputs, forward_fn=forward, customized_pruners=dict(_PRUNERS),
                    verbose=True)
            except Exception as exc:  # a model the tracer cannot run
                shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
                raise UserError(f"prune (granularity channel): cannot trace the model on example inputs of "
                                f"shape {shapes}: {type(exc).__name__}: {first_line(exc)}; channel pruning "
                                "needs one forward pass with gradients to find the coupled layers") from None
        caught = [str(w.message).split("\n")[0] for w in seen if "Unknown operation" in str(w.message)]
        if caught:
            log.info("channel pruning: operations the graph treats as element-wise: %s", "; ".join(caught[:5]))
        self.dg.frozen = True
        for node in list(self.dg.module2node.values()):  # walks stop at a channel shuffle
            if _unmapped(node, tp):
                for dep in [*node.dependencies, *(d for n in (*node.inputs, *node.outputs) for d in n.dependencies
                                                  if d.target is node)]:
                    dep.index_mapping[0] = dep.index_mapping[1] = _stop
        self.name_of = {m: n for n, m in model.named_modules()}
        self.output_fns = out_fn.get("grad_fn") or set()
        self.groups: list[_Plan] = []
        self.kept: list[tuple[str, str]] = []           # (module, why) left whole on purpose
        self.skipped: list[dict[str, str]] = []          # (module, reason) the graph cannot handle
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        ignored = [s for n, m in model.named_modules() if n in ignore for s in m.modules()] + embeddings
        roots = tuple(ROOT_KINDS) + tuple(_PRUNERS)
        seen_members: set[str] = set()
        for group in self._all_groups(ignored, roots):
            plan = self._plan(group, targets, original, config)
            if plan is not None:
                self.groups.append(plan)
            seen_members.update(self._out_members(group))
        traced = {self.name_of.get(m) for m in self.dg.module2node if isinstance(m, nn.Module)}
        for n in sorted(targets):
            m = model.get_submodule(n)
            if n not in traced:
                self.skipped.append({"module": n, "reason": "not reached by the traced forward pass"})
            elif self.dg.get_pruner_of_module(m) is None:
                self.skipped.append({"module": n, "reason": f"no channel pruner for {type(m).__name__}; register "
                                                            "one with torchslim.prune.register_pruner"})
            elif n not in seen_members:
                self._not_grouped(n, m, ignored)
        # a group the walk could not build is reported for the targeted layers only
        self.skipped = [s for s in self.skipped if s["module"] in targets]

    def _all_groups(self, ignored: list[nn.Module], roots: tuple[type, ...]) -> Iterator[Any]:
        """torch-pruning's ``get_all_groups`` (one group per set of coupled output channels, rooted at
        its first layer, none holding an ignored layer), where a group the graph fails to build is
        reported as skipped instead of ending the walk."""
        visited: set[int] = set()
        ignored_ids = {id(m) for m in ignored}
        for m in list(self.dg.module2node):
            if id(m) in visited or id(m) in ignored_ids or not isinstance(m, roots):
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as exc:  # an index mapping torch-pruning cannot follow
                visited.add(id(m))
                self.skipped.append({"module": self.name_of.get(m, "?"), "reason": _why(exc)})
                continue
            outs = [item.dep.target.module for item in group if self.dg.is_out_channel_pruning_fn(item.dep.handler)]
            visited.update(id(o) for o in outs)
            if not any(id(o) in ignored_ids for o in outs):
                yield group

    def _not_grouped(self, name: str, module: nn.Module, ignored: list[nn.Module]) -> None:
        """Say why ``name`` is in no group: coupled with a layer left whole, or not prunable."""
        pruner = self.dg.get_pruner_of_module(module)
        if pruner.get_out_channels(module) is None:
            self.skipped.append({"module": name, "reason": "its pruner reports no output channels"})
            return
        if any(s["module"] == name for s in self.skipped):
            return
        try:
            group = self.dg.get_pruning_group(module, pruner.prune_out_channels, [0])
        except Exception as exc:
            self.skipped.append({"module": name, "reason": _why(exc)})
            return
        held = [self.name_of.get(m, "?") for m in (item.dep.target.module for item in group)
                if isinstance(m, nn.Module) and any(m is i for i in ignored)]
        if held:
            self.kept.append((name, f"its channels are coupled with {held[0]} (ignored or an embedding)"))
        else:
            self.skipped.append({"module": name, "reason": "the graph forms no group with its output channels"})

    def _out_members(self, group: Any) -> list[str]:
        return [self.name_of[dep.target.module] for dep, _ in group
                if isinstance(dep.target.module, nn.Module) and dep.target.module in self.name_of
                and self.dg.is_out_channel_pruning_fn(dep.handler)]

    def _plan(self, group: Any, targets: set[str], original: dict[str, int], config: PruneConfig) -> _Plan | None:
        tp = self.tp
        members = self._out_members(group)
        root = group[0].dep.target.module
        name = self.name_of.get(root, "?")
        if not any(n in targets for n in members):
            return None
        for dep, _ in group:
            node = dep.target
            if node.type == tp.ops.OPTYPE.OUTPUT or (node.grad_fn in self.output_fns
                                                      and self.dg.is_out_channel_pruning_fn(dep.handler)):
                self.kept.append((name, "its channels are the model's output"))
                return None
        pruner = self.dg.get_pruner_of_module(root)
        channels = pruner.get_out_channels(root)
        per_group = 1
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, nn.Module) or self.dg.get_pruner_of_module(m) is None:
                continue
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels:
                continue  # depthwise: pruned channel by channel with its input
            p = self.dg.get_pruner_of_module(m)
            per_group = max(per_group, p.get_out_channel_groups(m) if self.dg.is_out_channel_pruning_fn(dep.handler)
                            else p.get_in_channel_groups(m))
        if channels % per_group:
            self.skipped.append({"module": name, "reason": f"{channels} channels do not split into the {per_group} "
                                                           "channel groups of a coupled layer"})
            return None
        return _Plan(group, root, name, members, channels, original.get(name, channels), per_group)

    # -- scores -------------------------------------------------------------------------
    def criterion_group(self, plan: _Plan, grads: dict[str, torch.Tensor] | None,
                        acts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> Group:
        """The :class:`Group` the criterion scores: ``units`` = the group's channels."""
        units = plan.channels
        weights, grad_rows, labels = [], [], []
        for item in plan.group:
            dep, idxs = item.dep, item.idxs
            roots = item.root_idxs
            module = dep.target.module
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            pname = self.param_name(module)
            if pname is None or roots is None or any(r is None for r in roots):
                continue
            tensor = module if isinstance(module, nn.Parameter) else module.weight
            rows = _rows(tensor.detach(), module, out, getattr(dep.target, "pruning_dim", None))
            if rows is None or max(idxs) >= rows.shape[0]:
                continue
            weights.append(_by_unit(_take(rows, idxs), list(roots), units))
            labels.append(f"{pname}[{'out' if out else 'in'}]")
            if grads is not None:
                g = grads.get(pname)
                g_rows = _rows(g, module, out, getattr(dep.target, "pruning_dim", None)) if g is not None else None
                grad_rows.append(_by_unit(_take(g_rows, idxs), list(roots), units) if g_rows is not None
                                 else torch.zeros_like(weights[-1]))
        activations = zeros = None
        if acts is not None and plan.name in acts:
            activations, zeros = acts[plan.name]
        return Group(units=units, weights=weights, grads=grad_rows if grads is not None else None,
                     activations=activations, zeros=zeros, names=labels)

    def param_name(self, module: Any) -> str | None:
        """The state_dict name of a member's weight (``layer1.0.conv1.weight``, ``stages.1.0.layer_scale``)."""
        if isinstance(module, nn.Parameter):
            return self.dg._param_to_name.get(module)
        if module in self.name_of and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{self.name_of[module]}.weight" if self.name_of[module] else "weight"
        return None


# -- deciding how many channels go ----------------------------------------------------------
def _keep_floor(plan: _Plan, max_layer_sparsity: float) -> int:
    """The fewest units ``plan`` may keep: at least one, and ``1 - max_layer_sparsity`` of its
    original units."""
    original_units = plan.original // plan.per_group
    return max(1, math.ceil((1.0 - max_layer_sparsity) * original_units - 1e-9))


def choose(plans: list[_Plan], ratio: float, config: PruneConfig, session) -> None:
    """Set ``plan.remove`` (units, lowest scores first) so that ``ratio`` of the original units
    are gone (per group for scope ``layer``, over all groups for ``global``), or as the config's
    own ``keep_masks`` rule says when its sparsity is a result (``threshold``). A group one of
    whose layers ``layer_sparsity`` names (first key matching its root or a layer whose output
    channels it removes; ``ratios: sensitivity`` fills it) loses its own fraction, scaled with
    the round's ``ratio``; the global ranking is then over the other groups only."""
    if not plans:
        return
    floors = [_keep_floor(p, config.max_layer_sparsity) for p in plans]
    collapsed: list[str] = []
    removals = [0] * len(plans)
    own = {}
    for i, p in enumerate(plans):
        key = next((k for k in config.layer_sparsity if any(matches(n, k) for n in (p.name, *p.members))), None)
        if key is not None:
            own[i] = config.layer_sparsity[key] * (ratio / config.sparsity if config.sparsity else 1.0)
    rest = [i for i in range(len(plans)) if i not in own]
    if getattr(type(config), "SPARSITY_IS_RESULT", False):  # the config's own rule (threshold) decides
        masks = config.keep_masks([p.scores for p in plans], ratio)
        removals = [min(int((~m).sum()), p.units - f) for p, m, f in zip(plans, masks, floors)]
        collapsed += [p.name for p, m in zip(plans, masks) if not bool(m.any())]
    else:
        for i in [*own, *(rest if config.scope == "layer" else [])]:
            p, original_units = plans[i], plans[i].original // plans[i].per_group
            r = min(own.get(i, ratio), 1.0)
            want = units_kept(r, original_units)
            if want < 1 and round(r * original_units) >= original_units:  # asked for all of them, not
                collapsed.append(p.name)                                  # a floor of a tiny group
            removals[i] = max(p.units - max(want, floors[i]), 0)
        if config.scope == "global" and rest:
            got, empty = _global_removals([plans[i] for i in rest], [floors[i] for i in rest], ratio, config, session)
            for i, n in zip(rest, got):
                removals[i] = n
            collapsed += empty
    for p, n in zip(plans, removals):
        if config.round_to > 1 and n:
            kept = round_kept(p.units - n, p.units, p.per_group, config.round_to)
            n = p.units - max(kept, 1)
        p.remove = torch.sort(p.scores, stable=True).indices[:max(n, 0)].tolist()
    if collapsed:
        session.warn("layer_collapse", f"channel pruning would remove every channel of {len(collapsed)} "
                                       f"layer(s) ({', '.join(collapsed[:5])}); each keeps its best channel "
                                       "(a layer never loses all of them); lower sparsity or set max_layer_sparsity")


def _global_removals(plans: list[_Plan], floors: list[int], ratio: float, config: PruneConfig,
                     session) -> tuple[list[int], list[str]]:
    """Units each plan loses under one ranking of mean-normalised scores, and the plans that
    ranking would have emptied (each kept at its floor)."""
    scores = [p.scores / p.scores.mean() if float(p.scores.mean()) > 0 else p.scores for p in plans]
    total0 = sum(p.original // p.per_group for p in plans)
    gone = total0 - sum(p.units for p in plans)              # removed by earlier rounds
    k = max(total0 - units_kept(ratio, total0) - gone, 0)
    caps = [max(p.units - f, 0) for p, f in zip(plans, floors)]
    if sum(caps) < k:
        session.warn("channel_limit", f"channel pruning: {ratio:.0%} of {total0} channel units cannot go while "
                                      f"every layer keeps at least one channel and max_layer_sparsity "
                                      f"{config.max_layer_sparsity} holds; {gone + sum(caps)} go")
        k = sum(caps)
    cur_total = sum(p.units for p in plans)
    masks = global_masks(scores, k / cur_total if cur_total else 0.0, caps=caps) if k else \
        [torch.ones(p.units, dtype=torch.bool) for p in plans]
    removals = [int((~m).sum()) for m in masks]
    empty = [p.name for p, s, r, f in zip(plans, scores, removals, floors)
             if f == 1 and r == p.units - 1 and _would_empty(s, scores, k)]
    return removals, empty


def _would_empty(s: torch.Tensor, scores: list[torch.Tensor], k: int) -> bool:
    """Whether the uncapped global ranking removing ``k`` units takes every unit of ``s``."""
    if k <= 0:
        return False
    flat = torch.cat([x.reshape(-1).float() for x in scores])
    threshold = torch.sort(flat, stable=True).values[min(k, flat.numel()) - 1]
    return bool((s.float() <= threshold).all())


# -- recording what changed ----------------------------------------------------------------
def _shapes(model: nn.Module) -> dict[str, dict[str, tuple]]:
    return {n: {k: tuple(t.shape) for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
            for n, m in model.named_modules()}


def record_changes(model: nn.Module, before: dict[str, dict[str, tuple]]) -> list[str]:
    """Record an edit for every module whose own tensors changed shape (see the module doc);
    returns their names."""
    changed = []
    for name, module in list(model.named_modules()):
        now = {k: tuple(t.shape) for k, t in [*module._parameters.items(), *module._buffers.items()]
               if t is not None}
        if name not in before or now == before[name]:
            continue
        changed.append(name)
        try:
            record = module_rebuild_record(module)
        except TypeError:
            record = None
        if record is not None and name:
            new = build_from_record(record)
            state = module.state_dict()
            if {k: tuple(v.shape) for k, v in new.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}:
                new.load_state_dict(state, assign=True)
                new.train(module.training)
                replace_module(model, name, new)
                continue
        for k, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and before[name].get(k) != tuple(t.shape):
                resize_tensor(model, f"{name}.{k}" if name else k, t.detach())
    return changed


def _predictions(model: nn.Module, out: Any) -> tuple[torch.Tensor, ...]:
    """The model's prediction, or every tensor of its output when it has several and none is
    chosen (an encoder's hidden states and pooler output): all of them are kept whole."""
    try:
        return (prediction(model, out),)
    except OutputError:
        tensors = tuple(output_tensors(out))
        if not tensors:
            raise
        return tensors


def _output_shape(model: nn.Module, inputs: tuple) -> tuple:
    with eval_mode(model), torch.no_grad():
        return tuple(tuple(y.shape) for y in _predictions(model, model(*inputs)))


# -- one round ------------------------------------------------------------------------------
def _statistics(graph: _Graph, plans: list[_Plan], entry: CriterionEntry, config: PruneConfig, session):
    grads = acts = None
    if not entry.needs:
        return grads, acts
    from . import stats  # the data criteria's collectors
    if "grads" in entry.needs:
        names = sorted({n for p in plans for item in p.group
                        if (n := graph.param_name(item.dep.target.module)) is not None})
        grads = stats.collect_grads(session, graph.model, names, config.samples)
    if "activations" in entry.needs:
        acts = stats.collect_activations(session, graph.model, sorted({p.name for p in plans}), config.samples)
    return grads, acts


def prune_round(model: nn.Module, ratio: float, config: PruneConfig, session, entry: CriterionEntry,
                inputs: tuple, targets: set[str], ignore: set[str], original: dict[str, int],
                report: dict[str, Any]) -> None:
    """Remove channels until ``ratio`` of the original ones are gone; record the edits."""
    graph = _Graph(model, inputs, config, targets, ignore, original)
    report["skipped"].update({s["module"]: s["reason"] for s in graph.skipped})
    report["kept"].update(dict(graph.kept))
    plans = graph.groups
    grads, acts = _statistics(graph, plans, entry, config, session)
    for p in plans:
        g = graph.criterion_group(p, grads, acts)
        scores = check_scores(entry.fn(g), g, entry.name).cpu()
        p.scores = scores.view(p.per_group, -1).mean(0) if p.per_group > 1 else scores
    choose(plans, ratio, config, session)
    want = _output_shape(model, inputs)
    before = _shapes(model)
    backup = _snapshot(model.modules())
    _prune_all(graph, plans, report)
    try:
        ok = _output_shape(model, inputs) == want
        problem = "the output shape changed"
    except Exception as exc:  # a layer the graph coupled wrongly
        ok, problem = False, f"{type(exc).__name__}: {first_line(exc)}"
    if not ok:  # start again from the copy, one group at a time, leaving out those that break it
        log.info("channel pruning broke the forward pass (%s); pruning group by group", problem)
        _restore(backup)
        graph = _Graph(model, inputs, config, targets, ignore, original)
        graph.dg.frozen = False  # pruned one group at a time: the mappings follow each change
        by_name = {p.name: p for p in plans}
        for p in graph.groups:
            p.remove = by_name[p.name].remove if p.name in by_name else []
            _prune_checked(graph, p, inputs, want, report)
    record_changes(model, before)


def _removal_group(graph: _Graph, plan: _Plan, report: dict[str, Any], unchanged: bool = False) -> Any:
    """torch-pruning's group removing ``plan.remove`` (in every channel group), or None. On the
    ``unchanged`` model it is read off the full group (each member's indices whose root channel
    goes), as the graph's walk would give it, without walking again."""
    if not plan.remove:
        return None
    size = plan.units
    idxs = sorted(u + g * size for g in range(plan.per_group) for u in plan.remove)
    if unchanged and all(r is not None for item in plan.group for r in item.root_idxs):
        gone = set(idxs)
        group = graph.tp.dependency.Group()
        group._DG = graph.dg
        for item in plan.group:
            mine = [i for i, r in zip(item.idxs, item.root_idxs) if r in gone]
            if mine:
                group.add_dep(item.dep, mine)
    else:
        group = graph.dg.get_pruning_group(plan.root, graph.dg.get_pruner_of_module(plan.root).prune_out_channels,
                                           idxs)
    if not graph.dg.check_pruning_group(group):
        report["skipped"][plan.name] = "torch-pruning refused the group (a coupled layer would lose every channel)"
        return None
    return group


def _prune_plan(graph: _Graph, plan: _Plan, report: dict[str, Any]) -> None:
    group = _removal_group(graph, plan, report)
    if group is not None:
        group.prune(record_history=False)


def _prune_all(graph: _Graph, plans: list[_Plan], report: dict[str, Any]) -> None:
    """Remove every plan's channels at once: the groups are all taken on the unchanged model (in
    its channel numbering) and merged, so each layer is cut once, by the union of its indices
    (a layer after a concatenation is in several groups)."""
    cuts: dict[tuple[int, Any], tuple[Any, set[int]]] = {}   # (target, pruning function) -> indices
    for p in plans:
        group = _removal_group(graph, p, report, unchanged=True)
        for dep, idxs in group or ():
            cuts.setdefault((id(dep.target), dep.handler), (dep, set()))[1].update(idxs)
    merged = graph.tp.dependency.Group()
    merged._DG = graph.dg
    for dep, idxs in cuts.values():
        merged.add_dep(dep, sorted(idxs))
    if len(merged):
        merged.prune(record_history=False)


def _snapshot(modules: Iterator[nn.Module]) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module's attributes, with its own dicts of parameters, buffers and children: enough to
    undo torch-pruning, whose pruners put new tensors in place and never change one in place."""
    out = []
    for m in modules:
        state = dict(m.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(state[key])
        out.append((m, state))
    return out


def _restore(snapshot: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, state in snapshot:
        m.__dict__.clear()
        m.__dict__.update(state)


def _prune_checked(graph: _Graph, plan: _Plan, inputs: tuple, want: tuple, report: dict[str, Any]) -> None:
    saved = _snapshot(graph.model.modules())
    _prune_plan(graph, plan, report)
    try:
        if _output_shape(graph.model, inputs) == want:
            return
        reason = "pruning it changed the model's output shape"
    except Exception as exc:
        reason = f"pruning it broke the forward pass ({type(exc).__name__}: {first_line(exc, 120)})"
    _restore(saved)
    report["skipped"][plan.name] = reason


# -- the schedule ---------------------------------------------------------------------------
def _counted(model: nn.Module, original: dict[str, int], report: dict[str, Any]) -> tuple[int, int]:
    """(kept, before): output channels of the layers the step targets, now and before; not counted:
    the ignored ones, those left whole on purpose (the classifier) and those skipped and unchanged."""
    now = _channels(model)
    names = [n for n in report["counted"] if n not in report["kept"]
             and not (n in report["skipped"] and now.get(n) == original[n])]
    return sum(now.get(n, 0) for n in names), sum(original[n] for n in names)


def _channels(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, ROOT_KINDS)}


def channel_groups(model: nn.Module, config: PruneConfig, inputs: tuple) -> list[str]:
    """The root names of the channel groups ``config`` would prune in ``model`` traced on
    ``inputs`` (coupled layers form one group, named by its first layer; output layers,
    embeddings, ``ignore`` and what the graph cannot handle left out): the units of a channel
    sensitivity analysis, each prunable alone by ``targets: [root]``."""
    import torch_pruning as tp
    targets = channel_targets(model, config)
    ignore = {n for n, _ in model.named_modules() if n and n not in targets
              and any(matches(n, p) for p in config.ignore)}
    with _guard_reshapes(tp):
        graph = _Graph(model, inputs, config, targets, ignore, _channels(model))
    return [p.name for p in graph.groups]


def prune_channels(model: nn.Module, config: PruneConfig, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``channel`` (see :func:`_prune_channels`), with torch-pruning's reshape guard
    installed for the duration."""
    import torch_pruning as tp
    with _guard_reshapes(tp):
        return _prune_channels(model, config, session, entry)


def _prune_channels(model: nn.Module, config: PruneConfig, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``channel``: remove the lowest-scoring channels of every targeted group (see
    the module doc). ``session.task`` gives the example inputs the graph is traced on.

    Schedules: ``oneshot`` (prune, then fine-tune if asked); ``iterative`` (``iterations``
    rounds, each removing the same fraction of what is left, each followed by ``finetune``);
    ``gradual`` (``updates`` rounds along the cubic ramp of Zhu & Gupta 2017 from
    ``initial_sparsity``, over the first ``ramp`` of the ``finetune`` epochs, training between
    rounds). Records ``layer_channels`` (``{module: [kept, original]}``, output channels of
    every conv/linear layer) and ``skipped`` in the step's row.

    Raises
    ------
    UserError
        without a task (nothing to trace with), or a model the tracer cannot run.
    """
    if session.task is None:
        raise RecipeError("prune (granularity channel) traces one forward pass to find the coupled layers: "
                          "give a task (e.g. task='shape:3x224x224' or a data set)")
    inputs = tuple(to_device(session.task.example_inputs(1), session.device))
    targets = channel_targets(model, config)
    ignore = {n for n, _ in model.named_modules() if n and n not in targets
              and any(matches(n, p) for p in config.ignore)}
    original = _channels(model)
    report: dict[str, Any] = {"skipped": _recurrent_skips(model, config), "kept": {},
                              "counted": [n for n in original if n in targets and n not in ignore]}
    ratios = round_ratios(config)
    trains = config.finetune is not None and config.finetune.epochs > 0
    for r, ratio in enumerate(ratios, 1):
        prune_round(model, ratio, config, session, entry, inputs, targets, ignore, original, report)
        if trains or len(ratios) > 1:  # said before the fine-tune's epochs (the summary follows them)
            log.info("%s channel pruning%s: %d of %d output channels kept", entry.name,
                     f" round {r}/{len(ratios)}" if len(ratios) > 1 else "", *_counted(model, original, report))
        finetune_round(model, config, session, r)
    if config.SPARSITY_IS_RESULT and _channels(model) == original:   # the whole step, not one round
        session.warn("nothing_removed", f"{config.CRITERION} channel pruning removed no channel: "
                                        f"{config.kept_everything()}")
    _report(model, original, report, entry, config, session)
    return model


def _recurrent_skips(model: nn.Module, config: PruneConfig) -> dict[str, str]:
    """Recurrent layers (LSTM/GRU/RNN) the step's patterns pick: their hidden units are not
    removed, so they are reported as skipped, with the reason."""
    return {n: f"a {type(m).__name__}: channel pruning removes the outputs of Conv and Linear layers, not the "
               "hidden units of recurrent layers; left unchanged"
            for n, m in model.named_modules()
            if n and isinstance(m, nn.RNNBase) and not any(matches(n, p) for p in config.ignore)
            and any(matches(n, p) for p in config.targets)}


def _report(model: nn.Module, original: dict[str, int], report: dict[str, Any], entry: CriterionEntry,
            config: PruneConfig, session) -> None:
    now = _channels(model)
    layer_channels = {n: [now[n], c] for n, c in original.items() if n in now}
    total, total0 = _counted(model, original, report)
    asked = (f"alpha {config.alpha:g}" if config.SPARSITY_IS_RESULT and hasattr(config, "alpha")
             else f"{100 * config.sparsity:.0f}%")
    if config.layer_sparsity:   # a plan (ratios: sensitivity / netadapt) or the user's own per-layer sparsities
        asked = f"{len(config.layer_sparsity)} per-layer sparsities" + (f", {asked} elsewhere" if config.sparsity else "")
    log.info("%s channel pruning (%s, %s): %d of %d output channels kept; %s", entry.name, config.scope,
             asked, total, total0,
             ", ".join(f"{n} {k}/{c}" for n, (k, c) in layer_channels.items() if k != c) or "nothing removed")
    if report["kept"]:
        log.info("channel pruning left whole: %s", "; ".join(f"{n} ({why})" for n, why in report["kept"].items()))
    skipped = [{"module": n, "reason": why} for n, why in report["skipped"].items()]
    by_reason: dict[str, list[str]] = {}
    for s in skipped:                           # one warning per reason: 21 shuffled branches read as one
        by_reason.setdefault(s["reason"], []).append(s["module"])
    for why, names in by_reason.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        session.warn("channel_skipped", f"channel pruning skipped {', '.join(names[:5])}{more}: {why}")
    metrics = session.info.setdefault("metrics", {})
    metrics["layer_channels"] = layer_channels
    metrics["skipped"] = skipped


__all__: Sequence[str] = ("channel_groups", "prune_channels", "register_pruner")
