"""Students of a distillation step: a model spec, or a smaller copy of the teacher.

``student:`` takes

- a model spec or ``{spec, weights, args}`` (a :class:`~torchslim.config.ModelRef`): a new model,
  randomly initialised unless ``weights`` are given;
- ``{from_teacher: {layers: [0, 2, 4]}}``: a copy of the teacher keeping only the listed layers
  of its stack of layers, in the teacher's order, with their trained weights (DistilBERT's
  initialisation: Sanh et al. 2019, "DistilBERT, a distilled version of BERT", section 3, take
  one layer out of two). Embeddings, the final norm and the head are the teacher's too;
- ``{from_teacher: {width: 0.5}}``: a narrower copy of the teacher, by the magnitude of the
  weights (Li et al. 2017). A teacher with a stack of transformer layers keeps ``width`` of
  each layer's feed-forward neurons (:func:`cut_ffn`; attention and the hidden width, hence
  the embeddings' width, stay); any other model (a CNN) keeps ``width`` of the channels of
  every coupled group (conv filters, linear neurons; ``prune.magnitude`` at ``granularity:
  channel``, ``scope: layer``, :mod:`~torchslim.methods.prune.structured`; the output layer and
  embeddings stay). ``layers`` and ``width`` together: the layers are kept first.

Stacks of layers ``from_teacher.layers`` can keep (:data:`FROM_TEACHER_STACKS`): a Hugging Face
encoder's ``encoder.layer`` (``config.num_hidden_layers`` follows), an ``nn.TransformerEncoder``'s
``layers`` (``num_layers`` follows) and a torchvision ViT's ``encoder.layers``. The teacher must
have exactly one of them. Every change goes through :mod:`torchslim.edits` (``delete`` and
``setattr`` records), so the student saved as an artifact reloads without the teacher.

Examples
--------
>>> student_ref({"from_teacher": {"layers": [0, 2, 4]}}, "student").layers
(0, 2, 4)
>>> student_ref("zoo:digits-cnn", "student").spec
'zoo:digits-cnn'
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import MethodConfig, ModelRef, as_mapping, option
from ...errors import RecipeError, UserError, first_line
from ...modules import get_submodule

log = logging.getLogger(__name__)

FROM_TEACHER_STACKS = ("Hugging Face encoder.layer", "nn.TransformerEncoder layers", "torchvision ViT encoder.layers")


@dataclass(frozen=True)
class FromTeacher(MethodConfig):
    """A student made from a copy of the teacher: ``{from_teacher: {layers: [...], width: ...}}``.

    Examples
    --------
    >>> FromTeacher(layers=(4, 0, 2)).layers
    (0, 2, 4)
    """

    layers: tuple[int, ...] | None = option(None, low=0, doc="indices of the teacher's layers to keep "
                                            "(its stack of layers, from 0), e.g. [0, 2, 4]")
    width: float | None = option(None, low=0.0, high=1.0, low_open=True, high_open=True,
                                 doc="fraction of each layer's channels kept, by weight magnitude")

    def validate(self) -> None:
        where = type(self).__name__   # re-anchored at the recipe's location by from_dict
        if self.layers is None and self.width is None:
            raise RecipeError(f"{where}.layers: missing; give layers (e.g. [0, 2, 4]) or width (e.g. 0.5)")
        if self.layers is not None:
            if not self.layers:
                raise RecipeError(f"{where}.layers: empty; keep at least one layer, e.g. [0, 2, 4]")
            dup = sorted({i for i in self.layers if self.layers.count(i) > 1})
            if dup:
                raise RecipeError(f"{where}.layers: layer {dup[0]} is listed twice; each layer is kept once")
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    def to_dict(self) -> dict[str, Any]:
        """``{"from_teacher": {...}}``, the form a recipe writes (null fields left out)."""
        return {"from_teacher": {k: v for k, v in super().to_dict().items() if v is not None}}


def student_ref(value: Any, where: str) -> ModelRef | FromTeacher | None:
    """The ``student:`` of a distillation step as given: None, a spec string or ``{spec, weights,
    args}`` (a ModelRef), or ``{from_teacher: {layers: [...], width: ...}}``.

    Raises
    ------
    RecipeError
        For ``from_teacher`` beside other keys, unknown keys, or bad values (named with ``where``).
    """
    if value is None or isinstance(value, (ModelRef, FromTeacher)):
        return value
    if isinstance(value, str):
        return ModelRef.from_dict({"spec": value}, where=where)
    data = as_mapping(value, where)
    if "from_teacher" in data:
        extra = sorted(set(data) - {"from_teacher"})
        if extra:
            raise RecipeError(f"{where}: from_teacher takes no sibling keys, got {extra[0]!r}; "
                              "give {from_teacher: {layers: [...]}} or a model spec")
        return FromTeacher.from_dict(data["from_teacher"], where=f"{where}.from_teacher")
    return ModelRef.from_dict(data, where=where)


# -- the teacher's stack of layers ----------------------------------------------------------
def _is_student_stack(model: nn.Module, stack: Any) -> bool:
    """Stacks whose every layer may go: HF lists and TransformerEncoders (which carry their
    layer count), ViT encoder blocks; not ResNet or Swin stages."""
    from torchvision.models.vision_transformer import EncoderBlock

    if stack.candidates != stack.children:
        return False
    blocks = list(get_submodule(model, stack.name)._modules.values())
    return stack.count_attr is not None or all(isinstance(b, EncoderBlock) for b in blocks)


def teacher_stack(teacher: nn.Module, where: str = "student.from_teacher.layers") -> tuple[str, list[str], Any]:
    """``(name, children, count_attr)`` of the teacher's one stack of layers.

    Raises
    ------
    RecipeError
        When the teacher has none (naming the kinds searched) or several (naming them).
    """
    from ..prune.heads import layer_stacks

    try:
        stacks = [s for s in layer_stacks(teacher) if _is_student_stack(teacher, s)]
    except RecipeError:
        stacks = []
    if not stacks:
        raise RecipeError(f"{where}: the teacher ({type(teacher).__name__}) has no stack of layers to keep a "
                          f"subset of; supported: {'; '.join(FROM_TEACHER_STACKS)}. Give a student spec instead")
    if len(stacks) > 1:
        raise RecipeError(f"{where}: the teacher has {len(stacks)} stacks of layers "
                          f"({', '.join(s.name for s in stacks)}); from_teacher.layers needs exactly one")
    s = stacks[0]
    return s.name, list(s.children), s.count_attr


def check_layers(ref: FromTeacher, teacher: nn.Module) -> None:
    """RecipeError unless every index of ``ref.layers`` is a layer of the teacher's stack."""
    if ref.layers is None:
        return
    name, children, _ = teacher_stack(teacher)
    bad = [i for i in ref.layers if i >= len(children)]
    if bad:
        raise RecipeError(f"student.from_teacher.layers: index {bad[0]} is out of range: the teacher's "
                          f"{name} has {len(children)} layers (0..{len(children) - 1})")


