"""Reports from metrics.json: a console table, report.md, a self-contained report.html, plots.

Everything is derived from ``DIR/metrics.json`` alone (CONTRACT section 6), so
``torchslim report DIR`` can rewrite the report of any finished (or partial) run. Every file is
written to a temporary sibling first and renamed into place, so a reader never sees half a file.

Ratios compare each step with ``steps[0]``, the baseline: ``size x`` is baseline bytes / step
bytes (bigger is smaller on disk), ``speed-up`` is baseline latency / step latency, written ``≈``
when the two medians lie within their interquartile ranges of each other (a difference the
measurement cannot tell from noise), and ``delta`` is step metric - baseline metric, in
percentage points when both values lie in [-1, 1] (accuracy, Spearman). Sizes are binary units
(1 KiB = 1024 B) everywhere.

``torchslim report A B ...`` compares runs: each run's last step against its own baseline, one
row per run (:func:`compare_rows`, :func:`write_comparison`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_open, write_text

# Keys every step has (CONTRACT section 6) or that the table already shows; anything else a step
# carries (a handler's own figures such as onnx_latency_ms) goes to the "step details" section.
_STANDARD_KEYS = frozenset({"name", "verb", "method", "params", "nonzero_params", "size_bytes",
                            "macs", "latency_ms", "metric", "wall_s", "config",
                            # shown in their own sections: latency table and plot, header, banner,
                            # per-layer tables, training curves
                            "latency", "runtime", "onnx_latency_ms", "onnx_latency", "input_shapes",
                            "warnings", "layers", "layer_sparsity", "training", "sensitivity", "skipped", "netadapt",
                            "ingredients", "base", "greedy", "spectra", "quantized_layers",
                            "quantized_layers_input"})
# Files make_plots owns in plots/; a stale one (e.g. metric.png of a run now without a metric) is
# removed so the folder matches the report.
_PLOT_FILES = ("size.png", "macs.png", "latency.png", "metric.png", "metric_vs_size.png", "training.png",
               "sensitivity.png", "spectra.png", "quantization.png", "layer_sparsity.png")
_PLOT_CAPTIONS = {
    "size": "Size on disk per step",
    "macs": "MACs per forward pass (batch 1)",
    "latency": "Latency per forward pass, by batch size",
    "metric": "Task metric per step",
    "metric_vs_size": "Task metric against size on disk",
    "training": "Training curves: loss and validation metric per epoch",
    "sensitivity": "Sensitivity: the metric as each layer alone is pruned",
    "spectra": "Singular values of the factorized layers (normalized), the kept rank marked",
    "quantization": "Output SQNR per quantized layer (dB), coloured by bits; weight SQNR marked",
    "layer_sparsity": "Per-layer sparsity of the final model: weights zero or removed, of each baseline layer's",
}
#: a task metric whose values lie in [-1, 1] (accuracy, Spearman) is plotted on an axis at least
#: this tall (10 points), so that a fraction of a point does not fill the plot like a cliff
_MIN_UNIT_SPAN = 0.10
_NOTE = ("Sizes are bytes on disk of each step's saved artifact (1 KiB = 1024 B); size x is baseline "
         "bytes / step bytes. Latency is the median of repeated forward passes after warm-up, in ms per "
         "batch; ~ marks a figure whose spread stayed large after re-measuring (a busy machine); "
         "speed-up is baseline median / step median, and ≈ means the two medians are within their "
         "interquartile ranges (IQR) of each other: no change the measurement can show. "
         "MACs are traced (dense, batch 1). Delta is the metric change against the baseline, on "
         "the split each metric names in metrics.json (test unless measure.split says val).")


# -- formatting ------------------------------------------------------------------------------

def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, null, NaN, or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt_bytes(n: float | None) -> str:
    """Bytes in binary units: ``512 B``, ``39.1 KiB``, ``1.5 MiB``, ``2.0 GiB``."""
    if _num(n) is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _byte_unit(values: Iterable[float | None]) -> tuple[float, str]:
    """(divisor, unit) that suits the largest of ``values`` in a plot: KiB below 10 MiB, else MiB."""
    top = max((v for v in values if v is not None), default=0.0)
    return (1024.0 ** 2, "MiB") if top >= 10 * 1024 ** 2 else (1024.0, "KiB")


def _fmt_int(n: float | None) -> str:
    if _num(n) is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_tick(v: float) -> str:
    """Axis tick: 1.4M, 200K, 0.5."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:g}"


