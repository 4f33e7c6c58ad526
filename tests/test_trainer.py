"""The training loop: schedules against hand-computed curves, early stopping, regularization,
seeding, accuracy, TensorBoard output and divergence errors (digits, a tiny CNN)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchslim
from torchslim.errors import UserError
from torchslim.train import TrainConfig, Trainer
from torchslim.train.trainer import TrainingDivergedError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, which only adds synchronization (and on a
    busy 2-core machine makes every small op wait for a descheduled thread)."""
    torch.set_num_threads(1)
    yield


N_TRAIN = 1257          # digits train split (tasks.py: 1257 / 180 / 360)
BS = 256                # -> 1257 // 256 = 4 steps per epoch (drop_last: 1257 > 256)
SPE = N_TRAIN // BS


def tiny(seed: int = 0) -> torch.nn.Module:
    """digits-cnn at 8/16 channels, 32 hidden (~10k params; ~0.05 s per epoch)."""
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32})


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.01, batch_size=BS, loggers=())
    base.update(kw)
    return TrainConfig(**base)


def lr_curve(task, config: TrainConfig, vals: list[float] | None = None) -> list[float]:
    """The learning rate each optimizer step used (read inside the loss, i.e. before the step).

    ``vals`` replaces the validation metric epoch by epoch (for plateau)."""
    t = Trainer(tiny(), task, config)
    lrs: list[float] = []

    def loss_fn(m, b):
        lrs.append(t.optimizer.param_groups[0]["lr"])
        return task.loss(task.forward(m, b), b)

    t.loss_fn = loss_fn
    if vals is not None:
        it = iter(vals)
        t._validate = lambda model: next(it)
    t.fit()
    assert len(lrs) == config.epochs * SPE
    return lrs


def assert_curve(got: list[float], want: list[float]) -> None:
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


# -- schedules ------------------------------------------------------------------------------
def test_constant_schedule(digits_task):
    assert_curve(lr_curve(digits_task, cfg(epochs=3, schedule="constant", lr=0.02)), [0.02] * 3 * SPE)


def test_cosine_schedule(digits_task):
    total = 5 * SPE
    want = [0.01 * 0.5 * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    assert_curve(lr_curve(digits_task, cfg(epochs=5, schedule="cosine")), want)


def test_cosine_with_warmup(digits_task):
    total, warm = 5 * SPE, SPE          # warmup: 1 epoch = 4 steps
    want = [0.01 * (i + 1) / warm for i in range(warm)]
    want += [0.01 * 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))) for i in range(warm, total)]
    got = lr_curve(digits_task, cfg(epochs=5, schedule="cosine", warmup=1.0))
    assert_curve(got, want)
    assert got[warm] == pytest.approx(0.01)  # the peak right after warm-up


def test_step_schedule(digits_task):
    want = [0.01 * 0.5 ** ((i // SPE) // 2) for i in range(6 * SPE)]   # halve every 2 epochs
    assert_curve(lr_curve(digits_task, cfg(epochs=6, schedule="step", step_size=2, gamma=0.5)), want)


def test_onecycle_peak(digits_task):
    total = 5 * SPE                     # 20 steps; warmup 1 of 5 epochs -> pct_start 0.2
    peak = int(0.2 * total) - 1         # step 3 reaches max_lr
    lo, hi, floor = 0.01 / 25, 0.01, 0.01 / 25 / 1e4   # div_factor 25, final_div_factor 1e4

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)

    want = [anneal(lo, hi, i / peak) if i <= peak else anneal(hi, floor, (i - peak) / (total - 1 - peak))
            for i in range(total)]
    got = lr_curve(digits_task, cfg(epochs=5, schedule="onecycle", warmup=1.0))
    assert_curve(got, want)
    assert max(got) == pytest.approx(0.01) and got.index(max(got)) == peak


def test_plateau_reduces_after_no_improvement(digits_task):
    # patience 1: the 2nd epoch in a row without improvement multiplies lr by gamma
    vals = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    per_epoch = [0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.0001]
    got = lr_curve(digits_task, cfg(epochs=7, schedule="plateau", gamma=0.1), vals)
    assert_curve(got, [lr for lr in per_epoch for _ in range(SPE)])


def test_plateau_with_warmup(digits_task):
    vals = [0.5, 0.6, 0.7]
    want = [0.01 * (i + 1) / SPE for i in range(SPE)] + [0.01] * 2 * SPE
    assert_curve(lr_curve(digits_task, cfg(epochs=3, schedule="plateau", warmup=1.0), vals), want)


# -- early stopping -------------------------------------------------------------------------
def test_early_stopping_stops_and_restores_best(digits_task):
    vals = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.9])
    snapshots = []

    def fake_validate(model):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(vals)

    model = tiny()
    t = Trainer(model, digits_task, cfg(epochs=6, early_stopping=2))
    t._validate = fake_validate
    t.fit()
    # best after epoch 2; epochs 3 and 4 do not improve -> stop after epoch 4
    assert [h["epoch"] for h in t.history] == [1, 2, 3, 4]
    assert len(snapshots) == 4
    final = model.state_dict()
    for k, v in snapshots[1].items():
        assert torch.equal(final[k], v), k
    assert not torch.equal(final["0.weight"], snapshots[3]["0.weight"])


