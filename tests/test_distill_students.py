"""Students built from the teacher (kept layers, cut width) and embedding distillation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchslim
from torchslim.cli import main
from torchslim.errors import RecipeError, SpecError
from torchslim.methods.distill.embedding import EmbeddingDistillConfig, EmbeddingDistillation
from torchslim.methods.distill.logits import LogitsDistillConfig
from torchslim.methods.distill.primitives import embedding_loss
from torchslim.methods.distill.students import FromTeacher, build_student
from torchslim.session import Session

ASSETS = Path(__file__).parent / "assets"
ENCODER = f"py:{ASSETS / 'architectures.py'}:encoder"
VIT = f"py:{ASSETS / 'attention_models.py'}:small_vit"


@pytest.fixture(autouse=True)
def _trust(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")   # the py: test architectures are ours


def _save_bert(path: Path, layers: int, hidden: int = 32, seed: int = 0) -> Path:
    """A random-init BERT (``hidden / 8`` heads) over the bundled MiniLM tokenizer's 30522 ids."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 8,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    tf.BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """The teacher: 5 layers, 32 wide."""
    return _save_bert(tmp_path_factory.mktemp("bert"), layers=5)


@pytest.fixture(scope="module")
def stsb():
    from conftest import data_dir

    d = data_dir()
    if d is None or not (d / "stsbenchmark").is_dir():
        pytest.skip("STS Benchmark data not found: set TORCHSLIM_DATA to the folder holding stsbenchmark/")
    return torchslim.build_task("stsb", str(d))


def _reload(model, path):
    torchslim.save(model, path)
    return torchslim.load(path).eval()


# -- students from the teacher ----------------------------------------------------------------
def test_bert_student_keeps_the_chosen_layers_and_reloads(tiny_bert_dir, tmp_path):
    teacher = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    before = copy.deepcopy(teacher.state_dict())
    student = build_student(FromTeacher(layers=(4, 0, 2)), teacher).eval()
    assert len(student.encoder.layer) == 3 and student.config.num_hidden_layers == 3
    assert len(teacher.encoder.layer) == 5 and teacher.config.num_hidden_layers == 5   # the teacher stays
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    for new, old in zip(student.encoder.layer, (0, 2, 4)):
        want = teacher.encoder.layer[old].state_dict()
        assert all(torch.equal(v, want[k]) for k, v in new.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())
    ids = torch.randint(0, 30522, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = teacher.embeddings(input_ids=ids)          # the teacher's layers 0, 2, 4 by hand
        for i in (0, 2, 4):
            h = teacher.encoder.layer[i](h)
        out = student(input_ids=ids).last_hidden_state
        torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)
        back = _reload(student, tmp_path / "s")
        assert back.config.num_hidden_layers == 3
        assert torch.equal(back(input_ids=ids).last_hidden_state, out)


