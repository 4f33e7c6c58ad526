"""Quantization-aware training: fake-quant math against hand-written references, the plugin in
the trainer, and ``quantize: {method: linear, qat: ...}`` ending in ordinary quantized layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import RecipeError
from torchslim.layers import QuantLinear
from torchslim.methods.quantize import fakequant as F
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.train import TrainConfig, train
from torchslim.train.qat import FakeQuantPlugin


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_forward_is_round_to_nearest_and_gradients_follow_lsq(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 20, generator=g, dtype=torch.float64).float()
    s0, z = P.choose_qparams(w, 4, "group", group_size=10, symmetric=symmetric)
    s0 = s0 * 0.7                                            # a smaller step: some weights clip
    qmin, qmax = P.qrange(4, symmetric)
    w_, s_ = w.clone().requires_grad_(), s0.clone().requires_grad_()
    zero = None if symmetric else z
    out = F.lsq_fake_quantize(w_, s_, zero, qmin, qmax)
    want = P.dequantize(P.quantize(w, s0, z, 4, "group", 10, symmetric), s0, z, "group", 10)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    up = torch.randn(6, 20, generator=g)
    (out * up).sum().backward()
    # Esser et al. 2020, eq. 3 and section 2.2, element by element
    grad_w = torch.zeros(6, 20, dtype=torch.float64)
    grad_s = torch.zeros(6, 2, dtype=torch.float64)
    for r in range(6):
        for c in range(20):
            k = c // 10
            x, zz = float(w[r, c]) / float(s0[r, k]), (0.0 if symmetric else float(z[r, k]))
            if qmin - zz < x < qmax - zz:      # inside the range: STE for w, round(x) - x for s
                grad_w[r, c] = up[r, c]
                d = round(x) - x
            else:                              # clipped: no gradient for w, the bound for s
                d = (qmin if x <= qmin - zz else qmax) - zz
            grad_s[r, k] += float(up[r, c]) * d / math.sqrt(10 * qmax)
    torch.testing.assert_close(w_.grad.double(), grad_w, rtol=1e-6, atol=0)   # up * s * (1 / s) in float32
    torch.testing.assert_close(s_.grad.double(), grad_s, rtol=1e-5, atol=1e-6)


def test_binary_and_ternary_codes_follow_their_definitions_with_straight_through_gradients():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 2, 2, generator=g)
    w[0, 0, 0, 0] = 0.0
    codes, alpha = F.binary_codes(w)
    codes_t, alpha_t = F.ternary_codes(w)
    for r in range(5):
        row = w[r].reshape(-1).tolist()
        assert codes[r].reshape(-1).tolist() == [1 if v >= 0 else -1 for v in row]
        assert alpha[r, 0].item() == pytest.approx(sum(abs(v) for v in row) / len(row), rel=1e-6)
        delta = 0.7 * sum(abs(v) for v in row) / len(row)
        kept = [abs(v) for v in row if abs(v) > delta]
        assert codes_t[r].reshape(-1).tolist() == [(1 if v > 0 else -1) if abs(v) > delta else 0 for v in row]
        assert alpha_t[r, 0].item() == pytest.approx(sum(kept) / len(kept), rel=1e-6)
    for fake, (c, a) in ((F.binary_fake_quantize, (codes, alpha)), (F.ternary_fake_quantize, (codes_t, alpha_t))):
        w_ = w.clone().requires_grad_()
        out = fake(w_)
        torch.testing.assert_close(out, (c.reshape(5, -1).float() * a).reshape(w.shape), rtol=0, atol=0)
        up = torch.randn(w.shape, generator=g)
        (out * up).sum().backward()
        torch.testing.assert_close(w_.grad, up, rtol=0, atol=0)     # straight through


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return torchslim.build_model("zoo:mlp", args={"in_features": 64, "hidden": [48]})


@pytest.fixture(scope="module")
def trained_mlp(digits_task):
    model = _mlp()
    train(model, digits_task, TrainConfig(optimizer="adamw", epochs=6, lr=0.01, batch_size=128, loggers=()))
    return model.eval()


def test_qat_recovers_2bit_accuracy_and_leaves_ordinary_quantized_layers(trained_mlp, digits_task, tmp_path):
    ptq = torchslim.apply(trained_mlp, LinearQuantConfig(bits=2))
    qat_cfg = TrainConfig(optimizer="adamw", epochs=4, lr=0.003, batch_size=128, loggers=())
    qat = torchslim.apply(trained_mlp, LinearQuantConfig(bits=2, qat=qat_cfg), task=digits_task)
    acc = {k: digits_task.evaluate(m.eval()) for k, m in (("float", trained_mlp), ("ptq", ptq), ("qat", qat))}
    assert acc["float"] > 0.9
    assert acc["qat"] > acc["ptq"] + 0.05, acc
    layers = [m for m in qat.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 and all(m.bits == 2 for m in layers)
    for m in layers:  # 2-bit symmetric codes, and scales trained away from min/max
        assert int(m.weight_q.abs().max()) <= 1
    assert not torch.equal(layers[0].scale, ptq.get_submodule(_name_of(ptq, QuantLinear)).scale)
    torchslim.save(qat, tmp_path / "m")
    again = torchslim.load(tmp_path / "m")
    x = digits_task.example_inputs(16)[0]
    with torch.no_grad():
        torch.testing.assert_close(again(x), qat(x), rtol=0, atol=0)


def _name_of(model: nn.Module, cls: type) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, cls))


def test_plugin_trains_scales_converts_exactly_and_restores_them(trained_mlp, digits_task):
    model = copy.deepcopy(trained_mlp)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plugin = FakeQuantPlugin({n: ["weight"] for n in names}, bits=3)
    keys = list(model.state_dict())
    train(model, digits_task, TrainConfig(optimizer="adamw", epochs=1, lr=0.003, batch_size=128, loggers=()),
          plugins=[plugin])
    assert list(model.state_dict()) == keys                 # the model's own state is untouched
    assert all("weight" not in model.get_submodule(n).__dict__ for n in names)    # hooks gone
    init = FakeQuantPlugin({n: ["weight"] for n in names}, bits=3)
    init.attach(model)
    init.detach()
    assert all(not torch.equal(plugin.scales[k], init.scales[k]) for k in plugin.scales)
    # the fake-quantized forward with the plugin attached is the stored layer's forward
    x = digits_task.example_inputs(8)[0]
    plugin.attach(model)
    with torch.no_grad():
        fake = model.eval()(x)
    plugin.detach()
    q = torchslim.apply(model, LinearQuantConfig(bits=3))
    for n in names:
        codes, scale, zero = plugin.codes(model, n)
        q.get_submodule(n).set_codes(codes, scale, zero)
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(x), fake, rtol=1e-5, atol=1e-5)
    # a resumed run gets its scales back into the parameters the optimizer holds
    state = plugin.state_dict()
    held = plugin.parameters()
    with torch.no_grad():
        for p in held:
            p.mul_(2)
    plugin.load_state_dict(state)
    assert all(torch.equal(plugin.scales[k], state["scales"][f"{k[0]}:{k[1]}"]) for k in plugin.scales)
    assert [id(p) for p in plugin.parameters()] == [id(p) for p in held]


def test_qat_config_refuses_early_stopping_and_round_trips():
    with pytest.raises(RecipeError, match="early_stopping"):
        LinearQuantConfig(bits=4, qat=TrainConfig(epochs=2, early_stopping=1))
    cfg = LinearQuantConfig.from_dict({"bits": 4, "qat": {"epochs": 2, "lr": 0.01}})
    assert cfg.qat.epochs == 2 and cfg.trains()
    assert LinearQuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="scheme"):
        FakeQuantPlugin({"0": ["weight"]}, "quaternary")


def test_weights_read_by_a_parent_are_fake_quantized_too():
    """Regression: hooks on each layer missed weights read without calling the layer
    (nn.MultiheadAttention passes out_proj.weight to its functional form), so out_proj trained in
    float and its scale got no gradient."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    targets = {"self_attn": ["in_proj_weight"], "self_attn.out_proj": ["weight"], "linear1": ["weight"]}
    plugin = FakeQuantPlugin(targets, bits=2)
    plugin.attach(enc)
    x = torch.randn(2, 5, 16)
    enc(x).square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in plugin.parameters())
    with torch.no_grad():
        fake = enc.eval()(x)                       # eval: the fused inference path reads them too
    plugin.detach()
    assert all(w not in enc.get_submodule(m).__dict__ for m, ws in targets.items() for w in ws)
    reference = copy.deepcopy(enc)
    with torch.no_grad():
        for m, ws in targets.items():
            for w in ws:
                codes, scale, _ = plugin.codes(enc, m, w)
                deq = P.dequantize(codes, scale, torch.zeros_like(scale), "channel", 128)
                getattr(reference.get_submodule(m), w).copy_(deq)
        torch.testing.assert_close(fake, reference(x), rtol=1e-5, atol=1e-5)


