"""Head and layer pruning on data and in rounds: the activation and entropy criteria for heads
(a head's slice of the attention output before the output projection) and layers (the mean
|output - input| of a residual layer), checked against the attention and the layers computed
by hand; iterative and gradual schedules for heads and layers (rounds counted through
``session.train``, the artifact reloaded); ``layer_sparsity`` per attention module.
The handlers are called directly, so the rounds can be counted."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.errors import RecipeError
from torchslim.methods.prune.activation import ActivationPruneConfig
from torchslim.methods.prune.criteria import bind, get_criterion
from torchslim.methods.prune.entropy import EntropyPruneConfig
from torchslim.methods.prune.heads import (attention_sites, drop_layers, head_activations, head_group, layer_score,
                                           prune_heads)
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.session import Session

ASSETS = Path(__file__).parent / "assets"
ATTENTION = f"py:{ASSETS / 'attention_models.py'}:digits_attention"
ENCODER = f"py:{ASSETS / 'attention_models.py'}:digits_encoder"
FINETUNE = {"epochs": 1, "lr": 0.01, "batch_size": 128}


class _Counting(Session):
    """A session recording each fine-tuning: its ``desc``, epochs and the model's heads per
    attention module (or layers) when it started."""

    def train(self, model, config, *, desc, **kw):
        heads = [s.heads for s in attention_sites(model)]
        self.rounds = [*getattr(self, "rounds", []), (desc, config.epochs, heads, len(model.encoder.layers))]
        return super().train(model, config, desc=desc, **kw)


def _context(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention output before the output projection, by hand: x (N, T, E), packed q/k/v weight
    w (3E', E) and bias b; returns (N, T, heads, d), softmax(q k^T / sqrt(d)) v per head."""
    q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(w.chunk(3), b.chunk(3)))
    n, t, inner = q.shape
    d = inner // heads
    q, k, v = (z.view(n, t, heads, d).transpose(1, 2) for z in (q, k, v))      # (N, h, T, d)
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
    return (att @ v).transpose(1, 2)                                            # (N, T, h, d)


