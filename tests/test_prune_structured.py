"""Channel pruning: coupled channels removed from real models, shapes rebuilt from the artifact."""

from __future__ import annotations

import copy
import logging
import math
import re

import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import RecipeError, UserError
from torchslim.measure import count_macs
from torchslim.methods.prune.criteria import _CRITERIA, register_criterion
from torchslim.methods.prune.primitives import round_kept
from torchslim.methods.prune.structured import _by_unit, _rows
from torchslim.prune import MagnitudePruneConfig
from torchslim.session import Session
from torchslim.specs.tasks import build_task

CHANNEL = dict(granularity="channel", sparsity=0.5)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# -- every torchvision classification family ------------------------------------------------
FAMILIES = {  # the smallest variant of each family, and the smallest input it accepts quickly
    "resnet18": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "efficientnet_b0": 64, "regnet_x_400mf": 64, "densenet121": 64,
    "shufflenet_v2_x0_5": 64, "squeezenet1_0": 64, "mnasnet0_5": 64, "convnext_tiny": 64,
    "vgg11": 32, "alexnet": 64, "googlenet": 64,
}


#: over 60 M parameters each (a classifier of 4096-wide linears, or 2x-wide bottlenecks): 20-60 s
#: apiece on the shared 2-core machine, so they run with ``-m slow``
HEAVY = ("vgg11", "alexnet", "wide_resnet50_2")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in FAMILIES])
def test_torchvision_family_pruned_by_channels(name, tmp_path):
    args = {"num_classes": 10}
    if name == "googlenet":
        args.update(aux_logits=False, init_weights=False)
    torch.manual_seed(0)
    model = torchslim.build_model(f"torchvision:{name}", args=args).eval()
    size = FAMILIES[name]
    task = f"shape:3x{size}x{size}"
    x = torch.randn(2, 3, size, size)
    pruned = torchslim.apply(model, MagnitudePruneConfig(**CHANNEL), task=task).eval()
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    # fewer MACs and parameters; every channel layer kept at least one channel
    assert count_macs(pruned, (x[:1],)) < 0.75 * count_macs(model, (x[:1],))
    assert _params(pruned) < 0.75 * _params(model)
    for n, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.weight.shape[0] >= 1, n
    # the artifact rebuilds the smaller architecture with identical outputs
    torchslim.save(pruned, tmp_path / "a")
    loaded = torchslim.load(tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


# -- a case checked by hand -----------------------------------------------------------------
class _Residual(nn.Module):
    """conv1 -> relu -> conv2, added to conv1's output: one group of 4 coupled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        y = a + self.conv2(torch.relu(a))
        return self.fc(y.mean((2, 3)))


def test_residual_group_scores_by_hand():
    torch.manual_seed(1)
    m = _Residual().eval()
    w1, w2, wf = m.conv1.weight[:, :, 0, 0], m.conv2.weight[:, :, 0, 0], m.fc.weight
    # channel c of the add: conv1's filter c, conv2's input column c and filter c, fc's column c
    expected = w1.abs().sum(1) + w2.abs().sum(0) + w2.abs().sum(1) + wf.abs().sum(0)
    drop = sorted(torch.argsort(expected)[:2].tolist())
    keep = [c for c in range(4) if c not in drop]
    pruned = torchslim.apply(m, MagnitudePruneConfig(**CHANNEL, scope="layer"), task="shape:2x3x3")
    assert pruned.conv1.weight.shape == (2, 2, 1, 1) and pruned.conv2.weight.shape == (2, 2, 1, 1)
    assert pruned.fc.weight.shape == (3, 2)          # the classifier keeps its 3 outputs
    assert torch.equal(pruned.conv1.weight[:, :, 0, 0], w1[keep])
    assert torch.equal(pruned.conv2.weight[:, :, 0, 0], w2[keep][:, keep])
    assert torch.equal(pruned.fc.weight, wf[:, keep])
    # the same function as the original with the dropped channels zeroed
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.conv1.weight[drop] = 0
        ref.conv2.weight[drop] = 0
        x = torch.randn(5, 2, 3, 3)
        assert torch.allclose(pruned(x), ref(x), atol=1e-6)


def test_group_rows_of_grouped_conv_input_and_flatten():
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)     # weight [6, 2, 1, 1]; input i in group i // 2
    w = conv.weight.detach()
    rows = _rows(w, conv, out=False)
    assert rows.shape == (4, 3)
    assert torch.equal(rows[3], w[3:6, 1, 0, 0])          # input 3 = group 1, position 1: outputs 3..5
    # flatten -> linear: channel c owns features 2c, 2c+1 (side by side in its row)
    feats = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(_by_unit(feats, [0, 0, 1, 1], 2), torch.tensor([[0.0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]))
    assert torch.equal(_by_unit(feats[[2, 0, 1, 3]], [1, 0, 0, 1], 2), torch.tensor(
        [[0.0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]))


def test_round_kept_multiples():
    assert round_kept(13, 64, round_to=8) == 16
    assert round_kept(3, 64, round_to=8) == 8
    assert round_kept(5, 32, per_unit=2, round_to=8) == 4


# -- scope, limits, targets, rounding -------------------------------------------------------
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_layer_scope_same_ratio_round_to_and_metrics():
    session = Session(task=build_task("shape:3x8x8"))
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    m = _cnn()
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.3, scope="layer", round_to=8),
                   session, get_criterion("magnitude"))
    # 30% of 16 -> keep 11 -> rounded to 8; of 32 -> keep 22 -> rounded to 24
    assert m[0].out_channels == 8 and m[1].num_features == 8 and m[3].in_channels == 8
    assert m[3].out_channels == 24 and m[8].in_features == 24 and m[8].out_features == 10
    assert session.info["metrics"]["layer_channels"] == {"0": [8, 16], "3": [24, 32], "8": [10, 10]}
    assert session.info["metrics"]["skipped"] == []


def test_global_scope_keeps_one_channel_and_warns():
    m = _cnn()
    with torch.no_grad():
        m[0].weight.mul_(1e-6)          # the first layer's channels all rank below the second's
        m[1].weight.mul_(1e-6)
    session = Session(task=build_task("shape:3x8x8"))
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    # scores are divided by each group's mean, so a global 90% still falls on both layers ...
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.9), session, get_criterion("magnitude"))
    kept = session.info["metrics"]["layer_channels"]
    assert kept["0"][0] >= 1 and kept["3"][0] >= 1
    assert kept["0"][0] + kept["3"][0] == math.floor(0.1 * 48)        # at least 90% gone: 4 of 48 kept
    m2 = _cnn()
    session2 = Session(task=build_task("shape:3x8x8"))
    prune_channels(m2, MagnitudePruneConfig(granularity="channel", sparsity=0.99, scope="layer"), session2,
                   get_criterion("magnitude"))
    assert m2[0].out_channels == 1 and m2[3].out_channels == 1     # never every channel
    assert [w["code"] for w in session2.warnings] == ["layer_collapse"]


def test_max_layer_sparsity_and_targets_and_ignore():
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    m = _cnn()
    s = Session(task=build_task("shape:3x8x8"))
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, max_layer_sparsity=0.25), s,
                   get_criterion("magnitude"))
    assert m[0].out_channels >= 12 and m[3].out_channels >= 24
    m = _cnn()
    s = Session(task=build_task("shape:3x8x8"))
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, targets=("3",)), s,
                   get_criterion("magnitude"))
    assert (m[0].out_channels, m[3].out_channels) == (16, 16)
    m = _cnn()
    s = Session(task=build_task("shape:3x8x8"))
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, ignore=("0",)), s,
                   get_criterion("magnitude"))
    assert (m[0].out_channels, m[3].out_channels) == (16, 16)


def test_custom_criterion_and_registered_pruner():
    import torch_pruning as tp

    class Scale(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.arange(1.0, c + 1).reshape(c, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    class ScalePruner(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = [i for i in range(layer.w.shape[0]) if i not in set(idxs)]
            layer.w = nn.Parameter(layer.w.data[keep])
            return layer
        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.w.shape[0]
        get_in_channels = get_out_channels

    torchslim.prune.register_pruner(Scale, ScalePruner())
    if "test-first" not in _CRITERIA:  # keeps the first half of the channels: scores n-1 .. 0
        register_criterion("test-first", lambda g: torch.arange(g.units, 0, -1).float())
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(8), nn.Conv2d(8, 4, 1))
    w = m[0].weight.detach().clone()
    s = Session(task=build_task("shape:3x4x4"))
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, scope="layer"), s,
                   get_criterion("test-first"))
    assert torch.equal(m[0].weight, w[:4]) and m[1].w.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert m[2].in_channels == 4


# -- schedules and bad input ----------------------------------------------------------------
def test_iterative_and_gradual_schedule_channels(digits_task):
    from torchslim.train import TrainConfig
    m = torchslim.build_model("zoo:digits-cnn")
    ft = TrainConfig(epochs=2, batch_size=256, lr=0.01)
    it = torchslim.apply(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, schedule="iterative",
                                                 iterations=2, finetune=TrainConfig(epochs=1, batch_size=256, lr=0.01)),
                         task=digits_task)
    gr = torchslim.apply(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, schedule="gradual",
                                                 updates=2, finetune=ft), task=digits_task)
    for pruned in (it, gr):  # 32 + 64 + 128 prunable channels (the classifier keeps its 10): 112 gone
        assert pruned[0].out_channels + pruned[2].out_channels + pruned[6].out_features == 112
        assert pruned[9].out_features == 10 and pruned[6].in_features == pruned[2].out_channels * 16


def test_bad_input_is_a_clear_error():
    m = _cnn()
    with pytest.raises(RecipeError, match="give a task"):
        torchslim.apply(m, MagnitudePruneConfig(**CHANNEL))
    with pytest.raises(RecipeError, match="matches no module"):
        torchslim.apply(m, MagnitudePruneConfig(**CHANNEL, targets=("re:nothing.*",)), task="shape:3x8x8")
    with pytest.raises(UserError, match="cannot trace the model"):
        torchslim.apply(m, MagnitudePruneConfig(**CHANNEL), task="shape:5x8x8")   # 5 channels into a 3-channel conv
    assert MagnitudePruneConfig(**CHANNEL).CHANGES_SHAPES and not MagnitudePruneConfig().CHANGES_SHAPES


# -- criteria that need data, random, threshold ---------------------------------------------
def test_taylor_and_activation_criteria_by_channels(digits_task):
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 64, 10))
    session = Session(task=digits_task)
    batches = session.calibration_batches(64)
    # independent: the summed loss gradient and each channel's spatial-mean activation (after its ReLU) of layer 0
    m = copy.deepcopy(model)
    loss = sum(digits_task.loss(digits_task.forward(m, b), b) * len(digits_task.targets(b)) for b in batches)
    g0, g2 = torch.autograd.grad(loss, [m[0].weight, m[2].weight])
    taylor = ((m[0].weight * g0).flatten(1).sum(1) + (m[2].weight * g2).transpose(0, 1).flatten(1).sum(1)).abs()
    with torch.no_grad():
        acts = torch.cat([torch.relu(m[0](b[0])).mean((2, 3)) for b in batches]).abs().mean(0)
    for crit, expected in (("taylor", taylor), ("activation", acts)):
        pruned = copy.deepcopy(model)
        prune_channels(pruned, MagnitudePruneConfig(granularity="channel", sparsity=0.5, scope="layer", samples=64),
                       Session(task=digits_task), get_criterion(crit))
        keep = sorted(torch.argsort(expected, descending=True)[:2].tolist())
        assert torch.equal(pruned[0].weight, model[0].weight[keep]), crit


def test_random_and_threshold_criteria_by_channels():
    from torchslim.prune import RandomPruneConfig, ThresholdPruneConfig
    m = _cnn()
    a = torchslim.apply(m, RandomPruneConfig(granularity="channel", sparsity=0.5, scope="layer"), task="shape:3x8x8")
    b = torchslim.apply(m, RandomPruneConfig(granularity="channel", sparsity=0.5, scope="layer"), task="shape:3x8x8")
    assert (a[0].out_channels, a[3].out_channels) == (8, 16) and torch.equal(a[0].weight, b[0].weight)
    # threshold: a channel stays when its group L1 norm >= alpha * the largest of its layer
    w0, w3, b1 = m[0].weight, m[3].weight, m[1].weight
    scores = w0.abs().flatten(1).sum(1) + b1.abs() + w3.abs().transpose(0, 1).flatten(1).sum(1)
    t = torchslim.apply(m, ThresholdPruneConfig(granularity="channel", alpha=0.9), task="shape:3x8x8")
    assert t[0].out_channels == int((scores >= 0.9 * scores.max()).sum())


def test_batchnorm_recalibration_after_channels_removed(digits_task):
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    session = Session(task=digits_task)
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, scope="layer"), session,
                   get_criterion("magnitude"))
    assert m[1].running_mean.shape == (4,) and m[4].in_features == 256
    assert session.recalibrate_batchnorm(m, 64) == 1
    # the statistics are now those of the pruned conv's outputs on those examples
    with torch.no_grad():
        out = torch.cat([m[0](b[0]) for b in session.calibration_batches(64, batch_size=64)])
    assert torch.allclose(m[1].running_mean, out.mean((0, 2, 3)), atol=1e-5)


class _InputResidual(nn.Module):
    """conv0's output is added to the model's input, which cannot lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 3, 1)
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv1(x + self.conv0(x))).mean((2, 3)))


