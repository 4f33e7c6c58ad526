"""Magnitude pruning: exact sparsity, the right weights removed, schedules, storage on disk."""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim
from torchslim.errors import RecipeError
from torchslim.methods.prune.magnitude import MagnitudePruneConfig
from torchslim.methods.prune.unstructured import GradualSchedule, MaskPlugin, run_schedule
from torchslim.methods.prune.primitives import cubic_sparsity, global_masks, layer_masks, topk_mask
from torchslim.train import TrainConfig


def test_topk_mask_removes_exactly_the_smallest():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.0, 0.0, 1.0, 4.0])
    keep = topk_mask(scores, 0.5)
    assert keep.tolist() == [False, True, False, True, False, False, True, True]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_global_masks_exact_count_with_ties(sparsity):
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 5, (37, 11), generator=g).float(), torch.zeros(100)]  # many ties
    masks = global_masks(scores, sparsity)
    n = sum(s.numel() for s in scores)
    removed = sum(int((~m).sum()) for m in masks)
    assert removed == round(sparsity * n)
    # every removed score <= every kept score (the global threshold)
    flat_s = torch.cat([s.reshape(-1) for s in scores])
    flat_m = torch.cat([m.reshape(-1) for m in masks])
    if 0 < removed < n:
        assert flat_s[~flat_m].max() <= flat_s[flat_m].min()


def test_layer_masks_same_sparsity_each_layer():
    scores = [torch.rand(50, 20), torch.rand(10, 10)]
    masks = layer_masks(scores, 0.7)
    assert [int((~m).sum()) for m in masks] == [700, 70]


def test_cubic_schedule_reference_values():
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3, hand-computed
    assert cubic_sparsity(0, 100, 0.9, 0.1) == pytest.approx(0.1)
    assert cubic_sparsity(50, 100, 0.9, 0.1) == pytest.approx(0.9 + (0.1 - 0.9) * 0.125)
    assert cubic_sparsity(100, 100, 0.9, 0.1) == pytest.approx(0.9)
    assert cubic_sparsity(150, 100, 0.9) == pytest.approx(0.9)
    vals = [cubic_sparsity(t, 20, 0.8) for t in range(21)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def _linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_oneshot_sparsity_exact_and_input_untouched(scope):
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")
    before = copy.deepcopy(model.state_dict())
    pruned = torchslim.apply(model, MagnitudePruneConfig(sparsity=0.8, scope=scope))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input changed: {k}"
    ws = _linear_weights(pruned)
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.8 * total) if scope == "global" else zeros == sum(round(0.8 * w.numel()) for w in ws)
    # the kept weights are the largest ones and are unchanged
    for w_new, w_old in zip(ws, _linear_weights(model)):
        kept = w_new != 0
        assert torch.equal(w_new[kept], w_old[kept])
        if scope == "layer":
            assert w_old[~kept].abs().max() <= w_old[kept].abs().min()


