"""Reports from metrics.json: a console table, report.md, a self-contained report.html, plots.

Everything is derived from ``DIR/metrics.json`` alone (CONTRACT section 6), so
``torchslim report DIR`` can rewrite the report of any finished (or partial) run. Every file is
written to a temporary sibling first and renamed into place, so a reader never sees half a file.

Ratios compare each step with ``steps[0]``, the baseline: ``size x`` is baseline bytes / step
bytes (bigger is smaller on disk) and ``delta`` is step metric - baseline metric, in percentage
points when both values lie in [-1, 1] (accuracy, Spearman).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import atomic_open, write_text

# Keys every step has (CONTRACT section 6) or that the table already shows; anything else a step
# carries (a handler's own figures such as onnx_latency_ms) goes to the "step details" section.
_STANDARD_KEYS = frozenset({"name", "verb", "method", "params", "nonzero_params", "size_bytes",
                            "macs", "latency_ms", "metric", "wall_s", "config"})
# Files make_plots owns in plots/; a stale one (e.g. metric.png of a run now without a metric) is
# removed so the folder matches the report.
_PLOT_FILES = ("size.png", "macs.png", "latency.png", "metric.png", "metric_vs_size.png")
_PLOT_CAPTIONS = {
    "size": "Size on disk per step",
    "macs": "MACs per forward pass (batch 1)",
    "latency": "Latency per forward pass, by batch size",
    "metric": "Task metric per step",
    "metric_vs_size": "Task metric against size on disk",
}
_NOTE = ("Sizes are bytes on disk of each step's saved artifact; size x is baseline bytes / step "
         "bytes. Latency is the median of repeated forward passes after warm-up, in ms per batch; "
         "~ marks a figure whose spread stayed large after re-measuring (a busy machine). "
         "MACs are traced (dense, batch 1). Delta is the metric change against the baseline, on "
         "the split each metric names in metrics.json (test unless measure.split says val).")


# -- formatting ------------------------------------------------------------------------------

def _num(x: Any) -> float | None:
    """``x`` as a finite float, else None (missing, null, NaN, or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _fmt_bytes(n: float | None) -> str:
    if _num(n) is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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


def _unstable(step: dict, bs: str) -> bool:
    """Whether the latency of batch size ``bs`` was marked unstable (dispersion above the
    bound after re-measuring): shown with a ``~`` after the figure."""
    entry = (step.get("latency") or {}).get(bs) if isinstance(step.get("latency"), dict) else None
    return isinstance(entry, dict) and entry.get("unstable") is True


def _batch_sizes(steps: Iterable[dict], key: str = "latency_ms") -> list[str]:
    """Every batch size any step measured, in numeric order."""
    seen: dict[str, None] = {}
    for s in steps:
        seen.update(dict.fromkeys(_latency(s, key)))
    return [k for k, _ in _by_batch(seen)]


# -- the table -------------------------------------------------------------------------------

def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table, one row per step, ratios against the baseline.

    Parameters
    ----------
    metrics : dict
        The content of metrics.json (only ``steps`` is read); missing fields show as ``-``.

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
    >>> header[:5], rows[1][4]
    (['step', 'params', 'non-zero', 'size', 'size x'], '4.00x')
    """
    steps = [s for s in metrics.get("steps") or [] if isinstance(s, dict)]
    base = steps[0] if steps else {}
    bss = _batch_sizes(steps)
    header = ["step", "params", "non-zero", "size", "size x", "MACs",
              *[f"latency bs{bs} (ms)" for bs in bss], "metric", "delta"]
    rows = []
    for i, s in enumerate(steps):
        m = _metric(s)
        value = _num(m.get("value"))
        ratio = size_ratio(base, s)
        lat = _latency(s)
        rows.append([
            _step_name(s, i), _fmt_int(s.get("params")), _fmt_int(s.get("nonzero_params")),
            _fmt_bytes(s.get("size_bytes")), "-" if ratio is None else f"{ratio:.2f}x",
            _fmt_int(s.get("macs")),
            *["-" if _num(lat.get(bs)) is None else f"{lat[bs]:.3f}{'~' if _unstable(s, bs) else ''}"
              for bs in bss],
            "-" if value is None else f"{m.get('name', 'metric')} {value:.4f}",
            _delta(base, s)[1],
        ])
    return header, rows


def format_table(metrics: dict[str, Any]) -> str:
    """The before/after table as aligned plain text, for the console.

    Examples
    --------
    >>> print(format_table({"steps": [{"name": "baseline", "params": 1200}]}))
    step      params  non-zero  size  size x  MACs  metric  delta
    --------  ------  --------  ----  ------  ----  ------  -----
    baseline   1.20K         -     -       -     -       -      -
    """
    header, rows = table_rows(metrics)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(metrics: dict[str, Any]) -> str:
    """The before/after table as a GitHub-flavoured Markdown table.

    Examples
    --------
    >>> print(markdown_table({"steps": [{"name": "a|b"}]}))
    | step | params | non-zero | size | size x | MACs | metric | delta |
    |---|---|---|---|---|---|---|---|
    | a\\|b | - | - | - | - | - | - | - |
    """
    header, rows = table_rows(metrics)
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

def make_plots(metrics: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Write the report's PNG plots into ``plot_dir``; returns their paths, in report order.

    Size, MACs and latency (one bar per batch size) per step, the task metric per step, and the
    metric against size. A plot whose figures no step has is left out (no metric plots for
    ``shape:`` tasks); a stale file of a left-out plot is removed.
    """
    # Figure objects, not pyplot: no global backend switch (a user's notebook keeps its own) and
    # no figure registry to leak into; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps = [s for s in metrics.get("steps") or [] if isinstance(s, dict)]
    names = [_step_name(s, i) for i, s in enumerate(steps)]
    xs = list(range(len(steps)))
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def new_axes(height: float = 3.4):
        fig = Figure(figsize=(6.4, height), dpi=100)
        ax = fig.subplots()
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        return fig, ax

    def save(fig, fname: str) -> None:
        fig.tight_layout()
        path = plot_dir / fname
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
        paths.append(path)

    def step_axis(ax) -> None:
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)

    def bars(ax, values: list[float | None], labels: list[str]) -> None:
        drawn = ax.bar(xs, [math.nan if v is None else v for v in values], color="#3b7dd8")
        ax.bar_label(drawn, labels=labels, fontsize=7, padding=2)
        ax.margins(y=0.15)
        step_axis(ax)

    def bar(fname: str, values: list[float | None], labels: list[str], title: str, ylabel: str) -> None:
        if all(v is None for v in values):
            return
        fig, ax = new_axes()
        bars(ax, values, labels)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_tick(v)))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        save(fig, fname)

    sizes = [_num(s.get("size_bytes")) for s in steps]
    base = steps[0] if steps else {}
    bar("size.png", [None if v is None else v / 1024 for v in sizes],
        ["" if r is None else f"{r:.1f}x" for r in (size_ratio(base, s) for s in steps)],
        "Size on disk per step (label: x smaller than baseline)", "KiB")
    macs = [_num(s.get("macs")) for s in steps]
    bar("macs.png", macs, ["" if v is None else _fmt_int(v) for v in macs],
        "MACs per forward (batch 1)", "MACs")

    # one panel per batch size: batch 32 takes far longer than batch 1, one axis would hide it
    lat = [_latency(s) for s in steps]
    bss = _batch_sizes(steps)
    if bss:
        ncols = min(len(bss), 3)
        nrows = math.ceil(len(bss) / ncols)
        fig = Figure(figsize=(6.4 if ncols < 3 else 9.6, 3.4 * nrows), dpi=100)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(bss):]:
            ax.set_visible(False)
        for ax, bs in zip(axes.flat, bss):
            values = [_num(d.get(bs)) for d in lat]
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            bars(ax, values, ["" if v is None else f"{v:.3g}" for v in values])
            ax.set_title(f"batch {bs}", fontsize=10)
            ax.set_ylabel("ms per batch")
        fig.suptitle("Latency per forward pass (median)")
        save(fig, "latency.png")

    values = [_num(_metric(s).get("value")) for s in steps]
    if any(v is not None for v in values):
        mname = next((_metric(s)["name"] for s in steps if _metric(s).get("name")), "metric")
        hib = next((_metric(s)["higher_is_better"] for s in steps
                    if isinstance(_metric(s).get("higher_is_better"), bool)), True)
        arrow = "higher is better" if hib else "lower is better"
        fig, ax = new_axes()
        ys = [math.nan if v is None else v for v in values]
        ax.plot(xs, ys, "o-", color="#d8573b")
        if values[0] is not None:
            ax.axhline(values[0], ls="--", lw=1, color="#888", label="baseline")
            ax.legend(fontsize=8)
        for x, v in zip(xs, values):
            if v is not None:
                ax.annotate(f"{v:.4f}", (x, v), fontsize=7, xytext=(0, 5), textcoords="offset points",
                            ha="center")
        ax.margins(x=0.08, y=0.2)
        step_axis(ax)
        ax.set_title(f"{mname} per step ({arrow})")
        ax.set_ylabel(mname)
        save(fig, "metric.png")

        pts = [(sz / 1024, v, n) for sz, v, n in zip(sizes, values, names) if sz and v is not None]
        if pts:
            fig, ax = new_axes(3.8)
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
            ax.margins(x=0.15, y=0.2)
            ax.set_xlabel("size on disk (KiB, log scale)")
            ax.set_ylabel(mname)
            ax.set_title(f"{mname} vs size ({arrow})")
            save(fig, "metric_vs_size.png")

    made = {p.name for p in paths}
    for fname in _PLOT_FILES:
        if fname not in made:
            (plot_dir / fname).unlink(missing_ok=True)
    return paths


