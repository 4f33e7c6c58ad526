"""User weight files (--weights, model.weights): every bad file is an ArtifactError, nothing runs."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.errors import ArtifactError
from torchslim.weights import check_state_dict, load_weights_into, read_state_dict


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _digits_state():
    torch.manual_seed(0)
    return torchslim.build_model("zoo:digits-cnn").state_dict()


@pytest.mark.parametrize("content,needle", [
    (b"hello world\nthis is a text file\n", "it is a text file"),
    (b"", "cannot read weights"),
    (bytes(range(256)) * 4, "refused"),
    (b"PK\x03\x04" + b"\0" * 60, "cannot read weights"),
])
def test_unreadable_weights_file_is_an_artifact_error(tmp_path, content, needle):
    """Regression: a text file passed as weights escaped as KeyError (exit 1)."""
    f = tmp_path / "w.pt"
    f.write_bytes(content)
    with pytest.raises(ArtifactError, match=needle):
        read_state_dict(f)


def test_text_weights_exit_2_on_the_command_line(tmp_path, capsys):
    f = tmp_path / "weights.txt"
    f.write_text("not weights\n")
    code = main(["measure", "zoo:digits-cnn", "--task", "digits", "--weights", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(f) in err and "Traceback" not in err


def test_truncated_torch_save_file(tmp_path):
    f = tmp_path / "w.pt"
    torch.save(_digits_state(), f)
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(ArtifactError, match="cannot read weights"):
        read_state_dict(f)


def test_unreadable_safetensors(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_text("hello")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        read_state_dict(f)


@pytest.mark.parametrize("make,needle", [
    (lambda: torch.randn(4, 4).to_sparse(), "sparse"),
    (lambda: torch.randn(4, 4).to_sparse_csr(), "sparse"),
    (lambda: torch.empty(4, 4, device="meta"), "meta tensor"),
    (lambda: torch.randn(4, 4, dtype=torch.complex64), "complex"),
])
def test_sparse_meta_complex_tensors_are_refused(tmp_path, make, needle):
    """Regression: complex tensors were silently cast to real; sparse/meta ones failed late."""
    f = tmp_path / "w.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch's own "sparse CSR is in beta" on creating one
        torch.save({"layer.weight": make()}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no torch warning leaks out either
        with pytest.raises(ArtifactError, match=f"layer.weight is .*{needle}"):
            read_state_dict(f)


def test_complex_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(3, dtype=torch.complex64)}, str(f))
    with pytest.raises(ArtifactError, match="w is complex"):
        read_state_dict(f)


def test_pickle_refusal_is_our_own_message(tmp_path):
    """Regression: the refusal repeated torch's advice to re-run torch.load with weights_only=False."""
    _Evil.marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"0.weight": _Evil()}, f)
    with pytest.raises(ArtifactError) as info:
        read_state_dict(f)
    msg = str(info.value)
    assert "Python objects other than tensors" in msg and "'os.system'" in msg
    assert "weights_only=True" in msg and "nothing in it was executed" in msg
    assert "state_dict" in msg and "safetensors" in msg
    assert "weights_only=False" not in msg and "Re-running" not in msg
    assert not _Evil.marker.exists()


def test_raw_pickle_is_refused_without_torch_warning(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    f = tmp_path / "raw.pkl"
    f.write_bytes(pickle.dumps(_Evil(), protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ArtifactError, match="refused.*weights_only=True") as info:
            read_state_dict(f)
    assert not [w for w in caught if "pickle protocol" in str(w.message)], [str(w.message) for w in caught]
    assert "weights_only=False" not in str(info.value)
    assert not _Evil.marker.exists()


def test_non_tensor_entry_is_named(tmp_path):
    f = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3}, f)
    with pytest.raises(ArtifactError, match="entry 'epoch' holds int"):
        read_state_dict(f)


def test_safetensors_content_is_recognised_without_the_suffix(tmp_path):
    from safetensors.torch import save_file
    state = _digits_state()
    f = tmp_path / "weights.bin"
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    back = read_state_dict(f)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_float16_file_into_float32_model_loads(tmp_path):
    state = _digits_state()
    f = tmp_path / "w16.pt"
    torch.save({k: v.half() for k, v in state.items()}, f)
    m = torchslim.build_model("zoo:digits-cnn")
    load_weights_into(m, f)
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, state[k].half().float(), rtol=0, atol=0)


def test_integer_file_into_float_model_is_refused(tmp_path):
    state = _digits_state()
    state["0.weight"] = state["0.weight"].to(torch.int8)
    f = tmp_path / "w.pt"
    torch.save(state, f)
    with pytest.raises(ArtifactError, match="0.weight has dtype int8, the model expects float32"):
        load_weights_into(torchslim.build_model("zoo:digits-cnn"), f)


def test_float_into_integer_buffer_is_refused():
    bn = nn.BatchNorm1d(3)
    state = dict(bn.state_dict())
    state["num_batches_tracked"] = state["num_batches_tracked"].float()
    with pytest.raises(ArtifactError, match="num_batches_tracked has dtype float32, the model expects int64"):
        check_state_dict(bn, state, "w.pt")