# -- quantize.binary / quantize.ternary with qat: the coded layers' own fake quantization -----

def _coded_configs():
    from torchslim.methods.quantize.binary import BinaryQuantConfig
    from torchslim.methods.quantize.ternary import TernaryQuantConfig
    return {"binary": BinaryQuantConfig, "ternary": TernaryQuantConfig}


@pytest.mark.parametrize("scheme", ["binary", "ternary"])
def test_qat_fake_quantization_is_the_stored_coding(scheme):
    """What QAT trains through (fakequant) is what the coded layer stores and decodes
    (primitives + CodedConv2d / CodedLinear), bit for bit, with a zero weight and a channel of zeros."""
    from torchslim.layers import CodedConv2d, CodedLinear
    g = torch.Generator().manual_seed(2)
    conv, lin = nn.Conv2d(3, 6, 3), nn.Linear(20, 7)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.weight[0, 0, 0, 0] = 0.0
        lin.weight[2] = 0.0
    fake = F.binary_fake_quantize if scheme == "binary" else F.ternary_fake_quantize
    for layer, cls in ((conv, CodedConv2d), (lin, CodedLinear)):
        coded = cls.from_float(layer, scheme, 1 if scheme == "binary" else 2)
        with torch.no_grad():
            torch.testing.assert_close(coded.dequantized_weight(), fake(layer.weight), rtol=0, atol=0)
        codes, alpha = (F.binary_codes if scheme == "binary" else F.ternary_codes)(layer.weight)
        stored = coded.weight_q.to(torch.int8) * 2 - 1 if scheme == "binary" else coded.weight_q
        assert torch.equal(stored, codes) and torch.equal(coded.scale, alpha)