def test_targets_and_ignore_respected():
    model = torchslim.build_model("zoo:lenet-300-100")
    pruned = torchslim.apply(model, MagnitudePruneConfig(sparsity=0.5, targets=("re:[13]",), ignore=("3",)))
    assert float((pruned[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert int((pruned[3].weight == 0).sum()) == 0
    assert int((pruned[5].weight == 0).sum()) == 0


def test_unmatched_target_is_an_error_with_nearest_names():
    model = torchslim.build_model("zoo:lenet-5")
    with pytest.raises(RecipeError, match="matches no module"):
        torchslim.apply(model, MagnitudePruneConfig(sparsity=0.5, targets=("fc1",)))
    # a re: pattern found inside names but matching none whole: said, with the pattern that would
    with pytest.raises(RecipeError, match=r"matches no whole module name \(it is found inside '3.conv1'.* write 're:\.\*conv1\.\*'"):
        torchslim.apply(torchslim.build_model("zoo:resnet-fmnist"),
                        MagnitudePruneConfig(sparsity=0.5, targets=("re:conv1",)))


def test_apply_with_a_mapping_instead_of_a_config_says_how_to_build_one():
    with pytest.raises(RecipeError, match=r"apply takes a method config, got dict: .*from_dict"):
        torchslim.apply(torchslim.build_model("zoo:lenet-5"), {"method": "magnitude", "sparsity": 0.5})


@pytest.mark.parametrize("bad", [dict(sparsity=1.5), dict(sparsity=-0.1), dict(scope="globl"),
                                 dict(schedule="gradual"), dict(granularity="2:4x")])
def test_bad_configs_raise(bad):
    with pytest.raises(RecipeError):
        MagnitudePruneConfig(**bad)


def test_did_you_mean_on_bad_choice():
    with pytest.raises(RecipeError, match="did you mean 'global'"):
        MagnitudePruneConfig(scope="globl")


@pytest.mark.parametrize("schedule", ["oneshot", "gradual", "iterative"])
def test_schedules_with_finetune_keep_accuracy(schedule, trained_digits, digits_task):
    base_acc = digits_task.evaluate(trained_digits)
    cfg = MagnitudePruneConfig(sparsity=0.75, schedule=schedule, iterations=2,
                               finetune=TrainConfig(optimizer="adamw", epochs=2, lr=0.001, loggers=()))
    pruned = torchslim.apply(trained_digits, cfg, task=digits_task)
    ws = _linear_weights(pruned)
    assert sum(int((w == 0).sum()) for w in ws) == round(0.75 * sum(w.numel() for w in ws))
    acc = digits_task.evaluate(pruned)
    assert acc >= base_acc - 0.03, (schedule, base_acc, acc)


def test_sparse_weights_are_stored_sparsely(tmp_path):
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")
    dense_bytes = torchslim.save(model, tmp_path / "dense")
    pruned = torchslim.apply(model, MagnitudePruneConfig(sparsity=0.9))
    sparse_bytes = torchslim.save(pruned, tmp_path / "sparse")
    # bitmask (1/32 of fp32) + 10% of the values: well under a quarter of the dense size
    assert sparse_bytes < 0.2 * dense_bytes, (dense_bytes, sparse_bytes)
    back = torchslim.load(tmp_path / "sparse")
    for k, v in pruned.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


class _Interrupt(Exception):
    pass


def test_gradual_pruning_resumes_bit_exactly(trained_digits, digits_task, tmp_path):
    """Regression: after a resume the gradual schedule kept applying the masks computed before
    fine-tuning until its next update, so a resumed run ended with other weights."""
    from torchslim.pipeline import StepContext

    class CrashingContext(StepContext):
        crash_at: int | None = None

        def train(self, model, config, *, callbacks=None, **kw):
            def crash(m, step, total):
                if step == self.crash_at:
                    raise _Interrupt
            return super().train(model, config, callbacks=[*(callbacks or []), crash], **kw)

    cfg = MagnitudePruneConfig(sparsity=0.8, schedule="gradual", updates=7,
                               finetune=TrainConfig(optimizer="adamw", epochs=4, lr=0.002, loggers=()))
    entry = torchslim.list_methods("prune.magnitude")[0]

    def run(workdir, crash_at=None):
        ctx = CrashingContext(task=digits_task, workdir=workdir)
        ctx.crash_at = crash_at
        return entry.handler(copy.deepcopy(trained_digits), cfg, ctx)

    straight = run(tmp_path / "a")
    with pytest.raises(_Interrupt):
        run(tmp_path / "b", crash_at=2 * 19 + 5)        # 19 steps per epoch: in epoch 3, mid-ramp
    resumed = run(tmp_path / "b")
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k



def test_gradual_with_early_stopping_is_refused():
    """Regression: early stopping restored a dense early epoch, then the final prune jumped to
    full sparsity without fine-tuning (accuracy 0.96 -> 0.39)."""
    with pytest.raises(RecipeError, match="early_stopping"):
        MagnitudePruneConfig(sparsity=0.9, schedule="gradual", finetune=TrainConfig(epochs=3, early_stopping=2))
    MagnitudePruneConfig(sparsity=0.9, schedule="iterative", finetune=TrainConfig(epochs=3, early_stopping=2))


def test_global_pruning_ranks_a_tied_weight_once(tmp_path):
    """Regression (first-use report): two Linear layers sharing one weight had it ranked twice
    beside the model's other weights, so global 50% removed 1,757 of 3,392 unique weights instead
    of 1,696: exactly half of the unique weights go, and the tie holds."""
    from torchslim.measure import count_params

    (tmp_path / "tied.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)\n"
        "        self.b.weight = self.a.weight\n"
        "    def forward(self, x):\n"
        "        return self.head(self.b(torch.relu(self.a(x))))\n"
        "def build():\n"
        "    return M()\n")
    torch.manual_seed(0)
    m = torchslim.build_model(f"py:{tmp_path / 'tied.py'}:build")
    pruned = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.5, scope="global", targets=("a", "b", "head")))
    assert pruned.a.weight is pruned.b.weight
    unique = pruned.a.weight.numel() + pruned.head.weight.numel()            # 1024 + 2048
    removed = int((pruned.a.weight == 0).sum()) + int((pruned.head.weight == 0).sum())
    assert removed == unique // 2
    params, nonzero = count_params(pruned)
    assert params == count_params(m)[0] and params - nonzero == unique // 2


def test_global_pruning_reports_and_can_cap_a_collapsing_layer(caplog):
    """Regression (first-use report): global 80% left 7 of 16,384 weights in one layer and the log
    said only "3 layers at 80.0%". Per-layer sparsity is logged and recorded, a layer losing >= 99%
    is warned about, and max_layer_sparsity caps it while the total stays exact."""
    import logging

    from torchslim.pipeline import StepContext

    torch.manual_seed(0)
    m = torchslim.build_model("zoo:lenet-300-100")
    with torch.no_grad():
        m[3].weight.mul_(1e-3)                      # a layer of small weights: global ranking strips it
    names = ["1", "3", "5"]
    total = sum(m.get_submodule(n).weight.numel() for n in names)

    ctx = StepContext()
    with caplog.at_level(logging.INFO, logger="torchslim"):
        torchslim.methods.prune.magnitude._magnitude(copy.deepcopy(m), MagnitudePruneConfig(sparsity=0.8), ctx)
    layers = ctx.info["metrics"]["layer_sparsity"]
    assert set(layers) == set(names) and layers["3"] >= 0.99
    assert any("removed" in r.message and "layer 3" in r.message for r in caplog.records if r.levelname == "WARNING")
    assert "3 100.0%" in caplog.text or "3 99." in caplog.text
    # recorded for the step's row (the report's banner), not only logged
    assert [w["code"] for w in ctx.warnings] == ["layer_collapse"] and "layer 3" in ctx.warnings[0]["message"]

    capped = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.8, max_layer_sparsity=0.9))
    zeros = {n: int((capped.get_submodule(n).weight == 0).sum()) for n in names}
    assert sum(zeros.values()) == round(0.8 * total)
    assert all(zeros[n] <= 0.9 * capped.get_submodule(n).weight.numel() for n in names)
    assert zeros["3"] == int(0.9 * capped.get_submodule("3").weight.numel())
    with pytest.raises(RecipeError, match="max_layer_sparsity"):
        torchslim.apply(m, MagnitudePruneConfig(sparsity=0.8, max_layer_sparsity=0.5))


