"""Granularities ``head`` and ``layer``: attention heads and whole layers physically removed.

**Heads** (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; Voita et al. 2019).
An *attention site* is a module whose heads can be removed:

- Hugging Face BERT-style self-attention (``BertSelfAttention`` and relatives: ``query``,
  ``key``, ``value`` Linear children, ``num_attention_heads``, ``attention_head_size``; the
  output projection is the sibling ``output.dense``): q/k/v lose the removed heads' output rows
  and ``output.dense`` their input columns (rebuilt ``nn.Linear``), and the module's own
  ``num_attention_heads`` / ``all_head_size`` follow, per layer (the shared config keeps the
  original count: layers may differ);
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
``downsample`` (never the first, downsampling block). A layer's score is the criterion over its
weight tensors as one unit, divided by their number of elements (``magnitude``: the mean |w|);
the lowest-scoring ``round(sparsity * candidates)`` go, over all stacks (``global``) or in each
(``layer``); each stack keeps at least one layer. ``targets`` / ``ignore`` name candidate
layers (``encoder.layer.3``, ``re:layer[34]\\..*``): to drop exactly the layers named, give
them as targets with ``sparsity: 0.99``.

**Criteria.** Any criterion reading the weights (``magnitude``, ``random``), ``taylor`` (its
``grads``: the loss gradients over ``samples`` calibration examples, one pass for all heads or
layers) and ``threshold`` (a unit goes below ``alpha`` times the largest score of its layer, or
of all with ``scope: global``; a layer it would empty keeps its best unit). Criteria reading
activations (``activation``, ``entropy``) are refused for now.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...edits import delete_module, replace_module, set_attribute
from ...errors import RecipeError
from ...layers.attention import PrunedMultiheadAttention, PrunedShiftedWindowAttention, head_rows
from ...modules import check_patterns, matches, get_submodule, weight_names
from .criteria import CriterionEntry, Group, check_scores
from .primitives import capped_lowest
from .stats import collect_grads

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


def head_group(model: nn.Module, site: HeadSite, grads: dict[str, torch.Tensor] | None = None) -> Group:
    """One unit per head: its q/k/v rows (heads, head_dim * in) and its output-projection
    columns (heads, out * head_dim); ``grads`` (parameter name -> loss gradient) fills
    ``Group.grads`` alike."""
    qkv, out = _site_params(model, site)
    weights = _per_head([model.get_parameter(n) for n in qkv], model.get_parameter(out), site.heads)
    g = None if grads is None else _per_head([grads[n] for n in qkv], grads[out], site.heads)
    names = [f"{site.name}.{p}" for p in ("q", "k", "v", "out")]
    return Group(units=site.heads, weights=weights, grads=g, names=names)


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


def _choose(scores: list[torch.Tensor], config, caps: list[int], what: str,
            unit: str) -> tuple[list[torch.Tensor], bool]:
    """Keep-masks, and whether keeping one per group (or ``caps``) changed the choice.

    A ranking removes ``round(sparsity * n)`` (per group, or over all at once within ``caps``);
    a rule whose sparsity is its result (``threshold``) gives the masks, and a group it would
    empty keeps its best unit."""
    if getattr(config, "SPARSITY_IS_RESULT", False):
        masks = [m.clone() for m in config.keep_masks(scores, config.sparsity)]
        emptied = [m for m in masks if not m.any()]
        for s, m in zip(scores, masks):
            if not m.any():
                m[int(torch.argmax(s))] = True
        return masks, bool(emptied)
    if config.scope == "layer":
        return [capped_lowest([s], min(int(round(config.sparsity * s.numel())), c), [c])[0]
                for s, c in zip(scores, caps)], False
    total = sum(s.numel() for s in scores)
    k = int(round(config.sparsity * total))
    if k > sum(caps):
        raise RecipeError(f"prune: sparsity {config.sparsity} removes {k} of {total} {unit}s, but each {what} "
                          f"keeps at least one (and max_layer_sparsity bounds the rest): at most {sum(caps)} can "
                          "go; lower sparsity")
    masks = capped_lowest(scores, k, caps)
    free = capped_lowest(scores, k, [s.numel() for s in scores])
    return masks, any(not torch.equal(a, b) for a, b in zip(masks, free))


def _check_feasible(sizes: list[int], caps: list[int], config, what: str, unit: str) -> None:
    if config.scope == "global" and not getattr(config, "SPARSITY_IS_RESULT", False):
        _choose([torch.zeros(n) for n in sizes], config, caps, what, unit)


def check_heads(model: nn.Module, config) -> None:
    """Preflight for granularity ``head``: attention modules among the targets, and a
    ``sparsity`` that leaves a head in each (RecipeError naming what was searched)."""
    sites = attention_sites(model, config.targets, config.ignore)
    _check_feasible([s.heads for s in sites], _caps([s.heads for s in sites], config.max_layer_sparsity), config,
                    "attention layer", "head")


def check_layers(model: nn.Module, config) -> None:
    """Preflight for granularity ``layer``: droppable layers among the targets, and a
    ``sparsity`` that leaves a layer in each stack."""
    stacks = layer_stacks(model, config.targets, config.ignore)
    _check_feasible([len(s.droppable) for s in stacks], _stack_caps(stacks, config.max_layer_sparsity), config,
                    "stack of layers", "layer")


def _scores_of(entry: CriterionEntry, group: Group) -> torch.Tensor:
    return check_scores(entry.fn(group), group, entry.name)


def _check_entry(entry: CriterionEntry, granularity: str) -> None:
    if granularity not in entry.granularities:
        raise RecipeError(f"prune.{entry.name}: granularity {granularity!r} is not available with this "
                          f"criterion; it scores {', '.join(entry.granularities)}")
    if "activations" in entry.needs:
        raise RecipeError(f"prune.{entry.name}: granularity {granularity!r} with a criterion that reads "
                          "activations: not available yet; use magnitude, taylor or random")


def _finetune(model: nn.Module, config, session) -> None:
    if config.finetune is not None and config.finetune.epochs > 0:
        session.train(model, config.finetune, desc="prune-finetune")


def prune_heads(model: nn.Module, config, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``head``: remove the lowest-scoring attention heads (see the module doc)."""
    _check_entry(entry, "head")
    check_patterns(model, (*config.targets, *config.ignore), "prune.targets")
    sites = attention_sites(model, config.targets, config.ignore)
    grads = None
    if "grads" in entry.needs:  # one pass over the calibration examples for every site
        names = [n for s in sites for qkv, out in [_site_params(model, s)] for n in (*qkv, out)]
        grads = collect_grads(session, model, names, config.samples)
    scores = [_scores_of(entry, head_group(model, s, grads)) for s in sites]
    if config.scope == "global":  # comparable across layers: each site's scores over their mean
        scores = [s / s.mean() if s.mean() > 0 else s for s in scores]
    caps = _caps([s.heads for s in sites], config.max_layer_sparsity)
    masks, capped = _choose(scores, config, caps, "attention layer", "head")
    kept = {}
    for site, keep in zip(sites, masks):
        idx = [int(i) for i in torch.nonzero(keep).flatten()]
        if len(idx) < site.heads:
            remove_heads(model, site, idx)
        kept[site.name] = len(idx)
    if capped:
        session.warn("heads_kept", f"{entry.name} head pruning: the global ranking would have removed every head "
                                   "(or more than max_layer_sparsity) of some layers; each keeps at least one and "
                                   "the next lowest heads elsewhere went instead")
    total, left = sum(s.heads for s in sites), sum(kept.values())
    log.info("%s head pruning: %d of %d heads removed (%s): %s", entry.name, total - left, total, config.scope,
             ", ".join(f"{n} {k}" for n, k in kept.items()))
    session.info.setdefault("metrics", {})["heads_kept"] = kept
    _finetune(model, config, session)
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
        stack = _stack(model, name, m, kinds) if name else None
        if stack is None:
            continue
        for c in stack.candidates:
            full = f"{name}.{c}"
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


