"""Head and layer pruning: attention heads and whole layers physically removed from Hugging
Face BERT, torchvision ViT and Swin, nn.TransformerEncoder and ResNet, checked against the
same models with the removed parts switched off by hand (output-projection columns of the
removed heads zeroed; a dropped residual block's last BatchNorm zeroed), and reloaded exactly."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.errors import RecipeError
from torchslim.layers.attention import PrunedMultiheadAttention, PrunedShiftedWindowAttention
from torchslim.measure import count_macs, count_params
from torchslim.methods.prune.magnitude import MagnitudePruneConfig

ASSETS = Path(__file__).parent / "assets"
VIT = f"py:{ASSETS / 'attention_models.py'}:small_vit"
SWIN = f"py:{ASSETS / 'attention_models.py'}:small_swin"
ENCODER = f"py:{ASSETS / 'architectures.py'}:encoder"


def _heads(sparsity=0.5, **kw):
    return MagnitudePruneConfig(granularity="head", sparsity=sparsity, **kw)


def _l1_per_head(qkv: list[torch.Tensor], out: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's summed |w| over its q, k, v rows and its output-projection columns, by hand."""
    d = out.shape[1] // heads
    qkv, out = [w.detach() for w in qkv], out.detach()
    return torch.tensor([sum(float(w[h * d:(h + 1) * d].abs().sum()) for w in qkv)
                         + float(out[:, h * d:(h + 1) * d].abs().sum()) for h in range(heads)])


def _zero_columns(weight: torch.Tensor, removed: list[int], heads: int) -> None:
    d = weight.shape[1] // heads
    with torch.no_grad():
        for h in removed:
            weight[:, h * d:(h + 1) * d] = 0.0


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


def _reload(model: nn.Module, path: Path) -> nn.Module:
    torchslim.save(model, path)
    return torchslim.load(path, trust_code=True).eval()


# -- the attention layers -------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_with_every_head_kept_is_torch_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = PrunedMultiheadAttention.from_attention(mha, keep=[0, 1, 2, 3]).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kw in ({"need_weights": False}, {"need_weights": True, "key_padding_mask": pad},
               {"need_weights": False, "attn_mask": causal}):
        with torch.no_grad():
            ref, ref_w = mha(x, x, x, **kw)
            got, got_w = ours(x, x, x, **kw)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if kw["need_weights"]:
            torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)