def _fmt_value(key: str, v: Any) -> str:
    """One extra per-step field, short: floats to 4 significant digits, dicts as ``k: v``."""
    if isinstance(v, dict):
        if key.endswith("latency_ms"):  # batch size -> ms, as latency_ms
            return ", ".join(f"bs{k} {_fmt_value('', x)} ms" for k, x in _by_batch(v))
        return ", ".join(f"{k}: {_fmt_value(str(k), x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(key, x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _by_batch(d: dict) -> list[tuple[str, Any]]:
    """Items of a ``{batch size: value}`` mapping, numeric batch sizes first, in order."""
    def key(item: tuple[str, Any]) -> tuple[int, float, str]:
        try:
            return (0, float(item[0]), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(item[0]))
    return sorted(((str(k), v) for k, v in d.items()), key=key)


def _metric(step: dict) -> dict:
    m = step.get("metric")
    return m if isinstance(m, dict) else {}


def _step_name(step: dict, i: int) -> str:
    return str(step.get("name") or f"step {i}")


def size_ratio(base: dict, step: dict) -> float | None:
    """Baseline bytes / step bytes (2.0 means half the size), or None if either is unknown."""
    b, s = _num(base.get("size_bytes")), _num(step.get("size_bytes"))
    return b / s if b and s else None


def _delta(base: dict, step: dict) -> tuple[float | None, str]:
    """(step metric - baseline metric, its text); the text says "pt" for values in [-1, 1]."""
    b, v = _num(_metric(base).get("value")), _num(_metric(step).get("value"))
    if b is None or v is None:
        return None, "-"
    if abs(b) <= 1 and abs(v) <= 1:
        return v - b, f"{100 * (v - b):+.2f} pt"
    return v - b, f"{v - b:+.4g}"


def _latency(step: dict, key: str = "latency_ms") -> dict[str, Any]:
    """``step[key]`` as ``{batch size as str: ms}`` ({} when absent)."""
    lat = step.get(key)
    return {str(k): v for k, v in lat.items()} if isinstance(lat, dict) else {}


def _batch_sizes(steps: Iterable[dict], key: str = "latency_ms") -> list[str]:
    """Every batch size any step measured, in numeric order."""
    seen: dict[str, None] = {}
    for s in steps:
        seen.update(dict.fromkeys(_latency(s, key)))
    return [k for k, _ in _by_batch(seen)]


def _timing(step: dict, bs: str, onnx: bool = False) -> tuple[float | None, float | None, bool]:
    """(median ms, IQR ms or None, unstable) of batch size ``bs`` on the step's runtime, or with
    ``onnx`` under ONNX Runtime (the export step's ``onnx_latency_ms`` / ``onnx_latency``)."""
    median = _num(_latency(step, "onnx_latency_ms" if onnx else "latency_ms").get(bs))
    full = step.get("onnx_latency" if onnx else "latency")
    entry = full.get(bs) if isinstance(full, dict) else None
    entry = entry if isinstance(entry, dict) else {}
    if median is None:
        median = _num(entry.get("median_ms"))
    return median, _num(entry.get("iqr_ms")), entry.get("unstable") is True


def within_noise(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool:
    """Whether two latencies ``(median, IQR)`` differ by no more than their IQRs allow: the
    medians lie within (IQR_a + IQR_b) / 2 of each other, i.e. the two interquartile ranges
    (taken around each median) overlap. False when either IQR is unknown.

    Examples
    --------
    >>> within_noise((1.0, 0.2), (1.15, 0.2)), within_noise((1.0, 0.02), (1.15, 0.02))
    (True, False)
    """
    (ma, ia), (mb, ib) = a, b
    if ma is None or mb is None or ia is None or ib is None:
        return False
    return abs(ma - mb) <= (ia + ib) / 2


def _speedup(base: dict, step: dict, bs: str) -> str:
    """Baseline median / step median for batch size ``bs`` (``1.25x``), ``≈`` within noise."""
    b, s = _timing(base, bs)[:2], _timing(step, bs)[:2]
    if not b[0] or not s[0]:
        return "-"
    if step is base:
        return "1.00x"
    return "≈" if within_noise(b, s) else f"{b[0] / s[0]:.2f}x"


def _fmt_ms(median: float | None, unstable: bool = False) -> str:
    return "-" if median is None else f"{median:.3f}{'~' if unstable else ''}"


def step_warnings(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every warning of every step as ``(step name, code, message)``, in step order.

    A step row may carry ``warnings: [{"code": str, "message": str}]`` (a step that lost more of
    the metric than allowed, a baseline at chance level, a layer pruned to almost nothing).
    """
    out = []
    for i, s in enumerate(metrics.get("steps") or []):
        if not isinstance(s, dict) or not isinstance(s.get("warnings"), list):
            continue
        for w in s["warnings"]:
            w = w if isinstance(w, dict) else {"message": w}
            out.append((_step_name(s, i), str(w.get("code") or "warning"), str(w.get("message") or "")))
    return out


def _shape_text(shape: Any, batch: str = "B") -> str:
    """``[1, 16]`` as ``(B, 16)``: the leading batch dimension named."""
    if not isinstance(shape, list) or not shape:
        return str(shape)
    return "(" + ", ".join([batch, *(str(d) for d in shape[1:])]) + ")"


def latency_setup(metrics: dict[str, Any]) -> str:
    """One line: what latency was measured on (runtime, threads, OpenMP policy, input shapes,
    batch sizes), from the baseline row; "" when nothing was timed."""
    steps = [s for s in metrics.get("steps") or [] if isinstance(s, dict)]
    bss = _batch_sizes(steps)
    if not bss:
        return ""
    rt = next((s["runtime"] for s in steps if isinstance(s.get("runtime"), dict)), {})
    parts = [f"runtime {rt.get('name', '?')}"] if rt else []
    if rt.get("threads") is not None:
        parts.append(f"{rt['threads']} thread(s)")
    if rt.get("omp_wait_policy"):
        parts.append(f"OMP_WAIT_POLICY {rt['omp_wait_policy']}")
    shapes = next((s["input_shapes"] for s in steps if isinstance(s.get("input_shapes"), list)), None)
    if shapes:
        parts.append("input " + ", ".join(_shape_text(x) for x in shapes))
    parts.append("B = " + ", ".join(bss))
    return "; ".join(parts)


# -- the table -------------------------------------------------------------------------------

def table_rows(metrics: dict[str, Any], exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table, one row per step, ratios against the baseline.

    Per batch size: ``latency bsN (ms)`` (median, ``~`` when unstable) and ``speed-up bsN``
    (baseline / step, ``≈`` within the IQRs); ``onnx bsN (ms)`` when a step (export) timed
    ONNX Runtime.

    Parameters
    ----------
    metrics : dict
        The content of metrics.json (only ``steps`` is read); missing fields show as ``-``.
    exact : bool, default=False
        Add a ``size (B)`` column with the exact bytes (report.md / report.html).

    Returns
    -------
    header : list of str
    rows : list of list of str
        One row per step, each as long as ``header``.

    Examples
    --------
    >>> m = {"steps": [{"name": "baseline", "size_bytes": 4000},
    ...                {"name": "quantize", "size_bytes": 1000}]}
    >>> header, rows = table_rows(m)
    >>> header[:5], rows[1][3:5]
    (['step', 'params', 'non-zero', 'size', 'size x'], ['1000 B', '4.00x'])
    """
    steps = [s for s in metrics.get("steps") or [] if isinstance(s, dict)]
    base = steps[0] if steps else {}
    bss = _batch_sizes(steps)
    onnx_bss = _batch_sizes(steps, "onnx_latency_ms")
    header = ["step", "params", "non-zero", "size", *(["size (B)"] if exact else []), "size x", "MACs",
              *[c for bs in bss for c in (f"latency bs{bs} (ms)", f"speed-up bs{bs}")],
              *[f"onnx bs{bs} (ms)" for bs in onnx_bss], "metric", "delta"]
    rows = []
    for i, s in enumerate(steps):
        m = _metric(s)
        value = _num(m.get("value"))
        ratio = size_ratio(base, s)
        size = _num(s.get("size_bytes"))
        rows.append([
            _step_name(s, i), _fmt_int(s.get("params")), _fmt_int(s.get("nonzero_params")),
            _fmt_bytes(size), *([("-" if size is None else f"{size:,.0f}")] if exact else []),
            "-" if ratio is None else f"{ratio:.2f}x", _fmt_int(s.get("macs")),
            *[c for bs in bss for c in (_fmt_ms(*_timing(s, bs)[::2]), _speedup(base, s, bs))],
            *[_fmt_ms(*_timing(s, bs, onnx=True)[::2]) for bs in onnx_bss],
            "-" if value is None else f"{m.get('name', 'metric')} {value:.4f}",
            _delta(base, s)[1],
        ])
    return header, rows


def format_table(metrics: dict[str, Any]) -> str:
    """The before/after table as aligned plain text, for the console, followed by one
    ``warning:`` line per step warning.

    Examples
    --------
    >>> print(format_table({"steps": [{"name": "baseline", "params": 1200}]}))
    step      params  non-zero  size  size x  MACs  metric  delta
    --------  ------  --------  ----  ------  ----  ------  -----
    baseline   1.20K         -     -       -     -       -      -
    """
    lines = _aligned(*table_rows(metrics))
    lines += [f"warning: {name}: {msg} [{code}]" for name, code, msg in step_warnings(metrics)]
    return "\n".join(lines)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Header, a rule and rows as plain-text lines, columns aligned (first left, others right)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(metrics: dict[str, Any], exact: bool = False) -> str:
    """The before/after table as a GitHub-flavoured Markdown table (``exact``: see `table_rows`).

    Examples
    --------
    >>> print(markdown_table({"steps": [{"name": "a|b"}]}))
    | step | params | non-zero | size | size x | MACs | metric | delta |
    |---|---|---|---|---|---|---|---|
    | a\\|b | - | - | - | - | - | - | - |
    """
    return _md_table(*table_rows(metrics, exact=exact))


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
    return "\n".join(out)


def extra_fields(step: dict) -> dict[str, Any]:
    """The fields of one step beyond the standard ones (e.g. ``onnx_latency_ms``), in order."""
    return {k: v for k, v in step.items() if k not in _STANDARD_KEYS}


def _details_rows(steps: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["step", "verb", "method", "wall (s)", "other fields"]
    rows = []
    for i, s in enumerate(steps):
        extras = "; ".join(f"{k}: {_fmt_value(k, v)}" for k, v in extra_fields(s).items())
        wall = _num(s.get("wall_s"))
        rows.append([_step_name(s, i), str(s.get("verb") or "-"), str(s.get("method") or "-"),
                     "-" if wall is None else f"{wall:.2f}", extras or "-"])
    return header, rows


def _layers(step: dict) -> list[dict]:
    rows = step.get("layers")
    return [r for r in rows if isinstance(r, dict) and r.get("name") is not None] if isinstance(rows, list) else []


def _zeros(layer: dict) -> float | None:
    """Fraction of a layer's weights (and bias) that are zero."""
    p, nz = _num(layer.get("params")), _num(layer.get("nonzero"))
    return 1 - nz / p if p and nz is not None else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def layer_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-layer table of the final model (the last step with a ``layers`` field).

    Columns: ``layer`` (module name), ``type``, ``weight shape``, ``params``, ``non-zero``,
    ``sparsity`` (zeros of the layer's weights and bias), ``bits`` (quantized layers, else ``-``),
    ``kept channels`` (``out / baseline out`` where the first weight dimension shrank against the
    baseline layer of that name, ``new`` for a layer the baseline lacks, else ``-``), ``MACs``
    (batch 1). Empty when no step recorded its layers.

    Examples
    --------
    >>> m = {"steps": [{"layers": [{"name": "fc", "type": "Linear", "shape": [8, 4], "params": 40, "nonzero": 40}]},
    ...                {"layers": [{"name": "fc", "type": "QuantLinear", "shape": [6, 4], "params": 30,
    ...                             "nonzero": 15, "bits": 4}]}]}
    >>> layer_rows(m)[1]
    [['fc', 'QuantLinear', '6x4', '30', '15', '50.0%', '4', '6/8', '-']]
    """
    steps = [s for s in metrics.get("steps") or [] if isinstance(s, dict)]
    final = next((s for s in reversed(steps) if _layers(s)), None)
    if final is None:
        return [], []
    base = {r["name"]: r for r in _layers(steps[0])}
    header = ["layer", "type", "weight shape", "params", "non-zero", "sparsity", "bits", "kept channels", "MACs"]
    rows = []
    for r in _layers(final):
        shape = r.get("shape") if isinstance(r.get("shape"), list) else None
        b = base.get(r["name"])
        b_shape = b.get("shape") if b and isinstance(b.get("shape"), list) else None
        kept = "new" if base and b is None else "-"
        if shape and b_shape and shape[0] != b_shape[0]:
            kept = f"{shape[0]}/{b_shape[0]}"
        rows.append([str(r["name"]) or "(model)", str(r.get("type", "-")),
                     "x".join(map(str, shape)) if shape else "-",
                     _fmt_int(r.get("params")), _fmt_int(r.get("nonzero")),
                     _pct(_zeros(r)), str(r.get("bits", "-")), kept, _fmt_int(r.get("macs"))])
    return header, rows


def _gone(layer: dict, base: dict | None) -> float | None:
    """Fraction of the baseline layer's weights and bias that are zero or removed (channels or heads
    cut: ``1 - non-zero / baseline params``); a layer the baseline lacks: its own zeros."""
    p, nz = _num((base or layer).get("params")), _num(layer.get("nonzero"))
    return max(0.0, 1 - nz / p) if p and nz is not None else None


def layer_sparsity_series(metrics: dict[str, Any]) -> list[tuple[str, dict[str, float | None], set[str]]]:
    """``(step name, {layer: fraction gone}, removed layers)`` per step with per-layer figures: the
    fraction of each baseline layer's weights and bias that are zero or removed (:func:`_gone`;
    1.0 for a baseline layer the step's model no longer has, listed in the set: a dropped block, a
    removed layer); a step without measured ``layers`` gives its own ``layer_sparsity`` (of the
    weights alone)."""
    steps = [(i, s) for i, s in enumerate(metrics.get("steps") or []) if isinstance(s, dict)]
    base = {r["name"]: r for r in next((_layers(s) for _, s in steps if _layers(s)), [])}
    cols: list[tuple[str, dict[str, float | None], set[str]]] = []
    for i, s in steps:
        if _layers(s):
            col: dict[str, float | None] = {r["name"]: _gone(r, base.get(r["name"])) for r in _layers(s)}
            removed = {n for n in base if n not in col}
            col.update(dict.fromkeys(removed, 1.0))
            cols.append((_step_name(s, i), col, removed))
        elif isinstance(s.get("layer_sparsity"), dict):
            cols.append((_step_name(s, i), {k: _num(v) for k, v in s["layer_sparsity"].items()}, set()))
    return cols


def layer_sparsity_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-layer sparsity at every step that has per-layer figures (:func:`layer_sparsity_series`):
    one row per layer (in order of first appearance), one column per step; ``removed`` for a
    baseline layer the step's model no longer has. Empty when no step has any.

    Examples
    --------
    >>> m = {"steps": [{"layers": [{"name": "a", "params": 40, "nonzero": 40},
    ...                            {"name": "b", "params": 10, "nonzero": 10}]},
    ...                {"layers": [{"name": "a", "params": 20, "nonzero": 10}]}]}
    >>> layer_sparsity_rows(m)[1]
    [['a', '0.0%', '75.0%'], ['b', '0.0%', 'removed']]
    """
    cols = layer_sparsity_series(metrics)
    if not cols:
        return [], []
    names = list(dict.fromkeys(n for _, col, _ in cols for n in col))
    header = ["layer", *[name for name, _, _ in cols]]
    return header, [[n or "(model)", *["-" if n not in col else "removed" if n in gone else _pct(col[n])
                                       for _, col, gone in cols]] for n in names]


def layer_sparsity_figure(metrics: dict[str, Any]):
    """One horizontal bar per layer of the final model's baseline layers: the fraction of its weights
    and bias zero or removed (:func:`layer_sparsity_series`, last step), the first ``MAX_QUANT_LAYERS``
    drawn. None when no step has per-layer figures or nothing is sparse."""
    cols = layer_sparsity_series(metrics)
    if len(cols) < 2 or not any(v for v in cols[-1][1].values()):
        return None
    step, col, _ = cols[-1]
    order = dict.fromkeys(n for _, c, _ in cols for n in c)   # model order: a dropped layer where it was
    found = [(n, col[n]) for n in order if n in col]
    drawn = found[:MAX_QUANT_LAYERS]
    fig, ax = _new_axes(max(2.4, 1.2 + 0.22 * len(drawn)))
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    ys = list(range(len(drawn)))
    vals = [100 * (v or 0.0) for _, v in drawn]
    bars = ax.barh(ys, vals, height=0.7, color=["#888" if v == 100 else "#3b7dd8" for v in vals])
    ax.bar_label(bars, labels=[f"{v:.0f}%" for v in vals], fontsize=6, padding=2)
    ax.set_yticks(ys, [str(n) or "(model)" for n, _ in drawn], fontsize=7)
    ax.invert_yaxis()   # model order, top down
    ax.set_xlim(0, 110)
    ax.set_xlabel("weights zero or removed (% of the baseline layer's)")
    more = f" (first {MAX_QUANT_LAYERS} of {len(found)} layers)" if len(found) > MAX_QUANT_LAYERS else ""
    ax.set_title(f"Per-layer sparsity after {step}{more}", fontsize=10)
    return fig


def _training(metrics: dict[str, Any]) -> list[tuple[str, list[dict]]]:
    """``(label, epochs)`` per training run of every step (a step may train more than once)."""
    out: list[tuple[str, list[dict]]] = []
    for i, s in enumerate(metrics.get("steps") or []):
        if not isinstance(s, dict) or not isinstance(s.get("training"), list):
            continue
        runs: dict[str, list[dict]] = {}
        for e in s["training"]:
            if isinstance(e, dict):
                runs.setdefault(str(e.get("run") or _step_name(s, i)), []).append(e)
        name = _step_name(s, i)
        out += [(name if run == name else f"{name}: {run}", eps) for run, eps in runs.items()]
    return out


def training_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per training run: epochs, first and last train loss, last and best validation
    metric (with its epoch). Empty when no step trained."""
    header = ["training", "epochs", "loss first", "loss last", "val last", "val best (epoch)"]
    rows = []
    hib = next((_metric(s)["higher_is_better"] for s in metrics.get("steps") or []
                if isinstance(s, dict) and isinstance(_metric(s).get("higher_is_better"), bool)), True)
    for label, eps in _training(metrics):
        losses = [_num(e.get("loss")) for e in eps]
        vals = [(_num(e.get("val_metric")), e.get("epoch")) for e in eps if _num(e.get("val_metric")) is not None]
        best = (max if hib else min)(vals, key=lambda v: v[0]) if vals else None
        rows.append([label, str(len(eps)), _fmt_value("", losses[0]), _fmt_value("", losses[-1]),
                     f"{vals[-1][0]:.4f}" if vals else "-", f"{best[0]:.4f} ({best[1]})" if best else "-"])
    return (header, rows) if rows else ([], [])


def _run_line(metrics: dict[str, Any]) -> str:
    """The run's date, command, total time and host (metrics.json ``run``); "" without one."""
    run = metrics.get("run")
    if not isinstance(run, dict):
        return ""
    parts = [f"started {run.get('started') or '?'}"]
    if run.get("finished"):
        parts.append(f"finished {run['finished']}")
    if _num(run.get("wall_s")) is not None:
        parts.append(f"total {run['wall_s']:.1f} s")
    host = run.get("host") if isinstance(run.get("host"), dict) else {}
    if host:
        parts.append(f"host {host.get('cpus', '?')} CPUs, {host.get('threads', '?')} torch threads")
    if run.get("resumed"):
        parts.append("resumed")
    line = "Run: " + ", ".join(parts) + "."
    if isinstance(run.get("command"), list):
        line += " Command: `" + " ".join(map(str, run["command"])) + "`"
    return line


def _summary(metrics: dict[str, Any]) -> str:
    """One sentence: the last step against the baseline."""
    steps = metrics["steps"]
    if len(steps) < 2:
        return "Only the baseline was measured."
    base, last = steps[0], steps[-1]
    parts = []
    ratio = size_ratio(base, last)
    if ratio is not None:
        parts.append(f"{ratio:.2f}x smaller on disk ({_fmt_bytes(base['size_bytes'])} -> "
                     f"{_fmt_bytes(last['size_bytes'])})")
    b_macs, l_macs = _num(base.get("macs")), _num(last.get("macs"))
    if b_macs and l_macs:
        parts.append("MACs unchanged" if b_macs == l_macs else f"{b_macs / l_macs:.2f}x fewer MACs")
    delta, text = _delta(base, last)
    if delta is not None:
        parts.append(f"{_metric(last).get('name', 'metric')} {_metric(base)['value']:.4f} -> "
                     f"{_metric(last)['value']:.4f} ({text})")
    what = "; ".join(parts) if parts else "no comparable figures"
    return f"{_step_name(base, 0)} -> {_step_name(last, len(steps) - 1)}: {what}."


# -- plots -----------------------------------------------------------------------------------
# Figure objects, not pyplot: no global backend switch (a user's notebook keeps its own) and no
# figure registry to leak into; savefig renders with Agg. Each builder returns the Figure (or
# None when no step has its figures), so its axes can be checked.

def _new_axes(height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, height), dpi=100)
    ax = fig.subplots()
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _steps(metrics: dict[str, Any]) -> list[dict]:
    return [s for s in metrics.get("steps") or [] if isinstance(s, dict)]


def _step_axis(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)


def _metric_meta(steps: list[dict]) -> tuple[str, bool]:
    mname = next((_metric(s)["name"] for s in steps if _metric(s).get("name")), "metric")
    hib = next((_metric(s)["higher_is_better"] for s in steps
                if isinstance(_metric(s).get("higher_is_better"), bool)), True)
    return mname, hib


def metric_limits(values: list[float]) -> tuple[float, float]:
    """Y-limits of the metric axis, anchored so that a small change looks small.

    Values in [-1, 1] (accuracy, Spearman): an axis at least 10 points tall (``_MIN_UNIT_SPAN``)
    around the values, kept inside [0, 1] (or [-1, 1] when a value is negative); other metrics
    (perplexity, loss): from 0 when every value is positive, else the values' range padded by
    10%.

    Examples
    --------
    >>> metric_limits([0.9917, 0.9889])
    (0.9, 1.0)
    >>> metric_limits([20.0, 22.5])
    (0.0, 24.75)
    """
    lo, hi = min(values), max(values)
    if all(-1 <= v <= 1 for v in values):
        floor = -1.0 if lo < 0 else 0.0
        span = min(max(1.2 * (hi - lo), _MIN_UNIT_SPAN), 1.0 - floor)
        bottom = (hi + lo) / 2 - span / 2
        bottom = min(max(bottom, floor), 1.0 - span)  # shifted inside [floor, 1], span kept
        return round(bottom, 6), round(bottom + span, 6)
    if lo > 0:
        return 0.0, round(hi * 1.1, 6)
    pad = 0.1 * (hi - lo or abs(hi) or 1.0)
    return lo - pad, hi + pad


def metric_figure(metrics: dict[str, Any]):
    """The task metric per step on an anchored axis (:func:`metric_limits`), each point
    labelled with its value and its change against the baseline (points for metrics in
    [-1, 1]); None when no step has a metric."""
    steps = _steps(metrics)
    values = [_num(_metric(s).get("value")) for s in steps]
    if all(v is None for v in values):
        return None
    mname, hib = _metric_meta(steps)
    fig, ax = _new_axes()
    xs = list(range(len(steps)))
    ax.plot(xs, [math.nan if v is None else v for v in values], "o-", color="#d8573b")
    if values[0] is not None:
        ax.axhline(values[0], ls="--", lw=1, color="#888", label="baseline")
        ax.legend(fontsize=8, loc="lower left")
    for x, (v, s) in enumerate(zip(values, steps)):
        if v is not None:
            delta, text = _delta(steps[0], s)
            label = f"{v:.4f}" if x == 0 or delta is None else f"{v:.4f}\n({text})"
            ax.annotate(label, (x, v), fontsize=7, xytext=(0, -7), textcoords="offset points", ha="center",
                        va="top")  # below the point: an anchored axis leaves room under the values
    ax.set_ylim(*metric_limits([v for v in values if v is not None]))
    ax.margins(x=0.08)
    _step_axis(ax, [_step_name(s, i) for i, s in enumerate(steps)])
    last = next((s for s in reversed(steps) if _num(_metric(s).get("value")) is not None), steps[0])
    drop = _delta(steps[0], last)[1]
    ax.set_title(f"{mname} per step ({'higher' if hib else 'lower'} is better); last vs baseline: {drop}",
                 fontsize=10)
    ax.set_ylabel(mname)
    return fig


def latency_figure(metrics: dict[str, Any]):
    """Latency per step, one panel per batch size: bars at the median with IQR error bars
    (± IQR/2 around the median), hatched and marked ``~`` when unstable, and a second bar for
    ONNX Runtime where the step timed it. The title names the runtime, threads and input
    shape. None when no step timed anything."""
    from matplotlib.patches import Patch

    steps = _steps(metrics)
    bss = _batch_sizes(steps)
    if not bss:
        return None
    from matplotlib.figure import Figure

    onnx = _batch_sizes(steps, "onnx_latency_ms")
    ncols = min(len(bss), 3)
    nrows = math.ceil(len(bss) / ncols)
    fig = Figure(figsize=(6.4 if ncols < 3 else 9.6, 3.4 * nrows + 0.4), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(bss):]:
        ax.set_visible(False)
    rt = next((s["runtime"] for s in steps if isinstance(s.get("runtime"), dict)), {})
    rt_name = str(rt.get("name", "eager"))
    width = 0.4 if onnx else 0.8
    for ax, bs in zip(axes.flat, bss):
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        series = [(rt_name, "#3b7dd8", [_timing(s, bs) for s in steps])]
        if bs in onnx:
            series.append(("onnxruntime", "#8e44ad", [_timing(s, bs, onnx=True) for s in steps]))
        for k, (label, colour, ts) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(steps))]
            meds = [math.nan if t[0] is None else t[0] for t in ts]
            errs = [0.0 if t[1] is None else t[1] / 2 for t in ts]
            drawn = ax.bar(xs, meds, width, yerr=errs, capsize=3, color=colour, label=label,
                           error_kw={"elinewidth": 1, "ecolor": "#333"})
            for bar_, t in zip(drawn, ts):
                if t[2]:
                    bar_.set_hatch("///")
                    bar_.set_alpha(0.6)
            ax.bar_label(drawn, labels=["" if t[0] is None else f"{t[0]:.3g}{'~' if t[2] else ''}" for t in ts],
                         fontsize=6, padding=2)
        ax.margins(y=0.2)
        _step_axis(ax, [_step_name(s, i) for i, s in enumerate(steps)])
        ax.set_title(f"batch {bs}", fontsize=10)
        ax.set_ylabel("ms per batch")
        handles = [Patch(color=c, label=lbl) for lbl, c, _ in series]
        if any(t[2] for _, _, ts in series for t in ts):
            handles.append(Patch(facecolor="white", edgecolor="#333", hatch="///", label="~ unstable"))
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    setup = latency_setup(metrics)
    fig.suptitle("Latency: median, error bar = IQR\n" + setup, fontsize=9)
    return fig