def test_transformer_encoder_student_is_the_teacher_without_a_layer(tmp_path):
    torch.manual_seed(0)
    teacher = torchslim.build_model(ENCODER, args={"layers": 3}).eval()
    student = build_student(FromTeacher(layers=(0, 2)), teacher).eval()
    assert len(student.encoder.layers) == 2 and student.encoder.num_layers == 2
    ids = torch.randint(0, 2048, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = teacher.embed(ids)
        for i in (0, 2):
            h = teacher.encoder.layers[i](h)
        torch.testing.assert_close(student(ids), teacher.head(h.mean(dim=1)), rtol=1e-5, atol=1e-6)
        assert torch.equal(_reload(student, tmp_path / "e")(ids), student(ids))


def test_vit_student_keeps_named_blocks_and_reloads(tmp_path):
    torch.manual_seed(0)
    teacher = torchslim.build_model(VIT, args={"layers": 3}).eval()
    student = build_student(FromTeacher(layers=(1,)), teacher).eval()
    assert list(student.encoder.layers._modules) == ["encoder_layer_1"]
    want = teacher.encoder.layers.encoder_layer_1.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in student.encoder.layers.encoder_layer_1.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(_reload(student, tmp_path / "v")(x), student(x))


def test_width_student_keeps_half_of_each_layers_channels_by_magnitude(digits_task, tmp_path):
    torch.manual_seed(0)
    teacher = torchslim.build_model("zoo:digits-cnn").eval()
    student = build_student(FromTeacher(width=0.5), teacher, Session(task=digits_task)).eval()
    assert [student[i].out_channels for i in (0, 2)] == [16, 32] and student[6].out_features == 64
    l1 = teacher[0].weight.abs().sum(dim=(1, 2, 3))               # conv0's filters: L1 of their rows ...
    keep = torch.sort(torch.topk(l1 + teacher[2].weight.abs().sum(dim=(0, 2, 3)), 16).indices).values
    assert torch.equal(student[0].weight, teacher[0].weight[keep])  # ... and conv2's input slices
    x = digits_task.example_inputs(4)[0]
    with torch.no_grad():
        assert torch.equal(_reload(student, tmp_path / "w")(x), student(x))


# -- bad input --------------------------------------------------------------------------------
def test_layer_indices_out_of_range_or_repeated_are_refused(tiny_bert_dir):
    teacher = torchslim.build_model(f"hf:{tiny_bert_dir}")
    with pytest.raises(RecipeError, match=r"index 5 is out of range: the teacher's encoder.layer has 5 layers \(0..4\)"):
        build_student(FromTeacher(layers=(0, 5)), teacher)
    cfg = EmbeddingDistillConfig.from_dict({"student": {"from_teacher": {"layers": [1, 9]}}})
    with pytest.raises(RecipeError, match="index 9 is out of range"):
        cfg.check_model(teacher)                                 # teacher: current, at preflight
    with pytest.raises(RecipeError, match="layer 2 is listed twice"):
        EmbeddingDistillConfig.from_dict({"student": {"from_teacher": {"layers": [2, 0, 2]}}})


def test_a_teacher_without_a_stack_of_layers_is_refused_at_preflight(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: zoo:digits-cnn\ntask: digits\nsteps:\n"
                      "  - distill: {method: logits, student: {from_teacher: {layers: [0]}}, epochs: 1}\n")
    assert main(["compress", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "steps.0.distill" in err and "no stack of layers" in err, err
    assert "Hugging Face encoder.layer" in err and "Traceback" not in err


def test_teacher_and_student_of_different_widths_are_named(tiny_bert_dir, tmp_path, stsb):
    _save_bert(tmp_path / "narrow", layers=1, hidden=16)
    task = stsb
    config = EmbeddingDistillConfig.from_dict({"teacher": f"hf:{tiny_bert_dir}", "student": f"hf:{tmp_path / 'narrow'}"})
    with pytest.raises(RecipeError, match=r"student's embeddings are \(2, 2, 16\) \(width 16\) but the teacher's "
                                          r"are \(2, 2, 32\) \(width 32\)"):
        config.check_ready(task)
    with pytest.raises(SpecError, match="^teacher: hf: model directory not found"):
        EmbeddingDistillConfig.from_dict({"teacher": f"hf:{tmp_path / 'none'}",
                                          "student": {"from_teacher": {"layers": [0]}}}).check_ready(task)


def test_width_of_a_bert_keeps_the_feed_forward_neurons_of_largest_magnitude(tiny_bert_dir, tmp_path):
    teacher = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    student = build_student(FromTeacher(layers=(0, 3), width=0.25), teacher).eval()
    for new, i in zip(student.encoder.layer, (0, 3)):
        up, down = teacher.encoder.layer[i].intermediate.dense, teacher.encoder.layer[i].output.dense
        l1 = up.weight.abs().sum(dim=1) + down.weight.abs().sum(dim=0)       # (64,) per neuron
        keep = torch.sort(torch.topk(l1, 16).indices).values                  # 25% of 64
        assert torch.equal(new.intermediate.dense.weight, up.weight[keep])
        assert torch.equal(new.intermediate.dense.bias, up.bias[keep])
        assert torch.equal(new.output.dense.weight, down.weight[:, keep])
        assert new.attention.self.query.weight.shape == (32, 32)             # attention and width stay
    assert (student.config.intermediate_size, teacher.config.intermediate_size) == (16, 64)  # config follows
    ids = torch.randint(0, 30522, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = student(input_ids=ids).last_hidden_state
        assert out.shape == (2, 9, 32)
        again = _reload(student, tmp_path / "f")
        assert torch.equal(again(input_ids=ids).last_hidden_state, out)
    assert again.config.intermediate_size == 16


def test_from_teacher_needs_one_teacher_and_a_cache_needs_fixed_length_inputs(stsb):
    with pytest.raises(RecipeError, match="from_teacher copies one teacher, and 2 are given"):
        LogitsDistillConfig.from_dict({"student": {"from_teacher": {"layers": [0]}},
                                       "teacher": [{"model": "baseline"}, {"model": "current"}]})
    cfg = EmbeddingDistillConfig.from_dict({"student": {"from_teacher": {"layers": [0]}}, "cache": True})
    with pytest.raises(RecipeError, match="pads each batch to its longest input"):
        cfg.check_ready(stsb)


def test_student_round_trips_through_a_recipe():
    c = LogitsDistillConfig.from_dict({"student": {"from_teacher": {"layers": [2, 0]}}, "epochs": 1})
    assert c.student == FromTeacher(layers=(0, 2))
    assert c.to_dict()["student"] == {"from_teacher": {"layers": [0, 2]}}
    assert LogitsDistillConfig.from_dict(c.to_dict()) == c
    assert LogitsDistillConfig(student={"from_teacher": {"width": 0.5}}).student == FromTeacher(width=0.5)


# -- embedding distillation -------------------------------------------------------------------
def test_embedding_loss_equals_hand_computed_value():
    s = torch.tensor([[[1.0, 0.0], [2.0, 2.0]], [[0.0, -1.0], [3.0, 4.0]]])   # (2 pairs, 2, D=2)
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]], [[0.0, -2.0], [4.0, 3.0]]])
    sq = [(1 - 0) ** 2 + (0 - 1) ** 2, 0.0, 0 + (-1 + 2) ** 2, (3 - 4) ** 2 + (4 - 3) ** 2]
    mse = sum(sq) / 8
    cos = [0.0, 1.0, 1.0, (3 * 4 + 4 * 3) / 25]
    one_minus = sum(1 - c for c in cos) / 4
    assert float(embedding_loss(s, t, "mse")) == pytest.approx(mse, rel=1e-6)
    assert float(embedding_loss(s, t, "cosine")) == pytest.approx(one_minus, rel=1e-6)
    assert float(embedding_loss(s, t, "mse+cosine")) == pytest.approx(mse + one_minus, rel=1e-6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    embedding_loss(s, t, "mse+cosine").backward()
    assert s.grad is not None and t.grad is None


def test_embedding_distillation_on_stsb_lowers_the_loss_without_the_task_loss(tiny_bert_dir, stsb, tmp_path,
                                                                             monkeypatch):
    """A random-init 2-layer student of the teacher's width learns the teacher's sentence embeddings
    on STS-B training sentences; the task's loss (its labels) is never computed."""
    from torchslim.specs.stsb import STSBTask

    _save_bert(tmp_path / "student", layers=2, seed=1)
    task = copy.copy(stsb)                       # the first 1,024 training pairs, for speed
    task._splits = {**{k: stsb.split(k) for k in ("train", "val", "test")},
                    "train": torch.utils.data.Subset(stsb.split("train"), range(1024))}
    teacher = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    batch = task.collate([task.split("val")[i] for i in range(256)])

    def distance(model):
        with torch.no_grad():
            s, t = task.forward(model.eval(), batch), task.forward(teacher, batch)    # (256, 2, 32) each
        return F.mse_loss(s, t).item() + (1 - F.cosine_similarity(s, t, dim=-1)).mean().item()

    def no_task_loss(self, outputs, batch, label_smoothing=0.0):
        raise AssertionError("the training loss used the task loss (the labels)")

    monkeypatch.setattr(STSBTask, "loss", no_task_loss)
    config = EmbeddingDistillConfig.from_dict({"student": f"hf:{tmp_path / 'student'}", "loss": "mse+cosine",
                                               "optimizer": "adamw", "lr": 0.003, "epochs": 1, "batch_size": 32,
                                               "loggers": []})
    student = torchslim.apply(teacher, config, task=task)
    init = torchslim.build_model(f"hf:{tmp_path / 'student'}")
    assert distance(student) < 0.25 * distance(init), (distance(init), distance(student))


def test_several_teachers_are_matched_through_their_weighted_mean_embedding():
    g = torch.Generator().manual_seed(0)
    s, a, b = (torch.randn(4, 2, 8, generator=g) for _ in range(3))
    plugin = EmbeddingDistillation([torch.nn.Identity(), torch.nn.Identity()], "mse+cosine", weights=[3.0, 1.0])
    want = 0.75 * a + 0.25 * b
    expected = F.mse_loss(s, want) + (1 - F.cosine_similarity(s, want, dim=-1)).mean()
    assert float(plugin.term(s, [a, b])) == pytest.approx(float(expected), rel=1e-6)


def test_embedding_plugin_weighs_the_task_loss_by_one_minus_alpha(tiny_bert_dir, stsb):
    task = stsb
    teacher = torchslim.build_model(f"hf:{tiny_bert_dir}").eval()
    student = build_student(FromTeacher(layers=(1,)), teacher).eval()
    batch = task.collate([task.split("train")[i] for i in range(8)])
    plugin = EmbeddingDistillation(teacher, "cosine", alpha=0.25)
    plugin.task = task
    with torch.no_grad():
        s, t = task.forward(student, batch), task.forward(teacher, batch)
        got = plugin.loss(student, batch, s, torch.tensor(2.0))
    want = 0.25 * (1 - F.cosine_similarity(s, t, dim=-1)).mean() + 0.75 * 2.0
    assert float(got) == pytest.approx(float(want), rel=1e-6)
