"""The run report: table figures, report.md/report.html/plots, `torchslim report`, and a real browser.

Most tests build metrics.json by hand (fast, exact numbers); `pipeline_run` runs a tiny real
recipe once per module so the report is also checked on what the pipeline really writes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torchslim.cli import main
from torchslim.errors import UserError
from torchslim.report import (extra_fields, format_table, make_plots, markdown_table, read_metrics,
                              table_rows, write_report)

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
    assert header == ["step", "params", "non-zero", "size", "size x", "MACs", "latency bs1 (ms)",
                      "latency bs8 (ms)", "latency bs32 (ms)", "metric", "delta"]
    assert [r[0] for r in rows] == ["baseline", "prune-magnitude", "export"]
    col = dict(zip(header, zip(*rows)))
    # size x = baseline bytes / step bytes: 40000/40000, 40000/16000, 40000/10000
    assert col["size x"] == ("1.00x", "2.50x", "4.00x")
    assert col["non-zero"] == ("10.00K", "3.00K", "3.00K")
    assert col["size"] == ("39.1 KB", "15.6 KB", "9.8 KB")
    assert col["latency bs8 (ms)"] == ("1.250", "1.000", "0.900")
    assert col["latency bs32 (ms)"] == ("4.000", "3.000", "2.000")
    assert col["metric"] == ("accuracy 0.9750", "accuracy 0.9700", "accuracy 0.9600")
    # accuracy deltas in percentage points against the baseline
    assert col["delta"] == ("+0.00 pt", "-0.50 pt", "-1.50 pt")


def test_table_handles_missing_and_null_fields():
    """A metric=null (shape: task) step, a step without size or latency, int latency keys."""
    m = {"steps": [{"name": "baseline", "size_bytes": 1000, "latency_ms": {1: 2.0}, "metric": None},
                   {"name": "odd", "size_bytes": None, "latency_ms": None, "metric": None}]}
    header, rows = table_rows(m)
    assert header[6] == "latency bs1 (ms)"
    assert rows[0][4:] == ["1.00x", "-", "2.000", "-", "-"]
    assert rows[1][3:] == ["-", "-", "-", "-", "-", "-"]


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
    assert lines[2].split() == ["measure", "10.00K", "10.00K", "2.0", "KB", "1.00x", "250.00K",
                                "0.250", "2.500", "-", "-"]


def test_extra_fields():
    steps = hand_metrics()["steps"]
    assert extra_fields(steps[0]) == {}
    assert extra_fields(steps[1]) == {}  # config is shown separately
    assert list(extra_fields(steps[2])) == ["onnx_latency_ms", "onnx_max_abs_diff"]


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
    assert "onnx_latency_ms: bs1 0.0156 ms, bs32 0.1139 ms" in md
    assert "onnx_max_abs_diff: 3.8e-06" in md
    assert "baseline -> export: 4.00x smaller on disk" in md
    assert '"sparsity": 0.7' in md

    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == len(ALL_PLOTS)
    assert "plots/" not in page  # self-contained: nothing loaded from beside the file
    assert "onnx_latency_ms" in page and "Test CPU" in page
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
    """A tiny real run (1 training epoch, prune, quantize): about 15 s on 2 CPU cores."""
    import torch

    import torchslim

    torch.set_num_threads(2)
    recipe = {"model": {"spec": "zoo:digits-cnn"}, "task": "digits",
              "train": {"optimizer": "adamw", "epochs": 1, "lr": 0.003, "seed": 0, "loggers": []},
              "steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
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
    assert {p.name for p in (run / "plots").iterdir()} == ALL_PLOTS
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
    else:  # metric null everywhere, one ONNX extra field
        metrics = copy.deepcopy(hand_metrics())
        metrics["task"] = "shape:1x8x8"
        for s in metrics["steps"]:
            s["metric"] = None
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
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert len(imgs) == n_plots and n_plots >= 3
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    assert cells == names
    assert ncols == [len(header)] * len(names)
    if which == "shape-task":
        assert "onnx_max_abs_diff" in details
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