def test_global_masks_with_a_cap_against_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(40, generator=g) * 0.01, torch.rand(100, generator=g), torch.rand(60, generator=g)]
    masks = global_masks(scores, 0.6, max_layer_sparsity=0.7)
    removed = [int((~mk).sum()) for mk in masks]
    assert sum(removed) == 120 and removed[0] == 28                 # capped at int(0.7 * 40)
    # the others lose exactly the 92 lowest of their pooled scores
    pooled = torch.cat(scores[1:])
    thresh = torch.sort(pooled).values[91]
    assert all(bool((s[~mk] <= thresh).all()) for s, mk in zip(scores[1:], masks[1:]))


# -- every weight tensor of a targeted module --------------------------------------------------
ASSETS = __import__("pathlib").Path(__file__).parent / "assets" / "architectures.py"
MIXED_WEIGHTS = ["embed.weight", "conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "up.weight", "head.weight"]


def _mixed(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")  # the py: test architecture is ours
    torch.manual_seed(0)
    return torchslim.build_model(f"py:{ASSETS}:mixed").eval()


def test_global_pruning_covers_every_weight_of_named_layers(monkeypatch):
    """Regression (replayed bug report): targets naming a Conv1d, ConvTranspose2d, Embedding and
    LSTM beside a Linear pruned only the Linear (sparsity 0.36 of their weights instead of 0.5)."""
    m = _mixed(monkeypatch)
    pruned = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.5, targets=("embed", "conv", "lstm", "up", "head")))
    new = dict(pruned.named_parameters())
    old = dict(m.named_parameters())
    total = sum(new[n].numel() for n in MIXED_WEIGHTS)
    assert sum(int((new[n] == 0).sum()) for n in MIXED_WEIGHTS) == total // 2
    assert all(int((new[n] == 0).sum()) > 0 for n in MIXED_WEIGHTS)       # each kind lost weights
    # one threshold over all of them: every removed magnitude <= every kept one
    removed = torch.cat([old[n][new[n] == 0].abs() for n in MIXED_WEIGHTS])
    kept = torch.cat([old[n][new[n] != 0].abs() for n in MIXED_WEIGHTS])
    assert removed.max() <= kept.min()
    for n in set(new) - set(MIXED_WEIGHTS):                                 # biases untouched
        assert torch.equal(new[n], old[n]), n
    # the LSTM's forward sees its pruned weights (it keeps flat views of them)
    fresh = torch.nn.LSTM(16, 16, batch_first=True)
    fresh.load_state_dict(pruned.lstm.state_dict())
    h = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(pruned.lstm(h)[0], fresh(h)[0], rtol=0, atol=0)


