"""Linear weight quantization: codes against PyTorch's reference, error bounds, storage, reload."""

from __future__ import annotations

import json

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.methods.quantize import primitives as P
from torchslim.methods.quantize.linear import LinearQuantConfig
from torchslim.layers import QuantConv2d, QuantLinear


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()))


# PyTorch's quantized tensors are deprecated but remain an independent reference implementation
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def test_symmetric_per_channel_codes_match_torch_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g) * torch.linspace(0.1, 3, 16)[:, None]
    scale, zero = P.choose_qparams(w, 8, "channel", symmetric=True)
    q = P.quantize(w, scale, zero, 8, "channel", 128, True)
    ref = torch.quantize_per_channel(w, scale.reshape(-1).double(), torch.zeros(16, dtype=torch.long),
                                     axis=0, dtype=torch.qint8).int_repr()
    torch.testing.assert_close(q, ref, rtol=0, atol=0)
    # symmetric: scale = max|w| / 127 per row
    torch.testing.assert_close(scale.reshape(-1), w.abs().amax(dim=1) / 127, rtol=0, atol=0)


def test_affine_per_tensor_codes_match_torch_reference():
    w = torch.rand(8, 9) * 2 + 0.3           # all positive: affine uses an offset range
    scale, zero = P.choose_qparams(w, 8, "tensor", symmetric=False)
    q = P.quantize(w, scale, zero, 8, "tensor", 128, False)
    ref = torch.quantize_per_tensor(w, float(scale), int(zero), dtype=torch.qint8).int_repr()
    torch.testing.assert_close(q, ref, rtol=0, atol=0)


@pytest.mark.parametrize("granularity,symmetric", [("tensor", True), ("channel", True), ("channel", False),
                                                   ("group", True), ("group", False)])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_bounded_by_half_step(granularity, symmetric, bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 64, generator=g)
    scale, zero = P.choose_qparams(w, bits, granularity, group_size=16, symmetric=symmetric)
    q = P.quantize(w, scale, zero, bits, granularity, 16, symmetric)
    lo, hi = P.qrange(bits, symmetric)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    back = P.dequantize(q, scale, zero, granularity, 16)
    # per element, error <= scale/2 of its group (values inside the range are never clipped)
    step = P._grouped(torch.ones_like(w), granularity, 16) * scale.unsqueeze(-1)
    err = P._grouped((w - back).abs(), granularity, 16)
    assert bool((err <= step / 2 + 1e-6).all())


def test_more_bits_less_error_and_zero_is_exact():
    w = torch.randn(32, 32)
    w[w.abs() < 0.5] = 0.0
    errs = []
    for bits in (2, 4, 8):
        s, z = P.choose_qparams(w, bits, "channel", symmetric=False)
        back = P.dequantize(P.quantize(w, s, z, bits, "channel", 128, False), s, z, "channel", 128)
        assert bool((back[w == 0] == 0).all()), "zeros must stay exact (sparsity survives quantization)"
        errs.append(float((w - back).abs().mean()))
    assert errs[0] > errs[1] > errs[2]


def test_quant_layers_sqnr_and_input_untouched():
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = torchslim.apply(model, LinearQuantConfig(bits=8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(q[0], QuantConv2d) and isinstance(q[5], QuantLinear)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 35


def test_quantized_model_saves_int8_and_reloads_identically(tmp_path, trained_digits, digits_task):
    base_bytes = torchslim.save(trained_digits, tmp_path / "float")
    q = torchslim.apply(trained_digits, LinearQuantConfig(bits=8))
    q_bytes = torchslim.save(q, tmp_path / "int8")
    assert q_bytes < 0.3 * base_bytes, (base_bytes, q_bytes)
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["tensors"]["0.weight_q"]["dtype"] == "int8"
    back = torchslim.load(tmp_path / "int8")
    q.eval()
    x = digits_task.example_inputs(16)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)
    acc_f, acc_q = digits_task.evaluate(trained_digits), digits_task.evaluate(back)
    assert acc_q >= acc_f - 0.01


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(granularity="row"), dict(group_size=0),
                                 dict(activations="int4"), dict(activations="dynamic", granularity="group")])
def test_bad_quant_configs(bad):
    with pytest.raises(RecipeError):
        LinearQuantConfig(**bad)


