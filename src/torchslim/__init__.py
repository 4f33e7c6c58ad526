"""torchslim: make trained PyTorch models smaller and faster, and prove it with measurements.

Examples
--------
>>> import torchslim
>>> model = torchslim.build_model("zoo:lenet-300-100")
>>> pruned = torchslim.apply(model, torchslim.list_methods("prune.magnitude")[0].config_cls(sparsity=0.5))
"""

# Before anything imports torch: OpenMP reads OMP_WAIT_POLICY once, when torch loads. PASSIVE
# keeps idle worker threads from spin-waiting, which on a busy machine stalls forward passes
# (0.08 ms read as 36-60 ms on 2 shared cores); a policy the user set wins. _OMP_WAIT_POLICY is
# the policy in force, as set when torch loaded (reported by torchslim.runtime.omp_wait_policy).
import os as _os
import sys as _sys

_OMP_WAIT_POLICY = (_os.environ.get("OMP_WAIT_POLICY", "default") if "torch" in _sys.modules
                    else _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE"))
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