def test_patterns_pick_compute_layers_and_leave_embeddings(monkeypatch, caplog):
    """``re:.*`` prunes Linear, Conv, ConvTranspose and LSTM weights; the Embedding only when named."""
    import logging

    m = _mixed(monkeypatch)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        pruned = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.5, scope="layer"))
    for n in MIXED_WEIGHTS[1:]:
        w = pruned.get_parameter(n)
        assert int((w == 0).sum()) == round(0.5 * w.numel()), n
    assert int((pruned.embed.weight == 0).sum()) == int((m.embed.weight == 0).sum())   # padding row only
    assert "embed (Embedding)" in caplog.text                                # said, not silent
    both = torchslim.apply(m, MagnitudePruneConfig(sparsity=0.5, scope="layer", targets=("re:.*", "embed")))
    assert int((both.embed.weight == 0).sum()) == round(0.5 * m.embed.weight.numel())


@pytest.mark.parametrize("target,cls", [("encoder.layers.0.norm1", "LayerNorm"), ("encoder.layers.0", "TransformerEncoderLayer")])
def test_named_module_without_weights_is_refused(monkeypatch, target, cls):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    m = torchslim.build_model(f"py:{ASSETS}:encoder")
    with pytest.raises(RecipeError, match=f"'{target}' is a {cls}: it has no weight tensor"):
        torchslim.apply(m, MagnitudePruneConfig(sparsity=0.5, targets=("head", target)))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_transformer_encoder_layer_prunes_packed_in_proj(scope):
    """Regression: nn.MultiheadAttention's packed q/k/v ``in_proj_weight`` was never pruned."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    pruned = torchslim.apply(layer, MagnitudePruneConfig(sparsity=0.5, scope=scope))
    names = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    ws = [pruned.get_parameter(n) for n in names]
    zeros = [int((w == 0).sum()) for w in ws]
    if scope == "layer":
        assert zeros == [w.numel() // 2 for w in ws]
    else:
        assert sum(zeros) == sum(w.numel() for w in ws) // 2 and zeros[0] > 0
    assert float((pruned.norm1.weight == 0).float().mean()) == 0.0
    x = torch.randn(2, 5, 32)
    with torch.no_grad():                        # the fused inference path and the plain one agree
        fast = pruned(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = pruned(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


# -- per-layer sparsity (layer_sparsity: Han et al. 2015's per-layer rates) ------------------
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_layer_sparsity_prunes_each_named_layer_to_its_own_fraction(scope):
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")   # Linear layers 1 (784x300), 3, 5
    cfg = MagnitudePruneConfig(sparsity=0.6, scope=scope, layer_sparsity={"1": 0.92, "re:[15]": 0.74})
    pruned = torchslim.apply(model, cfg)
    zeros = {i: int((pruned[i].weight == 0).sum()) for i in (1, 3, 5)}
    # layer 1 by its exact name (the first key wins over the pattern), layer 5 by the pattern,
    # layer 3 alone under `sparsity`
    assert zeros == {1: round(0.92 * 235200), 3: round(0.6 * 30000), 5: round(0.74 * 1000)}
    for i in (1, 3, 5):  # each layer keeps its own largest weights, unchanged
        w_old, w_new = model[i].weight, pruned[i].weight
        kept = w_new != 0
        assert torch.equal(w_new[kept], w_old[kept])
        assert w_old[~kept].abs().max() <= w_old[kept].abs().min()


def test_layer_sparsity_global_threshold_is_shared_by_the_other_layers_only():
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-5")   # conv 0, conv 2, linear 5, linear 7
    pruned = torchslim.apply(model, MagnitudePruneConfig(sparsity=0.9, layer_sparsity={"0": 0.34}))
    assert int((pruned[0].weight == 0).sum()) == round(0.34 * 500)
    rest_old = torch.cat([model[i].weight.reshape(-1) for i in (2, 5, 7)])
    rest_new = torch.cat([pruned[i].weight.reshape(-1) for i in (2, 5, 7)])
    kept = rest_new != 0
    assert int((~kept).sum()) == round(0.9 * rest_old.numel())
    assert rest_old[~kept].abs().max() <= rest_old[kept].abs().min()


class _RecordRounds:
    """A session whose fine-tuning only records each layer's zeros (the schedule, without training)."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []

    def train(self, model, config, desc="", sub=None, plugins=()):
        self.rounds.append([int((model[i].weight == 0).sum()) for i in (1, 3, 5)])


