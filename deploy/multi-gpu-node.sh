#!/usr/bin/env bash
# dva on every GPU of one node: a dask scheduler, `dask cuda worker` (one worker per visible GPU)
# and `dva run` against them; everything it started is stopped when it exits (also on Ctrl-C).
#
#   deploy/multi-gpu-node.sh STORE.zarr MASK.mrc OUT_DIR --filter-res 8 --modes 3 [dva run options]
#
# Run it in the environment where dva was installed with `pip install -e ".[cuda12]"`.
# CUDA_VISIBLE_DEVICES=0,1 limits it to those GPUs. The dashboard is on http://localhost:8787
# (from a laptop: ssh -L 8787:localhost:8787 NODE). After a crash or Ctrl-C, run the same command
# with --resume added: the run continues from OUT_DIR/checkpoint/.
set -euo pipefail

if (($# < 3)); then
    echo "usage: $0 STORE.zarr MASK.mrc OUT_DIR [dva run options]" >&2
    exit 2
fi
store=$1 mask=$2 out=$3
shift 3

if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
    n_gpus=${#devices[@]}
else
    n_gpus=$(nvidia-smi --list-gpus | wc -l)
fi
if ((n_gpus < 1)); then
    echo "$0: no GPU visible (nvidia-smi --list-gpus is empty)" >&2
    exit 2
fi

work=$(mktemp -d)
scheduler_file=$work/scheduler.json
pids=()
cleanup() {
    local i  # last started, first stopped: dva, then the workers, then the scheduler
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Both listen on this machine only; the dashboard on port 8787.
dask scheduler --host 127.0.0.1 --dashboard-address 127.0.0.1:8787 \
    --scheduler-file "$scheduler_file" >"$work/scheduler.log" 2>&1 &
pids+=($!)
dask cuda worker --scheduler-file "$scheduler_file" --local-directory "$work" \
    >"$work/workers.log" 2>&1 &
pids+=($!)

# Start dva once every GPU has its worker: chunks are dealt to the workers present at the start.
address=$(python - "$scheduler_file" "$n_gpus" <<'PY'
import json, sys, time
from pathlib import Path
from distributed import Client

path, n = Path(sys.argv[1]), int(sys.argv[2])
for _ in range(120):
    if path.is_file() and path.stat().st_size:
        break
    time.sleep(0.5)
with Client(scheduler_file=str(path), timeout="60s") as client:
    client.wait_for_workers(n, timeout="300s")
print(json.loads(path.read_text())["address"])
PY
) || { echo "$0: the workers did not start; logs:" >&2; cat "$work"/*.log >&2; exit 1; }

echo "dask: $n_gpus GPU workers on $address; dashboard http://localhost:8787" >&2
# In the background so that a signal stops everything at once (the trap above).
dva run "$store" --mask "$mask" --out "$out" --scheduler "$address" "$@" &
pids+=($!)
wait $!
