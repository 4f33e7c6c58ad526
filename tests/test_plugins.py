"""Training plugins: loss terms, extra trainable parameters, after-step hooks and checkpointed
state, composed in one run of the one trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.train import TrainConfig, Trainer, TrainingPlugin


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchslim.build_model("zoo:digits-cnn", args={"channels": [8, 16], "hidden": 32})


class HintLike(TrainingPlugin):
    """A FitNets-style term with its own trainable projection: the MSE between a projection of
    the logits and a fixed random target, weighted by ``w``; the projection trains with the model."""

    def __init__(self, w: float) -> None:
        torch.manual_seed(1)
        self.proj = nn.Linear(10, 4)
        self.target = torch.randn(4)
        self.w = w
        self.steps = 0

    def parameters(self):
        return list(self.proj.parameters())

    def loss(self, model, batch, outputs, loss):
        return loss + self.w * F.mse_loss(self.proj(outputs), self.target.expand(len(outputs), 4))

    def after_step(self, model, step, total):
        self.steps = step

    def state_dict(self):
        return {"proj": self.proj.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.proj.load_state_dict(state["proj"])
        self.steps = state["steps"]


def test_plugin_adds_a_loss_term_and_trains_its_own_parameters(digits_task):
    plugin = HintLike(w=1.0)
    before = plugin.proj.weight.detach().clone()
    config = TrainConfig(epochs=2, lr=0.01, batch_size=256, loggers=())
    model = tiny().eval()  # no dropout: the loss is computed twice below
    trainer = Trainer(model, digits_task, config, plugins=[plugin])
    batch = next(iter(torch.utils.data.DataLoader(digits_task.split("train"), batch_size=64)))
    base = F.cross_entropy(model(batch[0]), batch[1])
    extra = F.mse_loss(plugin.proj(model(batch[0])), plugin.target.expand(64, 4))
    torch.testing.assert_close(trainer.loss_fn(model, batch), base + extra)   # the term is added
    trainer.fit()
    assert not torch.equal(plugin.proj.weight, before)          # optimized with the model
    assert any(plugin.proj.weight is p for g in trainer.optimizer.param_groups for p in g["params"])
    assert plugin.steps == 2 * (1257 // 256)                     # after_step saw every step


def test_plugin_state_is_checkpointed_and_resumed(digits_task, tmp_path):
    """A run killed after epoch 1 and resumed ends exactly where an uninterrupted one does,
    plugin parameters included."""
    config = TrainConfig(epochs=2, lr=0.01, batch_size=256, loggers=())
    full = HintLike(w=0.5)
    Trainer(tiny(), digits_task, config, plugins=[full]).fit()

    class Stop(Exception):
        pass

    def stop(m, step, total):
        if step == total // 2 + 1:
            raise Stop

    first = HintLike(w=0.5)
    with pytest.raises(Stop):
        Trainer(tiny(), digits_task, config, plugins=[first], callbacks=[stop], ckpt_dir=tmp_path).fit()
    resumed = HintLike(w=0.5)
    Trainer(tiny(), digits_task, config, plugins=[resumed], ckpt_dir=tmp_path).fit()
    assert resumed.steps == full.steps
    torch.testing.assert_close(resumed.proj.weight, full.proj.weight, rtol=0, atol=0)