def training_figure(metrics: dict[str, Any]):
    """Training loss and validation metric per epoch, one line per training run (baseline,
    distillation, fine-tuning); None when no step trained."""
    runs = _training(metrics)
    if not runs:
        return None
    from matplotlib.figure import Figure

    mname, _ = _metric_meta(_steps(metrics))
    fig = Figure(figsize=(9.6, 3.4), dpi=100)
    ax_loss, ax_val = fig.subplots(1, 2)
    for label, eps in runs:
        epochs = [e.get("epoch") for e in eps]
        ax_loss.plot(epochs, [_num(e.get("loss")) for e in eps], marker=".", label=label)
        vals = [_num(e.get("val_metric")) for e in eps]
        if any(v is not None for v in vals):
            ax_val.plot(epochs, [math.nan if v is None else v for v in vals], marker=".", label=label)
    for ax, title, where in ((ax_loss, "train loss", "upper right"),
                             (ax_val, f"validation {mname}", "lower right")):
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=7, loc=where)
    return fig


#: the most layers drawn in the spectra plot (a deep network factorizes dozens)
MAX_SPECTRA_LINES = 24


def spectra_figure(metrics: dict[str, Any]):
    """The singular values a factorize step records (``spectra``: layer -> first values divided
    by the largest), one line per layer on a log axis, a dot at the rank kept (``ranks``); None
    when no step has spectra."""
    lines = []
    for i, step in enumerate(_steps(metrics)):
        spectra, ranks = step.get("spectra"), step.get("ranks") or {}
        if isinstance(spectra, dict):
            lines += [(_step_name(step, i), layer, values, ranks.get(layer) if isinstance(ranks, dict) else None)
                      for layer, values in spectra.items() if isinstance(values, list)]
    if not lines:
        return None
    fig, ax = _new_axes(3.8)
    ax.grid(alpha=0.3)
    steps = {step for step, *_ in lines}
    for step, layer, values, rank in lines[:MAX_SPECTRA_LINES]:
        ys = [v if v is not None and v > 0 else math.nan for v in map(_num, values)]
        (line,) = ax.plot(range(1, len(ys) + 1), ys, lw=1,
                          label=layer if len(steps) == 1 else f"{step}: {layer}")
        r = rank[0] if isinstance(rank, list) and rank else rank   # tucker: [r_out, r_in]
        if isinstance(r, int) and 1 <= r <= len(ys):
            ax.plot([r], [ys[r - 1]], "o", color=line.get_color(), ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1")
    more = f" (first {MAX_SPECTRA_LINES} of {len(lines)} layers)" if len(lines) > MAX_SPECTRA_LINES else ""
    ax.set_title(f"Singular values per layer{more}", fontsize=10)
    if len(ax.get_legend_handles_labels()[0]) <= 12:
        ax.legend(fontsize=6, loc="upper right")
    return fig


#: the most layers drawn in the quantization plot (a transformer quantizes dozens of linears)
MAX_QUANT_LAYERS = 40
#: bar colours of the quantization plot, by rank of the bits among those drawn
_BITS_COLOURS = ("#c0392b", "#e67e22", "#b7950b", "#27ae60", "#3b7dd8", "#8e44ad", "#7f8c8d", "#2c3e50")


def _quantized(metrics: dict[str, Any]) -> list[tuple[str, dict]]:
    """``(step name, entry)`` for every entry of every step's ``quantized_layers``, in order."""
    out = []
    for i, step in enumerate(_steps(metrics)):
        rows = step.get("quantized_layers")
        if isinstance(rows, list):
            out += [(_step_name(step, i), r) for r in rows if isinstance(r, dict) and r.get("name") is not None]
    return out


def _fmt_db(v: Any) -> str:
    return "-" if _num(v) is None else f"{v:.1f}"


def quantized_layer_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The "Quantized layers" table: one row per layer a quantize step replaced
    (``quantized_layers``): layer, scheme, bits, output SQNR and weight SQNR in dB (``-`` where
    not measured), a ``step`` column first when several steps quantized, and a ``note`` column
    when an entry has one. Empty when no step quantized.

    Examples
    --------
    >>> m = {"steps": [{"name": "baseline"}, {"name": "quantize", "quantized_layers": [
    ...     {"name": "fc", "scheme": "int4 symmetric per-group g128", "bits": 4, "sqnr_db": 21.34,
    ...      "weight_sqnr_db": 20.9}]}]}
    >>> quantized_layer_rows(m)
    (['layer', 'scheme', 'bits', 'output SQNR (dB)', 'weight SQNR (dB)'], [['fc', 'int4 symmetric per-group g128', '4', '21.3', '20.9']])
    """
    found = _quantized(metrics)
    if not found:
        return [], []
    steps = len({name for name, _ in found}) > 1
    notes = any(r.get("note") for _, r in found)
    header = [*(["step"] if steps else []), "layer", "scheme", "bits", "output SQNR (dB)", "weight SQNR (dB)",
              *(["note"] if notes else [])]
    rows = [[*([step] if steps else []), str(r["name"]) or "(model)", str(r.get("scheme") or "-"),
             str(r.get("bits", "-")), _fmt_db(r.get("sqnr_db")), _fmt_db(r.get("weight_sqnr_db")),
             *([str(r.get("note") or "")] if notes else [])] for step, r in found]
    return header, rows


def _quantized_note(metrics: dict[str, Any]) -> str:
    """The note under the "Quantized layers" table: what the SQNR is, and each step's inputs."""
    inputs = [f"{_step_name(s, i)}: {s['quantized_layers_input']}" for i, s in enumerate(_steps(metrics))
              if isinstance(s.get("quantized_layers"), list) and s.get("quantized_layers_input")]
    return _QUANT_NOTE + (" Inputs: " + "; ".join(inputs) + "." if inputs else "")


def quantization_figure(metrics: dict[str, Any]):
    """One horizontal bar per quantized layer (``quantized_layers`` of every quantize step): its
    output SQNR in dB, coloured by bits, the weight SQNR marked ``|``; the first
    ``MAX_QUANT_LAYERS`` layers are drawn and the title says how many there are. None when no
    step quantized."""
    found = _quantized(metrics)
    if not found:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    drawn = found[:MAX_QUANT_LAYERS]
    several = len({step for step, _ in found}) > 1
    bits = sorted({str(r.get("bits", "?")) for _, r in drawn}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0))
    colour = {b: _BITS_COLOURS[k % len(_BITS_COLOURS)] for k, b in enumerate(bits)}
    fig, ax = _new_axes(max(2.4, 1.2 + 0.22 * len(drawn)))
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    ys = list(range(len(drawn)))
    out = [_num(r.get("sqnr_db")) for _, r in drawn]
    bars = ax.barh(ys, [math.nan if v is None else v for v in out], height=0.7,
                   color=[colour[str(r.get("bits", "?"))] for _, r in drawn])
    ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in out], fontsize=6, label_type="center",
                 color="white")
    weights = [_num(r.get("weight_sqnr_db")) for _, r in drawn]
    ax.plot([math.nan if v is None else v for v in weights], ys, "|", color="#222", ms=9, mew=1.5)
    ax.set_yticks(ys, [(f"{step}: " if several else "") + (str(r["name"]) or "(model)") for step, r in drawn],
                  fontsize=7)
    ax.invert_yaxis()   # model order, top down
    ax.set_xlabel("SQNR (dB), higher is better")
    ax.margins(x=0.12)
    handles = [Patch(color=colour[b], label=f"{b} bits") for b in bits]
    handles.append(Line2D([], [], color="#222", marker="|", ls="", ms=9, mew=1.5, label="weight SQNR"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    more = f" (first {MAX_QUANT_LAYERS} of {len(found)} layers)" if len(found) > MAX_QUANT_LAYERS else ""
    ax.set_title(f"Output SQNR per quantized layer{more}", fontsize=10)
    return fig


def make_plots(metrics: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Write the report's PNG plots into ``plot_dir``; returns their paths, in report order.

    Size, MACs and latency (:func:`latency_figure`) per step, the task metric per step
    (:func:`metric_figure`), the metric against size, and the training curves
    (:func:`training_figure`), the singular values of factorized layers
    (:func:`spectra_figure`), the output SQNR of quantized layers (:func:`quantization_figure`). A plot whose figures no step has is left out (no metric plots for
    ``shape:`` tasks); a stale file of a left-out plot is removed.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps = _steps(metrics)
    names = [_step_name(s, i) for i, s in enumerate(steps)]
    xs = list(range(len(steps)))
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig, fname: str) -> None:
        if fig is None:
            return
        fig.tight_layout()
        path = plot_dir / fname
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
        paths.append(path)

    def bar(fname: str, values: list[float | None], labels: list[str], title: str, ylabel: str) -> None:
        if all(v is None for v in values):
            return
        fig, ax = _new_axes()
        drawn = ax.bar(xs, [math.nan if v is None else v for v in values], color="#3b7dd8")
        ax.bar_label(drawn, labels=labels, fontsize=7, padding=2)
        ax.margins(y=0.15)
        _step_axis(ax, names)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_tick(v)))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        save(fig, fname)

    sizes = [_num(s.get("size_bytes")) for s in steps]
    base = steps[0] if steps else {}
    div, unit = _byte_unit(sizes)
    bar("size.png", [None if v is None else v / div for v in sizes],
        ["" if r is None else f"{r:.1f}x" for r in (size_ratio(base, s) for s in steps)],
        "Size on disk per step (label: x smaller than baseline)", unit)
    macs = [_num(s.get("macs")) for s in steps]
    bar("macs.png", macs, ["" if v is None else _fmt_int(v) for v in macs],
        "MACs per forward (batch 1)", "MACs")
    save(latency_figure(metrics), "latency.png")
    save(metric_figure(metrics), "metric.png")

    values = [_num(_metric(s).get("value")) for s in steps]
    pts = [(sz / div, v, n) for sz, v, n in zip(sizes, values, names) if sz and v is not None]
    if pts:
        mname, hib = _metric_meta(steps)
        fig, ax = _new_axes(3.8)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#d8573b")
        # steps that land on the same point (an export after a quantize) share one label
        # (within 2% in size, same metric to 6 digits)
        groups: list[tuple[float, float, list[str]]] = []
        for x, y, n in pts:
            near = next((g for g in groups if abs(g[0] - x) <= 0.02 * x and abs(g[1] - y) < 1e-6), None)
            if near:
                near[2].append(n)
            else:
                groups.append((x, y, [n]))
        for k, (x, y, ns) in enumerate(groups):  # alternate above/below: neighbours collide less
            ax.annotate(", ".join(ns), (x, y), fontsize=7, xytext=(4, 5 if k % 2 == 0 else -11),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
        ax.set_ylim(*metric_limits([p[1] for p in pts]))
        ax.set_xlabel(f"size on disk ({unit}, log scale)")
        ax.set_ylabel(mname)
        ax.set_title(f"{mname} vs size ({'higher' if hib else 'lower'} is better)")
        save(fig, "metric_vs_size.png")
    save(training_figure(metrics), "training.png")
    found = next((s["sensitivity"] for s in steps if isinstance(s.get("sensitivity"), dict)), None)
    if found is not None:
        save(sensitivity_figure(found), "sensitivity.png")
    save(spectra_figure(metrics), "spectra.png")
    save(quantization_figure(metrics), "quantization.png")
    save(layer_sparsity_figure(metrics), "layer_sparsity.png")

    made = {p.name for p in paths}
    for fname in _PLOT_FILES:
        if fname not in made:
            (plot_dir / fname).unlink(missing_ok=True)
    return paths


def sensitivity_figure(data: dict[str, Any]):
    """Metric against sparsity, one line per layer pruned alone, the unpruned metric dashed:
    the curves of ``torchslim sensitivity`` (``sensitivity.json``) or of a ``ratios: sensitivity``
    step's ``sensitivity`` record. None when there is no layer with a finite point."""
    layers = data.get("layers") if isinstance(data, dict) else None
    base = _num(data.get("baseline")) if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        return None
    fig, ax = _new_axes(4.5)
    drawn = 0
    for name, row in list(layers.items())[:60]:
        pts = [(p, m) for p, m in (row.get("points") or []) if _num(p) is not None and _num(m) is not None]
        if base is not None:
            pts = [(0.0, base)] + pts
        if len(pts) > (1 if base is not None else 0):
            ax.plot([100 * p for p, _ in pts], [m for _, m in pts], marker="o", ms=3, lw=1, label=str(name) or "(model)")
            drawn += 1
    if not drawn:
        return None
    if base is not None:
        ax.axhline(base, color="grey", ls="--", lw=1)
    ax.set_xlabel(f"{data.get('granularity', 'weight')} sparsity of the layer alone (%)")
    ax.set_ylabel(f"{data.get('metric', 'metric')} on {data.get('split', 'val')}")
    steps = data.get("finetune_steps") or 0
    ax.set_title(f"Sensitivity ({data.get('method', 'prune')}, "
                 + (f"each cut fine-tuned {steps} steps)" if steps else "one-shot)"))
    if drawn <= 20:
        ax.legend(fontsize=7, ncol=2)
    return fig


def skipped_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Modules a step left alone and why (``skipped: [{module, reason}]`` of a structured
    pruning step: a layer its dependency graph cannot handle). Empty when none."""
    rows = []
    for i, s in enumerate(metrics.get("steps") or []):
        if isinstance(s, dict) and isinstance(s.get("skipped"), list):
            rows += [[_step_name(s, i), str(e.get("module", "?")), str(e.get("reason", "?"))]
                     for e in s["skipped"] if isinstance(e, dict)]
    return (["step", "module", "reason"], rows) if rows else ([], [])


def netadapt_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The rounds of a ``ratios: netadapt`` step (``netadapt: {cost, rounds: [{round, group,
    removed, kept, metric, size}]}``): the group each round cut, its channels, the candidate's
    val metric after its short fine-tune and the model's remaining cost. Empty when none.

    Examples
    --------
    >>> netadapt_rows({"steps": [{"name": "prune", "netadapt": {"cost": "macs", "rounds": [
    ...     {"round": 1, "group": "0", "removed": 8, "kept": 24, "metric": 0.97, "size": 0.77}]}}]})[1]
    [['prune', '1', '0', '8', '24', '0.9700', '77.0% of macs']]
    """
    rows = []
    for i, s in enumerate(metrics.get("steps") or []):
        found = s.get("netadapt") if isinstance(s, dict) else None
        if not (isinstance(found, dict) and isinstance(found.get("rounds"), list)):
            continue
        for r in found["rounds"]:
            if isinstance(r, dict):
                metric, size = _num(r.get("metric")), _num(r.get("size"))
                rows.append([_step_name(s, i), str(r.get("round", "?")), str(r.get("group", "?")),
                             str(r.get("removed", "?")), str(r.get("kept", "?")),
                             "-" if metric is None else f"{metric:.4f}",
                             "-" if size is None else f"{100 * size:.1f}% of {found.get('cost', 'cost')}"])
    return (["step", "round", "group cut", "channels removed", "kept", "val metric (short fine-tune)",
             "model left"], rows) if rows else ([], [])


def ingredient_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The models a merge step merged (``ingredients: [{model, metric}]``, ``base``) with each
    one's test metric, and for a greedy soup whether it went in and the soup's metric on its
    split with it. Empty when no step merged."""
    rows = []
    for i, s in enumerate(metrics.get("steps") or []):
        if not (isinstance(s, dict) and isinstance(s.get("ingredients"), list)):
            continue
        greedy = s.get("greedy") if isinstance(s.get("greedy"), dict) else {}
        tried = {str(e.get("model")): e for e in greedy.get("steps") or [] if isinstance(e, dict)}
        entries = [("ingredient", e) for e in s["ingredients"] if isinstance(e, dict)]
        if isinstance(s.get("base"), dict):
            entries.append(("base", s["base"]))
        for role, e in entries:
            value = _num(e.get("metric"))
            got = tried.get(str(e.get("model")))
            soup = "-" if got is None else (("kept" if got.get("kept") else "left out")
                                            + f" ({greedy.get('split', 'val')} {_num(got.get('metric')) or 0:.4f})")
            rows.append([_step_name(s, i), role, str(e.get("model", "?")),
                         "-" if value is None else f"{value:.4f}", soup])
    return (["step", "role", "model", "test metric", "greedy soup"], rows) if rows else ([], [])


# -- files -----------------------------------------------------------------------------------

#: the most steps and latency batch sizes a report renders (a run has a handful; more is not a
#: metrics.json torchslim wrote, and rendering it would take minutes)
MAX_STEPS = 1000
MAX_BATCH_SIZES = 64


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``run_dir/metrics.json``.

    Raises
    ------
    UserError
        No metrics.json, broken JSON, or a shape the report cannot use; the message names the
        file, the step and the field.
    """
    run_dir = Path(run_dir)
    mf = run_dir / "metrics.json"
    if not mf.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.json"
        raise UserError(f"{run_dir} {what}; give the output directory of a torchslim run "
                        "(the folder holding metrics.json)")
    try:
        metrics = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{mf}: not valid JSON ({exc}); rerun the step or restore the file") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("steps"), list):
        raise UserError(f"{mf}: not a torchslim metrics.json (expected an object with a 'steps' list)")
    if not metrics["steps"]:
        raise UserError(f"{mf}: 'steps' is empty; a run writes its baseline as steps[0]")
    if len(metrics["steps"]) > MAX_STEPS:
        raise UserError(f"{mf}: {len(metrics['steps']):,} steps; a report shows at most {MAX_STEPS:,}")
    for i, s in enumerate(metrics["steps"]):
        where = f"{mf}: steps[{i}]"
        if not isinstance(s, dict):
            raise UserError(f"{where} is {type(s).__name__}, expected an object")
        for key in ("params", "nonzero_params", "size_bytes", "macs", "wall_s"):
            v = s.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"{where}.{key} = {v!r}: expected a number or null")
        for key in ("latency_ms", "metric"):
            if s.get(key) is not None and not isinstance(s[key], dict):
                raise UserError(f"{where}.{key} = {str(s[key])[:80]!r}: expected an object or null")
        for key in ("latency_ms", "latency", "onnx_latency_ms", "onnx_latency"):
            if isinstance(s.get(key), dict) and len(s[key]) > MAX_BATCH_SIZES:
                raise UserError(f"{where}.{key}: {len(s[key]):,} batch sizes; a report shows at most "
                                f"{MAX_BATCH_SIZES}")
        for key in ("warnings", "layers", "training", "quantized_layers"):
            if s.get(key) is not None and not isinstance(s[key], list):
                raise UserError(f"{where}.{key} = {s[key]!r}: expected a list of objects")
    if not isinstance(metrics.get("environment", {}), dict):
        raise UserError(f"{mf}: 'environment' should be an object")
    return metrics


