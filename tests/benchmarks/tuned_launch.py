"""The fastest launch shape in the lines of `tests/benchmarks/kernels.py` (run on a GPU) for one
box, K and chunk size, as the shell lines that make dva use it (`export DVA_CUDA_...`, read by
`dva.ops.kernels`); nothing when dva's own shape is within `--margin` of the fastest (noise is no
reason to change). Of several sweeps in the file, the last one counts.

    python tests/benchmarks/tuned_launch.py kernels.jsonl --box 128 --modes 3 > tuned.env
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lines", type=Path, help="kernels.py's JSON lines")
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--modes", type=int, default=3)
    parser.add_argument("--particles", type=int, default=8192, help="the sweep's chunk (other lines time other sizes)")
    parser.add_argument("--margin", type=float, default=0.03, help="fraction faster than dva's own shape to count")
    args = parser.parse_args()
    if not args.lines.exists():
        sys.exit(f"{args.lines}: no such file (the kernels stage did not run)")
    runs = [json.loads(line) for line in args.lines.read_text().splitlines() if line.startswith("{")]
    runs = [
        r
        for r in runs
        if r["backend"] == "cupy" and (r["box"], r["modes"], r["particles"]) == (args.box, args.modes, args.particles)
    ]
    starts = [i for i, r in enumerate(runs) if r["dva_default"]]  # each sweep measures dva's own shape first
    if not starts:
        return
    own, *others = runs[starts[-1] :]
    best = min([own, *others], key=lambda r: r["em_statistics_s"])
    if best["em_statistics_s"] >= (1 - args.margin) * own["em_statistics_s"]:
        return
    print(f"# {best['em_statistics_s']:.4f} s per chunk against dva's {own['em_statistics_s']:.4f} s")
    print(f"export DVA_CUDA_THREADS={best['threads_per_block']}")
    print(f"export DVA_CUDA_RESIDENT_THREADS={best['threads_aimed']}")
    if best["max_registers"] is None:
        print("unset DVA_CUDA_MAX_REGISTERS")
    else:
        print(f"export DVA_CUDA_MAX_REGISTERS={best['max_registers']}")


if __name__ == "__main__":
    main()
