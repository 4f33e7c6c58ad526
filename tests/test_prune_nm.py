"""N:M semi-structured pruning: exact masks, the 2:4 pattern on a real model, storage, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import torchslim
from torchslim.artifact import artifact_size, encoded_bytes
from torchslim.encodings import ENCODINGS
from torchslim.errors import RecipeError
from torchslim.methods.prune.magnitude import MagnitudePruneConfig, _magnitude
from torchslim.measure import bits_per_nonzero
from torchslim.methods.prune.primitives import nm_mask
from torchslim.pipeline import StepContext
from torchslim.train import TrainConfig


def _brute_force_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m: the subset of n positions with the largest score sum, the lexicographically
    first one among equal sums (ties keep the earlier positions)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    flat = scores.reshape(-1).tolist()
    for start in range(0, len(flat), m):
        group = flat[start:start + m]
        best, best_sum = None, None
        for subset in itertools.combinations(range(m), n):
            total = sum(group[i] for i in subset)
            if best_sum is None or total > best_sum:
                best, best_sum = subset, total
        for i in best:
            keep[start + i] = True
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_nm_mask_matches_a_brute_force_reference(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randint(0, 4, (6, 4 * m), generator=g).float()   # many ties within groups
    keep = nm_mask(scores, n, m)
    assert keep.reshape(-1, m).sum(1).eq(n).all()
    assert torch.equal(keep, _brute_force_nm(scores, n, m))
    conv_scores = torch.rand(3, 2, 2, m, generator=g)                 # a conv weight: rows of 2*2*m
    assert torch.equal(nm_mask(conv_scores, n, m), _brute_force_nm(conv_scores, n, m))
    with pytest.raises(ValueError, match="groups of"):
        nm_mask(torch.rand(4, m + 1), n, m)


def test_2_4_on_lenet_keeps_the_two_largest_of_every_four_along_the_input():
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = StepContext()
    pruned = _magnitude(torchslim.apply(model, MagnitudePruneConfig(sparsity=0.0)),  # a copy
                        MagnitudePruneConfig(granularity="2:4"), ctx)
    for name in ("1", "3", "5"):
        w, w0 = pruned.get_submodule(name).weight, before[f"{name}.weight"]
        assert w.shape[1] % 4 == 0
        groups, groups0 = w.reshape(-1, 4), w0.reshape(-1, 4)       # 4 consecutive inputs of one output
        assert (groups != 0).sum(1).eq(2).all(), name
        kept = groups != 0
        assert torch.equal(groups[kept], groups0[kept])               # kept weights unchanged
        # every pruned weight is no larger than every kept one of its group
        lo_kept = groups0.abs().masked_fill(~kept, float("inf")).min(1).values
        hi_pruned = groups0.abs().masked_fill(kept, -1.0).max(1).values
        assert (hi_pruned <= lo_kept).all(), name
        assert not torch.signbit(w[w == 0]).any()                    # +0.0, not -0.0
    assert ctx.info["metrics"]["layer_sparsity"] == {"1": 0.5, "3": 0.5, "5": 0.5}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # input untouched


def test_2_4_artifact_is_smaller_than_its_bitmask_and_reloads_identically(tmp_path):
    torch.manual_seed(0)
    pruned = torchslim.apply(torchslim.build_model("zoo:lenet-300-100"), MagnitudePruneConfig(granularity="2:4"))
    size = torchslim.save(pruned, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    state = pruned.state_dict()
    nm_bytes = bitmask_bytes = groups = 0
    for name in ("1.weight", "3.weight", "5.weight"):
        assert manifest["tensors"][name]["encoding"] == "nm" and manifest["tensors"][name]["meta"] == {"n": 2, "m": 4}
        parts, _ = ENCODINGS["bitmask"].encode(state[name])
        bitmask_bytes += sum(p.numel() * p.element_size() for p in parts.values())
        g = state[name].numel() // 4
        nm_bytes += g * 2 * 4 + (g * 3 + 7) // 8                      # 2 fp32 values + a 3-bit rank a group
        groups += g
    assert manifest["format_version"] == 4
    assert nm_bytes < bitmask_bytes                                    # 67 bits a group against 68
    back = torchslim.load(tmp_path / "m")
    for k, v in state.items():
        assert torch.equal(back.state_dict()[k], v), k
    assert size == artifact_size(tmp_path / "m")
    # what measure() puts in the step's row
    assert bits_per_nonzero(pruned, encoded_bytes(tmp_path / "m")) == round(8 * nm_bytes / (2 * groups), 3)


def test_finetune_keeps_the_one_shot_2_4_masks(digits_task):
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")                   # conv 0: rows of 9, left dense
    oneshot = torchslim.apply(model, MagnitudePruneConfig(granularity="2:4"))
    cfg = MagnitudePruneConfig(granularity="2:4", finetune=TrainConfig(optimizer="adamw", epochs=1, lr=0.003,
                                                                       batch_size=256, loggers=()))
    tuned = torchslim.apply(model, cfg, task=digits_task)
    for name in ("2.weight", "6.weight", "9.weight"):
        w, w1 = tuned.get_parameter(name), oneshot.get_parameter(name)
        assert torch.equal(w == 0, w1 == 0), name                      # the one-shot masks, kept
        assert (w.reshape(-1, 4) != 0).sum(1).eq(2).all(), name
        assert not torch.equal(w, w1), name                            # while the kept weights trained


def test_rows_not_a_multiple_of_m_are_refused_when_named_and_skipped_when_matched():
    model = torchslim.build_model("zoo:lenet-5")                       # conv 0: 1x5x5 = rows of 25
    named = MagnitudePruneConfig(granularity="2:4", targets=("0", "2"))
    with pytest.raises(RecipeError, match=r"0\.weight has rows of 25 weights .*not a multiple of 4"):
        named.check_model(model)                                       # preflight, before any work
    with pytest.raises(RecipeError, match="rows of 25"):
        torchslim.apply(model, named)
    ctx = StepContext()
    pruned = _magnitude(torchslim.apply(model, MagnitudePruneConfig(sparsity=0.0)),
                        MagnitudePruneConfig(granularity="2:4"), ctx)
    assert [w["code"] for w in ctx.warnings] == ["nm_skipped"] and "0.weight (rows of 25)" in ctx.warnings[0]["message"]
    assert torch.equal(pruned[0].weight, model[0].weight)              # left dense
    assert (pruned[2].weight.reshape(-1, 4) != 0).sum(1).eq(2).all()   # 20*5*5 = 500 per filter
    with pytest.raises(RecipeError, match="no targeted weight"):
        MagnitudePruneConfig(granularity="2:4", targets=("re:0",)).check_model(model)


@pytest.mark.parametrize("fields,match", [
    ({"granularity": "1:4", "sparsity": 0.6}, "fixes sparsity at 0.75"),
    ({"granularity": "2:4", "schedule": "gradual", "finetune": {"epochs": 1}}, "prunes one-shot"),
    ({"granularity": "4:4"}, "0 < N < M"),
])
def test_bad_nm_configs_are_refused(fields, match):
    with pytest.raises(RecipeError, match=match):
        MagnitudePruneConfig.from_dict(fields)
    MagnitudePruneConfig(granularity="1:4", sparsity=0.75)           # the fixed value is accepted
