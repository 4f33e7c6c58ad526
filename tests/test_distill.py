"""Logit distillation: the loss against a hand computation, and a student that really learns."""

from __future__ import annotations

import math

import pytest
import torch

import torchslim
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
    cfg = LogitsDistillConfig(student={"spec": "zoo:digits-cnn", "args": {"channels": [8, 16], "hidden": 32}},
                              optimizer="adamw", epochs=8, lr=0.005, loggers=())
    student = torchslim.apply(trained_digits, cfg, task=digits_task)
    n_t = sum(p.numel() for p in trained_digits.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s < n_t / 5
    acc = digits_task.evaluate(student)
    assert acc > 0.9 and acc >= teacher_acc - 0.06, (teacher_acc, acc)
    assert all(torch.equal(v, before[k]) for k, v in trained_digits.state_dict().items())


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(alpha=1.5), dict(student=None),
                                 dict(student={"spec": "zoo:digits-cnn", "layers": 2}),
                                 dict(student={"from_teacher": {"layers": [0]}})])
def test_bad_distill_configs(bad):
    kwargs = {"student": "zoo:digits-cnn", **bad}
    with pytest.raises(RecipeError):
        LogitsDistillConfig(**kwargs)


def test_student_spec_string_is_accepted():
    c = LogitsDistillConfig.from_dict({"student": "zoo:digits-cnn", "epochs": 2})
    assert c.student == {"spec": "zoo:digits-cnn"} and c.epochs == 2


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
