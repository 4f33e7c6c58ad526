"""The ``stsb`` task: STS Benchmark sentence similarity for sentence-embedding encoders.

Data: ``DATA_DIR/stsbenchmark/sts-{train,dev,test}.csv`` from the original release
(tab-separated, no header; fields genre, file, year, id, score 0-5, sentence1, sentence2,
sometimes followed by source notes). Splits: train, val (= dev), test.

Model I/O, as sentence-transformers does it: ``model(input_ids, attention_mask)`` gives token
states, mean-pooled over the attention mask into one embedding per sentence. The loss is the
MSE between the cosine similarity of a pair's embeddings and ``score / 5``
(``CosineSimilarityLoss``); the metric is the Spearman correlation between cosine similarity
and the gold score.

``stsb`` tokenizes with the bundled all-MiniLM-L6-v2 tokenizer; ``stsb:DIR`` uses the
tokenizer saved in a local directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import DataError, SpecError
from ..modules import eval_mode
from .hf import load_tokenizer, minilm_dir
from .tasks import Task, _device_of, register_task, to_device

FILES = {"train": "sts-train.csv", "val": "sts-dev.csv", "test": "sts-test.csv"}
MAX_LENGTH = 256   # all-MiniLM-L6-v2's max_seq_length; STS-B sentences are far shorter
# example inputs have one fixed length for every batch size, so latencies compare (exports
# keep the batch and sequence length dynamic): about the mean STS-B sentence (14 tokens; 95% <= 31)
EXAMPLE_LENGTH = 16
#: the Hugging Face name of the bundled tokenizer, recorded instead of its local folder
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def read_stsb(path: Path) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` per line of an STS Benchmark file.

    Plain ``split('\\t')``: sentences hold quote characters, so csv quoting would merge lines.
    """
    if not path.is_file():
        raise DataError(
            f"missing data file {path}: the stsb task needs {', '.join(FILES.values())} "
            f"(the STS Benchmark release, tab-separated) in {path.parent}; set --data-dir or "
            f"TORCHSLIM_DATA to the folder holding '{path.parent.name}/'. Nothing is downloaded.")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    pairs = []
    # split on '\n' only: str.splitlines() would also break on U+2028 etc. inside sentences
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) < 7:
            raise DataError(f"{path}:{lineno}: expected at least 7 tab-separated fields (genre, file, "
                            f"year, id, score, sentence1, sentence2), found {len(fields)}")
        try:
            score = float(fields[4])
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            raise DataError(f"{path}:{lineno}: score {fields[4]!r} is not a number in [0, 5]")
        pairs.append((fields[5], fields[6], score))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs in the file")
    return pairs


class _PairDataset(Dataset):
    """Token ids of both sentences and the gold score of each pair."""

    def __init__(self, ids1: list[list[int]], ids2: list[list[int]], scores: list[float]) -> None:
        self.ids1, self.ids2, self.scores = ids1, ids2, scores

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], float]:
        return self.ids1[i], self.ids2[i], self.scores[i]


def _pad(seqs: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, D) token states, (N, L) mask -> (N, D) mean over real tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)                           # (N, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings (N, D) of a batch of token ids (N, L)."""
    out = model(input_ids, attention_mask)
    hidden = out if isinstance(out, torch.Tensor) else out[0]         # last_hidden_state (N, L, D)
    return mean_pool(hidden, attention_mask)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x.double().numpy(), y.double().numpy()).statistic)


