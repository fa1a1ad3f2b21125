#!/usr/bin/env bash
# Simulate a small heterogeneous dataset, import it into a zarr store (Fourier-cropped to box 48)
# and print a summary. Run from any folder after `pip install -e .`.
set -euo pipefail
out=${1:-dva-example}
dva simulate --preset small --out "$out/sim"
dva import "$out/sim/particles.star" --out "$out/particles.zarr" --box 48 --overwrite
dva info "$out/particles.zarr"