def test_layer_sparsity_iterative_rounds_take_each_layer_to_its_target():
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")
    cfg = MagnitudePruneConfig(sparsity=0.9, schedule="iterative", iterations=3, scope="layer",
                               layer_sparsity={"1": 0.92, "5": 0.74}, finetune=TrainConfig(epochs=1, loggers=()))
    names = ["1.weight", "3.weight", "5.weight"]
    masker = MaskPlugin(names, cfg.scope, fixed=cfg.sparsity_of(names))
    session = _RecordRounds()
    run_schedule(model, cfg, session, masker)
    # after round r of 3 a layer keeps (1 - s) ** (r / 3) of its weights, s its own target
    sizes, targets = (235200, 30000, 1000), (0.92, 0.9, 0.74)
    expected = [[round((1 - (1 - s) ** (r / 3)) * n) for s, n in zip(targets, sizes)] for r in (1, 2, 3)]
    assert session.rounds == expected
    assert [int((model[i].weight == 0).sum()) for i in (1, 3, 5)] == expected[-1]


def test_layer_sparsity_gradual_ramp_takes_each_layer_along_the_cubic_schedule():
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:lenet-300-100")
    cfg = MagnitudePruneConfig(sparsity=0.9, schedule="gradual", ramp=1.0, updates=4, scope="layer",
                               layer_sparsity={"5": 0.5}, finetune=TrainConfig(epochs=1, loggers=()))
    masker = GradualSchedule(["1.weight", "3.weight", "5.weight"], cfg, fixed={"5.weight": 0.5})
    masker.after_step(model, 50, 100)   # half way: s_f (1 - 0.5^3), Zhu & Gupta eq. 1 with s_i = 0
    assert [int((model[i].weight == 0).sum()) for i in (1, 3, 5)] == [
        round(0.9 * 0.875 * 235200), round(0.9 * 0.875 * 30000), round(0.5 * 0.875 * 1000)]


@pytest.mark.parametrize("bad, message", [
    ({"fc1": 0.9}, r"layer_sparsity: pattern 'fc1' matches no module; nearest module names: 1"),
    ({"re:[13]": 0.9, "3": 0.5}, r"'3' matches none of the pruned layers"),
])
def test_layer_sparsity_key_matching_no_pruned_layer_is_an_error(bad, message):
    model = torchslim.build_model("zoo:lenet-300-100")
    with pytest.raises(RecipeError, match=message):
        torchslim.apply(model, MagnitudePruneConfig(layer_sparsity=bad))


def test_layer_sparsity_bad_values_are_recipe_errors_naming_the_key():
    with pytest.raises(RecipeError, match=r"steps.0.prune.layer_sparsity\['1'\]: 1.5 is out of range"):
        MagnitudePruneConfig.from_dict({"layer_sparsity": {"1": 1.5}}, where="steps.0.prune")
    with pytest.raises(RecipeError, match=r"layer_sparsity\['x'\]: expected a number"):
        MagnitudePruneConfig.from_dict({"layer_sparsity": {"x": "a"}})
    with pytest.raises(RecipeError, match="granularity weight, channel and head only"):
        MagnitudePruneConfig(granularity="2:4", layer_sparsity={"1": 0.5})
