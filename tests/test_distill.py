"""Logit distillation: the loss against a hand computation, and a student that really learns."""

from __future__ import annotations

import math

import pytest
import torch

import torchslim
from torchslim.config import ModelRef
from torchslim.errors import RecipeError
from torchslim.methods.distill.logits import LogitsDistillConfig
from torchslim.methods.distill.primitives import kd_loss


def test_kd_loss_equals_hand_computed_value():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.7
    total_kl = 0.0
    ce = 0.0
    for i in range(2):
        zs = [math.exp(v / T) for v in s[i].tolist()]
        zt = [math.exp(v / T) for v in t[i].tolist()]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        total_kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        e = [math.exp(v) for v in s[i].tolist()]
        ce += -math.log(e[int(y[i])] / sum(e))
    expected = alpha * T * T * total_kl / 2 + (1 - alpha) * ce / 2
    got = kd_loss(s, t, y, T, alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_kd_loss_zero_when_student_equals_teacher_and_alpha_one():
    x = torch.randn(4, 10)
    assert float(kd_loss(x, x.clone(), None, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_flows_only_to_student():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    kd_loss(s, t, torch.tensor([0, 1, 2]), 4.0, 0.5).backward()
    assert s.grad is not None and t.grad is None


def test_distill_into_smaller_student(trained_digits, digits_task):
    teacher_acc = digits_task.evaluate(trained_digits)
    before = {k: v.clone() for k, v in trained_digits.state_dict().items()}
    cfg = LogitsDistillConfig.from_dict({
        "student": {"spec": "zoo:digits-cnn", "args": {"channels": [8, 16], "hidden": 32}},
        "optimizer": "adamw", "epochs": 8, "lr": 0.005, "loggers": []})
    student = torchslim.apply(trained_digits, cfg, task=digits_task)
    teacher_params = sum(p.numel() for p in trained_digits.parameters())
    student_params = sum(p.numel() for p in student.parameters())
    assert student_params < teacher_params / 5
    acc = digits_task.evaluate(student)
    assert acc > 0.9 and acc >= teacher_acc - 0.06, (teacher_acc, acc)
    assert all(torch.equal(v, before[k]) for k, v in trained_digits.state_dict().items())


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(alpha=1.5), dict(student=None),
                                 dict(student={"spec": "zoo:digits-cnn", "layers": 2}),
                                 dict(student={"from_teacher": {"layers": [0, 0]}}),
                                 dict(student={"from_teacher": {"layers": [0]}, "spec": "zoo:digits-cnn"})])
def test_bad_distill_configs(bad):
    kwargs = {"student": "zoo:digits-cnn", **bad}
    with pytest.raises(RecipeError):
        LogitsDistillConfig(**kwargs)


def test_student_spec_string_is_accepted():
    c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 2})
    assert c.student == ModelRef(spec="zoo:digits-cnn") and c.train.epochs == 2
    # the nested form is what the resolved recipe writes, and it reads back the same
    assert LogitsDistillConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["train"]["epochs"] == 2 and "epochs" not in c.to_dict()


def test_training_fields_given_twice_are_refused():
    with pytest.raises(RecipeError, match="'epochs' given both"):
        LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 2, "train": {"epochs": 3}})


def test_teacher_weights_of_earlier_recipes_become_a_model_reference():
    c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "teacher": "zoo:digits-cnn",
                                       "teacher_weights": "w.safetensors"})
    assert c.teacher == ModelRef(spec="zoo:digits-cnn", weights="w.safetensors")


def test_one_distillation_plugin_serves_two_methods(trained_digits, digits_task, monkeypatch):
    """distill.logits and a pruning fine-tune with ``distill: {teacher: baseline}`` both train
    through the LogitDistillation plugin of the one trainer; pruning's mask plugin composes with it."""
    from torchslim.methods.prune.magnitude import MagnitudePruneConfig
    from torchslim.train.plugins import LogitDistillation

    calls: list[int] = []
    real = LogitDistillation.loss

    def spy(self, model, batch, outputs, loss):
        calls.append(id(self))
        return real(self, model, batch, outputs, loss)

    monkeypatch.setattr(LogitDistillation, "loss", spy)
    student = torchslim.apply(trained_digits, LogitsDistillConfig.example(), task=digits_task)
    n_distill = len(calls)
    assert n_distill > 0 and isinstance(student, torch.nn.Module)

    def kl_to_teacher(model):
        x = digits_task.example_inputs(256)[0]
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(torch.log_softmax(model(x), -1),
                                                    torch.log_softmax(trained_digits(x), -1),
                                                    reduction="batchmean", log_target=True))

    oneshot = torchslim.apply(trained_digits, MagnitudePruneConfig(sparsity=0.8, scope="layer"))
    cfg = MagnitudePruneConfig.from_dict({"sparsity": 0.8, "scope": "layer", "finetune": {
        "epochs": 2, "lr": 0.002, "optimizer": "adamw", "loggers": [],
        "distill": {"teacher": "baseline", "temperature": 2.0, "alpha": 1.0}}})
    pruned = torchslim.apply(trained_digits, cfg, task=digits_task)
    assert len(calls) > n_distill and len(set(calls)) == 2      # a second plugin instance, same class
    w = pruned[0].weight
    assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01)   # the mask plugin held
    assert kl_to_teacher(pruned) < kl_to_teacher(oneshot)        # trained toward the teacher



def test_logit_distillation_refuses_embedding_tasks():
    from torchslim.specs.tasks import ShapeTask

    task = ShapeTask("shape:4", (4,), tokens=True)
    task.outputs = "embeddings"
    with pytest.raises(RecipeError, match="class logits"):
        torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), LogitsDistillConfig.example(), task=task)


def test_label_smoothing_reaches_the_hard_term():
    """Regression: distill accepted label_smoothing but kd_loss ignored it."""
    import torch.nn.functional as F
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    soft = kd_loss(s, t, y, 2.0, 1.0)
    got = kd_loss(s, t, y, 2.0, 0.6, label_smoothing=0.2)
    want = 0.6 * soft + 0.4 * F.cross_entropy(s, y, label_smoothing=0.2)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