def _entropy(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Shannon entropy (nats) of each column's histogram over its own range, with numpy."""
    out = []
    for col in values.double().numpy().T:
        counts, _ = np.histogram(col, bins=bins, range=(col.min(), col.max()))
        p = counts[counts > 0] / len(col)
        out.append(float(-(p * np.log(p)).sum()))
    return torch.tensor(out)


# -- heads: activation and entropy ----------------------------------------------------------
def test_head_activation_apoz_and_entropy_scores_are_those_of_the_attention_output(digits_task):
    """DigitsAttention (one 4-head nn.MultiheadAttention over 8 row tokens): each head's slice of
    softmax(q k^T / sqrt(d)) v, computed by hand on the 96 calibration examples, gives mean |x|
    (activation), 1 - fraction <= 0 (apoz) and the entropy of the per-example mean |x| (numpy
    histogram); 50% keeps the two heads of largest mean |x|, weights copied."""
    torch.manual_seed(3)
    model = torchslim.build_model(ATTENTION).eval()
    session = Session(task=digits_task)
    xs = torch.cat([b[0] for b in session.calibration_batches(96)])
    att = model.att
    with torch.no_grad():
        ctx = _context(model.embed(xs[:, 0]), att.in_proj_weight, att.in_proj_bias, 4)    # (96, 8, 4, 4)
    per_example = ctx.abs().mean(dim=(1, 3))                                               # (96, 4)
    site, = attention_sites(model)
    group = head_group(model, site, acts=head_activations(session, model, [site], 96)["att"])
    assert isinstance(model.att, nn.MultiheadAttention)                # the probe was put back
    torch.testing.assert_close(get_criterion("activation").fn(group), per_example.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bind("activation", statistic="apoz").fn(group),
                               1.0 - (ctx <= 0).float().mean(dim=(0, 1, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(bind("entropy", bins=8).fn(group), _entropy(per_example, 8).float(),
                               rtol=1e-5, atol=1e-5)
    kept = sorted(torch.sort(per_example.mean(0), descending=True).indices[:2].tolist())
    pruned = torchslim.apply(model, ActivationPruneConfig(granularity="head", sparsity=0.5, samples=96),
                             task=digits_task)
    assert pruned.att.num_heads == 2
    torch.testing.assert_close(pruned.att.q_proj.weight, torch.cat([att.in_proj_weight[h * 4:(h + 1) * 4]
                                                                    for h in kept]).detach())


@pytest.fixture(scope="module")
def tiny_bert():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32)).eval()


class _Tokens:
    """Just what calibration reads of a task: the model's output on a batch of token ids."""

    spec = "tokens"

    def forward(self, model, batch):
        return model(input_ids=batch[0]).last_hidden_state

    def targets(self, batch):
        return batch[0][:, 0]


class _TokenSession(Session):
    def calibration_batches(self, samples=128, **kw):
        torch.manual_seed(1)
        ids = torch.randint(0, 120, (samples, 9))
        return [(ids[i:i + 4],) for i in range(0, samples, 4)]


def test_bert_head_activations_are_its_context_before_output_dense(tiny_bert):
    """Hugging Face BERT: the hook on ``attention.output.dense`` reads the context layer; here it is
    recomputed from the self-attention's input and its query/key/value Linears (no padding, so
    no mask), and each head's per-example mean |x| matches."""
    model = tiny_bert
    session = _TokenSession(task=_Tokens())
    inputs = {}
    hooks = [lay.attention.self.register_forward_hook(
        lambda m, args, kwargs, out, i=i: inputs.setdefault(i, []).append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, lay in enumerate(model.encoder.layer)]
    with torch.no_grad():
        for (ids,) in session.calibration_batches(8):
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    sites = attention_sites(model)
    got = head_activations(session, model, sites, 8)
    for i, site in enumerate(sites):
        a = model.encoder.layer[i].attention.self
        w = torch.cat([a.query.weight, a.key.weight, a.value.weight])
        b = torch.cat([a.query.bias, a.key.bias, a.value.bias])
        with torch.no_grad():
            ctx = _context(torch.cat(inputs[i]), w, b, 4)                          # (8, 9, 4, 8)
        torch.testing.assert_close(got[site.name][0], ctx.abs().mean(dim=(1, 3)), rtol=1e-5, atol=1e-6)


class _Images:
    spec = "images"

    def forward(self, model, batch):
        return model(batch[0])

    def targets(self, batch):
        return batch[0][:, 0, 0, 0]


class _ImageSession(Session):
    """Calibration on 6 random 32x32 images, in batches of ``size``."""

    size = 3

    def calibration_batches(self, samples=128, **kw):
        images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return [(images[i:i + self.size],) for i in range(0, 6, self.size)]


def test_swin_head_activations_are_per_image_whatever_the_batch():
    """Swin's projection sees (B * windows, tokens, heads * d); each image's windows are grouped
    back into its own row of statistics, so batches of 3 give what 6 batches of 1 give (a grouping
    that mixed the images of a batch would not). Each head's mean |x| over every window and token
    is the mean of its per-window figures."""
    torch.manual_seed(0)
    model = torchslim.build_model(f"py:{ASSETS / 'attention_models.py'}:small_swin").eval()
    sites = attention_sites(model)
    got = head_activations(_ImageSession(task=_Images()), model, sites, 6)
    one = _ImageSession(task=_Images())
    one.size = 1
    alone = head_activations(one, model, sites, 6)
    assert all(type(model.get_submodule(s.name)).__name__ == "ShiftedWindowAttention" for s in sites)
    for s in sites:
        assert got[s.name][0].shape == (6, s.heads)
        torch.testing.assert_close(got[s.name][0], alone[s.name][0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[s.name][0][0], got[s.name][0][1])      # images do differ


# -- layers: the residual update ------------------------------------------------------------
class _Pairs:
    """Digits with each example run as two rows (itself twice), as STS-B runs a sentence pair."""

    spec = "pairs"

    def __init__(self, task):
        self.task = task

    def __getattr__(self, name):
        return getattr(self.task, name)

    def forward(self, model, batch):
        return model(batch[0].repeat_interleave(2, dim=0))


def test_layer_activation_is_the_mean_residual_update_and_drops_the_smallest(digits_task):
    """DigitsEncoder (3 nn.TransformerEncoderLayers): each layer's mean |output - input| over the
    64 calibration examples, from the layers called one after another by hand (and the same when
    each example runs as two rows); the smallest is dropped, num_layers follows, and the others
    keep their weights."""
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER).eval()
    with torch.no_grad():                      # make the layers differ clearly in how much they change
        for lay, f in zip(model.encoder.layers, (1.0, 0.05, 1.0)):
            lay.linear2.weight.mul_(f), lay.self_attn.out_proj.weight.mul_(f)
    session = Session(task=digits_task)
    xs = torch.cat([b[0] for b in session.calibration_batches(64)])
    updates = []
    with torch.no_grad():
        h = model.embed(xs[:, 0])
        for lay in model.encoder.layers:
            y = lay(h)
            updates.append(float((y - h).abs().mean()))
            h = y
    from torchslim.methods.prune.stats import collect_updates
    names = [f"encoder.layers.{i}" for i in range(3)]
    got = collect_updates(session, model, names, 64)
    pairs = collect_updates(Session(task=_Pairs(digits_task)), model, names, 64)
    for n in names:     # each example's two rows are one example: the same figures
        torch.testing.assert_close(pairs[n], got[n], rtol=1e-5, atol=1e-7)
    entry = get_criterion("activation")
    scores = [layer_score(entry, model, n, update=got[n]) for n in names]
    assert scores == pytest.approx(updates, rel=1e-5)
    gone = int(np.argmin(updates))
    pruned = torchslim.apply(model, ActivationPruneConfig(granularity="layer", sparsity=0.34, samples=64),
                             task=digits_task)
    assert len(pruned.encoder.layers) == 2 and pruned.encoder.num_layers == 2
    for new, old in zip(pruned.encoder.layers, [i for i in range(3) if i != gone]):
        assert torch.equal(new.linear1.weight, model.encoder.layers[old].linear1.weight)


def test_layer_apoz_and_entropy_are_refused_with_a_reason():
    model = torchslim.build_model(ENCODER)
    with pytest.raises(RecipeError, match="residual update"):
        ActivationPruneConfig(granularity="layer", statistic="apoz").check_model(model)
    with pytest.raises(RecipeError, match="criterion 'entropy' scores channel, head, not 'layer'"):
        EntropyPruneConfig(granularity="layer")


# -- schedules ------------------------------------------------------------------------------
def _reloads(pruned: nn.Module, tmp_path: Path) -> None:
    torchslim.save(pruned, tmp_path / "a")
    back = torchslim.load(tmp_path / "a", trust_code=True).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), pruned.eval()(x))


@pytest.mark.parametrize("schedule,epochs,rounds", [
    # iterative: (1 - 0.75) ** (r / 2) kept -> 50% then 75% of each layer's 4 heads gone; each
    # round fine-tuned for all of finetune's epochs
    ("iterative", 1, [("prune-round1", 1, [2, 2, 2]), ("prune-round2", 1, [1, 1, 1])]),
    # gradual, 3 updates over 3 epochs: cubic ramp 0.53, 0.72, 0.75 (Zhu & Gupta) of 4 heads,
    # an epoch after each
    ("gradual", 3, [("prune-gradual1", 1, [2, 2, 2]), ("prune-gradual2", 1, [1, 1, 1]),
                    ("prune-gradual3", 1, [1, 1, 1])]),
])
def test_head_schedules_prune_in_rounds_between_fine_tunings(digits_task, tmp_path, schedule, epochs, rounds):
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER)
    config = MagnitudePruneConfig(granularity="head", sparsity=0.75, scope="layer",
                                  finetune={**FINETUNE, "epochs": epochs}, schedule=schedule, iterations=2,
                                  updates=3, ramp=1.0)
    session = _Counting(task=digits_task)
    pruned = prune_heads(model, config, session, get_criterion("magnitude"))
    assert session.rounds == [(d, e, h, 3) for d, e, h in rounds]
    assert [s.heads for s in attention_sites(pruned)] == [1, 1, 1]
    assert session.info["metrics"]["heads_kept"] == {f"encoder.layers.{i}.self_attn": 1 for i in range(3)}
    _reloads(pruned, tmp_path)