def test_a_group_that_breaks_the_model_is_skipped_and_reported():
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    torch.manual_seed(0)
    m = _InputResidual()
    session = Session(task=build_task("shape:3x4x4"))
    prune_channels(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5, scope="layer"), session,
                   get_criterion("magnitude"))
    assert m.conv0.out_channels == 3 and m.conv1.out_channels == 4 and m.fc.in_features == 4
    skipped = session.info["metrics"]["skipped"]
    assert [s["module"] for s in skipped] == ["conv0"] and "forward pass" in skipped[0]["reason"]
    assert "channel_skipped" in [w["code"] for w in session.warnings]
    x = torch.randn(2, 3, 4, 4)
    assert m(x).shape == (2, 2)


def test_skips_of_one_reason_are_one_warning_and_every_module_stays_in_the_row():
    """shufflenet_v2: the channels that pass a channel shuffle are skipped, 20-odd modules for
    one reason; the log says each reason once, the row lists every module."""
    from torchslim.methods.prune.criteria import get_criterion
    from torchslim.methods.prune.structured import prune_channels
    torch.manual_seed(0)
    m = torchslim.build_model("torchvision:shufflenet_v2_x0_5", args={"num_classes": 10}).eval()
    session = Session(task=build_task("shape:3x64x64"))
    prune_channels(m, MagnitudePruneConfig(**CHANNEL), session, get_criterion("magnitude"))
    skipped = session.info["metrics"]["skipped"]
    reasons = {s["reason"] for s in skipped}
    said = [w["message"] for w in session.warnings if w["code"] == "channel_skipped"]
    assert len(skipped) > 5 and len(said) == len(reasons) < len(skipped)
    for why in reasons:
        names = [s["module"] for s in skipped if s["reason"] == why]
        line = next(w for w in said if w.endswith(why))
        assert all(n in line for n in names[:5])
        assert (f"and {len(names) - 5} more" in line) == (len(names) > 5)


