"""Hint, attention and multi-teacher distillation: each loss against a hand computation, the
plugins on real models (digits CNNs, tiny ResNets, tiny random BERTs), bad input named."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import torchslim
from torchslim.errors import RecipeError
from torchslim.methods.distill.primitives import (at_loss, attention_map, attention_probs_loss, hint_loss,
                                                  soft_target_loss, soft_targets)
from torchslim.train import TrainConfig, Trainer
from torchslim.train.config import DistillTerm, teacher_roles
from torchslim.train.distill import AttentionTransfer, HintDistillation
from torchslim.train.plugins import LogitDistillation


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


# -- primitives against explicit loops -----------------------------------------------------
def test_two_teacher_soft_targets_and_loss_equal_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t1 = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    t2 = torch.tensor([[0.0, 3.0, -1.0], [2.0, 0.0, 1.0]])
    T, w = 2.0, (0.6, 0.2)          # normalised to 0.75 / 0.25
    loss = 0.0
    for i in range(2):
        p1, p2, q = _softmax(t1[i].tolist(), T), _softmax(t2[i].tolist(), T), _softmax(s[i].tolist(), T)
        mix = [0.75 * a + 0.25 * b for a, b in zip(p1, p2)]
        assert soft_targets([t1, t2], T, list(w))[i].tolist() == pytest.approx(mix, rel=1e-6)
        loss += sum(m * (math.log(m) - math.log(b)) for m, b in zip(mix, q))
    expected = T * T * loss / 2
    got = soft_target_loss(s, soft_targets([t1, t2], T, list(w)), T)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_hint_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    total = 0.0
    for n in range(2):
        for c in range(3):
            for h in range(2):
                for w in range(2):
                    total += (float(s[n, c, h, w]) - float(t[n, c, h, w])) ** 2
    assert float(hint_loss(s, t)) == pytest.approx(total / 24, rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(s, t[:, :2])


def test_attention_map_and_at_loss_equal_hand_computation():
    g = torch.Generator().manual_seed(1)
    a_s, a_t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)   # channels differ
    beta, p = 3.0, 2.0

    def q(a, n):   # Q = sum_c |A_c|^p over the 4 positions, divided by its L2 norm
        v = [sum(abs(float(a[n, c, h, w])) ** p for c in range(a.shape[1])) for h in range(2) for w in range(2)]
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    dist = [math.sqrt(sum((x - y) ** 2 for x, y in zip(q(a_s, n), q(a_t, n)))) for n in range(2)]
    expected = beta / 2 * sum(dist) / 2
    assert attention_map(a_s, p)[1].tolist() == pytest.approx(q(a_s, 1), rel=1e-6)
    got = at_loss([attention_map(a_s, p)], [attention_map(a_t, p)], beta)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # two pairs add up
    assert float(at_loss([attention_map(a_s)] * 2, [attention_map(a_t)] * 2, beta)) == pytest.approx(2 * expected)


def _probs(n, h, L, seed):
    return torch.softmax(torch.randn(n, h, L, L, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_attention_probs_loss_equals_hand_computation():
    s, t = _probs(2, 2, 3, 0), _probs(2, 2, 3, 1)
    kl, sq, rows = 0.0, 0.0, 0
    for n in range(2):
        for h in range(2):
            for i in range(3):
                rows += 1
                for j in range(3):
                    a, b = float(t[n, h, i, j]), float(s[n, h, i, j])
                    kl += a * (math.log(a) - math.log(b))
                    sq += (a - b) ** 2
    assert float(attention_probs_loss(s, t, "kl")) == pytest.approx(kl / rows, rel=1e-5)
    assert float(attention_probs_loss(s, t, "mse")) == pytest.approx(sq / (rows * 3), rel=1e-5)
    # different head counts: both averaged over heads first
    t4 = _probs(2, 4, 3, 2)
    kl = 0.0
    for n in range(2):
        for i in range(3):
            ps = [sum(float(s[n, h, i, j]) for h in range(2)) / 2 for j in range(3)]
            pt = [sum(float(t4[n, h, i, j]) for h in range(4)) / 4 for j in range(3)]
            kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    assert float(attention_probs_loss(s, t4, "kl")) == pytest.approx(kl / 6, rel=1e-5)


# -- logit distillation: several teachers, cached logits -----------------------------------
def _digits_cnn(channels, seed, hidden=32):
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:digits-cnn", args={"channels": channels, "hidden": hidden})


def _batch(task, n=16, split="train"):
    ds = task.split(split)
    return task.collate([ds[i] for i in range(n)])


def test_two_teachers_mix_their_soft_targets(digits_task):
    t1, t2, student = _digits_cnn([4, 8], 1), _digits_cnn([4, 8], 2), _digits_cnn([4, 8], 3).eval()
    plugin = LogitDistillation([t1, t2], temperature=3.0, alpha=1.0, weights=[0.7, 0.3])
    plugin.setup(SimpleNamespace(model=student, task=digits_task))
    batch = _batch(digits_task)
    x = batch[0]
    got = plugin.loss(student, batch, student(x), torch.tensor(0.0))
    with torch.no_grad():
        z1, z2, zs = t1(x), t2(x), student(x)
    total = 0.0
    for i in range(len(x)):
        mix = [0.7 * a + 0.3 * b for a, b in zip(_softmax(z1[i].tolist(), 3.0), _softmax(z2[i].tolist(), 3.0))]
        q = _softmax(zs[i].tolist(), 3.0)
        total += sum(m * (math.log(m) - math.log(b)) for m, b in zip(mix, q))
    assert float(got.detach()) == pytest.approx(9.0 * total / len(x), rel=1e-4)   # float32 sums


def test_teacher_with_other_outputs_is_named(digits_task):
    wrong = torchslim.build_model("zoo:digits-cnn", args={"channels": [4, 8], "hidden": 8, "num_classes": 7})
    student = _digits_cnn([4, 8], 0)
    plugin = LogitDistillation([_digits_cnn([4, 8], 1), wrong], alpha=1.0)
    plugin.setup(SimpleNamespace(model=student, task=digits_task))
    batch = _batch(digits_task, 4)
    with pytest.raises(RecipeError, match=r"teacher 2 of 2 outputs \(4, 7\)"):
        plugin.loss(student, batch, student(batch[0]), torch.tensor(0.0))


def test_cached_teacher_logits_match_and_are_read_from_disk(digits_task, tmp_path):
    teacher, student = _digits_cnn([4, 8], 1), _digits_cnn([4, 8], 2).eval()
    trainer = SimpleNamespace(model=student, task=digits_task)
    live = LogitDistillation(teacher, 2.0, 0.5)
    cached = LogitDistillation(teacher, 2.0, 0.5, cache=True, cache_dir=tmp_path)
    live.setup(trainer)
    cached.setup(trainer)
    assert (tmp_path / "teacher-logits-0.safetensors").is_file()
    ds = digits_task.split("train")
    batch = digits_task.collate([ds[i] for i in (5, 900, 17, 3)])     # any order, any batching
    out, base = student(batch[0]), torch.tensor(1.5)
    torch.testing.assert_close(cached.loss(student, batch, out, base), live.loss(student, batch, out, base))

    class Broken(nn.Module):   # same state as the teacher, but running it is an error
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(teacher)

        def forward(self, x):
            raise AssertionError("the cache should have been used")

        def state_dict(self, *a, **k):
            return self.inner.state_dict(*a, **k)

    again = LogitDistillation(Broken(), 2.0, 0.5, cache=True, cache_dir=tmp_path)
    again.setup(trainer)
    torch.testing.assert_close(again.loss(student, batch, out, base), live.loss(student, batch, out, base))
    noisy = (batch[0] + 0.01, batch[1])                                  # an augmented batch
    with pytest.raises(RecipeError, match="not in the cached"):
        cached.loss(student, noisy, student(noisy[0]), base)
    with pytest.raises(RecipeError, match="set cache: false"):           # the trainer's own augmentation
        TrainConfig.from_dict({"jitter": 1, "distill": {"teacher": "baseline", "cache": True}})


def test_several_teachers_in_recipes_round_trip_and_keep_their_roles():
    term = DistillTerm.from_dict({"teacher": [{"model": "baseline", "weight": 0.7},
                                              {"model": "zoo:digits-cnn", "weight": 0.3}], "cache": True})
    assert [w for _, w in term.teachers()] == [0.7, 0.3]
    assert DistillTerm.from_dict(term.to_dict()) == term
    assert teacher_roles(TrainConfig(distill=term)) == {"baseline"}
    with pytest.raises(RecipeError, match="weight"):
        DistillTerm.from_dict({"teacher": [{"model": "baseline", "weight": 0}]})
    with pytest.raises(RecipeError, match="one teacher"):
        DistillTerm.from_dict({"teacher": ["baseline", "current"], "hint": {"layers": {"2": "2"}}})
    with pytest.raises(RecipeError, match="temperature"):
        DistillTerm.from_dict({"temperature": 0})


# -- hints on digits ---------------------------------------------------------------------
def test_hint_run_on_digits_trains_the_projection_and_leaves_it_out_of_the_artifact(
        trained_digits, digits_task, tmp_path):
    from torchslim.train.trainer import seed_everything

    teacher = copy.deepcopy(trained_digits)                       # channels [32, 64]
    student = _digits_cnn([8, 16], 0)
    keys = set(student.state_dict())
    val = _batch(digits_task, 128, "val")

    def hint_gap(proj):  # the hint loss on validation data through a projection, by formula
        feats = {}
        hs = student[2].register_forward_hook(lambda m, a, o: feats.__setitem__("s", o))
        ht = teacher[2].register_forward_hook(lambda m, a, o: feats.__setitem__("t", o))
        with torch.no_grad():
            student.eval()(val[0])
            teacher(val[0])
            gap = float(((proj(feats["s"]) - feats["t"]) ** 2).mean())
        hs.remove(), ht.remove()
        return gap

    seed_everything(0)                # as the trainer does before setting plugins up
    untrained = HintDistillation(teacher, {"2": "2"})
    untrained.setup(SimpleNamespace(model=student, task=digits_task))
    untrained.teardown()
    proj0 = untrained.projections["0"]
    assert isinstance(proj0, nn.Conv2d) and (proj0.in_channels, proj0.out_channels) == (16, 64)
    before = hint_gap(proj0)

    plugin = HintDistillation(teacher, {"2": "2"})
    trainer = Trainer(student, digits_task, TrainConfig(optimizer="adamw", epochs=3, lr=0.005, loggers=()),
                      plugins=[plugin])
    opt_params = None

    def grab(model, step, total):
        nonlocal opt_params
        opt_params = opt_params or {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}

    trainer.plugins.append(torchslim.train.CallbackPlugin(grab))
    trainer.fit()
    proj = plugin.projections["0"]
    assert {id(p) for p in proj.parameters()} <= opt_params      # optimized with the student
    assert not torch.equal(proj.weight, proj0.weight)           # same init, then trained
    assert hint_gap(proj) < 0.5 * before
    assert digits_task.evaluate(student) > 0.8
    assert student[2]._forward_hooks == {} and teacher[2]._forward_hooks == {}   # hooks removed
    # the projection is no part of the student: not among its modules, not in the artifact
    assert set(student.state_dict()) == keys
    torchslim.save(student, tmp_path / "art")
    back = torchslim.load(tmp_path / "art")
    assert set(back.state_dict()) == keys
    x = _batch(digits_task, 8, "test")[0]
    with torch.no_grad():
        torch.testing.assert_close(back(x), student.eval()(x), rtol=0, atol=0)


def test_a_resumed_hint_run_ends_with_the_weights_and_projection_of_an_uninterrupted_one(digits_task, tmp_path):
    class Interrupt(Exception):
        pass

    teacher = _digits_cnn([16, 32], 5)
    config = TrainConfig(optimizer="adamw", epochs=2, batch_size=256, lr=0.01, loggers=())

    def run(ckpt, crash=False, init_seed=0):
        def stop(model, step, total):
            if crash and step == total // 2 + 1:      # first step of epoch 2
                raise Interrupt
        plugin = HintDistillation(teacher, {"2": "2", "6": "6"})       # 8 -> 16 channels, 32 -> 32 units
        t = Trainer(_digits_cnn([8, 16], init_seed), digits_task, config, ckpt_dir=ckpt, plugins=[plugin],
                    callbacks=[stop])
        t.fit()
        return t.model, plugin

    straight, p_straight = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", crash=True)
    resumed, p_resumed = run(tmp_path / "b", init_seed=99)   # weights and projection come from last.pt
    assert list(p_resumed.projections) == ["0"]              # "6" has the teacher's width: no projection
    for a, b in [(straight.state_dict(), resumed.state_dict()),
                 (p_straight.projections.state_dict(), p_resumed.projections.state_dict())]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hint_distill_method_and_a_pruning_finetune_with_hints(trained_digits, digits_task):
    from torchslim.methods.distill.hint import HintDistillConfig
    from torchslim.methods.prune.magnitude import MagnitudePruneConfig

    cfg = MagnitudePruneConfig.from_dict({"sparsity": 0.8, "scope": "layer", "finetune": {
        "epochs": 1, "lr": 0.002, "optimizer": "adamw", "loggers": [],
        "distill": {"teacher": "baseline", "alpha": 0.5, "hint": {"layers": {"3": "3"}, "weight": 0.5}}}})
    pruned = torchslim.apply(trained_digits, cfg, task=digits_task)
    assert float((pruned[0].weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)   # masks held
    assert digits_task.evaluate(pruned) > 0.8
    c = HintDistillConfig.from_dict({"student": {"spec": "zoo:digits-cnn", "args": {"channels": [8, 16]}},
                                     "layers": {"2": "2"}, "alpha": 0.5, "epochs": 1, "loggers": []})
    student = torchslim.apply(trained_digits, c, task=digits_task)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in trained_digits.parameters())


def test_bad_layer_names_suggest_the_right_ones(trained_digits, digits_task):
    from torchslim.methods.distill.attention import AttentionDistillConfig
    from torchslim.methods.distill.hint import HintDistillConfig

    student = {"spec": "zoo:digits-cnn", "args": {"channels": [8, 16]}}
    bad = HintDistillConfig.from_dict({"student": student, "layers": {"22": "2"}})
    with pytest.raises(RecipeError, match=r"no module named '22' in the student \(did you mean '2'"):
        bad.check_ready(digits_task)
    bad = AttentionDistillConfig.from_dict({"student": student, "layers": {"3": "33"}})
    with pytest.raises(RecipeError, match=r"'33' in the teacher \(did you mean '3'"):
        bad.check_model(trained_digits)
    plugin = HintDistillation(copy.deepcopy(trained_digits), {"2": "conv2"})
    with pytest.raises(RecipeError, match="no module named 'conv2' in the teacher"):
        plugin.setup(SimpleNamespace(model=_digits_cnn([8, 16], 0), task=digits_task))
    with pytest.raises(RecipeError, match="layers: missing"):
        HintDistillConfig.from_dict({"student": student})
    with pytest.raises(RecipeError, match="temperature"):
        HintDistillConfig.from_dict({"student": student, "layers": {"2": "2"}, "temperature": -1})
    # widths that must match, and shapes that cannot
    with pytest.raises(RecipeError, match="width 16, teacher layer '2' 64"):
        HintDistillation(copy.deepcopy(trained_digits), {"2": "2"}, projection="none").setup(
            SimpleNamespace(model=_digits_cnn([8, 16], 0), task=digits_task))
    with pytest.raises(RecipeError, match="must agree except in width"):
        HintDistillation(copy.deepcopy(trained_digits), {"2": "4"}).setup(
            SimpleNamespace(model=_digits_cnn([8, 16], 0), task=digits_task))


# -- attention transfer: a tiny ResNet pair ------------------------------------------------
def _resnet(widths, seed):
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:resnet-fmnist", args={"widths": widths, "blocks": 1})


def test_attention_transfer_on_a_tiny_resnet_pair(digits_task):
    teacher, student = _resnet([8, 16, 32], 0), _resnet([4, 8, 16], 1)
    torchslim.train.train(teacher, digits_task, TrainConfig(optimizer="adamw", epochs=1, lr=0.01, loggers=()))
    beta, pairs = 50.0, {"3": "3", "4": "4"}
    plugin = AttentionTransfer(teacher, pairs, beta=beta)
    x = _batch(digits_task, 64, "val")[0]

    def by_formula():   # beta/2 * sum over pairs of the batch mean of ||Q_s/|Q_s| - Q_t/|Q_t|||_2
        def maps(model, x):
            out, feats = x, {}
            for name, child in model.named_children():
                out = child(out)
                feats[name] = out
            return feats
        with torch.no_grad():
            fs, ft = maps(student.eval(), x), maps(teacher.eval(), x)
        total = 0.0
        for s, t in pairs.items():
            qs, qt = fs[s].pow(2).sum(1).flatten(1), ft[t].pow(2).sum(1).flatten(1)
            qs, qt = qs / qs.norm(dim=1, keepdim=True), qt / qt.norm(dim=1, keepdim=True)
            total += float((qs - qt).norm(dim=1).mean())
        return beta / 2 * total

    plugin.setup(SimpleNamespace(model=student, task=digits_task))
    with torch.no_grad():
        student.eval()
        got = plugin.loss(student, (x, None), student(x), torch.tensor(0.0))
    plugin.teardown()
    before = by_formula()
    assert float(got) == pytest.approx(before, rel=1e-5)
    Trainer(student, digits_task, TrainConfig(optimizer="adamw", epochs=1, lr=0.01, loggers=()),
            plugins=[plugin]).fit()
    assert by_formula() < 0.7 * before
    assert all(not m._forward_hooks for m in student.modules())


# -- attention transfer: two tiny random BERTs --------------------------------------------
class _TokenTask(torchslim.specs.tasks.Task):
    """Random token ids, the mean of the last hidden state as output (no metric)."""

    metric_name, outputs = None, "embeddings"

    def __init__(self):
        super().__init__("tokens")
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 60, (8, 6), generator=g)

    def split(self, name):
        return torch.utils.data.TensorDataset(self.ids, torch.zeros(len(self.ids)))

    def forward(self, model, batch):
        return model(batch[0]).last_hidden_state.mean(1)


def _bert(layers, heads, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.5)  # peaked attention
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_transformer_attention_probabilities_of_two_tiny_berts(kind):
    teacher, student = _bert(3, 4, 0), _bert(2, 2, 1)     # 4 heads against 2: averaged over heads
    impl = student.config._attn_implementation
    pairs = {"encoder.layer.0.attention.self": "encoder.layer.0.attention.self",
             "encoder.layer.1.attention.self": "encoder.layer.2.attention.self"}
    task = _TokenTask()
    plugin = AttentionTransfer(teacher, pairs, beta=2.0, loss=kind)
    plugin.setup(SimpleNamespace(model=student, task=task))
    batch = (task.ids[:3], None)
    got = plugin.loss(student, batch, task.forward(student, batch), torch.tensor(0.0))
    plugin.teardown()
    assert student.config._attn_implementation == impl == teacher.config._attn_implementation
    for m in (student, teacher):
        m.set_attn_implementation("eager")
    with torch.no_grad():
        att_s = student(task.ids[:3], output_attentions=True).attentions
        att_t = teacher(task.ids[:3], output_attentions=True).attentions
    expected = 0.0
    for ls, lt in ((0, 0), (1, 2)):
        s, t = att_s[ls], att_t[lt]                      # (3, 2, 6, 6) and (3, 4, 6, 6)
        d = 0.0
        for n in range(3):
            for i in range(6):
                ps = [sum(float(s[n, h, i, j]) for h in range(2)) / 2 for j in range(6)]
                pt = [sum(float(t[n, h, i, j]) for h in range(4)) / 4 for j in range(6)]
                if kind == "kl":
                    d += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
                else:
                    d += sum((a - b) ** 2 for a, b in zip(pt, ps)) / 6
        expected += 2.0 * d / 18
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)


def test_attention_transfer_refuses_layers_without_attention(trained_digits, digits_task):
    plugin = AttentionTransfer(copy.deepcopy(trained_digits), {"7": "7"})
    with pytest.raises(RecipeError, match="reads feature maps"):
        plugin.setup(SimpleNamespace(model=_digits_cnn([8, 16], 0), task=digits_task))
