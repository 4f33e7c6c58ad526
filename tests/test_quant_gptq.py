"""GPTQ and SmoothQuant: numerics against direct references, error below round-to-nearest on real
layers, artifacts that reload, smoothing that keeps the float model's function, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.errors import RecipeError, UserError
from torchslim.layers import QuantLinear
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.gptq import GPTQConfig
from torchslim.methods.quantize.gptq_math import gptq_quantize, hessian
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.methods.quantize.smooth import SmoothGroup, fold_scales, smooth_groups, smooth_model
from torchslim.session import Session


def rtn(w, bits, granularity, group_size=128, symmetric=True):
    s, z = P.choose_qparams(w, bits, granularity, group_size, symmetric)
    return P.dequantize(P.quantize(w, s, z, bits, granularity, group_size, symmetric), s, z, granularity, group_size)


def obs_reference(w, h, bits, granularity, group_size, symmetric, damp=0.01, act_order=False):
    """GPTQ written directly from the Optimal Brain Surgeon equations (Frantar et al. 2023, eq. 2-3;
    Frantar & Alistarh 2022, OBQ): one column at a time, the explicit inverse Hessian updated by
    Gaussian elimination of the rounded column, no Cholesky factor, no blocks; float64."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    h[torch.diag(h) == 0, torch.diag(h) == 0] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    qmin, qmax = P.qrange(bits, symmetric)
    if granularity == "group":
        static = [P.choose_qparams(w[:, g:g + group_size].float(), bits, "channel", symmetric=symmetric)
                  for g in range(0, cols, group_size)]
    else:
        static = P.choose_qparams(w.float(), bits, granularity, symmetric=symmetric)
    params = {}
    h_inv = torch.linalg.inv(h)
    for q in perm.tolist():
        if granularity != "group":
            s, z = static
        elif act_order:
            s, z = static[q // group_size]
        elif q % group_size == 0:            # a group's scale from its columns as updated so far
            s, z = params[q // group_size] = P.choose_qparams(w[:, q:q + group_size].float(), bits, "channel",
                                                              symmetric=symmetric)
        else:
            s, z = params[q // group_size]
        s, z = s.double().reshape(-1), z.double().reshape(-1)
        code = torch.clamp(torch.round(w[:, q] / s) + z, qmin, qmax)
        err = (w[:, q] - (code - z) * s) / h_inv[q, q]
        w -= err[:, None] * h_inv[q][None, :]                 # eq. 2: delta_F = -err * H^-1[:, q]
        w[:, q] = (code - z) * s
        h_inv -= h_inv[:, q:q + 1] @ h_inv[q:q + 1, :] / h_inv[q, q]   # eq. 3: drop q from H^-1
    return w.float()


def correlated_inputs(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3 + torch.randn(d, generator=g)


@pytest.mark.parametrize("granularity,symmetric,act_order,block", [
    ("channel", True, False, 5), ("group", True, False, 3), ("group", False, False, 16),
    ("group", True, True, 5), ("tensor", False, True, 7)])
def test_gptq_matches_direct_obs_reference(granularity, symmetric, act_order, block):
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    h = hessian(correlated_inputs(200, 16, 2))
    codes, scale, zero = gptq_quantize(w, h, 3, granularity, 4, symmetric, block_size=block, act_order=act_order)
    ours = P.dequantize(codes, scale, zero, granularity, 4)
    ref = obs_reference(w, h, 3, granularity, 4, symmetric, act_order=act_order)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert not torch.equal(ours, rtn(w, 3, granularity, 4, symmetric)), "the test case must differ from RTN"


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group", False), ("tensor", True)])
def test_gptq_with_identity_hessian_is_round_to_nearest(granularity, symmetric):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    codes, scale, zero = gptq_quantize(w, torch.eye(32), 4, granularity, 8, symmetric, block_size=8)
    s, z = P.choose_qparams(w, 4, granularity, 8, symmetric)
    torch.testing.assert_close(codes, P.quantize(w, s, z, 4, granularity, 8, symmetric), rtol=0, atol=0)
    torch.testing.assert_close(scale, s, rtol=0, atol=0)


def test_gptq_keeps_pruned_weights_zero():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    w[torch.rand(8, 32, generator=torch.Generator().manual_seed(5)) < 0.5] = 0.0
    for symmetric in (True, False):
        codes, scale, zero = gptq_quantize(w, hessian(correlated_inputs(100, 32, 6)), 4, "group", 16, symmetric)
        q = P.dequantize(codes, scale, zero, "group", 16)
        assert bool((q[w == 0] == 0).all())
        assert float((q[w != 0] == 0).float().mean()) < 0.2     # the kept weights are not zeroed with them


@pytest.fixture(scope="module")
def digits_layer_inputs(trained_digits, digits_task):
    """The trained digits CNN's 1024 -> 128 Linear and its inputs on 512 real training images."""
    model = copy.deepcopy(trained_digits).eval()
    with Session(task=digits_task).capture(model, ["6"]) as got, torch.no_grad():
        for batch in Session(task=digits_task).calibration_batches(512, batch_size=128):
            digits_task.forward(model, batch)
    return model[6].weight.detach().clone(), torch.cat(got["6"]["inputs"])


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("granularity,act_order", [("channel", False), ("group", False), ("group", True)])
def test_gptq_output_error_below_round_to_nearest(digits_layer_inputs, bits, granularity, act_order):
    w, x = digits_layer_inputs
    fit, held = x[:384], x[384:]                    # Hessian from some images, error on others
    codes, scale, zero = gptq_quantize(w, hessian(fit), bits, granularity, 128, True, act_order=act_order)
    q = P.dequantize(codes, scale, zero, granularity, 128)
    err_gptq = float((held @ (w - q).T).norm())
    err_rtn = float((held @ (w - rtn(w, bits, granularity)).T).norm())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_step_reloads_identically_and_beats_rtn(trained_digits, digits_task, tmp_path):
    cfg = GPTQConfig(bits=3, granularity="group", group_size=64, calibration={"samples": 256})
    q = torchslim.apply(trained_digits, cfg, task=digits_task).eval()
    r = torchslim.apply(trained_digits, LinearQuantConfig(bits=3, granularity="group", group_size=64,
                                                          targets=("6", "9")), task=digits_task).eval()
    assert isinstance(q[6], QuantLinear) and isinstance(q[9], QuantLinear) and isinstance(q[0], nn.Conv2d)
    x = digits_task.example_inputs(256)[0]
    with torch.no_grad():
        y, y_q, y_r = trained_digits.eval()(x), q(x), r(x)
    assert float((y - y_q).norm()) < float((y - y_r).norm()), "GPTQ's logits must be closer to float than RTN's"
    size, size_rtn = torchslim.save(q, tmp_path / "gptq"), torchslim.save(r, tmp_path / "rtn")
    # the same 3-bit codes and scales as RTN's (entropy coding makes the bytes depend on the codes a little)
    assert size <= 1.02 * size_rtn and size < 0.25 * torchslim.save(trained_digits, tmp_path / "fp32"), (size, size_rtn)
    back = torchslim.load(tmp_path / "gptq")
    with torch.no_grad():
        torch.testing.assert_close(back(x), y_q, rtol=0, atol=0)


def test_gptq_refuses_a_task_without_data_and_bad_values(trained_digits):
    with pytest.raises(RecipeError, match="needs calibration data.*random inputs only"):
        torchslim.apply(trained_digits, GPTQConfig(), task="shape:1x8x8")
    with pytest.raises(UserError, match="needs a task"):
        torchslim.apply(trained_digits, GPTQConfig())
    for bad in (dict(bits=1), dict(bits=9), dict(damp=0.0), dict(smooth=1.5), dict(calibration={"samples": 0})):
        with pytest.raises(RecipeError):
            GPTQConfig(**bad)
    with pytest.raises(RecipeError, match="Linear layers only"):
        torchslim.apply(trained_digits, GPTQConfig(targets=("0",)), task="digits")
    with pytest.raises(RecipeError, match="does not divide"):
        torchslim.apply(trained_digits, GPTQConfig(group_size=96), task="digits")


def test_cli_dry_run_refuses_gptq_without_data(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: zoo:digits-cnn\ntask: shape:1x8x8\nsteps:\n  - quantize: {method: gptq, bits: 4}\n")
    assert main(["compress", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs calibration data" in err and "Traceback" not in err
    recipe.write_text(recipe.read_text().replace("shape:1x8x8", "digits").replace("bits: 4", "bits: 4, act_order: true"))
    assert main(["compress", str(recipe), "--dry-run"]) == 0
    assert "quantize.gptq" in capsys.readouterr().out


# -- SmoothQuant ----------------------------------------------------------------------------
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def random_factors(groups, model):
    g = torch.Generator().manual_seed(0)
    mods = dict(model.named_modules())
    return [torch.exp(torch.randn(mods[grp.readers[0]].in_features, generator=g)) for grp in groups]


def test_smoothing_keeps_a_bert_encoder_function():
    model = tiny_bert()
    groups = smooth_groups(model)
    # post-LN BERT: only value -> attention output projection (the LayerNorms feed the residual too)
    assert groups == [SmoothGroup(f"encoder.layer.{i}.attention.self.value", (f"encoder.layer.{i}.attention.output.dense",))
                      for i in range(2)]
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        before = model(ids, mask).last_hidden_state
        for grp, s in zip(groups, random_factors(groups, model)):
            fold_scales(model, grp, s)
        after = model(ids, mask).last_hidden_state
    assert not torch.equal(model.encoder.layer[0].attention.self.value.weight,
                           tiny_bert().encoder.layer[0].attention.self.value.weight)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_smoothing_keeps_linear_chains_and_pre_ln_encoders():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.LayerNorm(16),
                          nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=True, batch_first=True).eval()
    post = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    assert smooth_groups(chain) == [SmoothGroup("0", ("3",)), SmoothGroup("4", ("5",))]   # not across the GELU
    assert smooth_groups(enc) == [SmoothGroup("norm2", ("linear1",)), SmoothGroup("linear1", ("linear2",))]
    assert smooth_groups(post) == []
    for model, x in ((chain, torch.randn(5, 12)), (enc, torch.randn(2, 7, 16))):
        with torch.no_grad():
            before = model(x)
            groups = smooth_groups(model)
            for grp, s in zip(groups, random_factors(groups, model)):
                fold_scales(model, grp, s)
            torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_smooth_balances_activation_and_weight_ranges(trained_digits, digits_task):
    """alpha 0.5: per channel, max|X_j / s_j| equals max|W_j * s_j| (both sqrt(max|X_j| max|W_j|))."""
    model = copy.deepcopy(trained_digits).eval()
    session = Session(task=digits_task)
    batches = session.calibration_batches(128)
    x = digits_task.example_inputs(64)[0]
    with torch.no_grad():
        y0 = model(x)
    assert smooth_model(model, 0.5, session, batches) == 1          # 6 -> ReLU -> Dropout -> 9
    with session.capture(model, ["9"]) as got, torch.no_grad():
        for b in batches:
            digits_task.forward(model, b)
    a = torch.cat(got["9"]["inputs"]).abs().amax(dim=0)
    w = model[9].weight.abs().amax(dim=0)
    live = a > 0
    assert int(live.sum()) > 32                                    # ReLU units that fire on digits
    torch.testing.assert_close(a[live], w[live], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=1e-4, atol=1e-4)


def test_smooth_field_on_linear_and_gptq_runs_and_needs_data(trained_digits, digits_task):
    x = digits_task.example_inputs(64)[0]
    with torch.no_grad():
        y = trained_digits.eval()(x)
    for cfg in (LinearQuantConfig(bits=8, smooth=0.5, targets=("6", "9")), GPTQConfig(bits=8, smooth=0.5)):
        q = torchslim.apply(trained_digits, cfg, task=digits_task).eval()
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(q(x).flatten(), y.flatten(), dim=0)
        assert float(cos) > 0.999
        with pytest.raises(RecipeError, match="SmoothQuant|GPTQ"):
            cfg.check_ready(torchslim.build_task("shape:1x8x8"))
    LinearQuantConfig(bits=8).check_ready(torchslim.build_task("shape:1x8x8"))   # no smooth: no data needed
