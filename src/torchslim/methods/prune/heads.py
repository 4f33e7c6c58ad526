"""Granularities ``head`` and ``layer``: attention heads and whole layers physically removed.

**Heads** (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Voita et al. 2019).
An *attention site* is a module whose heads can be removed:

- Hugging Face BERT-style self-attention (``BertSelfAttention`` and relatives: ``query``,
  ``key``, ``value`` Linear children, ``num_attention_heads``, ``attention_head_size``; the
  output projection is the sibling ``output.dense``): q/k/v lose the removed heads' output rows
  and ``output.dense`` their input columns (rebuilt ``nn.Linear``), and the module's own
  ``num_attention_heads`` / ``all_head_size`` follow, per layer (the shared config keeps the
  original count: layers may differ). Such a model reloads with :func:`torchslim.load`;
  ``save_pretrained`` + ``from_pretrained`` cannot rebuild it (transformers 5 dropped
  ``config.pruned_heads``, so every layer is built with the config's head count);
- ``nn.MultiheadAttention`` (torchvision ViT, ``nn.TransformerEncoderLayer``; without
  ``bias_k``/``add_zero_attn``): replaced by a
  :class:`~torchslim.layers.attention.PrunedMultiheadAttention`;
- torchvision Swin ``ShiftedWindowAttention`` (v1): replaced by a
  :class:`~torchslim.layers.attention.PrunedShiftedWindowAttention` (the relative position
  bias table keeps the kept heads' columns).

Each site is one :class:`~.criteria.Group` with ``units`` = its heads; a head's row holds its
q, k and v output rows and its columns of the output projection (biases and the Swin bias
table are not scored). ``scope: layer`` removes ``round(sparsity * heads)`` in every site;
``scope: global`` ranks all heads together after dividing each site's scores by their mean
(a head of average importance in its layer scores 1, so a layer with larger weights does not
keep all its heads), removing ``round(sparsity * total heads)``. Every site keeps at least one
head (and at most ``max_layer_sparsity`` of a site goes); a warning says when that changed
the global choice. ``targets`` / ``ignore`` name sites (``encoder.layer.0.attention.self``,
``encoder.layers.encoder_layer_0.self_attention``, ``features.1.0.attn``) or patterns.

**Layers** (Fan et al. 2020, LayerDrop; Sajjad et al. 2023, "On the effect of dropping layers
of pre-trained transformer models"). A *stack* is a list of residual layers whose input and
output shapes match: a Hugging Face ``encoder.layer`` ModuleList (``config.num_hidden_layers``
follows), an ``nn.TransformerEncoder``'s ``layers`` (``num_layers`` follows), a torchvision ViT
``encoder.layers``, a Swin stage's blocks, and a torchvision ResNet stage's blocks without
``downsample`` (never the first, downsampling block), also where they sit in one flat
``nn.Sequential`` with the stem and the head (``zoo:resnet-fmnist``). A layer's score is the criterion over its
weight tensors as one unit, divided by their number of elements (``magnitude``: the mean |w|);
the lowest-scoring ``round(sparsity * candidates)`` go, over all stacks (``global``) or in each
(``layer``); each stack keeps at least one layer. ``targets`` / ``ignore`` name candidate
layers (``encoder.layer.3``, ``re:layer[34]\\..*``): to drop exactly the layers named, give
them as targets with ``sparsity: 0.99``.

**Criteria.** Any criterion reading the weights (``magnitude``, ``random``), ``taylor`` (its
``grads``: the loss gradients over ``samples`` calibration examples, one pass for all heads or
layers) and ``threshold`` (a unit goes below ``alpha`` times the largest score of its layer, or
of all with ``scope: global``; a layer it would empty keeps its best unit). Criteria reading
activations, on ``samples`` calibration examples in eval mode:

- a head's output is its ``head_dim`` slice of the attention output before the output
  projection (the projection's input, split into heads; :func:`head_activations`):
  ``activation`` ranks by its mean |value| (``statistic: mean``; Molchanov et al. 2017's mean
  activation, on |x| since attention outputs are signed) or by ``1 - APoZ`` (``apoz``: the
  fraction of entries <= 0; with no ReLU after attention it stays near 0.5, a weak signal);
  ``entropy`` bins each example's mean |value| of the head (Luo & Wu 2017);
- a layer's output is its residual update ``output - input`` (what dropping it removes from the
  next layer's input, :func:`.stats.collect_updates`): ``activation`` ranks by the mean
  |output - input| (``statistic: mean``; ``apoz`` is refused). This is the size of a residual
  branch's contribution that Veit et al. 2016 ("Residual Networks Behave Like Ensembles of
  Relatively Shallow Networks") relate to the damage of deleting a block, and the quantity
  whose direction ShortGPT's Block Influence (Men et al. 2024, eq. 2: ``1 - cos(input,
  output)``) measures. ``entropy`` is refused for layers: a histogram over the layer's own range
  ignores the size of the update.

**Schedules** (:mod:`.schedule`): ``oneshot`` (then ``finetune``), ``iterative``
(``iterations`` rounds, each removing the same fraction of what is left, fine-tuned after each)
and ``gradual`` (``updates`` rounds along Zhu & Gupta's cubic ramp over the ``finetune``
epochs). Each round scores the model as fine-tuning left it and removes heads (layers) until
``round(r * n)`` of the original ``n`` are gone, ``r`` the round's cumulative fraction
(``threshold``, whose sparsity is its result, applies its rule again at each round).

**Per-site sparsity** (``layer_sparsity: {site name or re: pattern: sparsity}``, granularity
``head``): a site matched by a key (the first that matches its name) loses its own fraction of
its heads, following the schedule to it; the others share ``sparsity`` as ``scope`` says (with
``global``, one ranking over them alone).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...edits import delete_module, replace_module, set_attribute
from ...errors import RecipeError
from ...layers.attention import PrunedMultiheadAttention, PrunedShiftedWindowAttention, head_rows
from ...modules import check_patterns, matches, get_submodule, weight_names
from .criteria import CriterionEntry, Group, check_scores
from .primitives import capped_lowest
from .schedule import finetune_round, round_ratios
from .stats import collect_grads, collect_input_slices, collect_updates

log = logging.getLogger(__name__)

HEAD_KINDS = ("Hugging Face self-attention (query/key/value Linear + output.dense)",
              "nn.MultiheadAttention (without bias_k/add_zero_attn)", "torchvision Swin ShiftedWindowAttention")
LAYER_KINDS = ("Hugging Face encoder.layer lists", "nn.TransformerEncoder layers", "torchvision ViT encoder blocks",
               "Swin stage blocks", "ResNet blocks without downsample")


# -- attention sites ------------------------------------------------------------------------
@dataclass
class HeadSite:
    """An attention module whose heads can be removed."""

    name: str
    kind: str                 # "hf" | "mha" | "swin"
    heads: int
    head_dim: int


def _plain_linear(*mods: object) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _site(model: nn.Module, name: str, m: nn.Module) -> HeadSite | None:
    if isinstance(m, PrunedMultiheadAttention):
        return HeadSite(name, "mha", m.num_heads, m.head_dim)
    if type(m) is nn.MultiheadAttention:  # not a quantized subclass: its weights are codes
        plain = m.bias_k is None and not m.add_zero_attn and isinstance(m.out_proj, nn.Linear)
        return HeadSite(name, "mha", m.num_heads, m.head_dim) if plain else None
    from torchvision.models.swin_transformer import ShiftedWindowAttention  # v1 only: v2 scales per head
    if type(m) in (ShiftedWindowAttention, PrunedShiftedWindowAttention) and _plain_linear(m.qkv, m.proj):
        return HeadSite(name, "swin", m.num_heads, getattr(m, "head_dim", m.qkv.in_features // m.num_heads))
    if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads", "attention_head_size")):
        parent = get_submodule(model, name.rpartition(".")[0])
        out = getattr(getattr(parent, "output", None), "dense", None)
        if _plain_linear(m.query, m.key, m.value, out):
            return HeadSite(name, "hf", int(m.num_attention_heads), int(m.attention_head_size))
    return None


def attention_sites(model: nn.Module, targets: tuple[str, ...] = ("re:.*",),
                    ignore: tuple[str, ...] = ()) -> list[HeadSite]:
    """The attention modules of ``model`` whose heads can be removed, chosen by ``targets``/``ignore``.

    Raises RecipeError naming what was searched when there is none, and for a module named in
    ``targets`` that is not one.
    """
    sites = []
    for name, m in model.named_modules():
        if not name or any(matches(name, p) for p in ignore) or not any(matches(name, p) for p in targets):
            continue
        site = _site(model, name, m)
        if site is not None:
            sites.append(site)
        elif name in targets:
            raise RecipeError(f"prune.targets: module {name!r} is a {type(m).__name__}, not an attention module "
                              f"granularity head can prune ({'; '.join(HEAD_KINDS)}); name those modules instead")
    if not sites:
        raise RecipeError(f"prune granularity head: no attention module found in {type(model).__name__} "
                          f"(targets={list(targets)}, ignore={list(ignore)}); searched for {'; '.join(HEAD_KINDS)}")
    return sites


def _site_params(model: nn.Module, site: HeadSite) -> tuple[list[str], str]:
    """Parameter names of the q/k/v weights (one packed name: ``in_proj_weight``, Swin's
    ``qkv.weight``) and of the output projection weight."""
    m, n = get_submodule(model, site.name), site.name
    if site.kind == "hf":
        return [f"{n}.query.weight", f"{n}.key.weight", f"{n}.value.weight"], \
            f"{n.rpartition('.')[0]}.output.dense.weight"
    if site.kind == "swin":
        return [f"{n}.qkv.weight"], f"{n}.proj.weight"
    if isinstance(m, PrunedMultiheadAttention):
        return [f"{n}.q_proj.weight", f"{n}.k_proj.weight", f"{n}.v_proj.weight"], f"{n}.out_proj.weight"
    packed = m._qkv_same_embed_dim
    return ([f"{n}.in_proj_weight"] if packed else [f"{n}.{p}_proj_weight" for p in "qkv"]), f"{n}.out_proj.weight"


def _per_head(qkv: list[torch.Tensor], out: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """q, k, v (heads * head_dim, in) -> (heads, head_dim * in) rows each; out (E, heads * head_dim)
    -> (heads, E * head_dim): its columns of each head."""
    qkv = [part for w in qkv for part in (w.chunk(3) if len(qkv) == 1 else (w,))]
    rows = [w.detach().reshape(heads, -1) for w in qkv]
    cols = out.detach().reshape(out.shape[0], heads, -1).transpose(0, 1).reshape(heads, -1)
    return [*rows, cols]


def head_group(model: nn.Module, site: HeadSite, grads: dict[str, torch.Tensor] | None = None,
               acts: tuple[torch.Tensor, torch.Tensor] | None = None) -> Group:
    """One unit per head: its q/k/v rows (heads, head_dim * in) and its output-projection
    columns (heads, out * head_dim); ``grads`` (parameter name -> loss gradient) fills
    ``Group.grads`` alike; ``acts`` (from :func:`head_activations`) ``Group.activations`` and
    ``Group.zeros``."""
    qkv, out = _site_params(model, site)
    weights = _per_head([model.get_parameter(n) for n in qkv], model.get_parameter(out), site.heads)
    g = None if grads is None else _per_head([grads[n] for n in qkv], grads[out], site.heads)
    names = [f"{site.name}.{p}" for p in ("q", "k", "v", "out")]
    activations, zeros = acts if acts is not None else (None, None)
    return Group(units=site.heads, weights=weights, grads=g, activations=activations, zeros=zeros, names=names)


@contextlib.contextmanager
def _probed(model: nn.Module, sites: list[HeadSite]) -> Iterator[dict[str, str]]:
    """Site name -> name of the Linear whose input is the site's attention output before the
    output projection, ``(B, ..., heads * head_dim)``. ``nn.MultiheadAttention`` and torchvision's
    Swin attention apply their projection as a bare weight, so for the block each is swapped for
    its :mod:`~torchslim.layers.attention` equivalent with every head kept (the same computation,
    its projection a module call); the originals are put back on exit (a measurement, not an edit)."""
    swapped, probes = [], {}
    try:
        for s in sites:
            m = get_submodule(model, s.name)
            if s.kind == "hf":
                probes[s.name] = f"{s.name.rpartition('.')[0]}.output.dense"
                continue
            if not isinstance(m, (PrunedMultiheadAttention, PrunedShiftedWindowAttention)):
                cls = PrunedMultiheadAttention if s.kind == "mha" else PrunedShiftedWindowAttention
                parent_name, _, child = s.name.rpartition(".")
                parent = get_submodule(model, parent_name)
                parent._modules[child] = cls.from_attention(m, list(range(s.heads)))
                swapped.append((parent, child, m))
            probes[s.name] = f"{s.name}.{'out_proj' if s.kind == 'mha' else 'proj'}"
        yield probes
    finally:
        for parent, child, m in reversed(swapped):
            parent._modules[child] = m


def head_activations(session, model: nn.Module, sites: list[HeadSite],
                     samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each head's share of its site's attention output on ``samples`` calibration examples.

    A head's unit is its ``head_dim`` slice of the attention output before the output
    projection (softmax(q k^T / sqrt(d)) v of that head, per token), read by a hook on the
    projection's input (:func:`.stats.collect_input_slices`). Returns ``site name -> (acts,
    zeros)``: ``acts`` ``[N, heads]``, each example's mean |value| over its tokens and the head's
    features (what ``activation`` averages and ``entropy`` bins); ``zeros`` ``[heads]``, the
    fraction of entries ``<= 0`` (``statistic: apoz``). Padding tokens count like the others."""
    with _probed(model, sites) as probes:
        got = collect_input_slices(session, model, {probes[s.name]: s.heads for s in sites}, samples)
    return {s.name: got[probes[s.name]] for s in sites}


