#!/usr/bin/env bash
# Issue 7's checks on the lent GPU machine, in one call: the test suite on CuPy, then the
# benchmarks (100k particles box 128 K=3 resident and streamed, box 256 K=10 50k particles).
#
# Here first (PyPI reachable): `bash ../shared/gpu/fetch-wheels.sh`, then the wheels of dva's own
# dependencies that the GPU image lacks (typer, rich, xarray, psutil, numba, llvmlite, scipy,
# scikit-learn, matplotlib, ... with the device README's `pip download` line into .whl/). Then:
#   run(command="bash tests/benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# Results: $OUT/tests.log, $OUT/bench.jsonl (one `dva bench --json` line per configuration).
set -o pipefail
export PYTHONUNBUFFERED=1
source .whl/install-wheels.sh || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH"
OUT="${OUT:-/tmp/dva-gpu}"
mkdir -p "$OUT"
nvidia-smi -L
# Only the CuPy variants of the numerical tests (the CPU ones ran in CI).
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUT/tests.log"
bench() { timeout "$1" python3 -m dva bench --json "${@:2}" | tee -a "$OUT/bench.jsonl"; }
# The 100k-particle dataset is simulated (one thread per core: ~0.65 s per 1,024 images of box 128
# on one core here) and imported once, into /tmp/b128, for the resident and the streamed run.
bench 180 --particles 100000 --box 128 --modes 3 --iterations 20 --gpus 0 --data /tmp/b128
bench 90 --particles 100000 --box 128 --modes 3 --iterations 5 --gpus 0 --streamed --data /tmp/b128
rm -rf /tmp/b128
bench 170 --particles 50000 --box 256 --modes 10 --iterations 3 --gpus 0