# -- files -----------------------------------------------------------------------------------

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
                raise UserError(f"{where}.{key} = {s[key]!r}: expected an object or null")
    if not isinstance(metrics.get("environment", {}), dict):
        raise UserError(f"{mf}: 'environment' should be an object")
    return metrics


def _title(metrics: dict[str, Any]) -> str:
    return f"torchslim report: {metrics.get('model', '?')} on {metrics.get('task', '?')}"


def _markdown(metrics: dict[str, Any], plots: list[Path]) -> str:
    env = metrics.get("environment") or {}
    md = [f"# {_title(metrics)}", "",
          f"torchslim {metrics.get('torchslim_version', '?')}, metrics.json schema "
          f"{metrics.get('schema_version', '?')}, {len(metrics['steps'])} step(s).", "",
          _summary(metrics), "", markdown_table(metrics), "", _NOTE, ""]
    if plots:
        md += ["## Plots", ""]
        md += [f"![{_PLOT_CAPTIONS.get(p.stem, p.stem)}](plots/{p.name})" for p in plots] + [""]
    header, rows = _details_rows(metrics["steps"])
    md += ["## Step details", "", "| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows] + [""]
    configs = [(_step_name(s, i), s["config"]) for i, s in enumerate(metrics["steps"]) if s.get("config")]
    if configs:
        md += ["<details><summary>Step configs (resolved)</summary>", ""]
        for name, cfg in configs:
            md += [f"**{_md_cell(name)}**", "", "```json", json.dumps(cfg, indent=1), "```", ""]
        md += ["</details>", ""]
    md += ["## Environment", "", "| key | value |", "|---|---|"]
    md += [f"| {_md_cell(k)} | {_md_cell(_fmt_value(k, v))} |" for k, v in env.items()]
    return "\n".join(md) + "\n"


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
    header, rows = table_rows(metrics)
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
    dh, drows = _details_rows(steps)
    configs = "".join(
        f"<details><summary>{html.escape(_step_name(s, i))}</summary>"
        f"<pre>{html.escape(json.dumps(s['config'], indent=1))}</pre></details>\n"
        for i, s in enumerate(steps) if s.get("config"))
    env = metrics.get("environment") or {}
    env_table = _html_table("environment", ["key", "value"],
                            [[str(k), _fmt_value(k, v)] for k, v in env.items()])
    version = html.escape(str(metrics.get("torchslim_version", "?")))
    schema = html.escape(str(metrics.get("schema_version", "?")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<p>torchslim {version}, metrics.json schema {schema}, {len(steps)} step(s).</p>
<p class="summary">{html.escape(_summary(metrics))}</p>
{_html_table("steps", header, rows, classes)}
<p class="note">{html.escape(_NOTE)}</p>
<h2>Plots</h2>
<div id="plots">
{imgs or "<p>No plottable figures.</p>"}
</div>
<h2>Step details</h2>
{_html_table("details", dh, drows)}
{"<h3>Step configs (resolved)</h3>" + chr(10) + configs if configs else ""}
<h2>Environment</h2>
{env_table}
</body></html>
"""


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
