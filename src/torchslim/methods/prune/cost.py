"""What a plan's budget counts: a model's params, its MACs, or its measured latency.

``ratios: sensitivity`` and ``ratios: netadapt`` remove a fraction of one of these (``budget``).
Params and MACs are counted (:func:`~torchslim.measure.count_params`,
:func:`~torchslim.measure.count_macs`); latency is measured: the median milliseconds of one
forward pass at ``latency_batch_size`` on the runtime ``latency_runtime``
(:func:`~torchslim.measure.measure_runtime_latency`, ``torch.utils.benchmark`` blocks), at the
process's intra-op thread count. NetAdapt (Yang et al. 2018, sec. 3) plans for measured latency
because MACs do not predict it: a layer's time depends on its shapes and the kernels the runtime
picks for them. A measured cost moves from one measurement to the next (a few percent on a busy
machine), so plans for it are as exact as the timing is, and each model is timed in turns with
the model it is compared to (:class:`RelativeCost`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...errors import RecipeError
from ...measure import count_macs, count_params, measure_runtime_latency
from ...specs.tasks import Task, to_device

#: the budgets a plan can be made for
COSTS = ("params", "macs", "latency")
#: seconds each latency measurement runs at least (``torch.utils.benchmark`` ``min_run_time``)
MIN_RUN_TIME = 0.2


def model_cost(task: Task, cost: str, *, device=None, latency_batch_size: int = 1,
               latency_runtime: str = "eager") -> Callable[[nn.Module], float]:
    """A function ``model -> cost``: params (count), MACs of one example of ``task``, or latency
    (milliseconds per forward pass of ``latency_batch_size`` examples on ``latency_runtime``,
    the median of :func:`~torchslim.measure.time_fn`).

    Raises
    ------
    RecipeError
        For a cost outside :data:`COSTS` or a batch size below 1.

    Examples
    --------
    >>> from torchslim.specs.tasks import build_task
    >>> size = model_cost(build_task("shape:3x8x8"), "macs")
    >>> size(nn.Conv2d(3, 4, 1))   # 3 x 4 MACs at each of 8 x 8 positions
    768.0
    """
    if cost not in COSTS:
        raise RecipeError(f"budget: cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if cost == "params":
        return lambda m: float(count_params(m)[0])
    if cost == "macs":
        inputs = to_device(task.example_inputs(1), device or "cpu")
        return lambda m: float(count_macs(m, inputs))
    if latency_batch_size < 1:
        raise RecipeError(f"latency_batch_size must be >= 1, got {latency_batch_size}")

    def latency(m: nn.Module) -> float:
        timing = measure_runtime_latency(m, task, latency_runtime, batch_sizes=(latency_batch_size,),
                                         min_run_time=MIN_RUN_TIME)[str(latency_batch_size)]
        latency.unstable += int(timing.unstable)
        return float(timing.median_ms)
    latency.unstable = 0  # timings whose spread stayed above measure.UNSTABLE_ABOVE in every attempt
    return latency


class RelativeCost:
    """``model -> its cost as a fraction of reference's`` (see :func:`model_cost` for the costs).

    Counted costs divide by the reference's count, taken once. Latency times the reference
    again with each model, in turns (reference first on one call, last on the next, so a
    warm-up or clock boost does not favour one side), and a machine that slows down or speeds
    up over a long search moves both. ``last``: the two milliseconds of the latest call,
    reference first; ``unstable``: how many timings stayed noisy (see
    :func:`~torchslim.measure.time_fn`).

    Examples
    --------
    >>> from torchslim.specs.tasks import build_task
    >>> frac = RelativeCost(build_task("shape:3x8x8"), "params", nn.Linear(8, 4))
    >>> frac(nn.Linear(8, 2))
    0.5
    """

    def __init__(self, task: Task, cost: str, reference: nn.Module, **kwargs) -> None:
        self.size = model_cost(task, cost, **kwargs)
        self.reference = reference
        self.timed = cost == "latency"
        self.last: tuple[float, float] | None = None
        self._fixed = None if self.timed else self.size(reference)
        self._calls = 0

    @property
    def unstable(self) -> int:
        return getattr(self.size, "unstable", 0)

    def __call__(self, model: nn.Module) -> float:
        if not self.timed:
            ref, got = self._fixed, self.size(model)
        elif self._calls % 2 == 0:
            ref = self.size(self.reference)
            got = self.size(model)
        else:
            got = self.size(model)
            ref = self.size(self.reference)
        self._calls += 1
        self.last = (ref, got)
        return got / ref if ref > 0 else float("inf")

    def median(self, model: nn.Module, turns: int = 3) -> float:
        """The median of ``turns`` calls (latency; a counted cost is exact, one call), with
        ``last`` set to the median call's two milliseconds."""
        if not self.timed:
            return self(model)
        calls = []
        for _ in range(turns):
            calls.append((self(model), self.last))
        calls.sort(key=lambda c: c[0])
        fraction, self.last = calls[len(calls) // 2]
        return fraction


def latency_setting(batch_size: int, runtime: str) -> dict:
    """How a latency is timed, as the records say it: ``{"batch_size", "runtime", "threads"}``
    (the intra-op threads in force now)."""
    import torch
    return {"batch_size": int(batch_size), "runtime": str(runtime), "threads": torch.get_num_threads()}


def check_runtime(name: str, where: str) -> None:
    """RecipeError unless ``name`` is a registered runtime a plan can time candidate after
    candidate (``where`` names the field). ``compile`` is refused: every candidate has other
    shapes, and ``torch.compile`` recompiles for each until its recompile limit, then runs them
    eagerly while the figure would still say compiled."""
    from ...errors import did_you_mean
    from ...runtime import list_runtimes
    timed = [r for r in list_runtimes() if r != "compile"]
    if name not in list_runtimes():
        raise RecipeError(f"{where}: unknown runtime {name!r}{did_you_mean(str(name), timed)}; runtimes a plan can "
                          f"time: {', '.join(timed)}")
    if name == "compile":
        raise RecipeError(f"{where}: compile cannot time a search's candidates (each has new shapes, so "
                          "torch.compile recompiles until its limit and then runs eagerly); plan on eager or "
                          "onnxruntime and measure the result with measure: {runtime: compile}")


__all__ = ["COSTS", "MIN_RUN_TIME", "RelativeCost", "check_runtime", "latency_setting", "model_cost"]