def test_kept_channels_are_said_before_the_fine_tune_epochs(trained_digits, digits_task, caplog):
    cfg = MagnitudePruneConfig.from_dict({"granularity": "channel", "sparsity": 0.5, "finetune": {"epochs": 1}})
    with caplog.at_level(logging.INFO, logger="torchslim"):
        torchslim.apply(trained_digits, cfg, task=digits_task)
    lines = [r.getMessage() for r in caplog.records]
    kept = next(i for i, m in enumerate(lines) if m.startswith("magnitude channel pruning: "))
    epoch = next(i for i, m in enumerate(lines) if " epoch 1/1 " in m)
    assert kept < epoch
    assert re.match(r"magnitude channel pruning: (\d+) of (\d+) output channels kept", lines[kept])


def test_layer_sparsity_sets_a_group_apart():
    m = torchslim.apply(_cnn(), MagnitudePruneConfig(granularity="channel", sparsity=0.5, layer_sparsity={"3": 0.75}),
                        task="shape:3x8x8")
    assert m[3].out_channels == 8 and m[0].out_channels == 8   # 75% of 32; the rest: 50% of layer 0 alone


def test_torch_pruning_is_left_as_it_was():
    """The reshape guard is installed only while torchslim prunes: direct users of torch-pruning
    in the same process see its own functions."""
    import torch_pruning as tp

    im = tp.dependency.index_mapping
    before = (im.update_reshape_index_mapping, im.update_index_mapping)
    m = torchslim.build_model("zoo:digits-cnn")
    torchslim.apply(m, MagnitudePruneConfig(granularity="channel", sparsity=0.5), task="shape:1x8x8")
    assert (im.update_reshape_index_mapping, im.update_index_mapping) == before


