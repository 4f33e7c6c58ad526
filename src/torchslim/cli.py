"""torchslim: compress, measure, report and export PyTorch models.

Exit codes: 0 success, 2 bad input (usage, recipe, spec, data, checkpoint), 1 internal failure.
Bad input prints one ``error:`` line without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from ._version import __version__
from .errors import RecipeError, UserError, did_you_mean, first_line

log = logging.getLogger("torchslim")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _batch_sizes(text: str) -> tuple[int, ...]:
    from .recipe import MAX_BATCH

    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {clip(text, 80)!r}") from None
    if not sizes or any(not 1 <= s <= MAX_BATCH for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be integers from 1 to {MAX_BATCH}, got {clip(text, 80)!r}")
    return sizes


#: the longest error line printed (a message quoting a 10 MB input is cut, saying so)
MAX_LINE = 600
#: the most error lines printed
MAX_LINES = 30


def clip(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def _error_lines(message: str) -> str:
    """One ``error:`` line per line of ``message``, each at most MAX_LINE characters, at most
    MAX_LINES of them: bounded whatever the input quoted."""
    lines = message.splitlines() or [""]
    shown = [f"error: {clip(line)}\n" for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        shown.append(f"error: ... and {len(lines) - MAX_LINES} more problems\n")
    return "".join(shown)


def _first_line(exc: BaseException) -> str:
    return clip(first_line(exc, limit=10 * MAX_LINE))


class _Parser(argparse.ArgumentParser):
    """Usage errors as every other bad input: ``error:`` first, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {clip(message)}\nerror: see '{self.prog} --help'\n")


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 13 <= value <= 23:
        raise argparse.ArgumentTypeError(f"{value} is out of range; accepted: 13 to 23")
    return value