def test_iterative_layer_dropping_names_the_layers_as_they_were(digits_task, tmp_path):
    """4 layers, 75% in 2 iterative rounds: 2 then 3 gone (each stack keeps one); the second
    round's names are of the renumbered list, the row's of the original one."""
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER, args={"layers": 4})
    original = {id(m): f"encoder.layers.{i}" for i, m in enumerate(model.encoder.layers)}
    config = MagnitudePruneConfig(granularity="layer", sparsity=0.75, finetune=FINETUNE, schedule="iterative",
                                  iterations=2)
    session = _Counting(task=digits_task)
    pruned = drop_layers(model, config, session, get_criterion("magnitude"))
    assert [(d, n) for d, _, _, n in session.rounds] == [("prune-round1", 2), ("prune-round2", 1)]
    left = original[id(pruned.encoder.layers[0])]
    assert sorted(session.info["metrics"]["layers_dropped"]) == sorted(set(original.values()) - {left})
    assert pruned.encoder.num_layers == 1
    _reloads(pruned, tmp_path)


# -- layer_sparsity per attention module ----------------------------------------------------
def test_layer_sparsity_sets_one_attention_module_and_the_others_share_the_rest():
    """Module 0 at 75% loses 3 of its 4 heads by its own ranking; the other two share 50% of
    their 8 heads under one global ranking of mean-normalised magnitudes, by hand here."""
    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER).eval()
    ref = copy.deepcopy(model)
    l1 = []
    for lay in model.encoder.layers:
        a = lay.self_attn
        w, o = a.in_proj_weight.detach().abs(), a.out_proj.weight.detach().abs()
        l1.append(torch.tensor([float(sum(w[p * 16 + h * 4:p * 16 + (h + 1) * 4].sum() for p in range(3))
                                      + o[:, h * 4:(h + 1) * 4].sum()) for h in range(4)]))
    shared = torch.cat([s / s.mean() for s in l1[1:]])
    gone = set(torch.sort(shared, stable=True).indices[:4].tolist())
    want = [1] + [4 - sum(4 * i + h in gone for h in range(4)) for i in range(2)]
    config = MagnitudePruneConfig(granularity="head", sparsity=0.5,
                                  layer_sparsity={"encoder.layers.0.self_attn": 0.75})
    config.check_model(model)                                # preflight feasible with the override
    pruned = prune_heads(model, config, Session(), get_criterion("magnitude"))
    assert [s.heads for s in attention_sites(pruned)] == want
    kept0 = sorted(torch.sort(l1[0], descending=True).indices[:1].tolist())
    torch.testing.assert_close(pruned.encoder.layers[0].self_attn.q_proj.weight,
                               ref.encoder.layers[0].self_attn.in_proj_weight[kept0[0] * 4:(kept0[0] + 1) * 4])
    bad = MagnitudePruneConfig(granularity="head", layer_sparsity={"re:.*linear1": 0.5})
    with pytest.raises(RecipeError, match="matches none of the attention modules"):
        prune_heads(ref, bad, Session(), get_criterion("magnitude"))