def _title(metrics: dict[str, Any]) -> str:
    return f"torchslim report: {metrics.get('model', '?')} on {metrics.get('task', '?')}"


def _header_lines(metrics: dict[str, Any]) -> list[str]:
    """The lines under the title: version and steps, the run (date, command, total time), and
    what latency was measured on."""
    lines = [f"torchslim {metrics.get('torchslim_version', '?')}, metrics.json schema "
             f"{metrics.get('schema_version', '?')}, {len(metrics['steps'])} step(s)."]
    run, setup = _run_line(metrics), latency_setup(metrics)
    if run:
        lines.append(run)
    if setup:
        lines.append(f"Latency measured on: {setup}.")
    return lines


def _md_warnings(metrics: dict[str, Any]) -> list[str]:
    found = step_warnings(metrics)
    if not found:
        return []
    out = [f"> **⚠ {len(found)} warning(s)**", ">"]
    out += [f"> - **{_md_cell(name)}**: {_md_cell(msg)} (`{_md_cell(code)}`)" for name, code, msg in found]
    return out + [""]


def _table_sections(metrics: dict[str, Any]) -> list[tuple[str, str, tuple[list[str], list[list[str]]], str]]:
    """The report's tables after the plots, for both renderers: ``(html id, heading, (header,
    rows), note)``; a section without rows is left out by the caller."""
    return [("training", "Training", training_rows(metrics), ""),
            ("layers", "Per-layer figures (final model)", layer_rows(metrics), _LAYER_NOTE),
            ("quantized", "Quantized layers", quantized_layer_rows(metrics), _quantized_note(metrics)),
            ("layer-sparsity", "Per-layer sparsity by step", layer_sparsity_rows(metrics), _SPARSITY_NOTE),
            ("skipped", "Skipped modules", skipped_rows(metrics), _SKIPPED_NOTE),
            ("netadapt", "NetAdapt rounds", netadapt_rows(metrics), _NETADAPT_NOTE),
            ("ingredients", "Merged models", ingredient_rows(metrics), _MERGE_NOTE)]


