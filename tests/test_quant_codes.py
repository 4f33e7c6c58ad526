"""Coded weights (k-means, log, binary, ternary, narrow floats) and linear quantization's
observers: primitives against independent references, layers, storage and reload."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import RecipeError
from torchslim.layers import CodedConv2d, CodedEmbedding, CodedLinear
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.binary import BinaryQuantConfig
from torchslim.methods.quantize.float import FloatQuantConfig
from torchslim.methods.quantize.kmeans import KMeansQuantConfig
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.methods.quantize.log import LogQuantConfig
from torchslim.methods.quantize.ternary import TernaryQuantConfig
from torchslim.pipeline import StepContext
from torchslim.recipe import Recipe

pytestmark = pytest.mark.filterwarnings("ignore:torch.fake_quantize:UserWarning")


def _weights(rows: int = 12, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.linspace(0.2, 2.0, rows)[:, None]


# -- observers ------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_observer_matches_numpy_percentiles(symmetric):
    w = _weights()
    w[3, 5] = 40.0                                                  # an outlier the percentile clips
    p = 95.0
    scale, zero = P.choose_qparams_observed(w, 8, "channel", symmetric=symmetric, observer="percentile",
                                            percentile=p)
    a = w.double().numpy()
    if symmetric:
        ref = np.percentile(np.abs(a), p, axis=1) / 127
    else:
        lo = np.minimum(np.percentile(a, 100 - p, axis=1), 0)
        hi = np.maximum(np.percentile(a, p, axis=1), 0)
        ref = (hi - lo) / 255
        ref_zero = np.clip(np.round(-128 - lo / ref), -128, 127)
        np.testing.assert_array_equal(zero.reshape(-1).numpy(), ref_zero.astype(np.float32))
    np.testing.assert_allclose(scale.reshape(-1).numpy(), ref, rtol=1e-6)
    assert float(scale[3]) < float(w[3].abs().max()) / 127 / 2      # the outlier no longer sets row 3's step


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_mse_observer_is_the_brute_force_best_clip(symmetric, granularity):
    """Each group's scale is the one, among the clip ratios, whose fake-quantized group has the
    least squared error, found here by PyTorch's fake_quantize on each group alone."""
    w = _weights(6, 32, seed=1)
    w[2, 7] = 12.0
    bits, gs = 4, 16
    qmin, qmax = P.qrange(bits, symmetric)
    scale, zero = P.choose_qparams_observed(w, bits, granularity, gs, symmetric, observer="mse")
    groups = P._grouped(w, granularity, gs)                          # (R, G, k)
    for r in range(groups.shape[0]):
        for c in range(groups.shape[1]):
            x = groups[r, c]
            best = None
            for ratio in P.MSE_RATIOS:
                lo, hi = float(x.min()) * ratio, float(x.max()) * ratio
                if symmetric:
                    s, z = max(abs(lo), abs(hi)) / qmax, 0
                else:
                    lo, hi = min(lo, 0.0), max(hi, 0.0)
                    s = (hi - lo) / (qmax - qmin)
                    z = int(min(max(round(qmin - lo / s), qmin), qmax))
                fq = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
                err = float((fq.double() - x.double()).pow(2).sum())
                if best is None or err < best[0] * (1 - 1e-6):
                    best = (err, s)
            assert float(scale[r, c]) == pytest.approx(best[1], rel=1e-5), (r, c)


def test_mse_observer_lowers_the_error_of_a_layer_with_outliers():
    w = _weights(16, 128, seed=2)
    w[:, 0] = 25.0                                                   # one outlier input per channel
    errs = {}
    for obs in ("minmax", "mse"):
        s, z = P.choose_qparams_observed(w, 4, "channel", symmetric=True, observer=obs)
        back = P.dequantize(P.quantize(w, s, z, 4, "channel", 128, True), s, z, "channel", 128)
        errs[obs] = float((back - w).pow(2).sum())
    assert errs["mse"] < 0.9 * errs["minmax"], errs


