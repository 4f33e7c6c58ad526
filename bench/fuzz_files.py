"""The long fuzz run: the properties of tests/test_fuzz_files.py and tests/test_recipe_fuzz.py
with many more examples (``--scale 50``: 15,000 mutated manifests, 10,000 mutated tensors files,
15,000 mutated weights files). Any traceback, hang or large allocation is a failure.

    python bench/fuzz_files.py --scale 50
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=50.0, help="examples = the suite's count times this")
    args = p.parse_args()
    env = {**os.environ, "TORCHSLIM_FUZZ_SCALE": str(args.scale), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_fuzz_files.py", "tests/test_recipe_fuzz.py", "--hypothesis-show-statistics"]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