def _markdown(metrics: dict[str, Any], plots: list[Path]) -> str:
    env = metrics.get("environment") or {}
    md = [f"# {_title(metrics)}", "", *_md_warnings(metrics)]
    for line in _header_lines(metrics):
        md += [line, ""]
    md += [_summary(metrics), "", markdown_table(metrics, exact=True), "", _NOTE, ""]
    if plots:
        md += ["## Plots", ""]
        md += [f"![{_PLOT_CAPTIONS.get(p.stem, p.stem)}](plots/{p.name})" for p in plots] + [""]
    for _, h2, (header, rows), note in _table_sections(metrics):
        if rows:
            md += [f"## {h2}", "", *([note, ""] if note else []), _md_table(header, rows), ""]
    md += ["## Step details", "", _md_table(*_details_rows(metrics["steps"])), ""]
    configs = [(_step_name(s, i), s["config"]) for i, s in enumerate(metrics["steps"]) if s.get("config")]
    if configs:
        md += ["<details><summary>Step configs (resolved)</summary>", ""]
        for name, cfg in configs:
            md += [f"**{_md_cell(name)}**", "", "```json", json.dumps(cfg, indent=1), "```", ""]
        md += ["</details>", ""]
    md += ["## Environment", "", _md_table(["key", "value"], [[k, _fmt_value(k, v)] for k, v in env.items()])]
    return "\n".join(md) + "\n"


