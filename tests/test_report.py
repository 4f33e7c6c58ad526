"""The run report: table figures, report.md/report.html/plots, `torchslim report`, and a real browser.

Most tests build metrics.json by hand (fast, exact numbers); `pipeline_run` runs a tiny real
recipe once per module so the report is also checked on what the pipeline really writes.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchslim.cli import main
from torchslim.errors import UserError
from torchslim.report import (extra_fields, format_table, layer_rows, make_plots, markdown_table,
                              read_metrics, table_rows, write_report)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]
ALL_PLOTS = {"size.png", "macs.png", "latency.png", "metric.png", "metric_vs_size.png"}


def _step(name: str, verb: str, size: int, nonzero: int, acc: float | None, lat: dict, **extra) -> dict:
    return {"name": name, "verb": verb, "method": None if verb == "baseline" else "x",
            "params": 10_000, "nonzero_params": nonzero, "size_bytes": size, "macs": 250_000,
            "latency_ms": lat,
            "metric": None if acc is None else {"name": "accuracy", "value": acc, "higher_is_better": True},
            "wall_s": 1.5, **extra}


def hand_metrics() -> dict:
    """Three steps; batch sizes 1, 8, 32 (numeric order differs from string order: "32" < "8")."""
    return {
        "schema_version": 1, "torchslim_version": "0.1.0", "model": "zoo:digits-cnn", "task": "digits",
        "environment": {"torch": "2.x", "threads": 2, "device": "cpu", "cpu": "Test CPU", "world_size": 1},
        "steps": [
            _step("baseline", "baseline", 40_000, 10_000, 0.9750, {"1": 0.5, "8": 1.25, "32": 4.0}),
            _step("prune-magnitude", "prune", 16_000, 3_000, 0.9700, {"1": 0.4, "8": 1.0, "32": 3.0},
                  config={"sparsity": 0.7}),
            _step("export", "export", 10_000, 3_000, 0.9600, {"1": 0.3, "8": 0.9, "32": 2.0},
                  onnx_latency_ms={"1": 0.0156, "32": 0.1139}, onnx_max_abs_diff=3.8e-06),
        ],
    }


def write_metrics(run_dir: Path, metrics: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def md_table(md: str) -> list[list[str]]:
    """The first Markdown table of ``md`` as rows of cells (header first, separator dropped)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    start = md.splitlines().index(lines[0])
    rows = []
    for ln in md.splitlines()[start:]:
        if not ln.startswith("|"):
            break
        if not ln.startswith("|---"):
            rows.append([c.strip() for c in ln.strip("|").split(" | ")])
    return rows


# -- the table ---------------------------------------------------------------------------------

def test_table_rows_ratios_deltas_and_latency_order():
    header, rows = table_rows(hand_metrics())
    assert header == ["step", "params", "non-zero", "size", "size x", "MACs",
                      "latency bs1 (ms)", "speed-up bs1", "latency bs8 (ms)", "speed-up bs8",
                      "latency bs32 (ms)", "speed-up bs32", "onnx bs1 (ms)", "onnx bs32 (ms)", "metric", "delta"]
    assert [r[0] for r in rows] == ["baseline", "prune-magnitude", "export"]
    col = dict(zip(header, zip(*rows)))
    # size x = baseline bytes / step bytes: 40000/40000, 40000/16000, 40000/10000
    assert col["size x"] == ("1.00x", "2.50x", "4.00x")
    assert col["non-zero"] == ("10.00K", "3.00K", "3.00K")
    assert col["size"] == ("39.1 KiB", "15.6 KiB", "9.8 KiB")
    assert col["latency bs8 (ms)"] == ("1.250", "1.000", "0.900")
    assert col["latency bs32 (ms)"] == ("4.000", "3.000", "2.000")
    # no IQR recorded (an older metrics.json): plain ratios, nothing called noise
    assert col["speed-up bs32"] == ("1.00x", "1.33x", "2.00x")
    assert col["onnx bs1 (ms)"] == ("-", "-", "0.016")
    assert col["metric"] == ("accuracy 0.9750", "accuracy 0.9700", "accuracy 0.9600")
    # accuracy deltas in percentage points against the baseline
    assert col["delta"] == ("+0.00 pt", "-0.50 pt", "-1.50 pt")


def test_table_handles_missing_and_null_fields():
    """A metric=null (shape: task) step, a step without size or latency, int latency keys."""
    m = {"steps": [{"name": "baseline", "size_bytes": 1000, "latency_ms": {1: 2.0}, "metric": None},
                   {"name": "odd", "size_bytes": None, "latency_ms": None, "metric": None}]}
    header, rows = table_rows(m)
    assert header[6] == "latency bs1 (ms)"
    assert rows[0][4:] == ["1.00x", "-", "2.000", "1.00x", "-", "-"]
    assert rows[1][3:] == ["-", "-", "-", "-", "-", "-", "-"]