def test_linear_quant_with_mse_observer_reloads_identically(tmp_path, trained_digits, digits_task):
    q = torchslim.apply(trained_digits, LinearQuantConfig(bits=4, observer="mse")).eval()
    ref = torchslim.apply(trained_digits, LinearQuantConfig(bits=4)).eval()
    x = digits_task.example_inputs(16)[0]
    w = trained_digits[0].weight.detach()
    s, _ = P.choose_qparams_observed(w, 4, "channel", observer="mse")
    torch.testing.assert_close(q[0].scale, s, rtol=0, atol=0)
    with torch.no_grad():
        y = q(x)
        # per layer, the weights are closer to the float ones than min/max scales leave them
        for i in (0, 2, 6, 9):
            w = trained_digits[i].weight
            assert float((q[i].weight - w).pow(2).sum()) < float((ref[i].weight - w).pow(2).sum()), i
    torchslim.save(q, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "q")(x), y, rtol=0, atol=0)
    with pytest.raises(RecipeError, match="observer"):
        LinearQuantConfig(observer="histogram")


# -- k-means --------------------------------------------------------------------------------
def test_kmeans_1d_matches_sklearn_lloyd_from_the_same_start():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 0.1 + m for m in (-2.0, -0.5, 0.3, 1.7)])
    k = 8
    c, assign = P.kmeans_1d(x, k)
    init = np.linspace(float(x.min()), float(x.max()), k).reshape(-1, 1)
    ref = KMeans(k, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(x.double().numpy()[:, None])
    order = np.argsort(ref.cluster_centers_[:, 0])
    np.testing.assert_allclose(c.numpy(), ref.cluster_centers_[order, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(assign.numpy(), np.argsort(order)[ref.labels_])


def test_kmeans_layer_reconstructs_from_its_codebook_and_keeps_pruned_zeros():
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.05] = 0.0                    # pruned before
    zeros = lin.weight == 0
    q = CodedLinear.from_float(lin, "kmeans", 4)
    assert q.zero_code and q.codebook.numel() == 15 and int(q.weight_q.max()) <= 15
    w = q.dequantized_weight()
    table = torch.cat([torch.zeros(1), q.codebook.detach()])
    torch.testing.assert_close(w, table[q.weight_q.long()], rtol=0, atol=0)
    assert torch.equal(w == 0, zeros)                                # exactly the pruned weights are zero
    # every weight sits at its nearest centroid, and each centroid is the mean of its weights
    kept = lin.weight.detach()[~zeros]
    nearest = (kept[:, None] - q.codebook.detach()[None]).abs().argmin(1) + 1
    assert torch.equal(nearest, q.weight_q[~zeros].long())
    for i in range(15):
        members = kept[q.weight_q[~zeros] == i + 1]
        if members.numel():
            assert float(q.codebook.detach()[i]) == pytest.approx(float(members.double().mean()), abs=1e-6)


def test_kmeans_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    q = CodedConv2d.from_float(conv, "kmeans", 3)
    x = torch.randn(2, 3, 9, 9)
    q(x).square().sum().backward()
    # the same loss on a float conv holding the decoded weight, its gradient summed per index
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(q.dequantized_weight())
    ref(x).square().sum().backward()
    summed = torch.zeros(8, dtype=torch.float64).index_add_(0, q.weight_q.reshape(-1).long(),
                                                             ref.weight.grad.reshape(-1).double())
    # float32 sums of a few hundred terms in another order: agree to float32 rounding
    torch.testing.assert_close(q.codebook.grad.double(), summed, rtol=1e-4, atol=1e-5)
    assert not q.weight_q.requires_grad                              # the indices are fixed


def test_kmeans_finetune_trains_centroids_only(tmp_path, trained_digits, digits_task):
    from torchslim.train.config import TrainConfig

    model = copy.deepcopy(trained_digits)
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0.0
    cfg = KMeansQuantConfig(bits=3, finetune=TrainConfig(epochs=1, lr=0.001, batch_size=256))
    ctx = StepContext(task=digits_task, out_dir=tmp_path)
    once = torchslim.apply(model, KMeansQuantConfig(bits=3))
    tuned = torchslim.methods.quantize.kmeans._kmeans_quant(copy.deepcopy(model), cfg, ctx)
    assert torch.equal(tuned[0].weight_q, once[0].weight_q)          # same indices
    assert not torch.equal(tuned[0].codebook, once[0].codebook)      # moved centroids
    assert torch.equal(tuned[0].dequantized_weight() == 0, model[0].weight == 0)
    assert digits_task.evaluate(tuned) >= digits_task.evaluate(once) - 0.01


# -- log, binary, ternary, float --------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_log_levels_are_the_nearest_signed_power_of_two(bits):
    w = _weights(8, 40, seed=bits)
    codes, scale = P.quantize_log(w, bits)
    back = P.dequantize_log(codes, scale, bits)
    n = 2 ** (bits - 1) - 1
    mags = [0.0] + [2.0 ** -e for e in range(n - 1, -1, -1)]
    levels = torch.tensor(sorted({s * m for m in mags for s in (-1.0, 1.0)}))  # signed, ascending
    for r in range(w.shape[0]):
        cand = levels * float(scale[r])
        dist = (w[r, :, None] - cand[None]).abs()
        # the decoded weight is a nearest level (brute force over every signed level)
        assert torch.allclose(dist.gather(1, (back[r, :, None] - cand[None]).abs().argmin(1, keepdim=True))[:, 0],
                              dist.min(1).values, rtol=0, atol=1e-6)
    assert int(codes.abs().max()) <= n and float(scale.reshape(-1)[0]) == float(w[0].abs().max())


def test_binary_and_ternary_match_their_formulas():
    w = _weights(10, 50, seed=3)
    a = w.numpy()
    codes, alpha = P.quantize_binary(w)
    np.testing.assert_allclose(alpha.reshape(-1).numpy(), np.abs(a).mean(1), rtol=1e-6)
    np.testing.assert_array_equal(P.dequantize_binary(codes, alpha).numpy(),
                                  np.where(a >= 0, 1.0, -1.0) * alpha.numpy())
    codes, alpha = P.quantize_ternary(w)
    delta = 0.7 * np.abs(a).mean(1, keepdims=True)
    keep = np.abs(a) > delta
    ref_alpha = np.array([np.abs(row[k]).mean() for row, k in zip(a, keep)])
    np.testing.assert_allclose(alpha.reshape(-1).numpy(), ref_alpha, rtol=1e-6)
    np.testing.assert_array_equal(codes.numpy(), (np.sign(a) * keep).astype(np.int8))
    # TWN's threshold leaves about 40% of Gaussian weights at zero
    assert 0.3 < float((codes == 0).float().mean()) < 0.55


@pytest.mark.parametrize("name,dtype,rel", [("bf16", torch.bfloat16, 2 ** -8), ("fp16", torch.float16, 2 ** -11),
                                            ("e4m3", torch.float8_e4m3fn, 2 ** -4),
                                            ("e5m2", torch.float8_e5m2, 2 ** -3)])
def test_float_storage_rounds_to_the_narrow_dtype(name, dtype, rel):
    w = _weights(8, 32, seed=4)
    stored, scale = P.quantize_float(w, dtype)
    assert stored.dtype == dtype
    back = P.dequantize_float(stored, scale)
    if scale is None:
        assert torch.equal(back, w.to(dtype).float())               # plain rounding, no scale
    else:
        torch.testing.assert_close(stored.float().abs().amax(1), torch.full((8,), torch.finfo(dtype).max))
    big = w.abs() > w.abs().amax(1, keepdim=True) / 16               # normal numbers: relative error bound
    assert bool(((back - w).abs() <= rel * w.abs() + 1e-12)[big].all())


# -- methods end to end: storage and reload --------------------------------------------------
CASES = [(KMeansQuantConfig(bits=4), "uint8", 4), (LogQuantConfig(bits=4), "int8", 4),
         (BinaryQuantConfig(), "uint8", 1), (TernaryQuantConfig(), "int8", 2),
         (FloatQuantConfig(dtype="bf16"), "bfloat16", 16), (FloatQuantConfig(dtype="fp8", fp8_format="e5m2"),
                                                            "float8_e5m2", 8)]


@pytest.mark.parametrize("cfg,dtype,bits", CASES, ids=[f"{type(c).__name__}-{d}" for c, d, _ in CASES])
def test_coded_model_stores_its_codes_and_reloads_identically(cfg, dtype, bits, tmp_path):
    model = torchslim.build_model("zoo:lenet-300-100").eval()
    float_bytes = torchslim.save(model, tmp_path / "float")
    q = torchslim.apply(model, cfg).eval()
    n = torchslim.save(q, tmp_path / "q")
    files = sum(p.stat().st_size for p in (tmp_path / "q").iterdir())
    assert n == files                                                # the size is the real files
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    entry = manifest["tensors"]["1.weight_q"]
    assert entry["dtype"] == dtype
    # at most `bits` bits a weight (+ a little: scales, codebook, manifest), entropy coding may go below
    assert n < float_bytes * bits / 32 * 1.1 + 4000, (n, float_bytes)
    back = torchslim.load(tmp_path / "q")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)
        assert float(nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0)) > 0.5
    from torchslim.numerics import nonfinite_tensors
    assert nonfinite_tensors(q) == []        # the pipeline's check reads every stored dtype (fp8 too)