def test_early_stopping_on_real_metric_keeps_best_val(digits_task):
    model = tiny()
    t = Trainer(model, digits_task, cfg(epochs=8, lr=0.05, early_stopping=1, optimizer="adamw"))
    t.fit()
    vals = [h["val/accuracy"] for h in t.history]
    # patience 1: it stops at the first epoch that does not improve on the best so far
    assert all(a < b for a, b in zip(vals[:-1], vals[1:-1]))
    if len(vals) < 8:
        assert vals[-1] <= max(vals[:-1])
    assert digits_task.evaluate(model, split="val") == max(vals)   # the best weights are back


# -- loss, regularization --------------------------------------------------------------------
def test_label_smoothing_matches_cross_entropy(digits_task):
    model = tiny()
    Trainer(model, digits_task, cfg(optimizer="adamw", batch_size=64, epochs=3)).fit()  # confident
    model.eval()   # no dropout: every forward pass gives the same logits
    batch = next(iter(torch.utils.data.DataLoader(digits_task.split("train"), batch_size=32)))
    eps, k = 0.1, 10
    smooth = Trainer(model, digits_task, cfg(label_smoothing=eps)).loss_fn(model, batch)
    plain = Trainer(model, digits_task, cfg()).loss_fn(model, batch)
    logits, y = model(batch[0]), batch[1]
    logp = F.log_softmax(logits, dim=-1)
    ref = -((1 - eps) * logp.gather(1, y[:, None]).squeeze(1) + eps / k * logp.sum(-1)).mean()
    torch.testing.assert_close(smooth, F.cross_entropy(logits, y, label_smoothing=eps), rtol=0, atol=0)
    torch.testing.assert_close(smooth, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain, F.cross_entropy(logits, y), rtol=0, atol=0)
    assert smooth.item() > plain.item() + 0.05   # smoothing penalizes confident predictions


def test_grad_clip_bounds_gradient_norm(digits_task):
    def norms_of(config):
        out = []

        def cb(m, step, total):   # after opt.step the clipped .grad is still there
            out.append(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None])).item())
        Trainer(tiny(), digits_task, config, callbacks=[cb]).fit()
        return out

    free = norms_of(cfg(epochs=1, lr=0.1))
    clipped = norms_of(cfg(epochs=1, lr=0.1, grad_clip=0.05))
    assert min(free) > 0.05                     # clipping has work to do
    assert max(clipped) <= 0.05 * (1 + 1e-5)
    # the first batch's gradient is rescaled to the bound (clip_grad_norm_ divides by norm + 1e-6)
    assert clipped[0] == pytest.approx(0.05, rel=1e-4)


def test_dropout_override(digits_task):
    model = tiny()
    Trainer(model, digits_task, cfg(epochs=1, dropout=0.5)).fit()
    ps = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert ps == [0.5]


def test_weight_decay_shrinks_weights(digits_task):
    norms = {}
    for wd in (0.0, 0.5):
        model = tiny()
        Trainer(model, digits_task, cfg(epochs=2, optimizer="adamw", weight_decay=wd)).fit()
        norms[wd] = sum(p.norm() ** 2 for p in model.parameters()).item()
    assert norms[0.5] < norms[0.0]


def test_jitter_images_shifts_each_image_within_bounds():
    from torchslim.train.trainer import jitter_images

    torch.manual_seed(0)
    x = torch.randn(64, 2, 9, 7)
    y = jitter_images(x, 2)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    seen = set()
    for i in range(len(x)):  # each output is one window of the replicate-padded input
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(y[i], padded[i, :, dy:dy + 9, dx:dx + 7])]
        assert hits, f"image {i} is not a shifted copy"
        seen.add(hits[0])
    assert len(seen) > 10                       # offsets differ between images
    assert torch.equal(jitter_images(x, 0), x)


def test_jitter_trains_and_refuses_non_images(digits_task):
    model = tiny()
    seen = []
    t = Trainer(model, digits_task, cfg(epochs=1, jitter=1))
    t.loss_fn = lambda m, b: (seen.append(b[0]), digits_task.loss(digits_task.forward(m, b), b))[1]
    t.fit()
    first = digits_task.split("train")[0][0]
    assert len(seen) == SPE and seen[0].shape[1:] == first.shape
    # the batches differ from the stored images: no batch is a plain copy of its rows
    train_x = digits_task.split("train").tensors[0]
    assert not any(torch.equal(b[0], row) for b in seen[:1] for row in train_x[:200])
    from torch.utils.data import TensorDataset

    from torchslim.specs.tasks import Task

    class Tabular(Task):  # rows of 4 features: nothing to shift
        def _load_splits(self):
            ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
            return {"train": ds, "val": ds, "test": ds}

    tab = torchslim.build_model("zoo:mlp", args={"in_features": 4, "hidden": [8], "num_classes": 2})
    with pytest.raises(UserError, match="jitter: 1 shifts images"):
        Trainer(tab, Tabular("tabular"), cfg(epochs=1, batch_size=8, jitter=1)).fit()


