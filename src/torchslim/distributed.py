"""torch.distributed helpers: torchslim never runs its own distributed engine.

Under ``torchrun`` every process runs the same pipeline; training wraps the model in DDP and only
rank 0 writes files. CPU tensors go through gloo; when CUDA is present, CUDA tensors go through
nccl (one process group with both backends, each process bound to ``cuda:LOCAL_RANK``).

Examples
--------
>>> init_from_env()   # not under torchrun: nothing to join
False
>>> world_size(), rank(), is_main()
(1, 0, True)
"""

from __future__ import annotations

import atexit
import logging
import os

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun.

    The group is destroyed when the process exits. Ranks other than 0 log warnings and errors
    only (debug logging, when on, stays on), so progress is reported once.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 \
            or "MASTER_ADDR" not in os.environ:
        return False
    if torch.cuda.is_available():
        # models are trained where they live: CPU tensors need gloo even on a GPU machine
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown)
    pkg = logging.getLogger("torchslim")
    if dist.get_rank() != 0 and pkg.getEffectiveLevel() > logging.DEBUG:
        pkg.setLevel(logging.WARNING)
    return True


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only process that writes files and logs curves."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of ``obj`` on every rank (any picklable object)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64; unchanged when not distributed).

    Examples
    --------
    >>> all_reduce_sum([1.5, 2.0])
    [1.5, 2.0]
    """
    if world_size() <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average each tensor over all processes, in place (no-op when not distributed)."""
    if world_size() <= 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