def keep_layers(model: nn.Module, layers: tuple[int, ...]) -> list[str]:
    """Delete every layer of ``model``'s stack but ``layers`` (in place, through the edit log) and
    set the stack's layer count; returns the names of the deleted layers (as they were)."""
    from ...edits import delete_module, set_attribute

    check_layers(FromTeacher(layers=layers), model)
    name, children, count_attr = teacher_stack(model)
    gone = [f"{name}.{c}" for i, c in enumerate(children) if i not in layers]
    for full in reversed(gone):          # last first: the numbers of the earlier ones stay valid
        delete_module(model, full)
    if gone and count_attr is not None:
        set_attribute(model, count_attr[0], count_attr[1], len(layers))
    return gone


def build_student(ref: ModelRef | FromTeacher, teacher: nn.Module, session: Any = None) -> nn.Module:
    """The student model: ``ref.build()`` for a spec; for ``from_teacher`` a deep copy of
    ``teacher`` (which is not changed) with the kept layers, then the width cut.

    ``session`` (a :class:`~torchslim.session.Session` with a task) is needed for ``width`` only:
    the channel groups are traced on the task's example inputs. Every parameter of the copy
    trains (``requires_grad`` on), whatever the teacher's flags were.

    Raises
    ------
    RecipeError
        For layer indices the teacher does not have or a teacher without a stack of layers.
    SpecError
        For a student spec that fails to build.
    """
    if isinstance(ref, ModelRef):
        return ref.build()
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    if ref.layers is not None:
        gone = keep_layers(student, ref.layers)
        log.info("student from the teacher: layers %s kept, %d dropped", list(ref.layers), len(gone))
    if ref.width is not None:
        cut = cut_ffn(student, ref.width)
        if cut:
            log.info("student from the teacher: %d of each layer's feed-forward neurons kept, by magnitude", cut)
        else:
            cut_channels(student, ref.width, session)
    return student


#: (up, down) Linear pairs of a transformer layer's feed-forward block: Hugging Face BERT-style,
#: nn.TransformerEncoderLayer, torchvision ViT's MLPBlock
FFN_PAIRS = (("intermediate.dense", "output.dense"), ("linear1", "linear2"), ("mlp.0", "mlp.3"))


def _ffn_pair(model: nn.Module, layer: str) -> tuple[str, str] | None:
    for up, down in FFN_PAIRS:
        try:
            a, b = get_submodule(model, f"{layer}.{up}"), get_submodule(model, f"{layer}.{down}")
        except AttributeError:
            continue
        if type(a) is nn.Linear and type(b) is nn.Linear and a.out_features == b.in_features:
            return f"{layer}.{up}", f"{layer}.{down}"
    return None