_LAYER_NOTE = ("Layers that hold weights. Sparsity: zeros among the layer's weights and bias; bits: "
               "quantized layers; kept channels: output channels / the baseline layer's, where they "
               "shrank (a narrower student, removed channels); MACs at batch 1.")
_SPARSITY_NOTE = ("The fraction of each baseline layer's weights and bias that are zero or removed after each "
                  "step (channels or heads cut count as removed; removed: the layer itself is gone, a dropped "
                  "block or layer; a layer new since the baseline: its own zeros; a pruning step's own "
                  "layer_sparsity, of the weights alone, where a step was not measured per layer).")


_QUANT_NOTE = ("Each layer a quantize step replaced. Output SQNR: 10 log10(sum y^2 / sum (y - y_q)^2) of the "
               "layer's output, y from the float layer and y_q from the quantized one on the same input (the "
               "float model's input to that layer: the layer's own error, not accumulated); weight SQNR: the "
               "float weight against the dequantized one. About 6 dB per bit; - where not measured.")
_MERGE_NOTE = ("The models a merge step combined, each measured alone on the test split; the merged "
               "model's own figures are the step's row above. The current model is the one entering the "
               "step (with torchslim merge, the first MODEL: the baseline row).")
_NETADAPT_NOTE = ("Each round cut the channel group whose candidate scored best on the val split after its "
                  "short fine-tune (ratios: netadapt); the step then pruned the model to the channels the last "
                  "round kept and fine-tuned it.")
