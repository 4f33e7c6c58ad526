"""torchslim: make trained PyTorch models smaller and faster, and prove it with measurements.

Examples
--------
>>> import torchslim
>>> model = torchslim.build_model("zoo:lenet-300-100")
>>> pruned = torchslim.apply(model, torchslim.list_methods("prune.magnitude")[0].config_cls(sparsity=0.5))
"""

from ._version import __version__
from .api import apply, apply_, compress
from .artifact import load, save
from .measure import measure
from .recipe import Recipe
from .registry import list_methods, register_method
from .specs import build_model, build_task

__all__ = [
    "__version__", "apply", "apply_", "compress", "load", "save", "measure", "Recipe",
    "list_methods", "register_method", "build_model", "build_task",
]