def _sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if rows is None else lin.bias[rows])
    return new.train(lin.training)


def remove_heads(model: nn.Module, site: HeadSite, keep: list[int]) -> None:
    """Keep heads ``keep`` (sorted indices) of ``site``; every change through the edit log."""
    m = get_submodule(model, site.name)
    if site.kind == "mha":
        replace_module(model, site.name, PrunedMultiheadAttention.from_attention(m, keep))
    elif site.kind == "swin":
        replace_module(model, site.name, PrunedShiftedWindowAttention.from_attention(m, keep))
    else:
        rows = head_rows(keep, site.head_dim)
        for proj in ("query", "key", "value"):
            replace_module(model, f"{site.name}.{proj}", _sliced_linear(getattr(m, proj), rows=rows))
        out_name = f"{site.name.rpartition('.')[0]}.output.dense"
        replace_module(model, out_name, _sliced_linear(get_submodule(model, out_name), cols=rows))
        set_attribute(model, site.name, "num_attention_heads", len(keep))
        set_attribute(model, site.name, "all_head_size", len(keep) * site.head_dim)


# -- how many go where ----------------------------------------------------------------------
def _caps(sizes: list[int], max_layer_sparsity: float) -> list[int]:
    """Most units each group may lose: at most ``max_layer_sparsity`` of them, at least one kept."""
    return [min(int(max_layer_sparsity * n + 1e-9), n - 1) for n in sizes]