def test_delta_of_a_metric_outside_unit_range_is_absolute():
    m = {"steps": [{"name": "a", "metric": {"name": "perplexity", "value": 20.0, "higher_is_better": False}},
                   {"name": "b", "metric": {"name": "perplexity", "value": 22.5, "higher_is_better": False}}]}
    assert table_rows(m)[1][1][-1] == "+2.5"


def test_markdown_table_content():
    md = markdown_table(hand_metrics())
    rows = md_table(md)
    header, body = rows[0], rows[1:]
    assert header[0] == "step" and header[-1] == "delta"
    assert all(len(r) == len(header) for r in body)
    assert [r[0] for r in body] == ["baseline", "prune-magnitude", "export"]
    assert body[2][header.index("size x")] == "4.00x"
    assert md.splitlines()[1] == "|" + "|".join(["---"] * len(header)) + "|"


def test_format_table_single_measure_row():
    """What `torchslim measure` prints: one step, no baseline to compare with but itself."""
    row = _step("measure", "measure", 2048, 10_000, None, {"1": 0.25, "32": 2.5})
    text = format_table({"steps": [row]})
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:6] == ["step", "params", "non-zero", "size", "size", "x"]
    assert lines[2].split() == ["measure", "10.00K", "10.00K", "2.0", "KiB", "1.00x", "250.00K",
                                "0.250", "1.00x", "2.500", "1.00x", "-", "-"]


def test_extra_fields():
    steps = hand_metrics()["steps"]
    assert extra_fields(steps[0]) == {}
    assert extra_fields(steps[1]) == {}  # config is shown separately
    assert list(extra_fields(steps[2])) == ["onnx_max_abs_diff"]  # ONNX latency has its own columns


# -- files -------------------------------------------------------------------------------------