_SKIPPED_NOTE = ("Modules a step could not handle and left unchanged, with the reason; the model still "
                 "runs and the other modules were processed.")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 14px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f3f8; }
td.better { color: #1a7f37; } td.worse { color: #c0392b; }
#details td, #details th, #environment td, #environment th { text-align: left; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; }
figcaption { font-size: 13px; color: #555; }
img { max-width: 100%; height: auto; }
pre { font-size: 12px; background: #f7f7f7; padding: 0.5em; margin: 0.3em 0; }
.note, .summary { max-width: 70em; }
.warnings { background: #fff4e5; border: 2px solid #e67e22; padding: 0.6em 1em; margin: 1em 0; max-width: 70em; }
.warnings ul { margin: 0.3em 0 0; }
#layers td:nth-child(2), #layers th:nth-child(2), #training td, #training th { text-align: left; }
#quantized td, #quantized th { text-align: left; }
"""


def _html_table(table_id: str, header: list[str], rows: list[list[str]],
                classes: list[list[str]] | None = None) -> str:
    def td(text: str, cls: str) -> str:
        return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"

    thead = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(td(c, classes[r][j] if classes else "") for j, c in enumerate(row)) + "</tr>\n"
        for r, row in enumerate(rows))
    return f'<table id="{table_id}"><thead><tr>{thead}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def _html(metrics: dict[str, Any], plots: list[Path]) -> str:
    steps = metrics["steps"]
    title = html.escape(_title(metrics))
    header, rows = table_rows(metrics, exact=True)
    # colour the delta column: green when the step is better than the baseline, red when worse
    classes = []
    for s in steps:
        delta, _ = _delta(steps[0], s)
        hib = _metric(s).get("higher_is_better", True) is not False
        good = None if not delta else (delta > 0) == hib
        classes.append([""] * (len(header) - 1) + ["" if good is None else "better" if good else "worse"])
    imgs = "\n".join(
        f'<figure><img alt="{html.escape(_PLOT_CAPTIONS.get(p.stem, p.stem))}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode("ascii")}">'
        f"<figcaption>{html.escape(_PLOT_CAPTIONS.get(p.stem, p.stem))}</figcaption></figure>"
        for p in plots)
    configs = "".join(
        f"<details><summary>{html.escape(_step_name(s, i))}</summary>"
        f"<pre>{html.escape(json.dumps(s['config'], indent=1))}</pre></details>\n"
        for i, s in enumerate(steps) if s.get("config"))
    env = metrics.get("environment") or {}
    found = step_warnings(metrics)
    banner = "" if not found else (
        f'<div id="warnings" class="warnings" role="alert"><strong>⚠ {len(found)} warning(s)</strong><ul>'
        + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(m)} (<code>{html.escape(c)}</code>)</li>"
                  for n, c, m in found) + "</ul></div>")
    head = "".join("<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(line)) + "</p>\n"
                   for line in _header_lines(metrics))
    sections = []
    for table_id, h2, (th, tr), note in _table_sections(metrics):
        if tr:
            sections.append(f"<h2>{h2}</h2>\n" + (f'<p class="note">{html.escape(note)}</p>\n' if note else "")
                            + _html_table(table_id, th, tr))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
{banner}
{head}<p class="summary">{html.escape(_summary(metrics))}</p>
{_html_table("steps", header, rows, classes)}
<p class="note">{html.escape(_NOTE)}</p>
<h2>Plots</h2>
<div id="plots">
{imgs or "<p>No plottable figures.</p>"}
</div>
{chr(10).join(sections)}
<h2>Step details</h2>
{_html_table("details", *_details_rows(steps))}
{"<h3>Step configs (resolved)</h3>" + chr(10) + configs if configs else ""}
<h2>Environment</h2>
{_html_table("environment", ["key", "value"], [[str(k), _fmt_value(k, v)] for k, v in env.items()])}
</body></html>
"""


# -- comparing runs --------------------------------------------------------------------------

def compare_rows(runs: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """One row per run: its last step against its own baseline, side by side.

    Parameters
    ----------
    runs : list of (label, metrics)
        Each run's label (its directory) and metrics.json content.

    Returns
    -------
    header, rows
        Columns: run, model, task, final step, then ``baseline -> final`` for size, params,
        non-zeros, MACs, latency per batch size (every batch size any run measured) and the
        metric, each followed by its ratio (baseline / final; ``≈`` for a latency change within
        the IQRs) or, for the metric, the delta (points for metrics in [-1, 1]).

    Examples
    --------
    >>> run = {"model": "zoo:lenet-5", "task": "mnist", "steps": [{"name": "baseline", "size_bytes": 4096},
    ...                                                           {"name": "quantize", "size_bytes": 1024}]}
    >>> header, rows = compare_rows([("a", run)])
    >>> dict(zip(header, rows[0]))["size"], dict(zip(header, rows[0]))["size x"]
    ('4.0 KiB -> 1.0 KiB', '4.00x')
    """
    bss = _batch_sizes(s for _, m in runs for s in _steps(m))
    header = ["run", "model", "task", "final step", "size", "size x", "params", "params x",
              "non-zero", "non-zero x", "MACs", "MACs x",
              *[c for bs in bss for c in (f"latency bs{bs} (ms)", f"speed-up bs{bs}")], "metric", "delta"]

    def pair(base: dict, last: dict, key: str, fmt) -> list[str]:
        b, v = _num(base.get(key)), _num(last.get(key))
        return [f"{fmt(b)} -> {fmt(v)}", f"{b / v:.2f}x" if b and v else "-"]

    rows = []
    for label, m in runs:
        steps = _steps(m)
        base, last = steps[0], steps[-1]
        bm, lm = _num(_metric(base).get("value")), _num(_metric(last).get("value"))
        metric = "-" if bm is None or lm is None else f"{_metric(last).get('name', 'metric')} {bm:.4f} -> {lm:.4f}"
        rows.append([
            label, str(m.get("model", "?")), str(m.get("task", "?")), _step_name(last, len(steps) - 1),
            *pair(base, last, "size_bytes", _fmt_bytes), *pair(base, last, "params", _fmt_int),
            *pair(base, last, "nonzero_params", _fmt_int), *pair(base, last, "macs", _fmt_int),
            *[c for bs in bss for c in (f"{_fmt_ms(*_timing(base, bs)[::2])} -> {_fmt_ms(*_timing(last, bs)[::2])}",
                                        _speedup(base, last, bs))],
            metric, _delta(base, last)[1]])
    return header, rows


def write_comparison(run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> str:
    """Compare runs side by side (:func:`compare_rows`); returns the text written or to print.

    Parameters
    ----------
    run_dirs : list of path
        Output directories of runs (each with a metrics.json); at least one.
    out : path, optional
        Write the comparison there: HTML when its suffix is ``.html`` / ``.htm``, else Markdown.
        Without it, the comparison is returned as aligned plain text (for the console).

    Raises
    ------
    UserError
        A directory without a usable metrics.json (see `read_metrics`).
    """
    runs = [(str(d), read_metrics(d)) for d in run_dirs]
    header, rows = compare_rows(runs)
    warn = [f"{label}: {name}: {msg} [{code}]" for label, m in runs for name, code, msg in step_warnings(m)]
    note = ("Each run's last step against its own baseline (baseline -> final); ratios are baseline / "
            "final; ≈: a latency change within the interquartile ranges. Runs measured on different "
            "machines or thread counts are not comparable in latency.")
    if out is None:
        return "\n".join(_aligned(header, rows) + [f"warning: {w}" for w in warn])
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warn)
        text = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>torchslim: '
                f"{len(runs)} runs compared</title>\n<style>{_CSS}</style></head>\n<body>\n"
                f"<h1>torchslim: {len(runs)} runs compared</h1>\n"
                + (f'<div id="warnings" class="warnings" role="alert"><strong>⚠ {len(warn)} warning(s)</strong>'
                   f"<ul>{items}</ul></div>\n" if warn else "")
                + _html_table("compare", header, rows) + f'\n<p class="note">{html.escape(note)}</p>\n</body></html>\n')
    else:
        text = "\n".join([f"# torchslim: {len(runs)} runs compared", "",
                          *([f"> **⚠ {len(warn)} warning(s)**", ">", *[f"> - {_md_cell(w)}" for w in warn], ""]
                            if warn else []),
                          _md_table(header, rows), "", note]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    return text


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(Re)write ``report.md``, ``report.html`` and ``plots/*.png`` from ``metrics.json``.

    Parameters
    ----------
    run_dir : path
        A run's output directory (or its ``.DIR.partial`` sibling while the run finishes).

    Returns
    -------
    (Path, Path)
        The paths of report.md and report.html. The HTML is self-contained (plots inlined).

    Raises
    ------
    UserError
        ``run_dir`` has no usable metrics.json (see `read_metrics`).
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    plots = make_plots(metrics, run_dir / "plots")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text(md_path, _markdown(metrics, plots))
    write_text(html_path, _html(metrics, plots))
    return md_path, html_path
