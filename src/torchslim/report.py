"""Reports from metrics.json: a console table, report.md, a self-contained report.html, plots.

Everything is derived from ``DIR/metrics.json`` alone, so ``torchslim report DIR`` can rewrite
the report of any finished (or partial) run.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_int(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table (ratios against the baseline)."""
    steps = metrics.get("steps", [])
    base = steps[0] if steps else {}
    bss = sorted({bs for s in steps for bs in (s.get("latency_ms") or {})}, key=int)
    header = ["step", "params", "non-zero", "size", "size x", "MACs",
              *[f"latency bs{bs} (ms)" for bs in bss], "metric", "delta"]
    rows = []
    for s in steps:
        m = s.get("metric") or {}
        bm = base.get("metric") or {}
        value = m.get("value")
        delta = "-" if value is None or bm.get("value") is None else f"{100 * (value - bm['value']):+.2f} pt"
        ratio = base.get("size_bytes", 0) / s["size_bytes"] if s.get("size_bytes") else None
        rows.append([
            s["name"], _fmt_int(s.get("params")), _fmt_int(s.get("nonzero_params")),
            _fmt_bytes(s.get("size_bytes")), "-" if ratio is None else f"{ratio:.2f}x",
            _fmt_int(s.get("macs")),
            *[f"{(s.get('latency_ms') or {}).get(bs, float('nan')):.3f}" for bs in bss],
            "-" if value is None else f"{m.get('name', '')} {value:.4f}", delta,
        ])
    return header, rows


def format_table(metrics: dict[str, Any]) -> str:
    header, rows = table_rows(metrics)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(metrics: dict[str, Any]) -> str:
    header, rows = table_rows(metrics)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def make_plots(metrics: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Bar charts per step (size, MACs, latency, metric) and metric vs size; returns PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = metrics.get("steps", [])
    names = [s["name"] for s in steps]
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def bar(fname: str, values: list[float | None], title: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
        ax.bar(range(len(names)), [v or 0 for v in values], color="#3b7dd8")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        p = plot_dir / fname
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)

    bar("size.png", [s.get("size_bytes", 0) / 1024 for s in steps], "Size on disk per step", "KiB")
    bar("macs.png", [s.get("macs") for s in steps], "MACs per forward (batch 1)", "MACs")
    lat = [(s.get("latency_ms") or {}) for s in steps]
    bs = "1" if any("1" in d for d in lat) else next((k for d in lat for k in d), None)
    if bs is not None:
        bar("latency.png", [d.get(bs) for d in lat], f"Latency, batch {bs}", "ms")
    metric_vals = [(s.get("metric") or {}).get("value") for s in steps]
    if any(v is not None for v in metric_vals):
        mname = next((s["metric"]["name"] for s in steps if s.get("metric")), "metric")
        bar("metric.png", metric_vals, f"Task metric ({mname}) per step", mname)
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        xs = [s.get("size_bytes", 0) / 1024 for s in steps]
        ax.plot(xs, [v if v is not None else float("nan") for v in metric_vals], "o-", color="#d8573b")
        for x, y, n in zip(xs, metric_vals, names):
            if y is not None:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("size on disk (KiB, log)")
        ax.set_ylabel(mname)
        ax.set_title(f"{mname} vs size")
        fig.tight_layout()
        p = plot_dir / "metric_vs_size.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(Re)write ``report.md``, ``report.html`` and ``plots/*.png`` from ``metrics.json``."""
    run_dir = Path(run_dir)
    mf = run_dir / "metrics.json"
    if not mf.is_file():
        raise UserError(f"{run_dir}: no metrics.json here; give the output directory of a run")
    try:
        metrics = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{mf}: not valid JSON: {exc}") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("steps"), list):
        raise UserError(f"{mf}: not a torchslim metrics.json (no steps list)")
    plots = make_plots(metrics, run_dir / "plots")
    env = metrics.get("environment", {})
    title = f"torchslim report: {metrics.get('model')} on {metrics.get('task')}"
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    md = [f"# {title}", "", f"torchslim {metrics.get('torchslim_version')}; {env_line}", "",
          markdown_table(metrics), "", "Sizes are bytes on disk of each step's saved artifact; "
          "latency is the median of repeated forward passes after warm-up; MACs are traced "
          "(dense, batch 1).", ""]
    md += [f"![{p.stem}](plots/{p.name})" for p in plots]
    _atomic_write(run_dir / "report.md", "\n".join(md) + "\n")

    header, rows = table_rows(metrics)
    thead = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    tbody = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{p.stem}</figcaption></figure>'
        for p in plots)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f0f3f8; }}
figure {{ display: inline-block; margin: 1em; }}
img {{ max-width: 640px; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="env">torchslim {html.escape(str(metrics.get('torchslim_version')))}; {html.escape(env_line)}</p>
<table id="steps"><thead><tr>{thead}</tr></thead><tbody>{tbody}</tbody></table>
<p>Sizes are bytes on disk of each step's saved artifact; latency is the median of repeated
forward passes after warm-up; MACs are traced (dense, batch 1).</p>
<div id="plots">{imgs}</div>
</body></html>
"""
    _atomic_write(run_dir / "report.html", page)
    return run_dir / "report.md", run_dir / "report.html"