def _train_batch(task):
    ds = task.split("train")
    return task.collate([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("scheme", ["binary", "ternary"])
def test_coded_qat_model_computes_the_last_qat_forward_and_reloads(scheme, digits_task, tmp_path, monkeypatch):
    from torchslim.layers import CodedConv2d, CodedLinear
    from torchslim.methods.quantize import qat as qat_module
    x = digits_task.example_inputs(32)[0]
    seen = {}
    original = qat_module.train_qat

    def train_and_look(model, targets, session, config, scheme="linear", **qargs):
        plugin = original(model, targets, session, config, scheme, **qargs)
        was = model.training
        plugin.attach(model)                      # the trained weights, fake-quantized as in training
        with torch.no_grad():
            seen["fake"] = model.eval()(x)
        plugin.detach()
        seen["scheme"], seen["targets"] = plugin.scheme, sorted(targets)
        model.train(was)
        return plugin

    monkeypatch.setattr(qat_module, "train_qat", train_and_look)
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")
    float_names = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    cfg = _coded_configs()[scheme](qat=TrainConfig(optimizer="adamw", epochs=1, lr=0.003, loggers=()))
    coded = torchslim.apply(model, cfg, task=digits_task)
    assert seen["scheme"] == scheme and seen["targets"] == float_names
    layers = {n: m for n, m in coded.named_modules() if isinstance(m, (CodedLinear, CodedConv2d))}
    assert sorted(layers) == float_names and all(m.scheme == scheme for m in layers.values())
    with torch.no_grad():
        out = coded.eval()(x)
    torch.testing.assert_close(out, seen["fake"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ptq = torchslim.apply(model, _coded_configs()[scheme]()).eval()(x)
    assert not torch.allclose(ptq, out, atol=1e-3)        # the codes are those of the trained weights
    torchslim.save(coded, tmp_path / "m")
    again = torchslim.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["binary", "ternary"])
def test_coded_qat_lowers_the_training_loss_of_post_training_coding(scheme, trained_mlp, digits_task):
    cls = _coded_configs()[scheme]
    ptq = torchslim.apply(trained_mlp, cls())
    qat = torchslim.apply(trained_mlp, cls(qat=TrainConfig(optimizer="adamw", epochs=2, lr=0.003, batch_size=128,
                                                           loggers=())), task=digits_task)
    batch = _train_batch(digits_task)
    with torch.no_grad():
        loss = {k: float(digits_task.loss(digits_task.forward(m.eval(), batch), batch))
                for k, m in (("float", trained_mlp), ("ptq", ptq), ("qat", qat))}
    assert loss["ptq"] > loss["float"]                     # coding costs something to recover
    assert loss["qat"] < 0.8 * loss["ptq"], loss


def test_qat_is_refused_on_coded_methods_without_a_fake_quantization():
    from torchslim.methods.quantize.float import FloatQuantConfig
    from torchslim.methods.quantize.kmeans import KMeansQuantConfig
    from torchslim.methods.quantize.log import LogQuantConfig
    with pytest.raises(RecipeError, match=r"quantize: qat is not available for quantize.kmeans: .*finetune"):
        KMeansQuantConfig.from_dict({"bits": 4, "qat": {"epochs": 1}}, "quantize")
    for cls in (LogQuantConfig, FloatQuantConfig):
        with pytest.raises(RecipeError, match=r"qat is not available .*quantize.linear"):
            cls.from_dict({"qat": {"epochs": 1}})
    for cls in _coded_configs().values():
        cfg = cls.from_dict({"qat": {"epochs": 2, "lr": 0.01}})
        assert cfg.qat.epochs == 2 and cfg.trains() and cls.from_dict(cfg.to_dict()) == cfg
        assert not cls().trains()