def cut_ffn(model: nn.Module, width: float) -> int:
    """Keep ``round(width * n)`` (at least 1) of the ``n`` feed-forward neurons of every layer of
    ``model``'s stack of layers, in place: those of largest L1 magnitude over their
    up-projection row and down-projection column (the ``magnitude`` criterion on that group; Li
    et al. 2017). Both Linear layers are rebuilt through :func:`~torchslim.edits.replace_module`;
    attention and the model's width stay; a Hugging Face encoder's ``config.intermediate_size``
    follows. Returns the neurons kept in the last layer, or 0 when
    ``model`` has no stack of layers (nothing is changed).

    Raises
    ------
    RecipeError
        For a stack whose layer has no feed-forward pair of Linear layers (:data:`FFN_PAIRS`).
    """
    from ...edits import replace_module
    from ..prune.criteria import Group, magnitude
    from ..prune.heads import _sliced_linear

    try:
        name, children, _ = teacher_stack(model)
    except RecipeError:
        return 0
    kept = 0
    for child in children:
        pair = _ffn_pair(model, f"{name}.{child}")
        if pair is None:
            raise RecipeError(f"student.from_teacher.width: layer {name}.{child} has no feed-forward block of two "
                              f"Linear layers ({', '.join('/'.join(p) for p in FFN_PAIRS)}); give layers only")
        up, down = (get_submodule(model, n) for n in pair)
        n = up.out_features
        kept = max(1, round(width * n))
        scores = magnitude(Group(units=n, weights=[up.weight.detach(), down.weight.detach().t()], names=list(pair)))
        keep = torch.sort(torch.topk(scores, kept).indices).values               # (kept,) in order
        replace_module(model, pair[0], _sliced_linear(up, rows=keep))
        replace_module(model, pair[1], _sliced_linear(down, cols=keep))
    _follow_config(model, name, kept)
    return kept


def _follow_config(model: nn.Module, stack: str, kept: int) -> None:
    """A Hugging Face encoder's ``config.intermediate_size`` (on the module holding the stack)
    set to the neurons kept, so the config describes the cut model (recorded in the edit log)."""
    from ...edits import set_attribute

    parent = stack.rpartition(".")[0]
    config = getattr(get_submodule(model, parent), "config", None)
    if isinstance(getattr(config, "intermediate_size", None), int) and kept:
        set_attribute(model, parent, "config.intermediate_size", kept)


def cut_channels(model: nn.Module, width: float, session: Any) -> None:
    """Keep ``width`` of every coupled channel group of ``model`` (a CNN) by magnitude, in place:
    ``prune.magnitude`` at ``granularity: channel``, ``scope: layer``, traced on the task's inputs."""
    from ..prune.dispatch import run_prune
    from ..prune.magnitude import MagnitudePruneConfig

    if session is None or session.task is None:
        raise RecipeError("student.from_teacher.width: cutting channels needs a task (its example inputs "
                          "trace the coupled layers)")
    config = MagnitudePruneConfig(granularity="channel", sparsity=round(1.0 - width, 6), scope="layer")
    try:
        run_prune(model, config, session, "magnitude")
    except UserError as exc:  # a model the dependency graph cannot trace
        raise RecipeError(f"student.from_teacher.width: the teacher's channels cannot be cut: "
                          f"{first_line(exc)}") from None


def student_preflight(student: ModelRef | FromTeacher | None, teacher: nn.Module | None,
                      task: Any) -> nn.Module | None:
    """The student as preflight can build it, run once on ``task``'s inputs: a spec (a SpecError
    names the ``student``), or ``from_teacher.layers`` of ``teacher`` when it is known (a spec, or
    the model entering the step), its indices checked. None where it cannot be built yet (a
    teacher by role, a ``width`` that needs the task's data).

    Raises
    ------
    SpecError
        For a student spec that does not build, or a student that does not run on the inputs.
    RecipeError
        For ``from_teacher.layers`` the teacher does not have.
    """
    from ...measure import check_runs
    from ...train.config import build_checked

    if isinstance(student, ModelRef):
        return build_checked(student, task, "student")
    if isinstance(student, FromTeacher) and teacher is not None and student.layers is not None:
        check_layers(student, teacher)
        if student.width is None:
            model = copy.deepcopy(teacher)
            keep_layers(model, student.layers)
            check_runs(model, task, "student from_teacher")
            return model
    return None


__all__ = ["FROM_TEACHER_STACKS", "FromTeacher", "build_student", "check_layers", "cut_channels", "cut_ffn",
           "keep_layers", "student_preflight", "student_ref", "teacher_stack"]