def test_hand_computed_head_scores_choose_the_heads():
    """Head h of a 4-head attention has every weight equal to s_h = (3, 1, 4, 2): magnitude
    scores are 4 * 8 * 2 * s_h each (q, k, v rows: 2 x 8; out columns: 8 x 2), so 50% per layer
    removes heads 1 and 3, and the result computes what the full layer computes with those
    heads' output columns zeroed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 4, batch_first=True)).eval()
    mha = model[0]
    scale = torch.tensor([3.0, 1.0, 4.0, 2.0]).repeat_interleave(2)     # per row of one projection
    with torch.no_grad():
        mha.in_proj_weight.copy_(scale.repeat(3)[:, None].expand(24, 8))
        mha.out_proj.weight.copy_(scale[None, :].expand(8, 8))
    expected = _l1_per_head(list(mha.in_proj_weight.chunk(3)), mha.out_proj.weight, 4)
    assert expected.tolist() == [64.0 * s for s in (3, 1, 4, 2)]
    from torchslim.methods.prune.heads import attention_sites, head_group
    from torchslim.methods.prune.criteria import get_criterion
    site, = attention_sites(model)
    torch.testing.assert_close(get_criterion("magnitude").fn(head_group(model, site)), expected)

    class Self(nn.Module):  # Sequential passes one input; attention wants three
        def __init__(self, att):
            super().__init__()
            self.att = att

        def forward(self, x):
            return self.att(x, x, x, need_weights=False)[0]

    with torch.no_grad():
        mha.in_proj_weight.add_(0.1 * torch.randn(24, 8))  # not a symmetric layer, same ranking
    full = Self(mha)
    pruned = torchslim.apply(full, _heads(0.5, scope="layer"))
    assert pruned.att.num_heads == 2
    ref = copy.deepcopy(full)
    _zero_columns(ref.att.out_proj.weight, [1, 3], 4)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(pruned(x), ref(x), rtol=1e-5, atol=1e-5)


def test_threshold_keeps_the_heads_above_alpha_times_the_largest():
    """Scores 64 * (3, 1, 4, 2) per head: alpha 0.6 keeps those >= 0.6 * 256, heads 0 and 2."""
    from torchslim.methods.prune.threshold import ThresholdPruneConfig
    model = nn.Sequential(nn.MultiheadAttention(8, 4, batch_first=True))
    scale = torch.tensor([3.0, 1.0, 4.0, 2.0]).repeat_interleave(2)
    with torch.no_grad():
        model[0].in_proj_weight.copy_(scale.repeat(3)[:, None].expand(24, 8))
        model[0].out_proj.weight.copy_(scale[None, :].expand(8, 8))
    pruned = torchslim.apply(model, ThresholdPruneConfig(granularity="head", alpha=0.6))
    assert pruned[0].num_heads == 2
    assert pruned[0].q_proj.weight[:, 0].tolist() == [3.0, 3.0, 4.0, 4.0]


def test_threshold_by_heads_that_removes_nothing_says_so(caplog):
    """Every head scoring the same: none is under alpha * max, and the step says to raise alpha."""
    import logging
    from torchslim.methods.prune.threshold import ThresholdPruneConfig
    model = nn.Sequential(nn.MultiheadAttention(8, 4, batch_first=True))
    with torch.no_grad():
        model[0].in_proj_weight.fill_(1.0), model[0].out_proj.weight.fill_(1.0)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        pruned = torchslim.apply(model, ThresholdPruneConfig(granularity="head", alpha=0.6))
    assert pruned[0].num_heads == 4
    assert "removed no head" in caplog.text and "raise alpha" in caplog.text


def test_taylor_head_scores_are_gradient_times_weight_over_the_data():
    """Taylor (Molchanov et al. 2019): |sum of grad * weight| over a head's q/k/v rows and output
    columns, the gradient of the summed loss over the 256 calibration examples, computed here
    with autograd on them stacked; the two lowest of 4 heads go (heads 0 and 1 here, where
    magnitude would keep 1 and 3)."""
    import torch.nn.functional as F
    from torchslim.methods.prune.taylor import TaylorPruneConfig
    from torchslim.session import Session
    torch.manual_seed(2)
    model = torchslim.build_model(f"py:{ASSETS / 'attention_models.py'}:digits_attention").eval()
    task = torchslim.build_task("digits")
    batches = Session(task=task).calibration_batches(256)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    att = model.att
    loss = F.cross_entropy(model(xs), ys, reduction="sum")
    g_in, g_out = torch.autograd.grad(loss, [att.in_proj_weight, att.out_proj.weight])
    prod_in, prod_out = (g_in * att.in_proj_weight).detach(), (g_out * att.out_proj.weight).detach()
    scores = torch.tensor([float(sum(prod_in[p * 16 + h * 4:p * 16 + (h + 1) * 4].sum() for p in range(3))
                                 + prod_out[:, h * 4:(h + 1) * 4].sum()) for h in range(4)]).abs()
    kept = [h for h in range(4) if h not in _lowest(scores, 2)]
    assert kept == [0, 1]
    pruned = torchslim.apply(model, TaylorPruneConfig(granularity="head", sparsity=0.5, samples=256), task=task)
    assert pruned.att.num_heads == 2
    torch.testing.assert_close(pruned.att.q_proj.weight, torch.cat([att.in_proj_weight[h * 4:(h + 1) * 4]
                                                                    for h in kept]).detach())


def test_head_sensitivity_has_a_curve_per_attention_module(digits_task):
    """``torchslim sensitivity --granularity head``: one curve per attention module; its point at
    50% is the metric of the model with that module's 2 lowest-magnitude heads switched off."""
    from torchslim.methods.prune import sensitivity
    torch.manual_seed(0)
    model = torchslim.build_model(f"py:{ASSETS / 'attention_models.py'}:digits_attention").eval()
    data = sensitivity.analyze(model, digits_task, _heads(), points=(0.5,), split="val", recalibrate_bn=0)
    assert list(data["layers"]) == ["att"]
    att = model.att
    ref = copy.deepcopy(model)
    gone = _lowest(_l1_per_head(list(att.in_proj_weight.chunk(3)), att.out_proj.weight, 4), 2)
    _zero_columns(ref.att.out_proj.weight, gone, 4)
    assert data["layers"]["att"]["points"] == [[0.5, pytest.approx(digits_task.evaluate(ref, "val"))]]


