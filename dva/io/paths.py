"""Where the image stacks named in a particle file live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def resolve_stack(name: str, base: Path, datadir: Path | None) -> Path:
    """First existing candidate for stack `name` named in a file in folder `base`.

    Candidates in order: `datadir/name`, `datadir/basename(name)` (when `datadir` is given),
    `base/name`, `name` relative to each folder above `base` (a RELION or CryoSPARC project
    directory above the job folder), then relative to the working directory. When none exists the
    first candidate is returned; the importer reports it.
    """
    rel = Path(name)
    if rel.is_absolute():
        candidates = [rel]
        if datadir is not None:
            candidates.insert(0, datadir / rel.name)
    else:
        candidates = []
        if datadir is not None:
            candidates += [datadir / rel, datadir / rel.name]
        candidates += [base / rel, *(a / rel for a in base.parents), Path.cwd() / rel]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return candidates[0].absolute()


def stack_ids(names, base: Path, datadir: Path | None) -> tuple[np.ndarray, list[str]]:
    """Per-row index into the list of distinct resolved stack paths, for stack names `(n,)`."""
    codes, uniques = pd.factorize(np.asarray(names, dtype=object))
    resolved = [str(resolve_stack(str(u), base, datadir)) for u in uniques]
    paths = list(dict.fromkeys(resolved))
    remap = np.array([paths.index(r) for r in resolved], dtype=np.int32)
    return remap[codes], paths


def relative_stack_names(stacks: list[str], out_dir: Path) -> list[str]:
    """Stack paths as a file written into `out_dir` should name them: relative when inside it."""
    names = []
    for s in stacks:
        p = Path(s)
        try:
            names.append(str(p.relative_to(out_dir.absolute())))
        except ValueError:
            names.append(str(p))
    return names


def known_image_sizes(table) -> np.ndarray:
    """Box of every particle's source image: from the table, else from its stack's header.

    RELION 3.0 files do not record the box; a writer needs it (`rlnImageSize`, `blob/shape`).
    """
    from dva.io.mrc import StackReader

    size = table["image_size"].to_numpy().copy()
    stack = table["stack"].to_numpy()
    for s in np.unique(stack[size <= 0]):
        size[stack == s] = StackReader(table.attrs["stacks"][s]).box
    return size
