"""Recipe validation never crashes: any YAML-shaped input is either a Recipe or a RecipeError
(UserError -> exit 2), never a TypeError or AttributeError (exit 1)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim.errors import UserError
from torchslim.recipe import Recipe

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2), st.just(float("nan")),
                    st.sampled_from(["", "zoo:digits-cnn", "digits", "magnitude", "linear", "re:.*", "x"]))
keys = st.sampled_from(["model", "task", "train", "steps", "measure", "search", "method", "sparsity",
                        "bits", "epochs", "lr", "spec", "weights", "args", "finetune", "targets",
                        "prune", "quantize", "distill", "export", "train", "student", "formats",
                        "batch_sizes", "schedule", "granularity", "bogus"])
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=12)


#: examples per property: a bounded run in the suite, a long one from bench/fuzz_files.py
N = max(1, int(300 * float(os.environ.get("TORCHSLIM_FUZZ_SCALE", "1"))))


def _check(data):
    try:
        Recipe.from_dict(data)
    except UserError:
        pass


@settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_arbitrary_input_is_a_recipe_or_a_clear_error(data):
    _check(data)


@settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.dictionaries(keys, values, min_size=1, max_size=2), max_size=3),
       train=values, model=values)
def test_near_valid_recipes(steps, train, model):
    _check({"model": "zoo:digits-cnn", "task": "digits", "steps": steps})
    _check({"model": model, "task": "digits", "train": train})