# -- commands ------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.out, data_dir=args.data_dir, print_fn=_out, resume=args.resume)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from . import distributed as tsdist
    from .pipeline import preflight, run_recipe
    from .recipe import Recipe
    from .report import format_table

    recipe = Recipe.from_yaml(args.recipe, overrides=args.set or [])
    if args.dry_run:
        model, _ = preflight(recipe, args.data_dir)
        _out("# resolved recipe (validated; nothing was run)")
        _out(recipe.to_yaml().rstrip())
        _out("# plan")
        _out(f"  00 baseline: {recipe.model.spec} ({sum(p.numel() for p in model.parameters()):,} params)"
             + (" + train" if recipe.train and not recipe.model.pretrained else ""))
        for i, s in enumerate(recipe.steps, 1):
            _out(f"  {i:02d} {s.key}")
        return 0
    tsdist.init_from_env()
    metrics = run_recipe(recipe, args.out, data_dir=args.data_dir, resume=args.resume,
                         keep_checkpoints=not args.drop_checkpoints)
    if tsdist.is_main():
        _out(format_table(metrics))
        _out(f"wrote {args.out}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from .measure import check_runs, measure
    from .report import format_table
    from .specs import build_model, build_task

    from .fileio import write_json
    from .outputs import parse_selector
    from .recipe import MeasureConfig

    t0 = time.perf_counter()
    how = MeasureConfig(batch_sizes=args.batch_sizes, runtime=args.runtime, split=args.split)
    task = build_task(args.task, args.data_dir)
    how.check_ready(task)
    import torch

    torch.manual_seed(0)  # a randomly initialized model measures the same in every run
    model = build_model(args.model, weights=args.weights, output=parse_selector(args.output, "--output"))
    check_runs(model, task, f"model {args.model}")
    from .numerics import check_finite_weights

    check_finite_weights(model, f"model {args.model}")  # a NaN model's figures would read as real ones
    # an artifact is measured as the files it is, not as a re-save
    art = args.model.partition(":")[2] if args.model.startswith("artifact:") else None
    row = {"name": "measure", "verb": "measure", "method": None,
           **measure(model, task, batch_sizes=how.batch_sizes, runtime=how.runtime, split=how.split,
                     artifact_dir=art)}
    row["wall_s"] = round(time.perf_counter() - t0, 3)
    _out(format_table({"steps": [row]}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, row)
    return 0


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {clip(text, 80)!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {clip(text, 80)!r}")
    return value


def _points(text: str) -> tuple[float, ...]:
    try:
        pts = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sparsities, got {clip(text, 80)!r}") from None
    if not pts or len(pts) > 50 or any(not 0.0 < p < 1.0 for p in pts):
        raise argparse.ArgumentTypeError(f"expected 1 to 50 sparsities in (0, 1), got {clip(text, 80)!r}")
    return pts


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import torch

    from .methods.prune import sensitivity
    from .outputs import parse_selector
    from .registry import get_method
    from .specs import build_model, build_task

    entry = get_method("prune", args.method)
    sensitivity.check_ranking(entry.config_cls, args.method)   # before threshold's config asks for alpha
    fields = {"granularity": args.granularity}
    if args.targets:
        fields["targets"] = args.targets
    if args.ignore:
        fields["ignore"] = args.ignore
    config = entry.config_cls.from_dict(fields, where=f"prune.{args.method}")
    sensitivity.check_config(config)
    if args.latency_runtime != "eager" and not args.latency_batch_size:
        raise RecipeError("--latency-runtime: read with --latency-batch-size N only (the curves are timed at batch N)")
    if args.latency_batch_size:   # said before the model is built
        from .recipe import MAX_BATCH
        if args.latency_batch_size > MAX_BATCH:
            raise RecipeError(f"--latency-batch-size: at most {MAX_BATCH}, got {args.latency_batch_size}")
        sensitivity.check_latency(config, args.latency_runtime)
        from .runtime import runtime_class
        runtime_class(args.latency_runtime).check_available()
    task = build_task(args.task, args.data_dir)
    torch.manual_seed(0)
    model = build_model(args.model, weights=args.weights, output=parse_selector(args.output, "--output"))
    from .measure import check_runs
    check_runs(model, task, f"model {args.model}")
    config.check_ready(task)
    config.check_targets(model)
    config.check_model(model)
    data = sensitivity.analyze(model, task, config, method=entry.key, points=args.points, split=args.split,
                               recalibrate_bn=args.recalibrate_bn, finetune_steps=args.finetune_steps,
                               finetune_lr=args.finetune_lr,
                               latency=(args.latency_batch_size, args.latency_runtime)
                               if args.latency_batch_size else None)
    chance = task.chance_level(args.split)
    if chance is not None and data["baseline"] <= chance + 0.02:
        log.warning("the model scores %.4f on %s, about chance (%.4f): an untrained model's curves are noise; "
                    "pass --weights or an artifact: of the trained model", data["baseline"], args.split, chance)
    path = sensitivity.write(data, args.out)
    _out(f"{'layer':40s} " + " ".join(f"{p:>7.0%}" for p in data["points"]))
    for name, row in data["layers"].items():
        _out(f"{(name or '(model)')[:40]:40s} " + " ".join(
            f"{m:7.4f}" if m is not None else "    nan" for _, m in row["points"]))
    if "latency" in data:
        _out(f"latency of the model: {data['model']['latency_ms']:.3f} ms at batch {data['latency']['batch_size']} on "
             f"{data['latency']['runtime']} ({data['latency']['threads']} threads); the milliseconds each point "
             "removed are in the file")
    _out(f"baseline {data['metric']} on {data['split']}: {data['baseline']:.4f}; wrote {path} and "
         f"{path.with_suffix('.png')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_comparison, write_report
    if len(args.dir) == 1 and args.out is None:
        md, page = write_report(args.dir[0])
        _out(f"wrote {md} and {page}")
        return 0
    if len(args.dir) == 1:
        raise UserError(f"report --out {args.out}: --out writes a comparison of runs; give two or more "
                        "run directories (torchslim report A B --out FILE), or drop --out to rewrite "
                        f"{args.dir[0]}/report.md and report.html")
    text = write_comparison(args.dir, args.out)
    _out(f"wrote {args.out}" if args.out else text)
    return 0


def _task_of_run(d: Path) -> str | None:
    """The task a run directory's metrics.json names: read from disk, so untrusted: a ``py:``
    task (a Python file that building it would run) is used only with --trust-code."""
    from .artifact import code_trusted

    try:
        data = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{d / 'metrics.json'}: unreadable ({clip(str(exc), 200)}); pass --task") from None
    task = data.get("task") if isinstance(data, dict) else None
    if task is not None and not isinstance(task, str):
        raise UserError(f"{d / 'metrics.json'}: 'task' is not a task spec; pass --task")
    if task and task.startswith("py:") and not code_trusted():
        raise UserError(f"{d / 'metrics.json'} names the task {clip(task, 200)!r}, a Python file that building it would "
                        "run; name the task yourself with --task, or pass --trust-code if you trust that file")
    return task


def cmd_export(args: argparse.Namespace) -> int:
    from .artifact import load
    from .measure import check_runs
    from .onnx_io import check_onnx, export_for_task
    from .specs import build_task

    d = Path(args.dir)
    if (d / "model" / "manifest.json").is_file():
        art, out = d / "model", d / "onnx" / "model.onnx"
        task_spec = args.task
        if task_spec is None and (d / "metrics.json").is_file():
            task_spec = _task_of_run(d)
    elif (d / "manifest.json").is_file():
        art, out, task_spec = d, d.parent / "onnx" / "model.onnx", args.task
        if task_spec is None and d.name == "model" and (d.parent / "metrics.json").is_file():   # RUN/model
            task_spec = _task_of_run(d.parent)
    else:
        raise UserError(f"{d}: neither a run directory (with model/) nor an artifact (with manifest.json)")
    if not task_spec:
        raise UserError("export: --task is needed to know the model's input shape (e.g. --task digits)")
    task = build_task(task_spec, args.data_dir)
    model = load(art)
    check_runs(model, task, f"the model in {art}")
    path = export_for_task(model, task, Path(args.out) if args.out else out, args.opset)
    diff = check_onnx(model, path, task.example_inputs(4), atol=1e-4)
    _out(f"wrote {path} (ONNX Runtime vs PyTorch max abs diff {diff:.2e})")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from .fileio import write_json
    from .measure import check_runs, layer_table
    from .specs import build_model, build_task

    task = build_task(args.task, args.data_dir) if args.task else None
    torch.manual_seed(0)
    model = build_model(args.model, weights=args.weights)
    if task is not None:
        check_runs(model, task, f"model {args.model}")
    rows = layer_table(model, task)
    header = ["name", "type", "params", "non-zero", "MACs", "output shape"]
    cells = [[r["name"] or "(model)", r["type"], f"{r['params']:,}", f"{r['nonzero_params']:,}",
              "-" if r["macs"] is None else f"{r['macs']:,}",
              "-" if r["output_shape"] is None else "x".join(map(str, r["output_shape"]))] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in cells]
    _out("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, rows)
    return 0


def _model_arg(text: str) -> str:
    """A model on the command line: a spec, or an artifact directory (``DIR`` for ``artifact:DIR``)."""
    if ":" not in text and (Path(text) / "manifest.json").is_file():
        return f"artifact:{text}"
    if ":" not in text and text not in ("baseline", "current"):
        what = "has no manifest.json (not a torchslim artifact)" if Path(text).is_dir() else "does not exist"
        raise UserError(f"merge: model {clip(text, 200)!r} {what}; give an artifact directory (such as "
                        "RUN/model) or a model spec such as zoo:lenet-5")
    return text


def _run_of_artifact(spec: str) -> Path | None:
    """The run directory an ``artifact:`` model was saved in (its folder or its parent holding a
    metrics.json), or None."""
    if not spec.startswith("artifact:"):
        return None
    where = Path(spec.partition(":")[2])
    return next((d for d in (where, where.parent) if (d / "metrics.json").is_file()), None)


def cmd_merge(args: argparse.Namespace) -> int:
    import yaml

    from .pipeline import run_recipe
    from .recipe import Recipe, RecipeLoader
    from .registry import get_method
    from .report import format_table

    entry = get_method("merge", args.method)
    uses_base = getattr(entry.config_cls, "USES_BASE", False)
    models = [_model_arg(m) for m in args.models]
    if args.base is not None and not uses_base:
        raise UserError(f"merge --method {args.method}: --base is for the task-vector methods (task-arithmetic, "
                        "ties, dare); a soup merges the models given")
    if uses_base and args.base is None:
        raise UserError(f"merge --method {args.method}: needs --base MODEL, the model the task vectors are taken "
                        "from (e.g. the pre-trained model the others were fine-tuned from)")
    if len(models) < 2 and args.base is None:
        raise UserError("merge: give at least two models (or one model and --base for task vectors)")
    exact = getattr(entry.config_cls, "N_MODELS", None)
    if exact is not None and len(models) != exact + 1:
        raise UserError(f"merge --method {args.method}: merges exactly {exact + 1} models; {len(models)} given")
    run = _run_of_artifact(models[0]) if not args.task else None
    if run is not None:
        args.task = _task_of_run(run)      # a py: task there runs only with --trust-code
        if args.task:
            log.info("merge: measuring on task %s, the task of the run %s came from", args.task, models[0])
    if not args.task:
        raise UserError("merge: --task TASK is needed to measure the models (e.g. --task mnist; "
                        "shape:1x28x28 for a task without data); it can be left out only for artifacts "
                        "saved by a torchslim run (their run's metrics.json names the task)")
    fields: dict = {"method": args.method, "models": models[1:]}
    if args.base is not None:
        fields["base"] = _model_arg(args.base)
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"merge --set {clip(item, 80)!r}: expected KEY=VALUE, e.g. --set scale=0.5")
        if key.strip() in ("method", "models", "base"):
            raise UserError(f"merge --set {key.strip()}: give it as --method, MODEL arguments or --base")
        fields[key.strip()] = yaml.load(value, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)
    measure = {"batch_sizes": list(args.batch_sizes), "latency": not args.no_latency}
    recipe = Recipe.from_dict({"model": models[0], "task": args.task, "measure": measure,
                               "steps": [{"merge": fields}]})
    metrics = run_recipe(recipe, args.out, data_dir=args.data_dir)
    _out(format_table(metrics))
    _out(f"wrote {args.out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import list_methods
    pattern = args.pattern
    if "." not in pattern and not any(c in pattern for c in "*?["):
        pattern += ".*"  # a verb alone: its methods
    entries = list_methods(pattern)
    if not entries:
        keys = [e.key for e in list_methods()]
        raise UserError(f"no method matches {args.pattern!r}{did_you_mean(args.pattern, keys)}; "
                        f"methods: {', '.join(keys)}")
    for e in entries:
        _out(f"{e.key}  ({e.config_cls.__name__}): {e.summary}")
        for f in e.config_cls.describe_fields():
            allowed = f"  [{f['allowed']}]" if f["allowed"] else ""
            _out(f"    {f['name']}: {f['type']} = {json.dumps(f['default'])}{allowed}  {f['doc']}")
    return 0


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torchslim", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"torchslim {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    common.add_argument("--trust-code", action="store_true",
                        help="allow rebuilding saved models whose architecture is a Python file (py: "
                             "sources); that file is imported and runs: only for files you trust")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("demo", parents=[common], help="end-to-end example on the built-in digits task")
    s.add_argument("--out", default="torchslim-demo", help="output directory (default ./torchslim-demo)")
    s.add_argument("--data-dir", help="data directory (not needed for digits)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted demo from its checkpoints")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("compress", parents=[common], help="run a recipe")
    s.add_argument("recipe", help="recipe YAML file")
    s.add_argument("--out", help="output directory (required unless --dry-run)")
    s.add_argument("--data-dir", help="data directory (default $TORCHSLIM_DATA or ./data)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field by dotted path, e.g. steps.0.prune.sparsity=0.8")
    s.add_argument("--resume", action="store_true", help="continue a failed run from its checkpoints")
    s.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    s.add_argument("--drop-checkpoints", action="store_true",
                   help="after success delete the per-step models and training checkpoints under "
                        "DIR/steps (each step.json stays; the run can no longer be resumed)")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("measure", parents=[common], help="measure one model")
    s.add_argument("model", help="model spec, e.g. zoo:lenet-5 or artifact:DIR")
    s.add_argument("--task", required=True, help="task spec, e.g. digits or shape:3x224x224")
    s.add_argument("--weights", help="local weights file (safetensors or state_dict)")
    s.add_argument("--data-dir", help="data directory")
    s.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 32), help="latency batch sizes (1,32)")
    s.add_argument("--runtime", default="eager", help="what latency is timed on: eager, compile, onnxruntime")
    s.add_argument("--split", default="test", choices=("test", "val"), help="split of the metric")
    s.add_argument("--output", help="which output is the prediction when the model returns a tuple or "
                   "mapping: an index (0) or a name (logits); default: automatic where unambiguous")
    s.add_argument("--json", help="write the measurement as one metrics.json step object")
    s.set_defaults(fn=cmd_measure)

    s = sub.add_parser("sensitivity", parents=[common],
                       help="per-layer curves: the metric as each layer alone is pruned")
    s.add_argument("model", help="model spec, e.g. zoo:lenet-5 or artifact:DIR")
    s.add_argument("--task", required=True, help="task spec with data and a metric, e.g. digits or mnist")
    s.add_argument("--out", required=True, help="output directory (sensitivity.json, sensitivity.png)")
    s.add_argument("--method", default="magnitude", help="pruning criterion (default magnitude)")
    s.add_argument("--granularity", default="weight",
                   help="weight, channel or head (default weight; a recipe's ratios: sensitivity takes curves "
                        "of its own granularity)")
    s.add_argument("--points", type=_points, default=(0.1, 0.3, 0.5, 0.7, 0.9),
                   help="sparsities of each curve (default 0.1,0.3,0.5,0.7,0.9)")
    s.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="split evaluated (default val: keep test for the final figures)")
    s.add_argument("--targets", action="append", help="layers analysed (names or re: patterns; default all)")
    s.add_argument("--ignore", action="append", help="layers left out (names or re: patterns)")
    s.add_argument("--recalibrate-bn", type=_nonnegative_int, default=512, metavar="N",
                   help="re-estimate BatchNorm statistics on N training examples after each pruning (0: off)")
    s.add_argument("--finetune-steps", type=_nonnegative_int, default=0, metavar="N",
                   help="train each cut N SGD steps before evaluating it, so the curves show what a layer "
                        "recovers from (NetAdapt's short-term fine-tune; for plans fine-tuned afterwards; "
                        "default 0: one-shot curves)")
    s.add_argument("--finetune-lr", type=_positive_float, default=0.01, metavar="LR",
                   help="peak learning rate of --finetune-steps (SGD, momentum 0.9, cosine to 0; default 0.01)")
    s.add_argument("--latency-batch-size", type=_nonnegative_int, default=0, metavar="N",
                   help="granularity channel or head: also time the model and every point's pruned copy at "
                        "batch N, for a recipe's budget: latency (default 0: not timed)")
    s.add_argument("--latency-runtime", default="eager", metavar="NAME",
                   help="runtime timed with --latency-batch-size (eager, onnxruntime, sparse; not compile, which "
                        "recompiles for every pruned copy; default eager)")
    s.add_argument("--weights", help="local weights file (safetensors or state_dict)")
    s.add_argument("--data-dir", help="data directory")
    s.add_argument("--output", help="which output is the prediction (index or name) for tuple/mapping outputs")
    s.set_defaults(fn=cmd_sensitivity)

    s = sub.add_parser("report", parents=[common],
                       help="(re)write report.md/.html from metrics.json, or compare runs (A B ...)")
    s.add_argument("dir", nargs="+", help="a run's output directory; two or more: compare the runs")
    s.add_argument("--out", help="comparison file: .md, or .html (default: print the comparison)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("export", parents=[common], help="export a saved model")
    s.add_argument("dir", help="a run's output directory, or an artifact directory")
    s.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    s.add_argument("--task", help="task spec giving the input shape (default: the run's task)")
    s.add_argument("--data-dir", help="data directory")
    s.add_argument("--out", help="output file (default DIR/onnx/model.onnx)")
    s.add_argument("--opset", type=_opset, default=18, help="ONNX opset, 13 to 23 (default 18)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("layers", parents=[common],
                       help="list every module: name (for targets/ignore), type, params, MACs, output shape")
    s.add_argument("model", help="model spec, e.g. zoo:lenet-5, torchvision:resnet18 or artifact:DIR")
    s.add_argument("--task", help="task spec for MACs and output shapes, e.g. digits or shape:3x224x224")
    s.add_argument("--weights", help="local weights file (safetensors or state_dict)")
    s.add_argument("--data-dir", help="data directory")
    s.add_argument("--json", help="write the rows as JSON")
    s.set_defaults(fn=cmd_layers)

    s = sub.add_parser("merge", parents=[common], help="merge models of one architecture (soups, task vectors)")
    s.add_argument("models", nargs="+", metavar="MODEL",
                   help="models to merge: specs (artifact:DIR, zoo:...) or artifact directories; the first "
                        "is the merged model's architecture and source record")
    s.add_argument("--method", required=True, help="uniform, greedy-soup, slerp, task-arithmetic, ties or dare")
    s.add_argument("--base", help="the model the task vectors are taken from (task-arithmetic, ties, dare)")
    s.add_argument("--task", help="task spec the models are measured on (greedy-soup: one with data)")
    s.add_argument("--out", required=True, help="output directory: model/, metrics.json, report")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the method, e.g. --set scale=0.5, --set density=0.2, --set t=0.3")
    s.add_argument("--data-dir", help="data directory (default $TORCHSLIM_DATA or ./data)")
    s.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 32), help="latency batch sizes (1,32)")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("methods", parents=[common], help="list registered methods and their fields")
    s.add_argument("pattern", nargs="?", default="*", help="glob over VERB.NAME, e.g. 'prune.*'")
    s.set_defaults(fn=cmd_methods)
    return p


class _Formatter(logging.Formatter):
    """Plain messages; warnings and errors start with ``warning:`` / ``error:`` so they stand out
    from progress lines (and grep finds them)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compress" and not args.dry_run and not args.out:
        parser.error("compress: --out DIR is required (or use --dry-run)")
    from .artifact import TRUST_ENV

    # the process's settings as they were: restored when this call ends, so an in-process caller's
    # next call (or its own code) is not left trusting code or without progress bars
    saved = {key: os.environ.get(key) for key in (TRUST_ENV, "TQDM_DISABLE")}
    tf = sys.modules.get("transformers")
    bars = tf.utils.logging.is_progress_bar_enabled() if tf is not None else not saved["TQDM_DISABLE"]
    try:
        return _run(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tf = sys.modules.get("transformers")
        if tf is not None and bars != tf.utils.logging.is_progress_bar_enabled():
            (tf.utils.logging.enable_progress_bar if bars else tf.utils.logging.disable_progress_bar)()


def _run(args: argparse.Namespace) -> int:
    if args.trust_code:
        from .artifact import TRUST_ENV

        os.environ[TRUST_ENV] = "1"
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # our progress bars and those of libraries we call
    logging.basicConfig(level=level, format="%(message)s" if not args.debug else
                        "%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_Formatter())
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "httpx", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(_error_lines(str(exc)))
        return 2
    except BrokenPipeError:  # the reader went away (`torchslim methods | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        again = " (rerun with --resume to continue from the finished steps)" if args.command in (
            "compress", "demo") else ""
        sys.stderr.write(f"error: interrupted{again}\n")
        return 130
    except SystemExit as exc:  # sys.exit() inside a user's model, task or factory file
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"error: the user code that was run called sys.exit({clip(repr(exc.code), 80)}); "
                         "a model or task factory must return or raise (rerun with --debug to see where)\n")
        return 2
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            sys.stderr.write(f"error: no space left on the device{where}; free some and rerun (compress: with "
                             "--resume, the finished steps are kept)\n")
            return 2
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or (
                type(exc).__name__ == "OutOfMemoryError"):
            sys.stderr.write(f"error: out of memory: {_first_line(exc) or type(exc).__name__}; use smaller batch "
                             "sizes, input shapes or models\n")
            return 2
        sys.stderr.write(f"error: internal failure: {type(exc).__name__}: {_first_line(exc)}\n"
                         "error: rerun with --debug for the traceback\n")  # internal failure
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
