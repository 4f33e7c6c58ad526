"""Model merging on MNIST / Fashion-MNIST with zoo:lenet-5, one thread.

1. Soups (Wortsman et al. 2022): a base trained on MNIST for one epoch (adamw, lr 1e-3), then
   fine-tuned for one epoch with SGD (lr 0.02, momentum 0.9) under 4 seeds (data orders). The
   best single ingredient (by val accuracy) against the uniform soup and the greedy soup
   (ranked and grown on val), all reported on test. The paper's claim: the greedy soup is not
   worse than the best ingredient (on val by construction; on test in their experiments).
2. Task vectors (Ilharco et al. 2023; Yadav et al. 2023): the same base fine-tuned for one
   epoch on MNIST (seed 1 above) and one on Fashion-MNIST (one shared 10-way head), merged
   by task arithmetic (lambda 0.5, 1.0) and TIES (density 0.2, lambda 1.0), each scored on
   both test sets.

    TORCHSLIM_DATA=/work/shared/data OMP_NUM_THREADS=1 python bench/merge_soups.py
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

import torchslim
from torchslim.methods.merge.soups import GreedySoupConfig, UniformMergeConfig
from torchslim.methods.merge.task_vectors import TaskArithmeticConfig, TiesMergeConfig
from torchslim.train import TrainConfig, train

T0 = time.perf_counter()


def stamp(text: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {text}", flush=True)


def finetune(model, task, seed):
    m = copy.deepcopy(model)
    train(m, task, TrainConfig(optimizer="sgd", epochs=1, lr=0.02, momentum=0.9, seed=seed, loggers=()))
    return m


def main() -> None:
    torch.set_num_threads(1)
    mnist, fmnist = torchslim.build_task("mnist"), torchslim.build_task("fashion-mnist")
    root = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    base = torchslim.build_model("zoo:lenet-5")
    train(base, mnist, TrainConfig(optimizer="adamw", epochs=1, lr=1e-3, seed=0, loggers=()))
    torchslim.save(base, root / "base")
    stamp(f"base: mnist test {mnist.evaluate(base):.4f}")

    ingredients = []
    for seed in (1, 2, 3, 4):
        m = finetune(base, mnist, seed)
        torchslim.save(m, root / f"ft{seed}")
        ingredients.append(m)
        stamp(f"ingredient seed {seed}: val {mnist.evaluate(m, 'val'):.4f} test {mnist.evaluate(m):.4f}")
    val = [mnist.evaluate(m, "val") for m in ingredients]
    best = max(range(len(ingredients)), key=lambda i: val[i])
    others = [f"artifact:{root / f'ft{s}'}" for s in (2, 3, 4)]
    uniform = torchslim.apply(ingredients[0], UniformMergeConfig(models=tuple(others)), task=mnist)
    greedy = torchslim.apply(ingredients[0], GreedySoupConfig(models=tuple(others)), task=mnist)
    print("\n| model | val accuracy | test accuracy |\n|---|---|---|")
    for i, m in enumerate(ingredients):
        print(f"| ingredient seed {i + 1}{' (best on val)' if i == best else ''} | {val[i]:.4f} | "
              f"{mnist.evaluate(m):.4f} |")
    for name, m in (("uniform soup (4)", uniform), ("greedy soup", greedy)):
        print(f"| {name} | {mnist.evaluate(m, 'val'):.4f} | {mnist.evaluate(m):.4f} |")
    stamp("soups done")

    fm = copy.deepcopy(base)
    train(fm, fmnist, TrainConfig(optimizer="sgd", epochs=1, lr=0.02, momentum=0.9, seed=1, loggers=()))
    torchslim.save(fm, root / "fmnist")
    heads = (f"artifact:{root / 'ft1'}", f"artifact:{root / 'fmnist'}")
    rows = [("base", base), ("MNIST fine-tune", ingredients[0]), ("Fashion-MNIST fine-tune", fm)]
    for scale in (0.5, 1.0):
        rows.append((f"task arithmetic lambda {scale}",
                     torchslim.apply(base, TaskArithmeticConfig(models=heads, scale=scale), task=mnist)))
    rows.append(("TIES density 0.2 lambda 1.0",
                 torchslim.apply(base, TiesMergeConfig(models=heads, density=0.2, scale=1.0), task=mnist)))
    rows.append(("uniform soup of the two", torchslim.apply(ingredients[0], UniformMergeConfig(
        models=heads[1:]), task=mnist)))
    print("\n| model | MNIST test | Fashion-MNIST test | mean |\n|---|---|---|---|")
    for name, m in rows:
        a, b = mnist.evaluate(m), fmnist.evaluate(m)
        print(f"| {name} | {a:.4f} | {b:.4f} | {(a + b) / 2:.4f} |")
    stamp("done")


if __name__ == "__main__":
    main()