class STSBTask(Task):
    """STS Benchmark: batches are ``(input_ids, attention_mask, target)``.

    ``input_ids`` and ``attention_mask`` are (B, 2, L): both sentences of each pair, padded to
    the longest sentence of the batch; ``target`` is (B,) = score / 5. :meth:`forward` returns
    the pair embeddings (B, 2, D).
    """

    metric_name = "spearman"
    outputs = "embeddings"
    input_names = ("input_ids", "attention_mask")
    output_name = "token_embeddings"   # (N, L, D) token states, mean-pooled into the embedding
    variable_length = True

    def chance_level(self, split: str = "test") -> float:
        """Unrelated similarities have a Spearman correlation of 0 with the gold scores."""
        return 0.0

    def __init__(self, spec: str, root: Path, tokenizer_dir: Path, max_length: int = MAX_LENGTH,
                 tokenizer_name: str | None = None) -> None:
        super().__init__(spec)
        self.root, self.tokenizer_dir, self.max_length = root, tokenizer_dir, max_length
        self.tokenizer_name = tokenizer_name    # a hub name for a bundled tokenizer, else its folder
        self._tok: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_dir, f"task {self.spec!r}")
        return self._tok

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Tokenizer, truncation and padding of the inputs, and the pooling of the output."""
        return {"input": "text", "tokenizer": self.tokenizer_name or str(self.tokenizer_dir), "max_length": self.max_length, "truncation": True,
                "padding": "longest", "pad_token_id": self._pad_id, "inputs": list(self.input_names),
                "dtype": "int64", "output": self.output_name,
                "pooling": "mean of the output over the positions where attention_mask is 1",
                "similarity": "cosine"}

    def _tokenize(self, sentences: list[str]) -> list[list[int]]:
        return self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]

    def _load_splits(self) -> dict[str, Dataset]:
        splits: dict[str, Dataset] = {}
        for name, fname in FILES.items():
            pairs = read_stsb(self.root / fname)
            splits[name] = _PairDataset(self._tokenize([p[0] for p in pairs]),
                                        self._tokenize([p[1] for p in pairs]),
                                        [p[2] for p in pairs])
        return splits

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seqs = [s for a, b, _ in items for s in (a, b)]                # pair i -> rows 2i, 2i+1
        ids, mask = _pad(seqs, max(len(s) for s in seqs), self._pad_id)  # (2B, L)
        b = len(items)
        target = torch.tensor([score / 5.0 for _, _, score in items], dtype=torch.float32)
        return ids.view(b, 2, -1), mask.view(b, 2, -1), target

    def example_inputs(self, batch_size: int = 1) -> tuple:
        """``(input_ids, attention_mask)``, each (batch_size, 16): first sentences of the test
        split, padded or cut to :data:`EXAMPLE_LENGTH` tokens."""
        ds = self.split("test")
        seqs = [ds[i % len(ds)][0][:EXAMPLE_LENGTH] for i in range(batch_size)]
        return _pad(seqs, EXAMPLE_LENGTH, self._pad_id)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        ids, mask = batch[0], batch[1]                                 # (B, 2, L)
        b = ids.shape[0]
        emb = embed(model, ids.reshape(2 * b, -1), mask.reshape(2 * b, -1))  # (2B, D)
        return emb.view(b, 2, -1)                                      # (B, 2, D)

    def targets(self, batch: Any) -> torch.Tensor:
        return batch[2]

    def loss(self, outputs: torch.Tensor, batch: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        cos = F.cosine_similarity(outputs[:, 0], outputs[:, 1], dim=-1)
        return F.mse_loss(cos, self.targets(batch))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", batch_size: int = 128) -> float:
        """Spearman correlation of cosine similarity with the gold score."""
        ds = self.split(split)
        # longest pairs first, so each batch pads to similar lengths (order does not change ranks)
        order = sorted(range(len(ds)), key=lambda i: -max(len(ds[i][0]), len(ds[i][1])))
        device = _device_of(model)
        sims = torch.empty(len(ds))
        with eval_mode(model):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = to_device(self.collate([ds[i] for i in idx]), device)
                out = self.forward(model, batch)
                sims[idx] = F.cosine_similarity(out[:, 0], out[:, 1], dim=-1).float().cpu()
        gold = torch.tensor(ds.scores, dtype=torch.float64)
        return spearman(sims, gold)


@register_task("stsb")
def _stsb(arg: str, data_dir: Path) -> Task:
    if arg:
        tok_dir = Path(arg).expanduser()
        if not tok_dir.is_dir():
            raise SpecError(f"stsb:{arg}: tokenizer directory not found: {tok_dir} (expected a folder "
                            "with tokenizer.json or vocab.txt, e.g. the model's save_pretrained folder)")
        return STSBTask("stsb", data_dir / "stsbenchmark", tok_dir)
    return STSBTask("stsb", data_dir / "stsbenchmark", minilm_dir(), tokenizer_name=MINILM_NAME)