def test_write_report_files(tmp_path):
    run = write_metrics(tmp_path / "run", hand_metrics())
    md_path, html_path = write_report(run)
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    assert {p.name for p in (run / "plots").iterdir()} == ALL_PLOTS
    for p in (run / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = md_path.read_text()
    table = md_table(md)
    assert [r[0] for r in table[1:]] == ["baseline", "prune-magnitude", "export"]
    for name in ALL_PLOTS:
        assert f"(plots/{name})" in md
    # environment, the per-step extras, and the summary
    assert "Test CPU" in md and "world_size" in md
    assert "onnx_max_abs_diff: 3.8e-06" in md
    assert table[0][-4:-2] == ["onnx bs1 (ms)", "onnx bs32 (ms)"] and table[3][-4:-2] == ["0.016", "0.114"]
    assert table[0][3:5] == ["size", "size (B)"] and table[1][3:5] == ["39.1 KiB", "40,000"]
    assert "baseline -> export: 4.00x smaller on disk" in md
    assert '"sparsity": 0.7' in md

    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == len(ALL_PLOTS)
    assert "plots/" not in page  # self-contained: nothing loaded from beside the file
    assert "onnx bs32 (ms)" in page and "Test CPU" in page
    assert re.search(r'<td class="worse">-1\.50 pt</td>', page)
    assert not list(run.glob("**/*.tmp"))


def test_write_report_metric_null_and_single_step(tmp_path):
    """A shape: task (metric null) with only a baseline: no metric plots, no crash."""
    m = hand_metrics()
    m["task"] = "shape:1x8x8"
    m["steps"] = [dict(m["steps"][0], metric=None)]
    run = write_metrics(tmp_path / "run", m)
    (run / "plots").mkdir()
    (run / "plots" / "metric.png").write_bytes(b"stale")  # left by an earlier report
    md_path, html_path = write_report(run)
    assert {p.name for p in (run / "plots").iterdir()} == {"size.png", "macs.png", "latency.png"}
    table = md_table(md_path.read_text())
    assert len(table) == 2 and table[1][0] == "baseline"
    assert table[1][-2:] == ["-", "-"]
    assert "Only the baseline was measured." in md_path.read_text()
    assert html_path.read_text().count("data:image/png;base64,") == 3


def test_make_plots_single_step_with_metric(tmp_path):
    m = hand_metrics()
    m["steps"] = m["steps"][:1]
    paths = make_plots(m, tmp_path / "plots")
    assert [p.name for p in paths] == ["size.png", "macs.png", "latency.png", "metric.png",
                                       "metric_vs_size.png"]


def test_write_report_is_atomic(tmp_path, monkeypatch):
    """A failure while rendering leaves the previous report whole and no temporary files."""
    import torchslim.report as report

    run = write_metrics(tmp_path / "run", hand_metrics())
    write_report(run)
    before = (run / "report.html").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(report, "_html", broken)
    with pytest.raises(RuntimeError):
        write_report(run)
    assert (run / "report.html").read_bytes() == before
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("content, message", [
    (None, "has no metrics.json"),
    ("{not json", "not valid JSON"),
    ('{"steps": 3}', "'steps' list"),
    ('{"steps": []}', "'steps' is empty"),
    ('{"steps": [{"name": "b", "size_bytes": "big"}]}', "steps[0].size_bytes"),
])
def test_read_metrics_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        read_metrics(tmp_path)


# -- the command -------------------------------------------------------------------------------

def test_cli_report_regenerates_from_metrics_json_alone(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", hand_metrics())
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert {p.name for p in run.iterdir()} == {"metrics.json", "report.md", "report.html", "plots"}
    # a second run rewrites in place (same table from the same metrics)
    first = (run / "report.md").read_text()
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == first


@pytest.mark.parametrize("case", ["missing-dir", "no-metrics", "broken-json"])
def test_cli_report_bad_input_exit_2(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing-dir":
        run.mkdir()
    if case == "broken-json":
        (run / "metrics.json").write_text('{"steps": [')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run) in err
    assert "Traceback" not in err


def test_cli_report_subprocess_exit_codes(tmp_path):
    """As a user runs it (a fresh process): exit 2 and one `error:` line, no traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{broken")
    cmd = [sys.executable, "-m", "torchslim", "report", str(run)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: ") and "not valid JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (run / "report.html").exists()


# -- a real run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    """A tiny real run (1 training epoch, prune with a 1-epoch fine-tune, quantize): about 20 s
    on 2 CPU cores."""
    import torch

    import torchslim

    torch.set_num_threads(2)
    recipe = {"model": {"spec": "zoo:digits-cnn"}, "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 1, "lr": 0.003, "seed": 0, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5,
                                   "finetune": {"epochs": 1, "lr": 0.001, "loggers": []}}},
                        {"quantize": {"method": "linear", "bits": 8}}]}
    out = tmp_path_factory.mktemp("report") / "run"
    torchslim.compress(recipe, out)
    return out


def test_report_of_a_real_run(pipeline_run, tmp_path):
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    names = [s["name"] for s in metrics["steps"]]
    assert names[0] == "baseline" and len(names) == 3
    # regenerate from metrics.json alone, in a fresh directory
    run = write_metrics(tmp_path / "copy", metrics)
    assert main(["report", str(run)]) == 0
    table = md_table((run / "report.md").read_text())
    header, body = table[0], table[1:]
    assert [r[0] for r in body] == names
    base = metrics["steps"][0]["size_bytes"]
    for row, step in zip(body, metrics["steps"]):
        assert row[header.index("size x")] == f"{base / step['size_bytes']:.2f}x"
        assert row[header.index("metric")] == f"accuracy {step['metric']['value']:.4f}"
    assert {p.name for p in (run / "plots").iterdir()} == ALL_PLOTS | {"training.png", "quantization.png",
                                                                      "layer_sparsity.png"}
    # the pipeline's own report matches the regenerated one
    assert (pipeline_run / "report.md").read_text() == (run / "report.md").read_text()


# -- in a browser ------------------------------------------------------------------------------

def _launch(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def _distinct_colours(png: Path) -> tuple[int, float]:
    """(number of distinct RGB colours, fraction of pixels that are not white)."""
    import numpy as np
    from matplotlib import image as mpimg

    px = mpimg.imread(png)  # (H, W, 3 or 4) floats in [0, 1]
    rgb = (px[..., :3] * 255).round().astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    return len(np.unique(packed)), float((packed != 0xFFFFFF).mean())


@pytest.mark.browser
@pytest.mark.parametrize("which", ["real-run", "shape-task"])
def test_report_html_renders_in_chromium(which, pipeline_run, tmp_path):
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")

    if which == "real-run":
        run = pipeline_run  # read only: the screenshot goes to tmp_path
        metrics = json.loads((run / "metrics.json").read_text())
    else:  # metric null everywhere, one ONNX extra field, a warning
        metrics = copy.deepcopy(hand_metrics())
        metrics["task"] = "shape:1x8x8"
        for s in metrics["steps"]:
            s["metric"] = None
        metrics["steps"][1]["warnings"] = WARNINGS[1:]
        run = write_metrics(tmp_path / "run", metrics)
        write_report(run)
    names = [s["name"] for s in metrics["steps"]]
    n_plots = len(list((run / "plots").glob("*.png")))

    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((run / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            imgs = page.eval_on_selector_all(
                "img", "els => els.map(e => ({complete: e.complete, w: e.naturalWidth, h: e.naturalHeight}))")
            cells = page.eval_on_selector_all("#steps tbody tr",
                                              "rows => rows.map(r => r.cells[0].innerText)")
            ncols = page.eval_on_selector_all("#steps tbody tr", "rows => rows.map(r => r.cells.length)")
            header = page.eval_on_selector_all("#steps thead th", "ths => ths.map(t => t.innerText)")
            details = page.inner_text("#details")
            banner = page.locator("#warnings")
            banner_text = banner.inner_text() if banner.count() else None
            banner_shown = banner.count() == 1 and banner.is_visible()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert len(imgs) == n_plots and n_plots >= 3
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    assert cells == names
    assert ncols == [len(header)] * len(names)
    if which == "shape-task":
        assert "onnx_max_abs_diff" in details
        assert banner_shown and "layer 6 is 99.7% zeros" in banner_text and "prune-magnitude" in banner_text
    else:
        assert banner_text is None
    colours, ink = _distinct_colours(shot)
    assert colours > 200, f"screenshot {shot} looks blank: {colours} colours"
    assert ink > 0.02, f"screenshot {shot} is {100 * (1 - ink):.1f}% white"


def test_unstable_latency_is_marked_in_the_table():
    from torchslim.report import table_rows

    m = {"steps": [{"name": "baseline", "latency_ms": {"1": 0.5, "32": 2.0},
                    "latency": {"1": {"median_ms": 0.5, "unstable": True}, "32": {"median_ms": 2.0}}}]}
    header, rows = table_rows(m)
    assert rows[0][header.index("latency bs1 (ms)")] == "0.500~"
    assert rows[0][header.index("latency bs32 (ms)")] == "2.000"


# -- latency: dispersion, ONNX Runtime, what it was measured on --------------------------------

def _timed(median: float, iqr: float, unstable: bool = False) -> dict:
    out = {"median_ms": median, "iqr_ms": iqr, "cpu_ms": median, "runs": 100, "threads": 2}
    return {**out, "unstable": True} if unstable else out


def noisy_metrics() -> dict:
    """Latency with IQRs: bs1 of 'prune' lies within the baseline's noise, bs32 does not;
    an export step with ONNX Runtime timings; runtime and input shapes as measure() writes them."""
    m = hand_metrics()
    lat = [({"1": _timed(0.50, 0.10), "32": _timed(4.0, 0.1)}),
           ({"1": _timed(0.45, 0.10), "32": _timed(3.0, 0.1, unstable=True)}),
           ({"1": _timed(0.30, 0.01), "32": _timed(2.0, 0.1)})]
    for s, entry in zip(m["steps"], lat):
        s["latency"] = entry
        s["latency_ms"] = {bs: e["median_ms"] for bs, e in entry.items()}
        s["runtime"] = {"name": "eager", "threads": 2, "omp_wait_policy": "PASSIVE"}
        s["input_shapes"] = [[1, 16]]
    m["steps"][2]["onnx_latency"] = {"1": _timed(0.0156, 0.002), "32": _timed(0.1139, 0.01)}
    return m


def test_latency_change_within_the_iqrs_is_not_a_speed_up(tmp_path):
    header, rows = table_rows(noisy_metrics())
    col = dict(zip(header, zip(*rows)))
    # |0.50 - 0.45| = 0.05 <= (0.10 + 0.10) / 2: noise; 0.50 -> 0.30 with IQRs 0.10 / 0.01: a change
    assert col["speed-up bs1"] == ("1.00x", "≈", "1.67x")
    assert col["speed-up bs32"] == ("1.00x", "1.33x", "2.00x")
    assert col["latency bs32 (ms)"] == ("4.000", "3.000~", "2.000")
    md = write_report(write_metrics(tmp_path / "run", noisy_metrics()))[0].read_text()
    assert "≈ means the two medians are within their interquartile ranges" in md


def test_latency_figure_error_bars_onnx_bars_and_setup():
    from matplotlib.container import BarContainer

    from torchslim.report import latency_figure

    fig = latency_figure(noisy_metrics())
    assert "runtime eager; 2 thread(s); OMP_WAIT_POLICY PASSIVE; input (B, 16); B = 1, 32" in fig._suptitle.get_text()
    ax_bs32 = [ax for ax in fig.axes if ax.get_title() == "batch 32"][0]
    bars = [c for c in ax_bs32.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in bars] == ["eager", "onnxruntime"]
    eager, onnx = bars
    assert [round(b.get_height(), 4) for b in eager] == [4.0, 3.0, 2.0]
    assert [b.get_hatch() for b in eager] == [None, "///", None]                # unstable is marked
    assert math.isnan(onnx[0].get_height()) and round(onnx[2].get_height(), 4) == 0.1139
    # IQR error bars: +- IQR / 2 around the median
    segs = eager.errorbar.lines[2][0].get_segments()
    assert [tuple(round(y, 4) for y in (s[0][1], s[1][1])) for s in segs] == [(3.95, 4.05), (2.95, 3.05), (1.95, 2.05)]
    assert "~ unstable" in [t.get_text() for t in ax_bs32.get_legend().get_texts()]
    # without any ONNX Runtime timing: eager bars only
    m = noisy_metrics()
    del m["steps"][2]["onnx_latency"], m["steps"][2]["onnx_latency_ms"]
    ax = latency_figure(m).axes[0]
    assert [c.get_label() for c in ax.containers if isinstance(c, BarContainer)] == ["eager"]


# -- metric axis ---------------------------------------------------------------------------------

def test_metric_axis_is_anchored_and_the_drop_is_printed():
    """A 0.28-point drop (a real demo's) on an axis 10 points tall, not stretched to fill it."""
    from torchslim.report import metric_figure

    m = hand_metrics()
    for s, v in zip(m["steps"], (0.9917, 0.9917, 0.9889)):
        s["metric"]["value"] = v
    ax = metric_figure(m).axes[0]
    lo, hi = ax.get_ylim()
    assert (lo, hi) == pytest.approx((0.9, 1.0))
    assert "-0.28 pt" in ax.get_title()
    assert "0.9889\n(-0.28 pt)" in [t.get_text() for t in ax.texts]
    # a metric outside [-1, 1] (perplexity, lower is better) starts at 0
    p = {"steps": [{"metric": {"name": "perplexity", "value": 20.0, "higher_is_better": False}},
                   {"metric": {"name": "perplexity", "value": 20.5, "higher_is_better": False}}]}
    assert metric_figure(p).axes[0].get_ylim()[0] == 0.0
    # a real drop of 30 points keeps its full extent
    m["steps"][2]["metric"]["value"] = 0.6
    lo, hi = metric_figure(m).axes[0].get_ylim()
    assert lo <= 0.6 and hi >= 0.9917 and hi <= 1.0


# -- warnings banner -----------------------------------------------------------------------------

WARNINGS = [{"code": "metric-drop", "message": "accuracy fell 12.5 points (limit 5)"},
            {"code": "layer-collapsed", "message": "layer 6 is 99.7% zeros"}]


def test_warnings_banner_in_markdown_html_and_console(pipeline_run, tmp_path):
    metrics = json.loads((pipeline_run / "metrics.json").read_text())
    metrics["steps"][1]["warnings"] = WARNINGS
    metrics["steps"][0]["warnings"] = [{"code": "chance-level", "message": "baseline accuracy 0.10 is chance level"}]
    run = write_metrics(tmp_path / "run", metrics)
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    banner = md[:md.index("| step |")]                       # above the table
    assert "**⚠ 3 warning(s)**" in banner
    assert "> - **prune-magnitude**: accuracy fell 12.5 points (limit 5) (`metric-drop`)" in banner
    assert "> - **baseline**: baseline accuracy 0.10 is chance level (`chance-level`)" in banner
    page = html_path.read_text()
    div = page[page.index('<div id="warnings"'):page.index("</div>", page.index('<div id="warnings"'))]
    assert page.index('<div id="warnings"') < page.index('<table id="steps"')
    assert "layer 6 is 99.7% zeros" in div and "<code>layer-collapsed</code>" in div
    text = format_table(metrics)
    assert "warning: prune-magnitude: accuracy fell 12.5 points (limit 5) [metric-drop]" in text.splitlines()
    # no warnings: no banner
    assert "⚠" not in (pipeline_run / "report.md").read_text()


def test_warnings_must_be_a_list(tmp_path):
    m = hand_metrics()
    m["steps"][1]["warnings"] = "bad"
    with pytest.raises(UserError, match=re.escape("steps[1].warnings = 'bad': expected a list")):
        read_metrics(write_metrics(tmp_path / "run", m))


# -- what a real run records: per-layer figures, training curves, run, input shapes ---------------

def test_real_run_records_layers_training_run_and_inputs(pipeline_run):
    m = json.loads((pipeline_run / "metrics.json").read_text())
    base, prune, quant = m["steps"]
    assert base["input_shapes"] == [[1, 1, 8, 8]]
    # per-layer: only layers with weights, compact
    assert [r["name"] for r in base["layers"]] == ["0", "2", "6", "9"]
    assert [r["type"] for r in quant["layers"]] == ["QuantConv2d", "QuantConv2d", "QuantLinear", "QuantLinear"]
    assert all(r["bits"] == 8 for r in quant["layers"]) and all("bits" not in r for r in prune["layers"])
    assert sum(r["params"] for r in base["layers"]) == base["params"]
    assert sum(r["nonzero"] for r in prune["layers"]) == prune["nonzero_params"]
    assert sum(r["macs"] for r in base["layers"]) == base["macs"]
    assert base["layers"][0]["shape"] == [32, 1, 3, 3]
    # training curves: the baseline's epoch and the prune step's fine-tune
    assert [(e["run"], e["epoch"]) for e in base["training"]] == [("baseline", 1)]
    assert [(e["run"], e["epoch"]) for e in prune["training"]] == [("prune-finetune", 1)]
    e = base["training"][0]
    assert e["loss"] > 0 and 0 < e["val_metric"] <= 1 and e["lr"] > 0
    assert "training" not in quant
    # the run: date, command, total time, host
    run = m["run"]
    started, finished = (datetime.datetime.strptime(run[k], "%Y-%m-%dT%H:%M:%SZ") for k in ("started", "finished"))
    assert started <= finished and run["wall_s"] > 0 and run["resumed"] is False
    assert isinstance(run["command"], list) and run["host"]["cpus"] >= 1 and run["host"]["threads"] >= 1
    assert m["schema_version"] == 1


def test_report_of_a_real_run_shows_layers_training_run_and_inputs(pipeline_run):
    from torchslim.report import training_figure

    m = json.loads((pipeline_run / "metrics.json").read_text())
    md = (pipeline_run / "report.md").read_text()
    assert f"Run: started {m['run']['started']}, finished {m['run']['finished']}" in md
    assert "input (B, 1, 8, 8); B = 1, 32" in md
    layers = md_table(md[md.index("## Per-layer figures (final model)"):])
    assert layers[0] == ["layer", "type", "weight shape", "params", "non-zero", "sparsity", "bits",
                         "kept channels", "MACs"]
    q = {r[0]: r for r in layers[1:]}
    assert q["0"][1:3] == ["QuantConv2d", "32x1x3x3"] and q["6"][6] == "8" and q["6"][7] == "-"
    lay6 = next(r for r in m["steps"][-1]["layers"] if r["name"] == "6")
    assert q["6"][5] == f"{100 * (1 - lay6['nonzero'] / lay6['params']):.1f}%"
    by_step = md_table(md[md.index("## Per-layer sparsity by step"):])
    assert by_step[0] == ["layer", "baseline", "prune-magnitude", "quantize-linear"]
    assert by_step[3][1] == "0.0%" and by_step[3][0] == "6"
    training = md_table(md[md.index("## Training"):])
    assert [r[:2] for r in training[1:]] == [["baseline", "1"], ["prune-magnitude: prune-finetune", "1"]]
    assert "(plots/training.png)" in md and (pipeline_run / "plots" / "training.png").is_file()
    ax_loss, ax_val = training_figure(m).axes
    assert [ln.get_label() for ln in ax_loss.lines] == ["baseline", "prune-magnitude: prune-finetune"]
    assert list(ax_val.lines[0].get_ydata()) == [m["steps"][0]["training"][0]["val_metric"]]
    html_page = (pipeline_run / "report.html").read_text()
    assert '<table id="layers">' in html_page and '<table id="layer-sparsity">' in html_page
    assert '<table id="training">' in html_page


def test_layer_sparsity_counts_removed_channels_and_dropped_layers():
    from torchslim.report import layer_sparsity_figure, layer_sparsity_rows

    m = {"steps": [{"name": "baseline", "layers": [{"name": "conv", "params": 100, "nonzero": 100},
                                                   {"name": "block", "params": 50, "nonzero": 50},
                                                   {"name": "fc", "params": 20, "nonzero": 20}]},
                   {"name": "prune", "layers": [{"name": "conv", "params": 25, "nonzero": 25},   # channels cut
                                                {"name": "fc", "params": 20, "nonzero": 5}]}]}   # zeros
    header, rows = layer_sparsity_rows(m)
    assert header == ["layer", "baseline", "prune"]
    assert rows == [["conv", "0.0%", "75.0%"], ["block", "0.0%", "removed"], ["fc", "0.0%", "75.0%"]]
    ax = layer_sparsity_figure(m).axes[0]
    assert [round(b.get_width(), 6) for b in ax.patches] == [75.0, 100.0, 75.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv", "block", "fc"]
    assert layer_sparsity_figure({"steps": m["steps"][:1]}) is None     # nothing pruned: no plot


def test_kept_channels_of_a_narrower_model_measured_for_real():
    """A student with fewer channels than the baseline: kept channels per layer."""
    import torchslim

    task = torchslim.build_task("shape:1x8x8")
    big = torchslim.measure(torchslim.build_model("zoo:digits-cnn"), task, latency=False)
    small = torchslim.measure(torchslim.build_model("zoo:digits-cnn", args={"channels": [24, 48], "hidden": 64}),
                              task, latency=False)
    header, rows = layer_rows({"steps": [big, small]})
    kept = {r[0]: r[header.index("kept channels")] for r in rows}
    assert kept == {"0": "24/32", "2": "48/64", "6": "64/128", "9": "-"}
    assert [r[header.index("bits")] for r in rows] == ["-"] * 4


def test_nlp_latency_input_shape_is_recorded_and_reported(tmp_path, monkeypatch):
    """Token models are timed at a fixed length (16 for shape:16): the row and report say so."""
    import torchslim

    monkeypatch.setenv("TORCHSLIM_TRUST_CODE", "1")
    (tmp_path / "tiny_lm.py").write_text(
        "import torch\n"
        "class TinyLM(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(2000, 8)\n"
        "        self.head = torch.nn.Linear(8, 2)\n"
        "    def forward(self, ids):  # (B, L) token ids -> (B, 2)\n"
        "        return self.head(self.emb(ids).mean(1))\n")
    model = torchslim.build_model(f"py:{tmp_path / 'tiny_lm.py'}:TinyLM")
    row = torchslim.measure(model, torchslim.build_task("shape:16"), batch_sizes=(1, 4), min_run_time=0.01)
    assert row["input_shapes"] == [[1, 16]]
    assert [(r["name"], r["shape"]) for r in row["layers"]] == [("emb", [2000, 8]), ("head", [2, 8])]
    run = write_metrics(tmp_path / "run", {"model": "py:tiny", "task": "shape:16",
                                           "steps": [dict(row, name="baseline")]})
    md = write_report(run)[0].read_text()
    assert "input (B, 16); B = 1, 4" in md


# -- units ---------------------------------------------------------------------------------------

def test_sizes_are_binary_units_everywhere(pipeline_run):
    m = json.loads((pipeline_run / "metrics.json").read_text())
    texts = [(pipeline_run / "report.md").read_text(), (pipeline_run / "report.html").read_text(),
             format_table(m)]
    for text in texts:
        assert "KiB" in text
        assert not re.search(r"\d (KB|MB|GB)\b", text)
    # exact bytes in the report tables
    table = md_table(texts[0])
    assert table[1][table[0].index("size (B)")] == f"{m['steps'][0]['size_bytes']:,}"


# -- comparing runs ------------------------------------------------------------------------------

def test_cli_report_compares_runs(pipeline_run, tmp_path, capsys):
    m = json.loads((pipeline_run / "metrics.json").read_text())
    other = copy.deepcopy(m)
    other["model"] = "zoo:other"
    other["steps"] = other["steps"][:2]                          # a run that stopped at pruning
    other["steps"][1]["warnings"] = WARNINGS[:1]
    b = write_metrics(tmp_path / "b", other)
    assert main(["report", str(pipeline_run), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "model", "task", "final"]
    assert out[2].startswith(str(pipeline_run)) and out[3].startswith(str(b))
    assert "quantize-linear" in out[2] and "prune-magnitude" in out[3]
    assert out[4] == f"warning: {b}: prune-magnitude: accuracy fell 12.5 points (limit 5) [metric-drop]"

    assert main(["report", str(pipeline_run), str(b), "--out", str(tmp_path / "cmp.md")]) == 0
    table = md_table((tmp_path / "cmp.md").read_text())
    header, rows = table[0], table[1:]
    assert [r[0] for r in rows] == [str(pipeline_run), str(b)]
    for row, run in zip(rows, (m, other)):
        base, last = run["steps"][0], run["steps"][-1]
        assert row[header.index("final step")] == last["name"]
        assert row[header.index("size x")] == f"{base['size_bytes'] / last['size_bytes']:.2f}x"
        assert row[header.index("non-zero x")] == f"{base['nonzero_params'] / last['nonzero_params']:.2f}x"
        assert row[header.index("metric")] == (f"accuracy {base['metric']['value']:.4f} -> "
                                               f"{last['metric']['value']:.4f}")
    assert "latency bs32 (ms)" in header and "speed-up bs1" in header

    assert main(["report", str(pipeline_run), str(b), "--out", str(tmp_path / "cmp.html")]) == 0
    page = (tmp_path / "cmp.html").read_text()
    assert page.count("<tr>") == 3 and '<table id="compare">' in page and 'id="warnings"' in page
    # DIR alone keeps its behaviour; DIR --out is a mistake
    assert main(["report", str(b)]) == 0 and (b / "report.html").is_file()
    capsys.readouterr()
    assert main(["report", str(b), "--out", str(tmp_path / "x.md")]) == 2
    assert capsys.readouterr().err.startswith("error: report --out")
    assert main(["report", str(b), str(tmp_path / "missing")]) == 2


def test_sensitivity_curves_and_skipped_modules_are_shown(tmp_path):
    m = hand_metrics()
    m["steps"][1]["sensitivity"] = {"schema": 1, "method": "prune.magnitude", "granularity": "channel",
                                    "split": "val", "metric": "accuracy", "baseline": 0.975,
                                    "layers": {"0": {"params": 320, "macs": 1, "points": [[0.5, 0.9], [0.9, 0.2]]},
                                               "6": {"params": 9000, "macs": 1, "points": [[0.5, 0.97], [0.9, None]]}}}
    m["steps"][1]["skipped"] = [{"module": "attn", "reason": "custom layer without a pruner"}]
    run = write_metrics(tmp_path / "run", m)
    md_path, html_path = write_report(run)
    assert (run / "plots" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    md = md_path.read_text()
    assert "(plots/sensitivity.png)" in md
    assert "| prune-magnitude | attn | custom layer without a pruner |" in md
    assert '<table id="skipped">' in html_path.read_text()
    # a later report of the same run without curves drops the stale plot
    del m["steps"][1]["sensitivity"]
    write_report(write_metrics(run, m))
    assert not (run / "plots" / "sensitivity.png").exists()


# -- quantized layers: per-layer bits, scheme and SQNR --------------------------------------------

def test_report_of_a_real_run_shows_the_quantized_layers(pipeline_run):
    """The quantize step of the real run: its layers' table (from metrics.json, one decimal) and
    quantization.png with one bar per layer at its output SQNR; the prune step has none."""
    from torchslim.report import quantization_figure

    m = json.loads((pipeline_run / "metrics.json").read_text())
    base, prune, quant = m["steps"]
    assert "quantized_layers" not in prune and "quantized_layers" not in base
    entries = quant["quantized_layers"]
    assert [r["name"] for r in entries] == ["0", "2", "6", "9"]
    assert all(r["bits"] == 8 and r["scheme"] == "int8 symmetric per-channel" for r in entries)
    assert all(r["sqnr_db"] > 30 and r["weight_sqnr_db"] > 30 for r in entries)
    # the first 32 of the 128 calibration examples the step drew
    assert quant["quantized_layers_input"] == "32 calibration examples of the train split (2 batch(es) of at most 16)"
    md = (pipeline_run / "report.md").read_text()
    table = md_table(md[md.index("## Quantized layers"):])
    assert table[0] == ["layer", "scheme", "bits", "output SQNR (dB)", "weight SQNR (dB)"]
    assert table[1:] == [[r["name"], r["scheme"], "8", f"{r['sqnr_db']:.1f}", f"{r['weight_sqnr_db']:.1f}"]
                         for r in entries]
    assert quant["quantized_layers_input"] in md and "(plots/quantization.png)" in md
    assert "quantized_layers" not in md[md.index("## Step details"):]   # its own section, not the extras
    assert '<table id="quantized">' in (pipeline_run / "report.html").read_text()
    (ax,) = quantization_figure(m).axes
    assert [b.get_width() for b in ax.patches] == [r["sqnr_db"] for r in entries]


def test_no_quantized_layers_section_without_a_quantize_step(tmp_path):
    run = write_metrics(tmp_path / "run", hand_metrics())
    (run / "plots").mkdir()
    (run / "plots" / "quantization.png").write_bytes(b"stale")   # from an earlier report of the directory
    md_path, html_path = write_report(run)
    assert "Quantized layers" not in md_path.read_text() and 'id="quantized"' not in html_path.read_text()
    assert not (run / "plots" / "quantization.png").exists()


def test_quantization_plot_at_most_40_layers_coloured_by_bits():
    """55 layers over two steps: 40 bars drawn (the title says of how many), one colour per bit
    width, a missing output SQNR drawn as no bar; the table has them all, with a step column."""
    from torchslim.report import MAX_QUANT_LAYERS, quantization_figure, quantized_layer_rows

    def entry(i: int) -> dict:
        return {"name": f"layer{i}", "scheme": f"int{4 + 4 * (i % 2)} symmetric per-channel", "bits": 4 + 4 * (i % 2),
                "sqnr_db": None if i == 3 else 10.0 + i, "weight_sqnr_db": 12.5 + i,
                **({"note": "not called on the inputs"} if i == 3 else {})}

    m = hand_metrics()
    m["steps"][1]["quantized_layers"] = [entry(i) for i in range(30)]
    m["steps"][2]["quantized_layers"] = [entry(i) for i in range(30, 55)]
    m["steps"][2]["quantized_layers_input"] = "the task's example inputs"
    (ax,) = quantization_figure(m).axes
    assert MAX_QUANT_LAYERS == 40 and len(ax.patches) == 40
    assert "first 40 of 55 layers" in ax.get_title()
    widths = [b.get_width() for b in ax.patches]
    assert math.isnan(widths[3]) and widths[:3] == [10.0, 11.0, 12.0] and widths[39] == 10.0 + 39
    colours = {i % 2: set() for i in range(2)}
    for i, bar_ in enumerate(ax.patches):
        colours[i % 2].add(bar_.get_facecolor())
    assert len(colours[0]) == len(colours[1]) == 1 and colours[0] != colours[1]
    assert ax.get_yticklabels()[0].get_text() == "prune-magnitude: layer0"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["4 bits", "8 bits", "weight SQNR"]
    header, rows = quantized_layer_rows(m)
    assert header == ["step", "layer", "scheme", "bits", "output SQNR (dB)", "weight SQNR (dB)", "note"]
    assert len(rows) == 55 and rows[3] == ["prune-magnitude", "layer3", "int8 symmetric per-channel", "8", "-",
                                           "15.5", "not called on the inputs"]
