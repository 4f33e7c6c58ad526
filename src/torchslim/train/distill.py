"""Feature distillation plugins: hints (FitNets) and attention transfer, from named layers.

Both read intermediate outputs through forward hooks on named modules of the student and the
teacher (names as ``model.named_modules()`` gives them), add their loss to the training loss,
and compose with every other plugin (pruning masks, QAT, logit distillation) in one fine-tune.
:func:`distill_plugins` turns a :class:`~torchslim.train.config.DistillTerm` into the plugins
it asks for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import RecipeError
from ..modules import eval_mode, find_module
from .plugins import LogitDistillation, TrainingPlugin

log = logging.getLogger(__name__)


class _Tap:
    """Forward hooks keeping the latest output of each named module (with its autograd graph)."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str) -> None:
        self.modules = {n: find_module(model, n, what) for n in names}   # every name checked first
        self.what = what
        self.out: dict[str, Any] = {}
        self._handles: list[Any] = []

    def attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: self.out.__setitem__(name, out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.out = [], {}

    def take(self, name: str) -> Any:
        if name not in self.out:
            raise RecipeError(f"distill: layer {name!r} of {self.what} did not run in the forward pass; "
                              "name a module the model calls")
        return self.out[name]


def _freeze(teacher: nn.Module, device: torch.device) -> None:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(device)


def _probe(trainer: Any, student: nn.Module, teacher: nn.Module) -> None:
    """One forward pass of both models on two training examples (eval mode, no_grad, random
    state untouched), so the taps hold the layers' outputs and their shapes can be read."""
    from ..specs.tasks import _device_of, to_device

    ds = trainer.task.split("train")
    batch = to_device(trainer.task.collate([ds[i] for i in range(min(2, len(ds)))]), _device_of(student))
    with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(student):
        trainer.task.forward(student, batch)
        trainer.task.forward(teacher, batch)


def _tensor(out: Any, name: str, what: str) -> torch.Tensor:
    """A module's output as one tensor: the tensor, or the first element of a tuple/list."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RecipeError(f"distill: layer {name!r} of {what} returns {type(out).__name__}, not a tensor")
    return out


def _width(shape: torch.Size) -> int:
    """Feature width: channels of (N, C, H, W), the last axis of (N, L, C) or (N, C)."""
    return shape[1] if len(shape) == 4 else shape[-1]


def _but_width(shape: torch.Size) -> tuple[int, ...]:
    """The sizes other than the width: (N, H, W), (N, L) or (N,)."""
    axis = 1 if len(shape) == 4 else len(shape) - 1
    return tuple(d for k, d in enumerate(shape) if k != axis)


class _LayerPairs(TrainingPlugin):
    """What hints and attention transfer share: a frozen teacher, ``{student layer: teacher
    layer}`` pairs read through forward hooks, and a probe pass at setup."""

    what = "distill"

    def __init__(self, teacher: nn.Module, pairs: dict[str, str]) -> None:
        if not pairs:
            raise RecipeError(f"{self.what}: no layer pairs; give {{student layer: teacher layer}}")
        self.teacher, self.pairs = teacher, dict(pairs)
        self.task: Any = None
        self._s: _Tap | None = None
        self._t: _Tap | None = None

    def setup(self, trainer: Any) -> None:
        """Check the names, freeze the teacher, hook both models and run the probe pass."""
        from ..specs.tasks import _device_of

        self.task = trainer.task
        self._s = _Tap(trainer.model, list(self.pairs), "the student")
        self._t = _Tap(self.teacher, list(self.pairs.values()), "the teacher")
        _freeze(self.teacher, _device_of(trainer.model))
        self._s.attach()
        self._t.attach()
        _probe(trainer, trainer.model, self.teacher)

    def _outputs(self, model: nn.Module, batch: Any, outputs: Any) -> list[tuple[Any, Any]]:
        """``(student output, teacher output)`` of each pair on ``batch``; the teacher is run
        here, the student only when the trainer did not (a custom ``loss_fn``)."""
        if outputs is None:
            self.task.forward(model, batch)
        with torch.no_grad():
            self.task.forward(self.teacher, batch)
        got = [(self._s.take(s), self._t.take(t)) for s, t in self.pairs.items()]
        self._s.out, self._t.out = {}, {}
        return got

    def teardown(self) -> None:
        for tap in (self._s, self._t):
            if tap is not None:
                tap.detach()


class HintDistillation(_LayerPairs):
    """Hint (feature) distillation, FitNets (Romero et al. 2015, eq. 3), as a loss term.

    For each pair, the student layer's output ``v`` is mapped by a learned projection ``r``
    (a 1x1 convolution for ``(N, C, H, W)``, a linear layer for ``(N, L, C)`` / ``(N, C)``)
    to the teacher layer's width, and ``weight * mean((r(v) - u)^2)`` is added to the loss
    (:func:`~torchslim.methods.distill.primitives.hint_loss`, summed over pairs). The
    projections are created at setup when the widths differ (``projection="auto"``), trained
    with the student (:meth:`parameters`), checkpointed (:meth:`state_dict`, so a resumed run
    continues with them) and never added to the student: the saved model does not hold them.

    Parameters
    ----------
    teacher : nn.Module
        Frozen; run in eval mode under ``no_grad`` on each batch.
    pairs : dict of str to str
        ``{student layer name: teacher layer name}``. A layer called several times in one
        forward pass is read at its last call.
    weight : float, default=1.0
    projection : {"auto", "always", "none"}, default="auto"
        ``none``: widths must match.

    Raises
    ------
    RecipeError
        At setup: a layer name that does not exist (with the nearest names), features of
        different sizes other than the width (spatial size, sequence length, rank), or
        different widths with ``projection="none"``.
    """

    what = "hint"

    def __init__(self, teacher: nn.Module, pairs: dict[str, str], weight: float = 1.0,
                 projection: str = "auto") -> None:
        super().__init__(teacher, pairs)
        if projection not in ("auto", "always", "none"):
            raise RecipeError(f"hint: projection {projection!r}; accepted: auto, always, none")
        self.weight, self.projection = weight, projection
        self.projections = nn.ModuleDict()     # str(index of the pair) -> projection

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        for i, (s_name, t_name) in enumerate(self.pairs.items()):
            s = _tensor(self._s.take(s_name), s_name, "the student")
            t = _tensor(self._t.take(t_name), t_name, "the teacher")
            if s.dim() not in (2, 3, 4) or s.dim() != t.dim() or _but_width(s.shape) != _but_width(t.shape):
                raise RecipeError(
                    f"hint: student layer {s_name!r} gives {tuple(s.shape)} and teacher layer {t_name!r} gives "
                    f"{tuple(t.shape)}; they must agree except in width: (N, C, H, W), (N, L, C) or (N, C)")
            c_s, c_t = _width(s.shape), _width(t.shape)
            if c_s == c_t and self.projection != "always":
                continue
            if self.projection == "none":
                raise RecipeError(f"hint: student layer {s_name!r} has width {c_s}, teacher layer {t_name!r} "
                                  f"{c_t}, and projection is none; set projection: auto")
            proj = nn.Conv2d(c_s, c_t, 1) if s.dim() == 4 else nn.Linear(c_s, c_t)
            self.projections[str(i)] = proj.to(device=s.device, dtype=s.dtype)
        self._s.out, self._t.out = {}, {}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    def _project(self, i: int, s: torch.Tensor) -> torch.Tensor:
        return self.projections[str(i)](s) if str(i) in self.projections else s

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        from ..methods.distill.primitives import hint_loss  # pure tensor math

        total = loss.new_zeros(())
        for i, ((s_name, t_name), (s, t)) in enumerate(zip(self.pairs.items(), self._outputs(model, batch, outputs))):
            total = total + hint_loss(self._project(i, _tensor(s, s_name, "the student")),
                                      _tensor(t, t_name, "the teacher"))
        return loss + self.weight * total

    def state_dict(self) -> dict[str, Any] | None:
        return {"projections": {k: v.detach().clone() for k, v in self.projections.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projections.load_state_dict(state["projections"])


def _attention_probs(out: Any) -> torch.Tensor | None:
    """The attention probabilities ``(N, heads, L, L)`` in an attention module's output
    ``(context, probabilities, ...)`` (Hugging Face self-attention), or None."""
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor) \
            and out[1].dim() == 4 and out[1].shape[-1] == out[1].shape[-2]:
        return out[1]
    return None


def _wants_eager(out: Any) -> bool:
    """An attention module's output whose probabilities slot is empty (fused SDPA kernels)."""
    return isinstance(out, (tuple, list)) and len(out) > 1 and out[1] is None


def check_attention_module(module: nn.Module, name: str, what: str) -> None:
    """RecipeError for a layer attention transfer cannot read: ``nn.MultiheadAttention`` computes
    its probabilities only when called with ``need_weights=True``, which ``nn.TransformerEncoder``
    layers do not do."""
    if isinstance(module, nn.MultiheadAttention):
        raise RecipeError(f"attention: layer {name!r} of {what} is an nn.MultiheadAttention, which computes no "
                          "probabilities unless called with need_weights=True (nn.TransformerEncoder layers do "
                          "not); not supported: use distill.hint on the layer outputs (e.g. encoder.layers.0)")


class AttentionTransfer(_LayerPairs):
    """Attention transfer from named teacher layers to named student layers, as a loss term.

    Each pair is one of two kinds, read from what the named modules return:

    - a feature map ``(N, C, H, W)`` (CNNs): Zagoruyko & Komodakis (2017, eq. 2), ``beta / 2 *
      sum_j mean_n ||Q_s - Q_t||_2`` of the normalised maps ``Q = sum_c |A_c|^p``
      (:func:`~torchslim.methods.distill.primitives.at_loss`); channel counts may differ,
      spatial sizes must match;
    - an attention module returning ``(context, probabilities)`` (Hugging Face BERT-style
      self-attention, ``encoder.layer.0.attention.self``): ``beta * sum_j D(P_t, P_s)`` with
      ``D`` the KL divergence or mean squared difference of the ``(N, heads, L, L)``
      probabilities (:func:`~torchslim.methods.distill.primitives.attention_probs_loss`). Equal
      head counts are compared head by head; different head counts are averaged over heads
      first. A model computing attention with a fused kernel (SDPA, which returns no
      probabilities) is switched to the eager implementation for the training and switched
      back at teardown. The probabilities are read after attention dropout: set the student's
      ``attention_probs_dropout_prob`` to 0 for exact targets.

    Parameters
    ----------
    teacher : nn.Module
    pairs : dict of str to str
        ``{student layer name: teacher layer name}``.
    beta : float, default=1.0
        Weight of the loss. The paper's beta = 1000 goes with a distance averaged over the map's
        elements; here the distance is the norm of the normalised maps, so values about 1 work
        and 1000 makes training diverge.
    p : float, default=2.0
        Exponent of the CNN attention map.
    loss : {"kl", "mse"}, default="kl"
        Distance of attention probabilities.

    Raises
    ------
    RecipeError
        At setup: a layer name that does not exist (with the nearest names), a layer whose
        output is neither kind, or shapes that cannot be compared (named).
    """

    what = "attention"

    def __init__(self, teacher: nn.Module, pairs: dict[str, str], beta: float = 1.0, p: float = 2.0,
                 loss: str = "kl") -> None:
        super().__init__(teacher, pairs)
        if loss not in ("kl", "mse"):
            raise RecipeError(f"attention: loss {loss!r}; accepted: kl, mse")
        if p <= 0:
            raise RecipeError(f"attention: p must be > 0, got {p}")
        self.beta, self.p, self.kind = beta, p, loss
        self._maps: list[bool] = []                       # per pair: CNN map (True) or probabilities
        self._restore: list[tuple[nn.Module, str]] = []   # models switched to eager attention

    def _eager(self, model: nn.Module) -> None:
        """Switch the Hugging Face models in ``model`` to eager attention (which returns the
        probabilities), remembering what to restore."""
        for m in model.modules():
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if impl not in (None, "eager") and hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation("eager")
                self._restore.append((m, impl))

    def setup(self, trainer: Any) -> None:
        for names, model, what in ((list(self.pairs), trainer.model, "the student"),
                                   (list(self.pairs.values()), self.teacher, "the teacher")):
            for name in names:
                check_attention_module(find_module(model, name, what), name, what)
        super().setup(trainer)
        student = trainer.model
        if any(_wants_eager(self._s.take(n)) for n in self.pairs) or \
                any(_wants_eager(self._t.take(n)) for n in self.pairs.values()):
            self._eager(student)
            self._eager(self.teacher)
            _probe(trainer, student, self.teacher)
        self._maps = []
        for s_name, t_name in self.pairs.items():
            s_out, t_out = self._s.take(s_name), self._t.take(t_name)
            s_p, t_p = _attention_probs(s_out), _attention_probs(t_out)
            if s_p is not None and t_p is not None:
                if s_p.shape[0] != t_p.shape[0] or s_p.shape[2:] != t_p.shape[2:]:
                    raise RecipeError(f"attention: student layer {s_name!r} gives probabilities {tuple(s_p.shape)} "
                                      f"and teacher layer {t_name!r} {tuple(t_p.shape)}; sequence lengths must match")
                if s_p.shape[1] != t_p.shape[1]:
                    log.info("attention: student layer %s has %d heads, teacher layer %s %d: comparing "
                             "head-averaged attention",
                             s_name, s_p.shape[1], t_name, t_p.shape[1])
                self._maps.append(False)
                continue
            s, t = s_out, t_out
            if not (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.dim() == 4 and t.dim() == 4):
                def kind(o):
                    return tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
                raise RecipeError(
                    f"attention: student layer {s_name!r} returns {kind(s)} and teacher layer {t_name!r} "
                    f"{kind(t)}; attention transfer reads feature maps (N, C, H, W) or attention modules "
                    "returning (output, probabilities) such as encoder.layer.0.attention.self")
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise RecipeError(f"attention: student layer {s_name!r} gives {tuple(s.shape)} and teacher layer "
                                  f"{t_name!r} {tuple(t.shape)}; spatial sizes must match")
            self._maps.append(True)
        self._s.out, self._t.out = {}, {}

    def loss(self, model: nn.Module, batch: Any, outputs: torch.Tensor | None,
             loss: torch.Tensor) -> torch.Tensor:
        from ..methods.distill.primitives import at_loss, attention_map, attention_probs_loss

        qs, qt = [], []
        total = loss.new_zeros(())
        for is_map, (s, t) in zip(self._maps, self._outputs(model, batch, outputs)):
            if is_map:
                qs.append(attention_map(s, self.p))
                qt.append(attention_map(t, self.p))
            else:
                total = total + self.beta * attention_probs_loss(_attention_probs(s), _attention_probs(t), self.kind)
        if qs:
            total = total + at_loss(qs, qt, self.beta)
        return loss + total

    def teardown(self) -> None:
        super().teardown()
        for model, impl in self._restore:
            model.set_attn_implementation(impl)
        self._restore = []


def distill_plugins(term: Any, teacher: Callable[[Any], nn.Module],
                    cache_dir: str | os.PathLike | None = None) -> list[TrainingPlugin]:
    """The plugins a :class:`~torchslim.train.config.DistillTerm` (or a distill method's config
    with the same fields) asks for: logit distillation when ``alpha > 0`` (several weighted
    teachers, an optional cache), then hints and attention transfer from the one teacher.
    ``teacher(ref)`` builds a teacher from a role or ModelRef (:meth:`Session.teacher`)."""
    refs = term.teachers()
    models = [teacher(ref) for ref, _ in refs]
    plugins: list[TrainingPlugin] = []
    if term.alpha > 0:
        plugins.append(LogitDistillation(models, term.temperature, term.alpha, weights=[w for _, w in refs],
                                         cache=term.cache, cache_dir=cache_dir))
    hint, attention = getattr(term, "hint", None), getattr(term, "attention", None)
    if hint is not None:
        plugins.append(HintDistillation(models[0], hint.layers, hint.weight, hint.projection))
    if attention is not None:
        plugins.append(AttentionTransfer(models[0], attention.layers, attention.beta, attention.p, attention.loss))
    return plugins


def check_distill(term: Any, teachers: Sequence[nn.Module | None], student: nn.Module | None, task: Any,
                  *, shapes: bool = True) -> None:
    """Preflight of a distillation term (a :class:`~torchslim.train.config.DistillTerm`, or a
    distill method's config with the same fields) on the models known before any work, so a
    recipe fails in seconds instead of after training.

    ``teachers``: one model (or None where unknown yet) per teacher of ``term``; ``student``: the
    model to be trained, or None; ``shapes=False`` when only its module names are known (a step
    that changes layer shapes before its fine-tune). The known models are copied first, so they
    are left as they are.

    Raises
    ------
    RecipeError
        A hint or attention layer missing from a known model (with the nearest names); student
        and teacher outputs of different shapes (logit term, ``alpha > 0``); and what the hint
        and attention plugins' setup finds on one probe batch of the training split: features
        that cannot be compared, different widths with ``projection: none``, layers attention
        transfer cannot read.
    """
    import copy
    from types import SimpleNamespace

    from ..specs.tasks import _device_of, to_device

    hint, attention = getattr(term, "hint", None), getattr(term, "attention", None)
    teacher = teachers[0] if len(teachers) == 1 else None
    for layers in (t.layers for t in (hint, attention) if t is not None):
        if teacher is not None:
            for name in layers.values():
                find_module(teacher, name, "the teacher")
        if student is not None:
            for name in layers:
                find_module(student, name, "the student")
    known = [(k, t) for k, t in enumerate(teachers) if t is not None]
    if student is None or not shapes or task is None or not known:
        return
    ds = task.split("train")
    batch = to_device(task.collate([ds[i] for i in range(min(2, len(ds)))]), _device_of(student))
    if term.alpha > 0:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(student):
            s_out = task.forward(student, batch)
        for k, t in known:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), eval_mode(t):
                t_out = task.forward(t, to_device(batch, _device_of(t)))
            if tuple(t_out.shape) != tuple(s_out.shape):
                which = "the teacher" if len(teachers) == 1 else f"teacher {k + 1} (of {len(teachers)})"
                raise RecipeError(f"distill: the student outputs {tuple(s_out.shape)}, {which} outputs "
                                  f"{tuple(t_out.shape)}; logit distillation compares outputs of one shape "
                                  "(the same classes): give a matching student or teacher, or alpha: 0")
    if teacher is None or (hint is None and attention is None):
        return
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)   # setup freezes the teacher
    plugins: list[_LayerPairs] = []
    if hint is not None:
        plugins.append(HintDistillation(teacher, hint.layers, hint.weight, hint.projection))
    if attention is not None:
        plugins.append(AttentionTransfer(teacher, attention.layers, attention.beta, attention.p, attention.loss))
    trainer = SimpleNamespace(task=task, model=student)
    for plugin in plugins:
        try:
            plugin.setup(trainer)
        finally:
            plugin.teardown()
