"""Structured pruning on a real task: ``zoo:resnet-fmnist`` trained on Fashion-MNIST, half of its
channels removed and fine-tuned with the baseline as teacher; uniform vs sensitivity-derived
per-group ratios at the same MACs.

    OMP_NUM_THREADS=1 python bench/structured_fmnist.py --baseline bench-out/tucker/baseline \\
        --out bench-out/structured

The same settings as recipes/structured-resnet-fmnist.yaml (which trains its baseline itself):
``prune: {method: magnitude, granularity: channel, sparsity: 0.5}`` with ``finetune: {epochs: 3,
lr: 0.02, distill: {teacher: baseline, temperature: 4, alpha: 0.5}}``. Rows: dense; 50% of every
group's channels (``scope: layer``, the uniform plan); 50% ranked globally (``scope: global``);
``ratios: sensitivity`` with ``budget: macs`` asking the MACs the uniform plan removed (curves on
the val split, one per channel group). Each pruned model is fine-tuned the same way. Latency:
``torch.utils.benchmark``, models in turns over ``--rounds`` rounds, batch 1 and 16, 1 thread, in
eager PyTorch and, exported to ONNX by torchslim's exporter, in ONNX Runtime (CPU provider).
Curves already in ``--out/sensitivity.json`` (an earlier run on the same baseline) are reused.
Test accuracy before and after the fine-tune; the curves and every row go to ``--out/structured.json``,
the models to ``--out/model-N`` (``--time-only`` re-times them, e.g. on a quieter machine, into
``--out/structured-timeN.json``).
``--allocation equal_drop,knapsack``: a sensitivity plan per allocation (``knapsack`` weighs each cut by
the MACs it removes).
``--sensitivity-steps N``: curves that account for recovery, each cut trained N steps before it
is evaluated (``sensitivity_steps``).
``--plans netadapt --adapt-rounds R``: plans found by NetAdapt (``ratios: netadapt``) at the uniform
plans' MACs instead, each round's candidates trained ``--sensitivity-steps`` steps.
``--oneshot``: the same plans with no fine-tuning (BatchNorm re-estimated), where the allocation alone decides.
``--budget latency``: the sensitivity plans (or NetAdapt) ask the latency the uniform plan removed
instead of its MACs: ``budget: latency`` at batch 16 in eager PyTorch, the uniform plan's latency
fraction timed here first (dense and uniform in turns, the median of 5 turns); curves timed too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import torchslim
from _timing import OrtSession, latency  # bench/_timing.py
from torchslim.fileio import write_json
from torchslim.measure import count_macs, count_params
from torchslim.methods.prune.cost import model_cost
from torchslim.onnx_io import export_onnx
from torchslim.prune import MagnitudePruneConfig
from torchslim.registry import get_method
from torchslim.session import Session
from torchslim.specs.tasks import build_task
from torchslim.train import TrainConfig, train
from torchslim.train.config import DistillTerm

FINETUNE = dict(epochs=3, lr=0.02, batch_size=128, schedule="cosine", weight_decay=0.0005, loggers=())




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=None, help="a trained zoo:resnet-fmnist artifact")
    ap.add_argument("--out", type=Path, default=Path("bench-out/structured"))
    ap.add_argument("--epochs", type=int, default=4, help="baseline training when --baseline is not given")
    ap.add_argument("--finetune-epochs", type=int, default=FINETUNE["epochs"])
    ap.add_argument("--seed", type=int, default=0, help="seed of every fine-tune (shuffling; another seed "
                    "shows how far a plan's accuracy moves by chance)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--oneshot", action="store_true", help="the same plans without fine-tuning, BatchNorm "
                    "statistics re-estimated on 512 training examples (to --out/oneshot.json)")
    ap.add_argument("--time-only", action="store_true", help="only re-time the models of a previous run in --out")
    ap.add_argument("--round-to", type=int, default=1, help="every plan keeps channel counts that are "
                    "multiples of this (round_to; 8: the block width of ONNX Runtime's AVX2 conv kernels)")
    ap.add_argument("--sensitivity-steps", type=int, default=0, help="curves with each cut trained this many "
                    "SGD steps before it is evaluated (sensitivity_steps; 0: one-shot curves)")
    ap.add_argument("--sensitivity-lr", type=float, default=0.01, help="learning rate of --sensitivity-steps")
    ap.add_argument("--allocation", default="equal_drop",
                    help="how the sensitivity plans turn curves into ratios (allocation: equal_drop, knapsack; "
                         "comma-separated: a plan for each, from the same curves)")
    ap.add_argument("--plans", choices=("all", "sensitivity", "netadapt"), default="all", help="sensitivity / "
                    "netadapt: only those plans (the uniform plan pruned to find their MACs target, not fine-tuned)")
    ap.add_argument("--adapt-rounds", type=int, default=10, help="--plans netadapt: rounds (adapt_rounds); "
                    "candidates trained --sensitivity-steps steps at --sensitivity-lr")
    ap.add_argument("--plan-from", type=Path, default=None, help="--plans netadapt: the ratios NetAdapt found "
                    "in this earlier --out (its search is deterministic), only fine-tuned again (e.g. --seed)")
    ap.add_argument("--skip-global", action="store_true", help="no row ranked globally")
    ap.add_argument("--budget", choices=("macs", "latency"), default="macs",
                    help="what the sensitivity / netadapt plans match of the uniform plan: its MACs, or its latency "
                         "at batch 16 in eager PyTorch (budget: latency, latency_batch_size: 16)")
    ap.add_argument("--sparsities", default="0.5,0.7", help="uniform channel sparsities, each with a "
                    "sensitivity plan at its MACs (the first also ranked globally)")
    args = ap.parse_args()
    # one line per NetAdapt round on stderr
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("torchslim.netadapt").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    task = build_task("fashion-mnist")
    if args.baseline is not None:
        dense = torchslim.load(args.baseline)
    else:
        torch.manual_seed(0)
        dense = torchslim.build_model("zoo:resnet-fmnist")
        train(dense, task, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=128, weight_decay=0.0005,
                                       loggers=()), desc="baseline")
        torchslim.save(dense, args.out / "baseline")
    x1 = task.example_inputs(1)
    dense_macs = count_macs(dense, x1)
    ft = None if args.oneshot else TrainConfig(**{**FINETUNE, "epochs": args.finetune_epochs, "seed": args.seed},
                                               distill=DistillTerm(teacher="baseline", temperature=4.0, alpha=0.5))
    rows = [{"name": "dense", "accuracy": None if args.time_only else task.evaluate(dense),
             "params": count_params(dense)[0], "macs": dense_macs}]
    models = {"dense": dense.eval()}
    print(rows[0], flush=True)

    def run(name: str, cfg: MagnitudePruneConfig) -> dict:
        """``torchslim.apply`` spelled out, to keep the step's row (ratios, skipped groups)."""
        t0 = time.process_time()
        pruned, teacher = copy.deepcopy(dense), copy.deepcopy(dense)
        session = Session(task=task, step_input=teacher, baseline=lambda: copy.deepcopy(teacher))
        before_ft = {}
        session_train = session.train

        def train_after_eval(model, config, **kw):  # the pruned model's accuracy before its fine-tune
            before_ft.setdefault("accuracy", task.evaluate(model))
            return session_train(model, config, **kw)

        session.train = train_after_eval
        get_method("prune", "magnitude").handler(pruned, cfg, session)
        if args.oneshot:  # as the pipeline does after a step that does not train
            session.recalibrate_batchnorm(pruned, 512)
        info = session.info.get("metrics", {})
        row = {"name": name, "accuracy": task.evaluate(pruned), "accuracy_before_finetune": before_ft.get("accuracy"),
               "params": count_params(pruned)[0],
               "macs": count_macs(pruned, x1), "cpu_s": round(time.process_time() - t0, 1),
               "layer_channels": info.get("layer_channels"), "skipped": info.get("skipped"),
               "sensitivity_ratios": info.get("sensitivity_ratios"),
               "sensitivity_budget": info.get("sensitivity_budget"), "netadapt": info.get("netadapt"),
               "warnings": session.warnings}
        if "sensitivity" in info and cfg.sensitivity is None:
            write_json(args.out / "sensitivity.json", info["sensitivity"])
        rows.append(row)
        models[name] = pruned.eval()
        if not args.oneshot:
            torchslim.save(pruned, args.out / f"model-{len(rows) - 1}")  # for --time-only
        print({k: v for k, v in row.items() if k not in ("layer_channels", "skipped")}, flush=True)
        return row

    if args.time_only:  # re-time the models a previous run saved, on a quieter machine
        rows = json.loads((args.out / "structured.json").read_text())["rows"]
        models.update({r["name"]: torchslim.load(args.out / f"model-{i}").eval()
                       for i, r in enumerate(rows) if i > 0})
    # curves measured by an earlier run of the same baseline are read back (they take the longest to measure)
    curves = str(args.out / "sensitivity.json") if (args.out / "sensitivity.json").exists() else None
    if curves is not None and not args.time_only:
        stored = json.loads(Path(curves).read_text())
        steps = stored.get("finetune_steps", 0)
        if args.budget == "latency" and "latency_ms" not in stored.get("model", {}):
            raise SystemExit(f"{curves} holds curves that were not timed; --budget latency needs another --out")
        if steps != args.sensitivity_steps:
            raise SystemExit(f"{curves} holds curves measured with {steps} fine-tune steps per cut, not "
                             f"--sensitivity-steps {args.sensitivity_steps}: use another --out")
    for i, sparsity in enumerate([] if args.time_only else [float(v) for v in args.sparsities.split(",")]):
        uniform_cfg = MagnitudePruneConfig(granularity="channel", sparsity=sparsity, scope="layer", finetune=ft,
                                           round_to=args.round_to)
        if args.plans != "all":   # the uniform plan's MACs only: pruned, not fine-tuned, no row
            thin = torchslim.apply(dense, dataclasses.replace(uniform_cfg, finetune=None), task=task)
            uniform = {"macs": count_macs(thin, x1)}
        else:
            uniform = run(f"uniform {sparsity:.0%} (scope layer)", uniform_cfg)
        if i == 0 and args.plans == "all" and not args.skip_global:
            run(f"global {sparsity:.0%}", MagnitudePruneConfig(granularity="channel", sparsity=sparsity,
                                                               scope="global", finetune=ft, round_to=args.round_to))
        target = 1.0 - uniform["macs"] / dense_macs
        timed = {}
        if args.budget == "latency":   # the latency the uniform plan removed, timed in turns with the dense model
            thin = models.get(uniform.get("name")) or torchslim.apply(
                dense, dataclasses.replace(uniform_cfg, finetune=None), task=task)
            clock = model_cost(task, "latency", latency_batch_size=16)
            turns = sorted(clock(thin) / clock(dense) for _ in range(5))
            target = 1.0 - turns[2]
            timed = {"budget": "latency", "latency_batch_size": 16}
            print(f"uniform {sparsity:.0%}: latency at batch 16 {turns[2]:.3f}x of dense (turns {turns})", flush=True)
        what = "latency" if timed else "MACs"
        if args.plans == "netadapt" and args.plan_from is not None:
            found = json.loads((args.plan_from / "structured.json").read_text())["rows"][1]
            ratios = found["netadapt"]["ratios"] if isinstance(found["netadapt"], dict) else found["sensitivity_ratios"]
            run(f"netadapt plan of {args.plan_from.name}, MACs of uniform {sparsity:.0%} ({target:.3f} removed)",
                MagnitudePruneConfig(granularity="channel", sparsity=0.0, scope="layer", finetune=ft,
                                     layer_sparsity={k: v for k, v in ratios.items() if v > 0}))
            continue
        if args.plans == "netadapt":
            run(f"netadapt ({args.adapt_rounds} rounds, {args.sensitivity_steps} steps), {what} of uniform "
                f"{sparsity:.0%} ({target:.3f} removed)",
                MagnitudePruneConfig(granularity="channel", sparsity=target, ratios="netadapt",
                                     **({"budget": "macs"} | timed),
                                     adapt_rounds=args.adapt_rounds, sensitivity_steps=args.sensitivity_steps,
                                     sensitivity_lr=args.sensitivity_lr, finetune=ft, round_to=args.round_to))
            continue
        # the curves are measured once (first row) and read back from sensitivity.json after
        for allocation in args.allocation.split(","):
            run(f"sensitivity ({allocation}), {what} of uniform {sparsity:.0%} ({target:.3f} removed)",
                MagnitudePruneConfig(granularity="channel", sparsity=target, ratios="sensitivity",
                                     **({"budget": "macs"} | timed),
                                     allocation=allocation, sensitivity=curves,
                                     sensitivity_steps=0 if curves else args.sensitivity_steps,
                                     sensitivity_lr=args.sensitivity_lr, finetune=ft, round_to=args.round_to))
            curves = str(args.out / "sensitivity.json")
    if args.oneshot:
        write_json(args.out / "oneshot.json", {"threads": args.threads, "rows": rows})
        print("| plan | test acc, no fine-tune (BN re-estimated) | params x | MACs x |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['accuracy']:.4f} | {r['params'] / rows[0]['params']:.3f} | "
                  f"{r['macs'] / dense_macs:.3f} |")
        return
    # the shipped form too: each model exported to ONNX (torchslim's exporter) in an ONNX Runtime session
    ort_models = {}
    for i, (name, m) in enumerate(models.items()):
        path = export_onnx(m, x1, args.out / "onnx" / f"model-{i}.onnx", input_names=("images",))
        ort_models[name] = OrtSession(path, args.threads)
        with torch.no_grad():  # the session computes what the model does
            torch.testing.assert_close(ort_models[name](x1[0]), m(*x1), atol=1e-4, rtol=1e-4)
    for bs in (1, 16):
        x = task.example_inputs(bs)[0]
        for runtime, group in (("", models), ("_ort", ort_models)):
            ms = latency(group, x, args.rounds)
            for row in rows:
                row[f"latency{runtime}_ms_bs{bs}"] = round(ms[row["name"]], 4)
                row[f"latency{runtime}_x_bs{bs}"] = round(ms[row["name"]] / ms["dense"], 3)
    for row in rows:
        row["macs_x"] = round(row["macs"] / dense_macs, 3)
        row["params_x"] = round(row["params"] / rows[0]["params"], 3)
        row["accuracy_drop_pt"] = round(100 * (rows[0]["accuracy"] - row["accuracy"]), 2)
    if args.time_only:  # each re-timing kept beside the run's own record: structured-time1.json, ...
        target = next(args.out / f"structured-time{n}.json" for n in range(1, 1000)
                      if not (args.out / f"structured-time{n}.json").exists())
    else:
        target = args.out / "structured.json"
    write_json(target, {"threads": args.threads, "rows": rows})
    print(f"wrote {target}")
    print("| model | test acc before fine-tune | test acc | drop (pt) | params x | MACs x | latency bs1 x "
          "| latency bs16 x | ORT bs1 x | ORT bs16 x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pre = r.get("accuracy_before_finetune")
        print(f"| {r['name']} | {'' if pre is None else f'{pre:.4f}'} | {r['accuracy']:.4f} | "
              f"{r['accuracy_drop_pt']:+.2f} | {r['params_x']:.3f} | "
              f"{r['macs_x']:.3f} | {r['latency_x_bs1']:.2f} | {r['latency_x_bs16']:.2f} | "
              f"{r['latency_ort_x_bs1']:.2f} | {r['latency_ort_x_bs16']:.2f} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
