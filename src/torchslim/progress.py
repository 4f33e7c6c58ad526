"""Progress of long loops (training epochs, metric evaluation, calibration) and run events.

- On a terminal (stderr is a TTY) a loop shows a ``tqdm`` bar.
- Otherwise (logs, CI, notebooks' captured stderr) it writes a log line to the ``torchslim``
  logger every :func:`period` seconds (30 by default; ``TORCHSLIM_PROGRESS_PERIOD`` sets it,
  ``0`` logs every update): ``baseline: epoch 1/3 step 120/450 (27%) loss 0.4312, 41.2 step/s,
  ETA 0:00:08``.
- Every such line, every finished training epoch and every finished recipe step is also an
  *event*, a plain dict handed to the callbacks registered with :func:`listen` (or given as
  ``torchslim.compress(..., on_event=fn)``). ``event["kind"]`` is ``"progress"`` (``desc``,
  ``done``, ``total``, ``unit``, ``rate`` per second, ``eta_s`` and the loop's figures such as
  ``epoch`` and ``loss``), ``"epoch"`` (``desc``, ``epoch``, ``epochs`` and the epoch's
  ``train/loss``, ``train/lr``, ``val/<metric>``) or ``"step"`` (``index``, ``name`` and the
  metrics ``row``).

The Python API logs through the standard :mod:`logging` module under the ``torchslim`` logger
namespace; ``logging.basicConfig(level=logging.INFO)`` shows what the CLI shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("torchslim.progress")

#: seconds between progress log lines when stderr is not a terminal
DEFAULT_PERIOD_S = 30.0
PERIOD_ENV = "TORCHSLIM_PROGRESS_PERIOD"

EventFn = Callable[[dict[str, Any]], None]
_LISTENERS: list[EventFn] = []


def period() -> float:
    """Seconds between progress lines: ``$TORCHSLIM_PROGRESS_PERIOD``, else 30."""
    text = os.environ.get(PERIOD_ENV, "").strip()
    try:
        return max(float(text), 0.0) if text else DEFAULT_PERIOD_S
    except ValueError:
        return DEFAULT_PERIOD_S


@contextlib.contextmanager
def listen(fn: EventFn | None) -> Iterator[None]:
    """Within the block, ``fn(event)`` is called for every event (see the module docstring).

    Examples
    --------
    >>> seen = []
    >>> with listen(seen.append):
    ...     emit("step", index=1, name="prune-magnitude", row={})
    >>> seen[0]["kind"], seen[0]["name"]
    ('step', 'prune-magnitude')
    """
    if fn is None:
        yield
        return
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def emit(kind: str, **fields: Any) -> None:
    """Hand the event ``{"kind": kind, **fields}`` to every listener."""
    for fn in list(_LISTENERS):
        fn({"kind": kind, **fields})


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress of one loop of ``total`` updates: a bar on a terminal, else periodic log lines
    and ``progress`` events (see the module docstring).

    Parameters
    ----------
    total : int
        Updates the loop makes in all.
    desc : str
        Names the loop in lines and events (``baseline``, ``metric on test``).
    unit : str, default="step"
    initial : int, default=0
        Updates already made (a resumed training).
    enabled : bool, default=True
        False shows and logs nothing (the ranks other than 0 under torchrun).
    period_s : float, optional
        Seconds between log lines and events; default :func:`period`.

    Examples
    --------
    >>> with listen(print):
    ...     with Progress(2, "demo", period_s=0) as p:
    ...         p.update(loss=0.5)  # doctest: +ELLIPSIS
    {'kind': 'progress', 'desc': 'demo', 'done': 1, 'total': 2, 'unit': 'step', 'rate': ..., 'eta_s': ..., 'loss': 0.5}
    """

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0,
                 enabled: bool = True, period_s: float | None = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._start = int(initial)
        self.enabled = enabled
        self.period_s = period() if period_s is None else period_s
        self._t0 = self._last = time.monotonic()
        self.figures: dict[str, Any] = {}
        self._bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE"):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1, **figures: Any) -> None:
        """``n`` more updates done; ``figures`` (``epoch``, ``loss``, ...) are shown with them."""
        self.done += n
        self.figures.update(figures)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if figures:
                self._bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v
                                       for k, v in self.figures.items()}, refresh=False)
        now = time.monotonic()
        if now - self._last >= self.period_s:
            self._last = now
            self._report(now)

    def _report(self, now: float) -> None:
        rate = (self.done - self._start) / max(now - self._t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else None
        event = {"desc": self.desc, "done": self.done, "total": self.total, "unit": self.unit,
                 "rate": rate, "eta_s": eta, **self.figures}
        emit("progress", **event)
        if self._bar is None:
            figs = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in self.figures.items())
            pct = 100 * self.done / max(self.total, 1)
            log.info("%s: %s%s %d/%d (%.0f%%), %.3g %s/s%s", self.desc, figs + " " if figs else "",
                     self.unit, self.done, self.total, pct, rate, self.unit,
                     f", ETA {_clock(eta)}" if eta is not None else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
