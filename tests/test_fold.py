"""Folding: BatchNorm into convolutions, Linear chains, Dropout removal; equivalence on real
torchvision models in eval mode, the parameters saved, and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import UserError
from torchslim.fold import BatchNormFoldConfig, IdentityFoldConfig, LinearFoldConfig
from torchslim.measure import count_params
from torchslim.methods.fold import primitives as P
from torchslim.methods.fold.batchnorm import _fold_batchnorm
from torchslim.methods.fold.linear import _fold_linear
from torchslim.pipeline import StepContext


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine terms far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def test_batchnorm_fold_matches_torch_reference():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, generator=g)
    mean, var = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.1
    gamma, beta = torch.randn(8, generator=g), torch.randn(8, generator=g)
    ref_w, ref_b = torch.nn.utils.fusion.fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    got_w, got_b = P.fold_batchnorm(w, b, mean, var, 1e-5, gamma, beta)
    torch.testing.assert_close(got_w, ref_w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_b, ref_b.detach(), rtol=1e-6, atol=1e-6)


def test_linear_fuse_is_the_composition():
    g = torch.Generator().manual_seed(1)
    a, c = nn.Linear(6, 5), nn.Linear(5, 3)
    x = torch.randn(4, 6, generator=g)
    w, b = P.fuse_linear(a.weight, a.bias, c.weight, c.bias)
    torch.testing.assert_close(x @ w.T + b, c(a(x)).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf"])
def test_fold_on_torchvision_models_keeps_outputs(arch, tmp_path):
    """Every BatchNorm of these models follows a convolution: all fold, outputs agree in eval mode,
    the parameters fall by each BatchNorm's scale and shift less the bias its conv gains, and the
    folded model reloads with identical outputs."""
    torch.manual_seed(0)
    model = torchslim.build_model(f"torchvision:{arch}", args={"num_classes": 10}).eval()
    _randomize_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs_without_bias = sum(m.num_features for m in bns)  # torchvision's convs before a BN have no bias
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = model(x)
    folded = torchslim.apply(model, BatchNormFoldConfig())
    folded = torchslim.apply(folded, IdentityFoldConfig()).eval()
    with torch.no_grad():
        y = folded(x)
    diff = float((y - y0).abs().max())
    assert diff < 1e-4 * float(y0.abs().max()), f"{arch}: max |difference| {diff:.3g} of outputs up to " \
                                                f"{float(y0.abs().max()):.3g}"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert count_params(model)[0] - count_params(folded)[0] == 2 * convs_without_bias - convs_without_bias
    torchslim.save(folded, tmp_path / "a")
    back = torchslim.load(tmp_path / "a")
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in back.modules())
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)


class _Branches(nn.Module):
    """A BatchNorm after a residual sum, and a conv read by a BatchNorm and by the sum: neither folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn_sum = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn_sum(self.conv(x) + x)          # BN of a sum
        c = self.conv2(h)
        h = self.bn2(c) + c                         # conv2's output read twice
        return self.bn3(self.conv3(h))              # the one foldable pair


def test_only_batchnorms_reading_a_layer_alone_fold():
    model = _Branches().eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 4, 6, 6)
    session = StepContext()
    out = _fold_batchnorm(copy.deepcopy(model), BatchNormFoldConfig(), session).eval()  # the record: in session
    assert session.info["metrics"]["folded"] == ["bn3"]
    assert isinstance(out.bn_sum, nn.BatchNorm2d) and isinstance(out.bn2, nn.BatchNorm2d)
    assert isinstance(out.bn3, nn.Identity) and out.conv3.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_linear_chains_fuse_unless_the_model_grows():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4), nn.ReLU(),      # 8*4 <= 8*16 + 16*4: fused
                          nn.Linear(4, 32), nn.Linear(32, 2), nn.Linear(2, 32),  # 3+4 fused (8 weights); with
                          nn.ReLU(), nn.Linear(32, 3))                           # 5: 4*32 > 8 + 2*32, apart
    x = torch.randn(5, 8)
    session = StepContext()
    out = _fold_linear(copy.deepcopy(model), LinearFoldConfig(), session)
    assert session.info["metrics"]["folded"] == ["0+1", "3+4"]
    assert out[0].weight.shape == (4, 8) and out[3].weight.shape == (2, 4) and isinstance(out[5], nn.Linear)
    # fused pairs: 8*16+16*4 -> 8*4 and 4*32+32*2 -> 4*2 weights; the biases of the second layers stay
    assert count_params(model)[0] - count_params(out)[0] == (128 + 64 - 32 + 16) + (128 + 64 - 8 + 32)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)


def test_identity_fold_removes_dropout_and_reloads(tmp_path, digits_task):
    model = torchslim.build_model("zoo:digits-cnn").eval()
    out = torchslim.apply(model, IdentityFoldConfig())
    assert len(out) == len(model) - 1 and not any(isinstance(m, nn.Dropout) for m in out.modules())
    x = digits_task.example_inputs(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=0)
    torchslim.save(out, tmp_path / "a")
    back = torchslim.load(tmp_path / "a")
    assert len(back) == len(out)
    with torch.no_grad():
        torch.testing.assert_close(back(x), out(x), rtol=0, atol=0)


def test_linear_batchnorm1d_folds_when_the_task_shows_2d_outputs(digits_task):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    _randomize_batchnorm(model)
    x = digits_task.example_inputs(4)[0]
    out = torchslim.apply(model, BatchNormFoldConfig(), task=digits_task)
    assert isinstance(out[2], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    kept = torchslim.apply(model, BatchNormFoldConfig())     # no task: the shape is unknown, nothing folds
    assert isinstance(kept[2], nn.BatchNorm1d)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:                              # control flow on data: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(UserError, match="does not trace with torch.fx"):
        torchslim.apply(_Untraceable(), BatchNormFoldConfig())


def test_fold_step_records_the_largest_output_difference():
    """The row's ``max_abs_diff``: outputs before and after folding on the task's example inputs
    (4 of them), the figure computed here independently."""
    from torchslim.methods.fold.batchnorm import _fold_batchnorm
    from torchslim.pipeline import StepContext
    from torchslim.specs.tasks import build_task

    torch.manual_seed(0)
    model = torchslim.build_model("zoo:resnet-fmnist").eval()
    _randomize_batchnorm(model)
    task = build_task("shape:1x28x28")
    x = task.example_inputs(4)
    with torch.no_grad():
        y0 = model(*x)
    ctx = StepContext(task=task)
    folded = _fold_batchnorm(copy.deepcopy(model), BatchNormFoldConfig(), ctx)
    with torch.no_grad():
        want = float((folded(*x) - y0).abs().max())
    got = ctx.info["metrics"]["max_abs_diff"]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12) and 0 < got < 1e-4 * float(y0.abs().max())
    no_task = StepContext()
    _fold_batchnorm(copy.deepcopy(model), BatchNormFoldConfig(), no_task)
    assert "max_abs_diff" not in no_task.info["metrics"]