def _choose(scores: list[torch.Tensor], config, ratio: float, originals: list[int], caps: list[int],
            own: list[float | None], what: str, unit: str) -> tuple[list[torch.Tensor], bool]:
    """Keep-masks of one round, and whether keeping one per group (or ``caps``) changed the choice.

    ``scores``: one tensor per group over the units it has left; ``originals``: its units before
    the first round; ``caps``: the most it may lose in all; ``own``: its own cumulative fraction
    (``layer_sparsity``) or None. After the round ``round(ratio * n)`` of the ``n`` original
    units are gone: in each group (scope ``layer``, or at its own fraction), or over all the other
    groups at once (scope ``global``, within ``caps``). A rule whose sparsity is its result
    (``threshold``) gives the masks itself, and a group it would empty keeps its best unit."""
    if getattr(config, "SPARSITY_IS_RESULT", False):
        masks = [m.clone() for m in config.keep_masks(scores, ratio)]
        emptied = [m for m in masks if not m.any()]
        for s, m in zip(scores, masks):
            if not m.any():
                m[int(torch.argmax(s))] = True
        return masks, bool(emptied)
    gone = [n - s.numel() for n, s in zip(originals, scores)]       # removed by earlier rounds
    left = [max(c - g, 0) for c, g in zip(caps, gone)]               # what each may still lose
    masks: list[torch.Tensor | None] = [None] * len(scores)
    for i, r in enumerate(own):
        if r is not None or config.scope == "layer":
            k = min(max(int(round((ratio if r is None else r) * originals[i])) - gone[i], 0), left[i])
            masks[i] = capped_lowest([scores[i]], k, [k])[0]
    rest = [i for i, m in enumerate(masks) if m is None]
    if not rest:
        return masks, False
    total = sum(originals[i] for i in rest)
    k = int(round(ratio * total))
    if k > sum(caps[i] for i in rest):
        raise RecipeError(f"prune: sparsity {ratio:g} removes {k} of {total} {unit}s, but each {what} keeps at "
                          f"least one (and max_layer_sparsity bounds the rest): at most {sum(caps[i] for i in rest)} "
                          "can go; lower sparsity")
    k = max(k - sum(gone[i] for i in rest), 0)
    sub = [scores[i] for i in rest]
    got = capped_lowest(sub, k, [left[i] for i in rest])
    free = capped_lowest(sub, k, [s.numel() for s in sub])
    for i, m in zip(rest, got):
        masks[i] = m
    return masks, any(not torch.equal(a, b) for a, b in zip(got, free))