def test_zoo_mlp_layout():
    m = torchslim.build_model("zoo:mlp", args={"hidden": [12, 6], "dropout": 0.5, "input_dropout": 0.2})
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [x.p for x in m if isinstance(x, torch.nn.Dropout)] == [0.2, 0.5, 0.5]
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in m.parameters()) == 784 * 12 + 12 + 12 * 6 + 6 + 6 * 10 + 10


# -- seeding, accuracy ----------------------------------------------------------------------
def test_seed_reproducible_and_distinct(digits_task):
    def run(seed):
        model = tiny(0)   # the same initial weights: only the trainer's seed differs
        Trainer(model, digits_task, cfg(epochs=2, seed=seed)).fit()
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_improves_digits_accuracy(digits_task):
    model = tiny()
    before = digits_task.evaluate(model)
    t = Trainer(model, digits_task, TrainConfig(optimizer="adamw", epochs=5, lr=0.01, batch_size=64,
                                                loggers=()))
    t.fit()
    after = digits_task.evaluate(model)
    assert before < 0.3 and after > 0.9
    losses = [h["train/loss"] for h in t.history]
    assert losses[-1] < losses[0] / 3


def test_default_training_trains_digits_cnn(digits_task):
    """Regression: with the defaults (then SGD at lr 0.01, digits inputs in [0, 1]) the full
    digits-cnn reached 14% test accuracy in 3 epochs and 83% in the default 10; the recipe's
    ``train: {}`` must train it."""
    torch.manual_seed(0)
    model = torchslim.build_model("zoo:digits-cnn")
    Trainer(model, digits_task, TrainConfig.from_dict({"loggers": []}, where="train")).fit()
    assert digits_task.evaluate(model) >= 0.95


def test_each_train_method_has_its_own_defaults():
    """Regression: ``torchslim methods`` listed train.adamw with optimizer = "sgd", and AdamW
    took SGD's learning rate."""
    from torchslim.recipe import parse_step
    from torchslim.registry import get_method

    for name, lr in (("sgd", 0.02), ("adamw", 0.001)):
        listed = {f["name"]: f["default"] for f in get_method("train", name).config_cls.describe_fields()}
        assert (listed["optimizer"], listed["lr"]) == (name, lr)
        config = parse_step({"train": {"method": name}}, "steps.0").config
        assert (config.optimizer, config.lr) == (name, lr)
        assert TrainConfig(optimizer=name).lr == lr
    # a learning rate given explicitly is kept, whatever the optimizer
    assert parse_step({"train": {"method": "adamw", "lr": 0.01}}, "steps.0").config.lr == 0.01
    assert TrainConfig.from_dict({"optimizer": "sgd", "lr": 0.01}).lr == 0.01


# -- logging, errors -------------------------------------------------------------------------
def test_tensorboard_event_files(digits_task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "logs" / "baseline"
    t = Trainer(tiny(), digits_task, cfg(epochs=3, loggers=("tensorboard",)), log_dir=log_dir)
    t.fit()
    assert list(log_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/accuracy"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([h["train/loss"] for h in t.history], rel=1e-6)


def test_nan_loss_raises_clear_error(digits_task):
    def nan_at_step_3(m, b, calls=[]):  # noqa: B006 - a counter
        calls.append(1)
        loss = digits_task.loss(digits_task.forward(m, b), b)
        return loss * float("nan") if len(calls) == 3 else loss

    t = Trainer(tiny(), digits_task, cfg(lr=0.5), loss_fn=nan_at_step_3, desc="baseline")
    with pytest.raises(TrainingDivergedError, match=r"baseline: the training loss became nan at "
                                                    r"epoch 1, step 3 .*lower lr \(now 0.5\)"):
        t.fit()


def test_divergence_is_user_error(digits_task):
    # a far too high learning rate makes the loss overflow: bad input (exit 2), not a crash
    t = Trainer(tiny(), digits_task, cfg(epochs=3, lr=1e6, schedule="constant", momentum=0.99))
    with pytest.raises(UserError, match="the training loss became (nan|inf)") as info:
        t.fit()
    assert isinstance(info.value, FloatingPointError)


def test_no_trainable_parameters(digits_task):
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        Trainer(model, digits_task, cfg()).fit()


def test_apply_takes_the_plain_train_config_as_its_optimizers_method(digits_task):
    from torchslim.train import SGDTrainConfig

    model = tiny()
    a = torchslim.apply(model, cfg(epochs=1), task=digits_task)
    b = torchslim.apply(model, SGDTrainConfig(**{**cfg(epochs=1).to_dict(), "optimizer": "sgd"}), task=digits_task)
    sa, sb, s0 = a.state_dict(), b.state_dict(), model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)           # the same run as train.sgd
    assert not all(torch.equal(sa[k], s0[k]) for k in sa)       # and it trained (the input untouched)