def test_group_size_must_divide_inputs():
    model = torchslim.build_model("zoo:lenet-300-100")
    with pytest.raises(RecipeError, match="does not divide"):
        torchslim.apply(model, LinearQuantConfig(granularity="group", group_size=7))


def test_inference_cache_follows_weight_changes():
    """The dequantized weight kept for inference must be refreshed when the codes change."""
    lin = torch.nn.Linear(16, 8)
    q = QuantLinear.from_float(lin)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y1 = q(x)
        q.set_weight(torch.randn(8, 16))        # new codes and scales
        y2 = q(x)
        assert not torch.allclose(y1, y2)
        torch.testing.assert_close(y2, torch.nn.functional.linear(x, q._dequantize(), q.bias), rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(q(x), y2, rtol=0, atol=0)
    q.train()
    y3 = q(x)                                    # with gradients: computed fresh, differentiable
    y3.sum().backward()
    assert q.bias.grad is not None


def test_scale_floor_is_relative_to_the_tensor_range():
    """Regression (first-use report): an absolute eps floor on scales gave 2.6% error on a
    channel whose weights are all below ~1.5e-5; its own scale gives half a step at most."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g)
    w[2] = torch.rand(256, generator=g) * 1.5e-5 - 0.75e-5       # a channel of tiny weights
    for symmetric in (True, False):
        scale, zero = P.choose_qparams(w, 8, "channel", symmetric=symmetric)
        q = P.quantize(w, scale, zero, 8, "channel", 128, symmetric)
        back = P.dequantize(q, scale, zero, "channel", 128)
        rel = float((back[2] - w[2]).norm() / w[2].norm())
        assert rel < 0.004, (symmetric, rel)
    zeros = torch.zeros(3, 8)                                    # all-zero tensor: a finite scale, exact zeros
    scale, zero = P.choose_qparams(zeros, 8, "channel")
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(P.dequantize(P.quantize(zeros, scale, zero, 8, "channel", 128, True), scale, zero,
                                    "channel", 128), zeros)


# -- attention, embeddings, Conv1d; refusals ----------------------------------------------------
ASSETS = __import__("pathlib").Path(__file__).parent / "assets" / "architectures.py"


def _build(monkeypatch, factory):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")  # the py: test architectures are ours
    torch.manual_seed(0)
    return torchslim.build_model(f"py:{ASSETS}:{factory}").eval()


def test_quantized_attention_matches_float_on_its_codes_and_reloads(monkeypatch, tmp_path):
    """Regression: the packed q/k/v ``in_proj_weight`` of nn.MultiheadAttention stayed float."""
    from torchslim.layers import QuantMultiheadAttention
    from torchslim.measure import count_params

    model = _build(monkeypatch, "encoder")
    q = torchslim.apply(model, LinearQuantConfig(bits=8))
    attn = q.encoder.layers[0].self_attn
    assert isinstance(attn, QuantMultiheadAttention) and attn.in_proj_weight_q.dtype == torch.int8
    assert not attn.training                     # an eval model stays in eval mode (no dropout)
    assert "in_proj_weight" not in dict(attn.named_parameters())
    # the layer computes nn.MultiheadAttention on its dequantized weights, exactly
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn._dequantize("in_proj_weight"))
        ref.in_proj_bias.copy_(attn.in_proj_bias)
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    h = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(h, h, h)[0], ref(h, h, h)[0], rtol=0, atol=0)
        # and is close to the float layer: SQNR of the attention output and of the model's logits
        f_attn = model.encoder.layers[0].self_attn
        assert sqnr_db(f_attn(h, h, h)[0], attn(h, h, h)[0]) > 35
        x = torch.randint(0, 2048, (4, 12))
        y = q(x)
        assert sqnr_db(model(x), y) > 35
    # honest counts: every float weight is one code; zeros are codes equal to the zero point
    own = attn.slim_weights()
    assert own["in_proj_weight_q"] == (3 * 32 * 32, int(torch.count_nonzero(attn.in_proj_weight_q)))
    assert count_params(q)[0] == count_params(model)[0]
    # save -> load: int8 codes in the file, bit-exact outputs
    torchslim.save(q, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["tensors"]["encoder.layers.0.self_attn.in_proj_weight_q"]["dtype"] == "int8"
    back = torchslim.load(tmp_path / "q")
    assert isinstance(back.encoder.layers[1].self_attn, QuantMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)
    assert count_params(back) == count_params(q)


def test_attention_with_separate_kv_dims_is_quantized():
    """kdim/vdim != embed_dim: q/k/v_proj_weight are three int8 tensors."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True).eval()
    q = torchslim.apply(torch.nn.ModuleDict({"attn": mha}), LinearQuantConfig(bits=8))["attn"]
    assert {n for n, b in q.named_buffers() if b.dtype == torch.int8} == {
        "q_proj_weight_q", "k_proj_weight_q", "v_proj_weight_q", "out_proj.weight_q"}
    x, k, v = torch.randn(2, 5, 16), torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    with torch.no_grad():
        assert sqnr_db(mha(x, k, v)[0], q(x, k, v)[0]) > 35


def test_fp16_attention_quantizes_and_keeps_its_dtype(monkeypatch):
    """Regression: in an fp16 model a quantized attention read float32 weights and failed."""
    model = _build(monkeypatch, "encoder").half()
    q = torchslim.apply(model, LinearQuantConfig(bits=8))
    x = torch.randint(0, 2048, (4, 12))
    with torch.no_grad():
        y0, y = model(x), q(x)
    assert y.dtype == torch.float16
    assert float(torch.nn.functional.cosine_similarity(y.float().flatten(), y0.float().flatten(), dim=0)) > 0.99


def test_named_embedding_and_conv1d_are_quantized_and_reload(monkeypatch, tmp_path):
    from torchslim.layers import QuantConv1d, QuantEmbedding

    model = _build(monkeypatch, "mixed")
    q = torchslim.apply(model, LinearQuantConfig(bits=8, targets=("embed", "conv", "head")))
    assert isinstance(q.embed, QuantEmbedding) and isinstance(q.conv, QuantConv1d)
    assert isinstance(q.lstm, torch.nn.LSTM)
    ids = torch.randint(0, 64, (4, 10))
    with torch.no_grad():
        assert sqnr_db(model.embed.weight, q.embed.weight) > 35
        torch.testing.assert_close(q.embed(ids), q.embed.weight[ids], rtol=0, atol=0)
        assert bool((q.embed.weight[0] == 0).all())           # the padding row stays exactly zero
        y = q(ids)
        assert sqnr_db(model(ids), y) > 30
    torchslim.save(q, tmp_path / "q")
    back = torchslim.load(tmp_path / "q")
    assert back.embed.padding_idx == 0 and back.embed.weight_q.dtype == torch.int8
    with torch.no_grad():
        torch.testing.assert_close(back(ids), y, rtol=0, atol=0)


@pytest.mark.parametrize("target,cls", [("lstm", "LSTM"), ("up", "ConvTranspose2d")])
def test_named_module_without_quantized_layer_is_refused(monkeypatch, target, cls):
    model = _build(monkeypatch, "mixed")
    with pytest.raises(RecipeError, match=f"'{target}' is a {cls}: no quantized layer exists"):
        torchslim.apply(model, LinearQuantConfig(targets=("head", target)))
    # a pattern leaves them in float and quantizes what it can
    q = torchslim.apply(model, LinearQuantConfig())
    assert isinstance(q.lstm, torch.nn.LSTM) and isinstance(q.head, QuantLinear)


def test_attention_quantized_after_its_out_proj_reloads(monkeypatch, tmp_path):
    """Two steps: out_proj first, then the attention; the replayed artifact has both, and a third
    pass over every module leaves the quantized attention's codes as they are."""
    model = _build(monkeypatch, "encoder")
    q1 = torchslim.apply(model, LinearQuantConfig(targets=("encoder.layers.0.self_attn.out_proj",)))
    q2 = torchslim.apply(q1, LinearQuantConfig(targets=("encoder.layers.0.self_attn",)))
    assert isinstance(q2.encoder.layers[0].self_attn.out_proj, QuantLinear)
    x = torch.randint(0, 2048, (2, 12))
    torchslim.save(q2, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(torchslim.load(tmp_path / "q")(x), q2(x), rtol=0, atol=0)
    q3 = torchslim.apply(q2, LinearQuantConfig())
    assert torch.equal(q3.encoder.layers[0].self_attn.in_proj_weight_q, q2.encoder.layers[0].self_attn.in_proj_weight_q)