# -- model kinds ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("bert")
    tf.BertModel(cfg).save_pretrained(path)
    return path


def _ids():
    torch.manual_seed(1)
    return torch.randint(0, 120, (2, 9))


def test_bert_heads_removed_by_global_magnitude_reload_exactly(tiny_bert_dir, tmp_path):
    model = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    layers = model.encoder.layer
    raw = [_l1_per_head([a.self.query.weight, a.self.key.weight, a.self.value.weight], a.output.dense.weight, 4)
           for a in (lay.attention for lay in layers)]
    flat = torch.cat([s / s.mean() for s in raw])                  # the documented global rule
    gone = set(_lowest(flat, 6))                                   # 50% of 12 heads
    removed = [[h for h in range(4) if 4 * i + h in gone] for i in range(3)]
    pruned = torchslim.apply(model, _heads(0.5))
    assert [lay.attention.self.num_attention_heads for lay in pruned.encoder.layer] == [4 - len(r) for r in removed]
    assert [lay.attention.self.query.out_features for lay in pruned.encoder.layer] == [8 * (4 - len(r))
                                                                                      for r in removed]
    ref = copy.deepcopy(model)
    for lay, r in zip(ref.encoder.layer, removed):
        _zero_columns(lay.attention.output.dense.weight, r, 4)
    ids = _ids()
    with torch.no_grad():
        out = pruned(input_ids=ids).last_hidden_state
        torch.testing.assert_close(out, ref(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    # per head removed: q, k, v rows (3 x (8 x 32 + 8)) and the output columns (32 x 8)
    assert count_params(model)[0] - count_params(pruned)[0] == 6 * (3 * (8 * 32 + 8) + 32 * 8)
    assert count_macs(pruned, (ids[:1],)) < count_macs(model, (ids[:1],))
    back = _reload(pruned, tmp_path / "m")
    assert [lay.attention.self.num_attention_heads for lay in back.encoder.layer] == \
        [lay.attention.self.num_attention_heads for lay in pruned.encoder.layer]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, out)


def test_vit_heads_per_layer_reload_exactly(tmp_path):
    torch.manual_seed(0)
    model = torchslim.build_model(VIT).eval()
    blocks = list(model.encoder.layers)
    removed = [_lowest(_l1_per_head(list(b.self_attention.in_proj_weight.chunk(3)),
                                    b.self_attention.out_proj.weight, 4), 1) for b in blocks]
    pruned = torchslim.apply(model, _heads(0.25, scope="layer"))
    atts = [b.self_attention for b in pruned.encoder.layers]
    assert all(isinstance(a, PrunedMultiheadAttention) and a.num_heads == 3 for a in atts)
    ref = copy.deepcopy(model)
    for b, r in zip(ref.encoder.layers, removed):
        _zero_columns(b.self_attention.out_proj.weight, r, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = pruned(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    before, after = torchslim.measure(model, "shape:3x32x32", latency=False), \
        torchslim.measure(pruned, "shape:3x32x32", latency=False)
    assert before["params"] - after["params"] == 2 * (3 * (16 * 64 + 16) + 64 * 16)
    assert after["macs"] < before["macs"]
    back = _reload(pruned, tmp_path / "v")
    with torch.no_grad():
        assert torch.equal(back(x), out)


def test_swin_heads_match_torchvision_and_reload_exactly(tmp_path):
    torch.manual_seed(0)
    model = torchslim.build_model(SWIN).eval()
    x = torch.randn(2, 3, 32, 32)
    shifted = model.features[1][1].attn                                    # 8x8 tokens, 4x4 windows, shift 2
    same = PrunedShiftedWindowAttention.from_attention(shifted, keep=[0, 1]).eval()
    h = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(h), shifted(h), rtol=1e-5, atol=1e-6)
    pruned = torchslim.apply(model, _heads(0.5, scope="layer"))
    atts = [blk.attn for i in (1, 3) for blk in pruned.features[i]]
    assert [a.num_heads for a in atts] == [1, 1, 2, 2]
    assert [tuple(a.relative_position_bias_table.shape) for a in atts] == [(49, 1), (49, 1), (49, 2), (49, 2)]
    ref = copy.deepcopy(model)
    for i in (1, 3):
        for blk in ref.features[i]:
            a = blk.attn
            w = _l1_per_head(list(a.qkv.weight.chunk(3)), a.proj.weight, a.num_heads)
            _zero_columns(a.proj.weight, _lowest(w, a.num_heads // 2), a.num_heads)
    with torch.no_grad():
        out = pruned(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    assert count_macs(pruned, (x[:1],)) < count_macs(model, (x[:1],))
    back = _reload(pruned, tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(back(x), out)


@pytest.mark.slow
def test_vit_b_16_loses_a_quarter_of_its_heads_and_runs():
    """The full-size torchvision ViT-B/16 (86M parameters; 32x32 inputs keep the forward cheap):
    36 of its 144 heads go, at least one stays in each of the 12 layers (about 5 s of CPU)."""
    torch.manual_seed(0)
    model = torchslim.build_model("torchvision:vit_b_16", args={"image_size": 32, "num_classes": 10}).eval()
    pruned = torchslim.apply(model, _heads(0.25))
    heads = [b.self_attention.num_heads for b in pruned.encoder.layers]
    assert sum(heads) == 108 and min(heads) >= 1
    with torch.no_grad():
        assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert count_params(model)[0] - count_params(pruned)[0] == 36 * (3 * (64 * 768 + 64) + 768 * 64)


def test_global_heads_compare_layers_by_their_mean_and_keep_one_each(caplog):
    """nn.TransformerEncoder of 2 layers, the second's weights x100: the global ranking divides
    each layer's scores by their mean, so 50% takes 2 heads from each layer; at 75% the ranking
    would empty the first layer, which keeps one head and warns."""
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER).eval()
    with torch.no_grad():
        for p in model.encoder.layers[1].self_attn.parameters():
            p.mul_(100.0)
    pruned = torchslim.apply(model, _heads(0.5))
    assert [lay.self_attn.num_heads for lay in pruned.encoder.layers] == [2, 2]
    ids = torch.randint(0, 2048, (2, 12))
    with torch.no_grad():
        assert pruned(ids).shape == (2, 5)       # nn.TransformerEncoderLayer runs its plain path
    with torch.no_grad():  # layer 0: four equal heads (1, 1, 1, 1); layer 1: heads 0, 1 zero (0, 0, 2, 2)
        a0, a1 = model.encoder.layers[0].self_attn, model.encoder.layers[1].self_attn
        a0.in_proj_weight.fill_(0.1), a0.out_proj.weight.fill_(0.1)
        a1.in_proj_weight.view(3, 32, 32)[:, :16] = 0.0
        a1.out_proj.weight[:, :16] = 0.0
    with caplog.at_level(logging.WARNING):
        pruned = torchslim.apply(model, _heads(0.75))
    assert [lay.self_attn.num_heads for lay in pruned.encoder.layers] == [1, 1]
    assert "keeps at least one" in caplog.text


# -- layers ---------------------------------------------------------------------------------
def _mean_abs(block: nn.Module) -> float:
    ws = [p.detach() for n, p in block.named_parameters() if n.endswith("weight") and p.dim() >= 2]
    return float(sum(w.abs().sum() for w in ws) / sum(w.numel() for w in ws))


def test_resnet18_drops_the_residual_blocks_of_least_mean_weight(tmp_path):
    """resnet18 has 4 droppable blocks (layerN.1; layerN.0 downsamples). Dropping a BasicBlock
    computes what zeroing its last BatchNorm computes: relu(0 + x) = x after a ReLU."""
    torch.manual_seed(0)
    model = torchslim.build_model("torchvision:resnet18", args={"num_classes": 10}).eval()
    with torch.no_grad():
        for i, f in zip(range(1, 5), (1.0, 0.2, 3.0, 0.5)):  # an order the stages would not have
            for p in getattr(model, f"layer{i}")[1].parameters():
                p.mul_(f)
    means = torch.tensor([_mean_abs(getattr(model, f"layer{i}")[1]) for i in range(1, 5)])
    gone = _lowest(means, 2)
    pruned = torchslim.apply(model, MagnitudePruneConfig(granularity="layer", sparsity=0.5))
    assert [len(getattr(pruned, f"layer{i}")) for i in range(1, 5)] == [1 if i - 1 in gone else 2 for i in range(1, 5)]
    ref = copy.deepcopy(model)
    for i in gone:
        bn = getattr(ref, f"layer{i + 1}")[1].bn2
        with torch.no_grad():
            bn.weight.zero_(), bn.bias.zero_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = pruned(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    dropped = sum(count_params(getattr(model, f"layer{i + 1}")[1])[0] for i in gone)
    assert count_params(model)[0] - count_params(pruned)[0] == dropped
    back = _reload(pruned, tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(back(x), out)


def test_bert_layers_dropped_set_the_layer_count_and_reload(tiny_bert_dir, tmp_path):
    model = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    means = torch.tensor([_mean_abs(lay) for lay in model.encoder.layer])
    keep = [i for i in range(3) if i != _lowest(means, 1)[0]]
    pruned = torchslim.apply(model, MagnitudePruneConfig(granularity="layer", sparsity=0.34, scope="layer"))
    assert len(pruned.encoder.layer) == 2 and pruned.config.num_hidden_layers == 2
    for new, old in zip(pruned.encoder.layer, keep):
        assert torch.equal(new.output.dense.weight, model.encoder.layer[old].output.dense.weight)
    back = _reload(pruned, tmp_path / "b")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).last_hidden_state, pruned(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("spec,stacks", [(VIT, ["encoder.layers"]), (SWIN, ["features.1", "features.3"])])
def test_named_transformer_layers_are_dropped_and_reload(spec, stacks, tmp_path):
    """Layers named as targets are the candidates; sparsity 0.99 drops all of them. ViT blocks
    have names (encoder_layer_1), not numbers: the artifact deletes them by name."""
    torch.manual_seed(0)
    model = torchslim.build_model(spec, **({"args": {"layers": 3}} if spec == VIT else {})).eval()
    names = [f"{s}.{c}" for s in stacks for c in list(model.get_submodule(s)._modules)[1:]]
    pruned = torchslim.apply(model, MagnitudePruneConfig(granularity="layer", sparsity=0.99, targets=tuple(names)))
    assert [len(pruned.get_submodule(s)) for s in stacks] == [1] * len(stacks)
    x = torch.randn(2, 3, 32, 32)
    back = _reload(pruned, tmp_path / "l")
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    assert count_macs(pruned, (x[:1],)) < count_macs(model, (x[:1],))


def test_residual_blocks_of_a_flat_sequential_are_dropped_and_reload(tmp_path):
    """zoo:resnet-fmnist holds stem, blocks and head in one nn.Sequential: the blocks that keep their
    shape (no downsample: children 4, 6, 8 and 3, whose input is already 16 wide) are the candidates."""
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:resnet-fmnist").eval()
    candidates = [n for n, b in model.named_children() if getattr(b, "downsample", 1) is None]
    assert candidates == ["3", "4", "6", "8"]
    means = {n: torch.cat([p.detach().abs().flatten() for k, p in model.get_submodule(n).named_parameters()
                           if k.endswith("weight")]).mean() for n in candidates}   # magnitude: mean |w| of a layer
    lowest = sorted(candidates, key=lambda n: means[n])[:2]
    pruned = torchslim.apply(model, MagnitudePruneConfig(granularity="layer", sparsity=0.5))
    kept = [b for n, b in model.named_children() if n not in lowest]
    assert len(pruned) == len(model) - 2 and all(a is not b and type(a) is type(b) for a, b in zip(pruned, kept))
    for new, old in zip(pruned, kept):
        assert all(torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))
    x = torch.randn(2, 1, 28, 28)
    back = _reload(pruned, tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    assert count_macs(pruned, (x[:1],)) < count_macs(model, (x[:1],))


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity,model,says", [
    ("head", "zoo:digits-cnn", "no attention module found in Sequential"),
    ("layer", "zoo:digits-cnn", "no droppable layer found in Sequential"),
])
def test_head_or_layer_on_a_model_without_them_fails_the_dry_run(tmp_path, capsys, granularity, model, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\ntask: digits\nsteps:\n"
                      f"  - prune: {{method: magnitude, granularity: {granularity}, sparsity: 0.5}}\n")
    code = main(["compress", str(recipe), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "steps.0.prune" in err and says in err, err
    assert "searched for" in err and "Traceback" not in err


@pytest.mark.parametrize("granularity,model,task", [("layer", "torchvision:resnet18", "shape:3x32x32"),
                                                    ("head", ENCODER, "shape:12")])
def test_head_or_layer_where_they_exist_passes_the_dry_run(tmp_path, capsys, granularity, model, task):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: '{model}'\ntask: '{task}'\nsteps:\n"
                      f"  - prune: {{method: magnitude, granularity: {granularity}, sparsity: 0.5}}\n")
    assert main(["compress", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err


def test_head_targets_naming_a_linear_and_impossible_sparsity_are_refused():
    model = torchslim.build_model(ENCODER)
    with pytest.raises(RecipeError, match="'head' is a Linear, not an attention module"):
        torchslim.apply(model, _heads(targets=("head",)))
    with pytest.raises(RecipeError, match="at most 6 can go"):
        _heads(0.9).check_model(model)
    with pytest.raises(RecipeError, match="layer_sparsity: per-layer sparsity is available with granularity "
                                          "weight, channel and head only, not 'layer'"):
        MagnitudePruneConfig(granularity="layer", layer_sparsity={"encoder.layers.0": 0.5})


def test_layer_count_that_rounds_away_from_the_request_is_said():
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.session import Session

    model = torchslim.build_model("torchvision:resnet18", args={"num_classes": 10}).eval()
    session = Session()
    run_prune(model, MagnitudePruneConfig(granularity="layer", sparsity=0.1), session, "magnitude")
    assert [w["code"] for w in session.warnings] == ["layer_count"]
    assert "so 0 were dropped" in session.warnings[0]["message"]
    assert session.info["metrics"]["layers_dropped"] == []


def test_steps_after_a_layer_drop_are_not_checked_against_the_old_names():
    """Dropping a layer renumbers a ModuleList: a later step's targets name the model as it will
    be, so preflight leaves them to the run (CHANGES_NAMES), as it does after any renaming step."""
    from torchslim.pipeline import preflight
    from torchslim.recipe import Recipe

    assert MagnitudePruneConfig(granularity="layer").CHANGES_NAMES
    assert not MagnitudePruneConfig(granularity="channel").CHANGES_NAMES
    steps = [{"prune": {"method": "magnitude", "granularity": "layer", "sparsity": 0.5}},
             {"prune": {"method": "magnitude", "targets": ["layer9.0.conv1"]}}]
    recipe = Recipe.from_dict({"model": {"spec": "torchvision:resnet18", "args": {"num_classes": 10}},
                               "task": "shape:3x32x32", "steps": steps})
    preflight(recipe)   # the same second step alone is refused at once:
    with pytest.raises(RecipeError, match="layer9"):
        preflight(Recipe.from_dict({"model": {"spec": "torchvision:resnet18", "args": {"num_classes": 10}},
                                    "task": "shape:3x32x32", "steps": steps[1:]}))


def test_head_pruning_log_gives_removed_and_kept_counts(caplog):
    """The summary line counts the removed heads and lists what each module keeps."""
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER).eval()
    before = sum(lay.self_attn.num_heads for lay in model.encoder.layers)
    with caplog.at_level(logging.INFO, logger="torchslim.methods.prune.heads"):
        pruned = torchslim.apply(model, _heads(0.5))
    kept = {f"encoder.layers.{i}.self_attn": lay.self_attn.num_heads for i, lay in enumerate(pruned.encoder.layers)}
    line = next(r.getMessage() for r in caplog.records if "head pruning:" in r.getMessage())
    assert f"{before - sum(kept.values())} of {before} heads removed" in line
    assert line.endswith("heads kept per module: " + ", ".join(f"{n} {k}" for n, k in kept.items())), line