# -- ratios: sensitivity for heads ----------------------------------------------------------
def test_ratios_sensitivity_for_heads_meets_the_measured_macs_budget(digits_task):
    """Head curves record what each point removed; the plan for the MACs the uniform 50% plan
    removes is pruned on a copy and measured, and the step removes that much."""
    from torchslim.measure import count_macs
    from torchslim.methods.prune import sensitivity
    from torchslim.methods.prune.dispatch import run_prune
    from torchslim.train import TrainConfig, train

    torch.manual_seed(0)
    model = torchslim.build_model(ENCODER)
    train(model, digits_task, TrainConfig(optimizer="adamw", epochs=4, lr=0.01, loggers=()))
    x = digits_task.example_inputs(1)
    dense = count_macs(model, x)
    data = sensitivity.analyze(model, digits_task, MagnitudePruneConfig(granularity="head"), points=(0.25, 0.5, 0.75))
    assert set(data["layers"]) == {f"encoder.layers.{i}.self_attn" for i in range(3)} and "model" in data
    for row in data["layers"].values():  # a head of 4 (of 16 wide) at 8 tokens: its q, k, v, out slices at least
        assert row["removed"][0][2] >= 4 * 16 * 4 * 8
    uniform = torchslim.apply(model, MagnitudePruneConfig(granularity="head", sparsity=0.5, scope="layer"),
                              task=digits_task)
    target = 1 - count_macs(uniform, x) / dense
    session = Session(task=digits_task)
    cfg = MagnitudePruneConfig(granularity="head", sparsity=target, budget="macs", ratios="sensitivity")
    planned = run_prune(copy.deepcopy(model), cfg, session, "magnitude")
    got = 1 - count_macs(planned, x) / dense
    assert got == pytest.approx(target, abs=0.005)
    assert session.info["metrics"]["sensitivity_budget"]["measured"] == pytest.approx(got, abs=1e-6)
    assert sum(s.heads for s in attention_sites(planned)) == sum(s.heads for s in attention_sites(uniform))