def test_coded_embedding_and_conv_reload(tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    spec = f"py:{Path(__file__).parent / 'assets' / 'architectures.py'}:mixed"
    model = torchslim.build_model(spec).eval()
    q = torchslim.apply(model, KMeansQuantConfig(bits=4, targets=("embed", "conv", "head")))
    assert isinstance(q.embed, CodedEmbedding) and int(q.embed.weight_q.max()) < 16
    torchslim.save(q, tmp_path / "q")
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "q")(ids), q(ids), rtol=0, atol=0)


@pytest.mark.parametrize("cfg,key", [(dict(method="kmeans", bits=9), "bits"), (dict(method="kmeans", bits=1), "bits"),
                                     (dict(method="kmeans", layer_bits={"1": 12}), "layer_bits"),
                                     (dict(method="binary", bits=2), "bits"), (dict(method="ternary", bits=3), "bits"),
                                     (dict(method="log", bits=1), "bits"), (dict(method="float", dtype="fp4"), "dtype")])
def test_bits_outside_a_methods_set_are_refused(cfg, key):
    with pytest.raises(RecipeError, match=key):
        Recipe.from_dict({"model": "zoo:lenet-300-100", "task": "digits", "steps": [{"quantize": cfg}]})


def test_layers_without_a_coded_layer_are_skipped_and_reported(tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    model = torchslim.build_model(f"py:{Path(__file__).parent / 'assets' / 'architectures.py'}:encoder").eval()
    ctx = StepContext(task=torchslim.build_task("shape:12"), out_dir=tmp_path)
    out = torchslim.methods.quantize.ternary._ternary_quant(copy.deepcopy(model), TernaryQuantConfig(), ctx)
    attn = out.encoder.layers[0].self_attn
    assert isinstance(attn.in_proj_weight, nn.Parameter)             # stays float
    assert isinstance(attn.out_proj, CodedLinear) and isinstance(out.head, CodedLinear)
    assert [w["code"] for w in ctx.warnings] == ["not_quantized"]
    assert "encoder.layers.0.self_attn (MultiheadAttention)" in ctx.info["metrics"]["skipped"]
    with pytest.raises(RecipeError, match="MultiheadAttention"):   # named: refused before any work
        TernaryQuantConfig(targets=("encoder.layers.0.self_attn",)).check_targets(model)