def _check_feasible(sizes: list[int], caps: list[int], own: list[float | None], config, what: str,
                    unit: str) -> None:
    if config.scope == "global" and not getattr(config, "SPARSITY_IS_RESULT", False):
        _choose([torch.zeros(n) for n in sizes], config, config.sparsity, sizes, caps, own, what, unit)


def site_sparsity(config, sites: list[HeadSite]) -> list[float | None]:
    """Each site's own sparsity from ``layer_sparsity`` (the first key matching its name, exactly or
    as a ``re:`` pattern), None for the others; RecipeError for a key matching no site."""
    keys, used, own = list(config.layer_sparsity), set(), []
    for s in sites:
        key = next((k for k in keys if matches(s.name, k)), None)
        own.append(None if key is None else config.layer_sparsity[key])
        used.add(key)
    unused = [k for k in keys if k not in used]
    if unused:
        names = [s.name for s in sites]
        raise RecipeError(f"prune.layer_sparsity: {', '.join(map(repr, unused))} matches none of the attention "
                          f"modules pruned (outside targets, in ignore, or matched by an earlier key); they are: "
                          f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    return own


def check_heads(model: nn.Module, config) -> None:
    """Preflight for granularity ``head``: attention modules among the targets, and a
    ``sparsity`` that leaves a head in each (RecipeError naming what was searched)."""
    sites = attention_sites(model, config.targets, config.ignore)
    sizes = [s.heads for s in sites]
    _check_feasible(sizes, _caps(sizes, config.max_layer_sparsity), site_sparsity(config, sites), config,
                    "attention layer", "head")


def check_layers(model: nn.Module, config) -> None:
    """Preflight for granularity ``layer``: droppable layers among the targets, and a
    ``sparsity`` that leaves a layer in each stack."""
    _check_statistic(config)
    stacks = layer_stacks(model, config.targets, config.ignore)
    _check_feasible([len(s.droppable) for s in stacks], _stack_caps(stacks, config.max_layer_sparsity),
                    [None] * len(stacks), config, "stack of layers", "layer")


def _scores_of(entry: CriterionEntry, group: Group) -> torch.Tensor:
    return check_scores(entry.fn(group), group, entry.name)


def _check_entry(entry: CriterionEntry, granularity: str) -> None:
    if granularity not in entry.granularities:
        raise RecipeError(f"prune.{entry.name}: granularity {granularity!r} is not available with this "
                          f"criterion; it scores {', '.join(entry.granularities)}")


def _check_statistic(config) -> None:
    if config.name == "activation" and getattr(config, "statistic", None) == "apoz":
        raise RecipeError("prune.statistic: apoz counts outputs <= 0 (zero after a ReLU); a layer's residual "
                          "update (output - input) has no such zeros: granularity layer ranks by statistic: mean "
                          "(mean |output - input|)")


def _head_scores(model: nn.Module, sites: list[HeadSite], config, session,
                 entry: CriterionEntry) -> list[torch.Tensor]:
    """Each site's head scores on the model as it is now (calibration statistics taken once for
    all sites); with scope global, each site's divided by their mean."""
    grads = acts = None
    if "grads" in entry.needs:  # one pass over the calibration examples for every site
        names = [n for s in sites for qkv, out in [_site_params(model, s)] for n in (*qkv, out)]
        grads = collect_grads(session, model, names, config.samples)
    if "activations" in entry.needs:
        acts = head_activations(session, model, sites, config.samples)
    scores = [_scores_of(entry, head_group(model, s, grads, None if acts is None else acts[s.name])) for s in sites]
    if config.scope == "global":  # comparable across layers: each site's scores over their mean
        scores = [s / s.mean() if s.mean() > 0 else s for s in scores]
    return scores


def prune_heads(model: nn.Module, config, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``head``: remove the lowest-scoring attention heads (see the module doc), in
    the rounds of ``config.schedule`` (:mod:`.schedule`), scores taken again before each round."""
    _check_entry(entry, "head")
    check_patterns(model, (*config.targets, *config.ignore), "prune.targets")
    check_patterns(model, tuple(config.layer_sparsity), "prune.layer_sparsity")
    sites = attention_sites(model, config.targets, config.ignore)
    original = [s.heads for s in sites]
    caps = _caps(original, config.max_layer_sparsity)
    own = [None if s is None else round_ratios(config, s) for s in site_sparsity(config, sites)]
    capped = False
    for r, ratio in enumerate(round_ratios(config), 1):
        sites = attention_sites(model, config.targets, config.ignore)   # pruned sites keep their names
        scores = _head_scores(model, sites, config, session, entry)
        own_now = [None if o is None else o[r - 1] for o in own]
        masks, capped_now = _choose(scores, config, ratio, original, caps, own_now,
                                    "attention layer", "head")
        capped |= capped_now
        for site, keep in zip(sites, masks):
            idx = [int(i) for i in torch.nonzero(keep).flatten()]
            if len(idx) < site.heads:
                remove_heads(model, site, idx)
        finetune_round(model, config, session, r)
    if capped:
        session.warn("heads_kept", f"{entry.name} head pruning: the global ranking would have removed every head "
                                   "(or more than max_layer_sparsity) of some layers; each keeps at least one and "
                                   "the next lowest heads elsewhere went instead")
    kept = {s.name: s.heads for s in attention_sites(model, config.targets, config.ignore)}
    total, left = sum(original), sum(kept.values())
    if config.SPARSITY_IS_RESULT and left == total:   # the threshold rule kept every head
        session.warn("nothing_removed", f"{config.CRITERION} head pruning removed no head: {config.kept_everything()}")
    log.info("%s head pruning: %d of %d heads removed (%s, %s); heads kept per module: %s", entry.name,
             total - left, total, config.scope, config.schedule, ", ".join(f"{n} {k}" for n, k in kept.items()))
    session.info.setdefault("metrics", {})["heads_kept"] = kept
    return model


# -- layer stacks ---------------------------------------------------------------------------
@dataclass
class LayerStack:
    """A list of residual layers; ``candidates``: the child keys that may be dropped."""

    name: str
    children: list[str]
    candidates: list[str]
    #: (module name, dotted attribute) holding the layer count, set after dropping
    count_attr: tuple[str, str] | None = None
    droppable: list[str] = field(default_factory=list)


def _block_kinds() -> dict[str, Callable[[nn.Module], bool]]:
    from torchvision.models import resnet, swin_transformer, vision_transformer
    return {
        "vit": lambda m: isinstance(m, vision_transformer.EncoderBlock),
        "swin": lambda m: isinstance(m, (swin_transformer.SwinTransformerBlock,
                                         swin_transformer.SwinTransformerBlockV2)),
        "resnet": lambda m: isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)),
        "torch": lambda m: isinstance(m, nn.TransformerEncoderLayer),
    }


def _stack(model: nn.Module, name: str, m: nn.Module, kinds: dict) -> LayerStack | None:
    if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
        return None
    children = list(m._modules)
    blocks = list(m._modules.values())
    parent_name, _, attr = name.rpartition(".")
    parent = get_submodule(model, parent_name)
    if isinstance(m, nn.Sequential) and not all(map(kinds["resnet"], blocks)) and any(map(kinds["resnet"], blocks)):
        # a flat Sequential: stem, residual blocks, head (zoo:resnet-fmnist): the blocks that keep their shape
        droppable = [c for c, b in zip(children, blocks) if kinds["resnet"](b) and b.downsample is None]
        return LayerStack(name, children, droppable) if droppable else None
    for kind, test in kinds.items():
        if all(test(b) for b in blocks):
            if kind == "resnet":
                droppable = [c for c, b in zip(children, blocks) if b.downsample is None]
                return LayerStack(name, children, droppable) if droppable else None
            count = (parent_name, "num_layers") if kind == "torch" and hasattr(parent, "num_layers") else None
            return LayerStack(name, children, list(children), count)
    config = getattr(parent, "config", None)
    if attr == "layer" and isinstance(m, nn.ModuleList) and getattr(config, "num_hidden_layers", None) == len(m):
        return LayerStack(name, children, list(children), (parent_name, "config.num_hidden_layers"))
    return None


def layer_stacks(model: nn.Module, targets: tuple[str, ...] = ("re:.*",),
                 ignore: tuple[str, ...] = ()) -> list[LayerStack]:
    """The stacks of ``model`` with their candidate layers as ``targets``/``ignore`` choose them
    (``droppable``: full names). RecipeError naming what was searched when there is none."""
    kinds = _block_kinds()
    stacks, named = [], set()
    for name, m in model.named_modules():
        stack = _stack(model, name, m, kinds)
        if stack is None:
            continue
        for c in stack.candidates:
            full = f"{name}.{c}" if name else c
            named.add(full)
            if any(matches(full, p) for p in targets) and not any(matches(full, p) for p in ignore):
                stack.droppable.append(full)
        if stack.droppable:
            stacks.append(stack)
    bad = [t for t in targets if not t.startswith("re:") and t not in named]
    if bad:
        m = get_submodule(model, bad[0])
        raise RecipeError(f"prune.targets: module {bad[0]!r} is a {type(m).__name__}, not a layer granularity layer "
                          f"can drop ({'; '.join(LAYER_KINDS)}); name those layers instead")
    if not stacks:
        raise RecipeError(f"prune granularity layer: no droppable layer found in {type(model).__name__} "
                          f"(targets={list(targets)}, ignore={list(ignore)}); searched for {'; '.join(LAYER_KINDS)}")
    return stacks


def _stack_caps(stacks: list[LayerStack], max_layer_sparsity: float) -> list[int]:
    """Most layers each stack may lose: it keeps one, beside its candidates (a ResNet's first
    block) or among them, and loses at most ``max_layer_sparsity`` of its candidates."""
    return [min(len(s.droppable) - (len(s.droppable) == len(s.children)),
                int(max_layer_sparsity * len(s.droppable) + 1e-9)) for s in stacks]


def _layer_params(model: nn.Module, name: str) -> list[str]:
    """Parameter names of every weight tensor inside layer ``name``."""
    return [".".join(filter(None, (name, sub, w))) for sub, m in get_submodule(model, name).named_modules()
            for w in weight_names(m)]


def layer_score(entry: CriterionEntry, model: nn.Module, name: str, grads: dict[str, torch.Tensor] | None = None,
                update: torch.Tensor | None = None) -> float:
    """The criterion over layer ``name``'s weight tensors as one unit, per element of them; for a
    criterion reading activations, over ``update`` (``[N]``: each calibration example's mean
    |output - input|, :func:`.stats.collect_updates`) as the unit's output, not divided."""
    params = _layer_params(model, name)
    if not params and update is None:
        return 0.0
    ws = [model.get_parameter(n).detach().reshape(1, -1) for n in params]
    g = None if grads is None else [grads[n].reshape(1, -1) for n in params]
    group = Group(units=1, weights=ws, grads=g, activations=None if update is None else update.reshape(-1, 1),
                  names=[name])
    score = float(_scores_of(entry, group)[0])
    return score if update is not None else score / sum(w.numel() for w in ws)


def _layer_scores(model: nn.Module, live: list[list[str]], config, session,
                  entry: CriterionEntry) -> list[torch.Tensor]:
    """Scores of the candidate layers ``live`` (names, per stack) on the model as it is now."""
    names = [n for ns in live for n in ns]
    grads = updates = None
    if "grads" in entry.needs:
        grads = collect_grads(session, model, [p for n in names for p in _layer_params(model, n)], config.samples)
    if "activations" in entry.needs:
        updates = collect_updates(session, model, names, config.samples)
    return [torch.tensor([layer_score(entry, model, n, grads, None if updates is None else updates[n]) for n in ns],
                         dtype=torch.float32) for ns in live]


def drop_layers(model: nn.Module, config, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``layer``: drop the lowest-scoring residual layers (see the module doc), in the
    rounds of ``config.schedule`` (:mod:`.schedule`), scores taken again before each round.
    ``layers_dropped`` in the row names them as the model named them before the step."""
    _check_entry(entry, "layer")
    _check_statistic(config)
    check_patterns(model, (*config.targets, *config.ignore), "prune.targets")
    stacks = layer_stacks(model, config.targets, config.ignore)
    caps = _stack_caps(stacks, config.max_layer_sparsity)
    originals = [len(s.droppable) for s in stacks]
    # candidates held by object: dropping a layer renumbers the ModuleList after it
    layers = [[get_submodule(model, n) for n in s.droppable] for s in stacks]
    first_name = {id(m): n for s, ms in zip(stacks, layers) for n, m in zip(s.droppable, ms)}
    dropped: list[str] = []
    capped = False
    for r, ratio in enumerate(round_ratios(config), 1):
        now = {id(m): n for n, m in model.named_modules()}
        live = [[now[id(m)] for m in ms if id(m) in now] for ms in layers]
        scores = _layer_scores(model, live, config, session, entry)
        masks, capped_now = _choose(scores, config, ratio, originals, caps, [None] * len(stacks),
                                    "stack of layers", "layer")
        capped |= capped_now
        for stack, names, keep in zip(stacks, live, masks):
            gone = [n for n, k in zip(names, keep.tolist()) if not k]
            container = get_submodule(model, stack.name)
            order = list(container._modules)
            dropped += [first_name[id(get_submodule(model, n))] for n in gone]
            for full in sorted(gone, key=lambda n: order.index(n.rpartition(".")[2]), reverse=True):
                delete_module(model, full)   # last first: the names of the others stay valid
            if gone and stack.count_attr is not None:
                set_attribute(model, stack.count_attr[0], stack.count_attr[1], len(container))
        finetune_round(model, config, session, r)
    if capped:
        session.warn("layers_kept", f"{entry.name} layer pruning: the global ranking would have emptied a stack of "
                                    "layers; each keeps at least one and the next lowest layers went instead")
    candidates = sum(originals)
    log.info("%s layer pruning: dropped %d of %d candidate layers (%s): %s", entry.name, len(dropped), candidates,
             config.schedule, ", ".join(dropped) or "none")
    if not config.SPARSITY_IS_RESULT and candidates and abs(len(dropped) / candidates - config.sparsity) > 1e-9:
        session.warn("layer_count", f"{entry.name} layer pruning: sparsity {config.sparsity:g} of {candidates} "
                                    f"candidate layers is {config.sparsity * candidates:g} layers; whole layers go, "
                                    f"so {len(dropped)} were dropped ({len(dropped) / candidates:.0%})")
    session.info.setdefault("metrics", {})["layers_dropped"] = dropped
    return model