def test_feed_forward_neurons_of_a_bert_are_removed_and_the_rest_computes_the_same(tmp_path, caplog):
    """``granularity: channel`` on an encoder's FFN up-projections (a Hugging Face model returning
    hidden states and a pooler output, its Linear layers applied to (B, L, D) inputs): each layer
    keeps half of its neurons, the down-projection loses the same inputs, and the model computes
    what the original computes with the removed neurons' up-projection rows zeroed."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    tf.BertModel(cfg).save_pretrained(tmp_path / "bert")
    model = torchslim.build_model(f"hf:{tmp_path / 'bert'}").eval()
    task = build_task("shape:9")                                                 # token ids in [1000, 2000)
    with caplog.at_level(logging.WARNING):
        pruned = torchslim.apply(model, MagnitudePruneConfig(granularity="channel", sparsity=0.5, scope="layer",
                                                             targets=(r"re:.*intermediate\.dense",)), task=task)
    assert "skipped" not in caplog.text      # the attention projections were not asked for
    ref = copy.deepcopy(model)
    for new, old, lay in zip(pruned.encoder.layer, model.encoder.layer, ref.encoder.layer):
        up, down = new.intermediate.dense, new.output.dense
        assert (up.out_features, down.in_features, up.in_features, down.out_features) == (32, 32, 32, 32)
        rows = old.intermediate.dense.weight
        kept = [int((rows == r).all(dim=1).nonzero()[0]) for r in up.weight]    # which neurons stayed
        gone = sorted(set(range(64)) - set(kept))
        assert len(gone) == 32 and torch.equal(down.weight, old.output.dense.weight[:, kept])
        with torch.no_grad():                                                  # gelu(0) = 0: no contribution
            lay.intermediate.dense.weight[gone] = 0
            lay.intermediate.dense.bias[gone] = -1e4                           # gelu(-1e4) = 0 exactly
    ids = task.example_inputs(2)[0]
    with torch.no_grad():
        out = pruned(input_ids=ids).last_hidden_state
        torch.testing.assert_close(out, ref(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
        torchslim.save(pruned, tmp_path / "a")
        assert torch.equal(torchslim.load(tmp_path / "a")(input_ids=ids).last_hidden_state, out)


def test_recurrent_layers_are_reported_skipped_and_not_counted(caplog):
    """A GRU picked by the default pattern keeps its hidden units: a skip with its reason in the
    row (the report's table); the kept-channel count leaves out the classifier kept whole."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
            self.rnn, self.fc = nn.GRU(16, 24, batch_first=True), nn.Linear(24, 10)

        def forward(self, x):
            y, _ = self.rnn(torch.relu(self.c1(torch.relu(self.c0(x)))).mean(2).transpose(1, 2))
            return self.fc(y[:, -1])

    session = Session(task=build_task("shape:1x8x8"))
    with caplog.at_level(logging.INFO, logger="torchslim"):
        from torchslim.methods.prune.criteria import get_criterion
        from torchslim.methods.prune.structured import prune_channels
        m = prune_channels(Net(), MagnitudePruneConfig(granularity="channel", sparsity=0.5), session,
                           get_criterion("magnitude"))
    assert m.c0.out_channels == 8 and m.c1.in_channels == 8 and m.rnn.input_size == 16 and m.fc.out_features == 10
    skipped = {s["module"]: s["reason"] for s in session.info["metrics"]["skipped"]}
    assert "hidden units of recurrent layers" in skipped["rnn"]
    assert "reshape the graph cannot map" in skipped["c1"]          # its channels reach the GRU through a transpose
    assert "8 of 16 output channels kept" in caplog.text          # c0 alone: c1 (skipped) and fc (the output) not counted
    assert "patterns pick Conv/Linear" in caplog.text and "_ConvNd" not in caplog.text
