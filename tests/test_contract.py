"""Contract checks generated from the registry: every registered method gets them the day it
is registered (STYLE R12). Nothing here lists methods by hand."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

import torchslim
from torchslim.errors import RecipeError
from torchslim.pipeline import StepContext
from torchslim.recipe import Recipe

ENTRIES = torchslim.list_methods()
IDS = [e.key for e in ENTRIES]


def _example(entry):
    cfg = entry.config_cls.example()
    if entry.verb == "train":  # the train verb's method names the optimizer
        cfg = dataclasses.replace(cfg, optimizer=entry.name)
    return cfg


def _run(entry, model, task, tmp_path):
    torch.manual_seed(0)
    cfg = _example(entry)
    out = entry.handler(copy.deepcopy(model), cfg, StepContext(task=task, out_dir=tmp_path))
    return out.eval()


def test_registry_has_the_contract_names():
    keys = set(IDS)
    for k in ("train.sgd", "train.adamw", "prune.magnitude", "quantize.linear", "distill.logits",
              "export.default"):
        assert k in keys


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_method_contract(entry, trained_digits, digits_task, tmp_path):
    model = copy.deepcopy(trained_digits).eval()
    before = copy.deepcopy(model.state_dict())
    x = digits_task.example_inputs(8)[0]

    _example(entry).check_ready(digits_task)   # the pre-flight check passes for a runnable config
    out = _run(entry, model, digits_task, tmp_path / "a")
    # 1. the input is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{entry.key} changed its input ({k})"
    # 2. the output runs, without NaN
    with torch.no_grad():
        y = out(x)
    assert torch.isfinite(y).all()
    # 3. save -> load gives identical outputs
    torchslim.save(out, tmp_path / "saved")
    back = torchslim.load(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)
    # 4. seeded runs repeat exactly
    again = _run(entry, model, digits_task, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_config_round_trips_through_yaml(entry):
    cfg = _example(entry)
    text = yaml.safe_dump(cfg.to_dict())
    assert entry.config_cls.from_dict(yaml.safe_load(text)) == cfg
    # and as a recipe step
    step = {entry.verb: {"method": entry.name, **cfg.to_dict()}}
    if entry.verb == "train":
        step[entry.verb].pop("optimizer")
    r = Recipe.from_dict({"model": "zoo:digits-cnn", "task": "digits", "steps": [step]})
    assert r.steps[0].config == cfg
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def _bad_value(f: dataclasses.Field):
    meta = f.metadata or {}
    if meta.get("choices"):
        return "no-such-choice"
    if meta.get("low") is not None:
        return meta["low"] - 1
    if meta.get("high") is not None:
        return meta["high"] + 1
    return None


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_every_constrained_field_rejects_bad_values(entry):
    base = entry.config_cls.example().to_dict()
    checked = 0
    for f in dataclasses.fields(entry.config_cls):
        bad = _bad_value(f)
        if bad is None:
            continue
        with pytest.raises(RecipeError, match=f.name):
            entry.config_cls.from_dict({**base, f.name: bad})
        checked += 1
    with pytest.raises(RecipeError, match="unknown key"):
        entry.config_cls.from_dict({**base, "no_such_field": 1})
    assert checked >= 1, f"{entry.key} declares no constraint at all"


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_methods_listing_documents_every_field(entry):
    fields = entry.config_cls.describe_fields()
    assert fields and all(f["doc"] for f in fields), f"{entry.key}: every field needs a doc string"
    assert entry.summary
