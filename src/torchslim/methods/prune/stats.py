"""Calibration statistics for the data criteria: loss gradients (``taylor``) and per-channel
activations (``activation``, ``entropy``), from ``session.calibration_batches``.

Both run the model in eval mode (no dropout, BatchNorm running statistics untouched, so the
scores are reproducible and the model is not changed) and restore every module's own
training flag afterwards. Both read the same seeded examples (the first ``samples`` of the
training split's seeded permutation, :meth:`torchslim.session.Session.calibration_batches`),
identical on every rank of a torchrun job, so no all-reduce is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ...errors import RecipeError
from ...modules import find_module
from .primitives import apoz, channels_last


@contextlib.contextmanager
def _eval_keeping_flags(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards each module gets back its own flag (a frozen
    BatchNorm kept in eval inside a training model stays so)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _param(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise RecipeError(f"calibration statistics: the model has no parameter {name!r}") from None


def collect_grads(session, model: nn.Module, param_names: Sequence[str], samples: int) -> dict[str, torch.Tensor]:
    """The loss gradient w.r.t. each named parameter, summed over ``samples`` calibration examples.

    Parameters
    ----------
    session : Session
        Gives the task (its ``forward`` and ``loss``) and :meth:`calibration_batches`.
    model : nn.Module
        Run in eval mode; every module's training flag, every ``requires_grad`` flag and every
        ``.grad`` are as before afterwards (gradients come from ``torch.autograd.grad``).
    param_names : sequence of str
        Parameter names (``features.0.weight``); a name given twice is computed once.
    samples : int
        Calibration examples (the whole split when it has fewer).

    Returns
    -------
    dict of str to Tensor
        ``name -> d/dθ Σ_i L_i``, the sum over the examples ``i`` of the per-example task loss
        ``L_i`` (each batch's mean loss times its size), same shape, dtype and device as the
        parameter. A parameter the loss does not reach gets zeros.

    Raises
    ------
    UserError
        Without a task with data (``calibration needs a task with data``).
    """
    task = session.require_task("calibration gradients")
    batches = session.calibration_batches(samples)
    names = list(dict.fromkeys(param_names))
    params = [_param(model, n) for n in names]
    sums = [torch.zeros_like(p) for p in params]
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():      # gradients only for the parameters asked for
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with _eval_keeping_flags(model), torch.enable_grad():
            for batch in batches:
                loss = task.loss(task.forward(model, batch), batch) * len(task.targets(batch))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s += g.to(s.dtype)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return dict(zip(names, sums))


def channel_dim(module: nn.Module) -> int:
    """Where a module's output keeps its channels: dim 1 for convolutions and norms over
    channels (``[B, C, H, W]``), the last dim otherwise (Linear ``[B, T, C]``, attention)."""
    channel_first = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                     nn.modules.instancenorm._InstanceNorm)
    return 1 if isinstance(module, channel_first) else -1


def _output_tensor(module: nn.Module, out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):        # nn.MultiheadAttention: (output, weights)
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RecipeError(f"activation statistics: {type(module).__name__} returns "
                          f"{type(out).__name__}, not a tensor")
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first and out.dim() == 3:
        out = out.transpose(0, 1)             # (L, B, E) -> (B, L, E)
    return out


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATIONS) or type(m).__module__.startswith("transformers.activations")


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


@contextlib.contextmanager
def _unit_outputs(model: nn.Module, modules: dict[str, nn.Module], reduce) -> Iterator[dict[str, list]]:
    """Per call of each named module, ``reduce(name, tensor)`` of the tensor its channels become:
    the module's output or, where that output goes straight into a BatchNorm and/or an activation
    module (conv -> BN -> ReLU, linear -> GELU), the activation's output, what the next layer reads
    (a dead unit is zero there, however large its pre-activation). Matched by tensor identity and
    version: an output changed in place first (a residual ``+=``) ends the chain at the module."""
    records: dict[str, list] = {n: [] for n in modules}
    live: dict[str, list] = {}            # name -> [tensor, version, stage] while a chain may go on
    matched: dict[nn.Module, list[str]] = {}
    handles = []

    def root_hook(name: str):
        def fn(mod: nn.Module, args: tuple, out) -> None:
            records[name].append(reduce(name, out))
            if isinstance(out, torch.Tensor):
                live[name] = [out, _version(out), 0]
        return fn

    def pre(mod: nn.Module, args: tuple) -> None:
        bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        x = args[0] if args else None
        matched[mod] = [n for n, (t, ver, stage) in live.items()
                        if x is t and _version(x) == ver and (stage == 0 or not bn)]

    def post(mod: nn.Module, args: tuple, out) -> None:
        for n in matched.pop(mod, []):
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                live[n] = [out, _version(out), 1]
            else:
                records[n][-1] = reduce(n, out)
                del live[n]

    for n, m in modules.items():
        handles.append(m.register_forward_hook(root_hook(n)))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_activation(m):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activations(session, model: nn.Module, module_names: Sequence[str],
                        samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel activation statistics of the named modules' units on calibration data.

    A unit is measured where the next layer reads it: after the BatchNorm and activation module
    that directly follow the named module (conv -> BN -> ReLU, linear -> ReLU / GELU), else at the
    module's output (a functional ``F.relu`` is not seen: there APoZ is still right, the mean is
    of the pre-activation).

    Parameters
    ----------
    session : Session
        Gives the task and :meth:`calibration_batches`.
    model : nn.Module
        Run in eval mode under ``no_grad``; training flags restored.
    module_names : sequence of str
        Modules whose units are measured (``features.0``, ``classifier.1``).
    samples : int
        Calibration examples (the whole split when it has fewer).

    Returns
    -------
    dict of str to (Tensor, Tensor)
        ``name -> (acts, zeros)``: ``acts`` ``[N, C]`` float32, each example's mean of the unit's
        activation over every position of channel ``c`` (the spatial mean of a conv output,
        channels on dim 1; the mean over token dims of a linear output, channels on the last
        dim); ``zeros`` ``[C]``, the fraction of entries ``<= 0`` over all examples and positions
        (APoZ, Hu et al. 2016). On the CPU.

    Raises
    ------
    UserError
        Without a task with data, or for a module name the model lacks (the nearest names).
    RecipeError
        For a module whose output is not a tensor, or that does not run in the forward pass.
    """
    task = session.require_task("calibration activations")
    batches = session.calibration_batches(samples)
    names = list(dict.fromkeys(module_names))
    modules = {n: find_module(model, n) for n in names}   # the nearest names on a typo

    def reduce(n: str, out) -> tuple[torch.Tensor, torch.Tensor, int]:
        dim = channel_dim(modules[n])
        x = _output_tensor(modules[n], out).float()
        return channels_last(x, dim).mean(dim=1).cpu(), apoz(x, dim).cpu(), x.numel() // x.shape[dim]

    means: dict[str, list[torch.Tensor]] = {n: [] for n in names}      # per batch: [B, C]
    nonpos = dict.fromkeys(names, 0.0)      # per channel: entries <= 0 so far
    positions = dict.fromkeys(names, 0)     # entries per channel so far
    with _eval_keeping_flags(model), _unit_outputs(model, modules, reduce) as got:
        for batch in batches:
            task.forward(model, batch)
            for n in names:
                calls, got[n] = got[n], []  # reduced per batch: full feature maps are not kept
                if not calls:
                    raise RecipeError(f"activation statistics: module {n!r} did not run in the forward pass")
                # a module called several times per forward (shared): its calls averaged
                means[n].append(torch.stack([c[0] for c in calls]).mean(0))
                for _, zeros, count in calls:
                    nonpos[n] = nonpos[n] + zeros * count
                    positions[n] += count
    return {n: (torch.cat(means[n]), nonpos[n] / positions[n]) for n in names}


def _forward_passes(session, model: nn.Module, samples: int, what: str) -> Iterator[int]:
    """Run the model over the calibration examples in eval mode under ``no_grad`` (training flags
    restored), yielding each batch's number of examples after its forward pass."""
    task = session.require_task(what)
    batches = session.calibration_batches(samples)
    with _eval_keeping_flags(model), torch.no_grad():
        for batch in batches:
            task.forward(model, batch)
            yield len(task.targets(batch))


def collect_input_slices(session, model: nn.Module, parts: dict[str, int],
                         samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Statistics of equal slices of the named modules' inputs on calibration data: the heads of
    an attention output before its output projection.

    Parameters
    ----------
    session : Session
        Gives the task, :meth:`calibration_batches` and :meth:`capture`.
    model : nn.Module
        Run in eval mode under ``no_grad``; training flags restored.
    parts : dict of str to int
        Module name (an output projection: ``encoder.layer.0.attention.output.dense``) -> the number
        of equal slices ``P`` its input's last dimension splits into (heads of ``head_dim``).
        The input's first dimension holds the batch's examples outermost: ``[B, T, P * d]``, or
        ``[B * k, T, P * d]`` (Swin's ``k`` windows of each image in turn; the two sentences of
        an STS-B pair), whose ``k`` rows make one example.
    samples : int
        Calibration examples (the whole split when it has fewer).

    Returns
    -------
    dict of str to (Tensor, Tensor)
        ``name -> (acts, zeros)``: ``acts`` ``[N, P]`` float32, each example's mean |x| over every
        position and every one of the slice's ``d`` features; ``zeros`` ``[P]``, the fraction of
        the slice's entries ``<= 0`` over all examples and positions (APoZ, Hu et al. 2016). On
        the CPU. A module called several times per forward pass has its calls averaged.

    Raises
    ------
    RecipeError
        A module that did not run, or whose input does not split as ``parts`` says.
    """
    names = list(parts)
    means: dict[str, list[torch.Tensor]] = {n: [] for n in names}     # per batch: [B, P]
    nonpos = {n: torch.zeros(parts[n]) for n in names}
    counts = dict.fromkeys(names, 0)
    with session.capture(model, names, inputs=True) as got:
        for b in _forward_passes(session, model, samples, "calibration activations"):
            for n in names:
                xs = [x.float() for x in got[n]["inputs"]]
                got[n]["inputs"].clear()
                if not xs:
                    raise RecipeError(f"activation statistics: module {n!r} did not run in the forward pass")
                p = parts[n]
                if xs[0].shape[-1] % p or xs[0].numel() % (b * xs[0].shape[-1]):
                    raise RecipeError(f"activation statistics: the input of {n!r} {list(xs[0].shape)} does not "
                                      f"split into {b} examples of {p} equal slices of its last dimension")
                sliced = [x.reshape(b, -1, p, x.shape[-1] // p) for x in xs]          # [B, positions, P, d]
                means[n].append(torch.stack([s.abs().mean(dim=(1, 3)) for s in sliced]).mean(0).cpu())
                for s in sliced:
                    nonpos[n] += (s <= 0).float().sum(dim=(0, 1, 3)).cpu()
                    counts[n] += s.numel() // p
    return {n: (torch.cat(means[n]), nonpos[n] / counts[n]) for n in names}


def collect_updates(session, model: nn.Module, module_names: Sequence[str], samples: int) -> dict[str, torch.Tensor]:
    """Each example's mean |output - input| of the named residual layers on calibration data.

    A residual layer computes ``y = x + F(x)`` (a transformer layer, a ResNet block without
    downsampling); dropping it passes ``x`` on instead, so ``y - x`` is exactly what dropping it
    removes from the next layer's input.

    Parameters
    ----------
    module_names : sequence of str
        Layers whose output has the shape of their first input (``hidden_states`` positional or
        by keyword; the output may be a tuple, whose first element is taken), the batch's
        examples outermost on the first dimension (``[B, ...]``, or ``[B * k, ...]``: the two
        sentences of a pair, ``k = 2``, are one example).
    samples : int
        Calibration examples (the whole split when it has fewer).

    Returns
    -------
    dict of str to Tensor
        ``name -> [N]`` float32 on the CPU: per example, the mean over all its entries of
        ``|y - x|``. A layer called several times per forward pass has its calls averaged.

    Raises
    ------
    RecipeError
        A layer that did not run, or whose output shape differs from its input's.
    """
    names = list(dict.fromkeys(module_names))
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}      # this batch: [B] per call
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, kwargs: dict, y) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
                raise RecipeError(f"activation statistics: layer {name!r} does not return a tensor of its "
                                  "input's shape; its residual update cannot be measured")
            if isinstance(mod, nn.TransformerEncoderLayer) and not mod.self_attn.batch_first and x.dim() == 3:
                x, y = x.transpose(0, 1), y.transpose(0, 1)                     # (S, B, E) -> (B, S, E)
            seen[name].append((y.float() - x.float()).abs().reshape(x.shape[0], -1).mean(dim=1).cpu())
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        for b in _forward_passes(session, model, samples, "calibration activations"):
            for n in names:
                if not seen[n]:
                    raise RecipeError(f"activation statistics: layer {n!r} did not run in the forward pass")
                rows = seen[n][0].numel()
                if rows % b or any(r.numel() != rows for r in seen[n]):
                    raise RecipeError(f"activation statistics: layer {n!r} sees {rows} rows for {b} examples; "
                                      "only layers whose first dimension holds the examples outermost are measured")
                # rows of one example side by side (a sentence pair: 2 rows), then its calls averaged
                out[n].append(torch.stack([r.reshape(b, -1).mean(dim=1) for r in seen[n]]).mean(0))
                seen[n].clear()
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(out[n]) for n in names}