def layer_score(entry: CriterionEntry, model: nn.Module, name: str,
                grads: dict[str, torch.Tensor] | None = None) -> float:
    """The criterion over layer ``name``'s weight tensors as one unit, per element of them."""
    params = _layer_params(model, name)
    if not params:
        return 0.0
    ws = [model.get_parameter(n).detach().reshape(1, -1) for n in params]
    g = None if grads is None else [grads[n].reshape(1, -1) for n in params]
    group = Group(units=1, weights=ws, grads=g, names=[name])
    return float(_scores_of(entry, group)[0]) / sum(w.numel() for w in ws)


def drop_layers(model: nn.Module, config, session, entry: CriterionEntry) -> nn.Module:
    """Granularity ``layer``: drop the lowest-scoring residual layers (see the module doc)."""
    _check_entry(entry, "layer")
    check_patterns(model, (*config.targets, *config.ignore), "prune.targets")
    stacks = layer_stacks(model, config.targets, config.ignore)
    grads = None
    if "grads" in entry.needs:
        grads = collect_grads(session, model, [p for s in stacks for n in s.droppable for p in _layer_params(model, n)],
                              config.samples)
    scores = [torch.tensor([layer_score(entry, model, n, grads) for n in s.droppable]) for s in stacks]
    caps = _stack_caps(stacks, config.max_layer_sparsity)
    masks, capped = _choose(scores, config, caps, "stack of layers", "layer")
    dropped = []
    for stack, keep in zip(stacks, masks):
        gone = [n for n, k in zip(stack.droppable, keep.tolist()) if not k]
        for full in sorted(gone, key=lambda n: stack.children.index(n.rpartition(".")[2]), reverse=True):
            delete_module(model, full)   # last first: the names of the others stay valid
        if gone and stack.count_attr is not None:
            set_attribute(model, stack.count_attr[0], stack.count_attr[1], len(stack.children) - len(gone))
        dropped += gone
    if capped:
        session.warn("layers_kept", f"{entry.name} layer pruning: the global ranking would have emptied a stack of "
                                    "layers; each keeps at least one and the next lowest layers went instead")
    candidates = sum(len(s.droppable) for s in stacks)
    log.info("%s layer pruning: dropped %d of %d candidate layers: %s", entry.name, len(dropped), candidates,
             ", ".join(dropped) or "none")
    if not config.SPARSITY_IS_RESULT and candidates and abs(len(dropped) / candidates - config.sparsity) > 1e-9:
        session.warn("layer_count", f"{entry.name} layer pruning: sparsity {config.sparsity:g} of {candidates} "
                                    f"candidate layers is {config.sparsity * candidates:g} layers; whole layers go, "
                                    f"so {len(dropped)} were dropped ({len(dropped) / candidates:.0%})")
    session.info.setdefault("metrics", {})["layers_dropped"] = dropped
    _finetune(model, config, session)
    return model
