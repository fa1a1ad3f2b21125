"""A run's state after each complete iteration, in `DIR/checkpoint/state.npz`, so `--resume` can
continue after a pre-emption, a killed driver or Ctrl-C.

One file, replaced atomically: a reader sees the previous iteration or the new one, never a mix.
It holds the model (mean, components, noise, scale prior; float64 as the loop keeps them, so a
resumed run ends bit-identical to an uninterrupted one), the data sign, the per-iteration
metrics, the iteration number, what the run was started with, and the coordinates and scales
each particle got in that iteration's E-step (`coordinates (N, K+1)`: z then α; empty after the
mean pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dva.errors import DvaInputError
from dva.io.atomic import atomic_path

FILE = "state.npz"


@dataclass
class Checkpoint:
    iteration: int  # complete iterations (0: the mean pass only)
    mean: np.ndarray
    components: np.ndarray
    noise_inverse: np.ndarray
    prior: tuple[float, float] | None
    data_sign: float
    metrics: list[dict]
    identity: dict  # store, particles and every parameter but the iteration count
    coordinates: np.ndarray


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `folder/state.npz` atomically (the folder is made if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / FILE) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            iteration=checkpoint.iteration,
            mean=checkpoint.mean,
            components=checkpoint.components,
            noise_inverse=checkpoint.noise_inverse,
            prior=np.array(checkpoint.prior if checkpoint.prior is not None else [], dtype=np.float64),
            data_sign=checkpoint.data_sign,
            metrics=json.dumps(checkpoint.metrics),
            identity=json.dumps(checkpoint.identity),
            coordinates=checkpoint.coordinates,
        )


def load_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in `folder`; a one-line error when there is none or it cannot be read."""
    path = folder / FILE
    if not path.is_file():
        raise DvaInputError(f"{path}: no checkpoint to resume from (run without --resume to start)")
    try:
        with np.load(path) as f:
            prior = f["prior"]
            return Checkpoint(
                iteration=int(f["iteration"]),
                mean=f["mean"],
                components=f["components"],
                noise_inverse=f["noise_inverse"],
                prior=(float(prior[0]), float(prior[1])) if len(prior) else None,
                data_sign=float(f["data_sign"]),
                metrics=json.loads(str(f["metrics"])),
                identity=json.loads(str(f["identity"])),
                coordinates=f["coordinates"],
            )
    except (OSError, KeyError, ValueError) as exc:
        raise DvaInputError(f"{path}: not a readable checkpoint ({exc})") from None


def check_identity(path: Path, saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint written for other data or parameters, naming the first difference."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise DvaInputError(
                f"{path / FILE}: written with {key} = {saved.get(key)!r}, not {current.get(key)!r}; "
                f"resume with the same inputs and options, or run without --resume to start again"
            )
