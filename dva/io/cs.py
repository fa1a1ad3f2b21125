"""CryoSPARC .cs particle files: `np.save` of a structured array, read without pickle.

A particle set may be split over a main file and a passthrough file joined on `uid`.
`alignments3D/pose` is an axis-angle vector (radians) with `A = R(pose)ᵀ`; `alignments3D/shift`
is in pixels of `alignments3D/psize_A`. `blob/idx` is 0-based; `blob/path` may start with `>`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from dva.errors import DvaInputError
from dva.io.atomic import atomic_path
from dva.io.paths import known_image_sizes, relative_stack_names, stack_ids
from dva.io.table import check_pixel_sizes, check_source, file_sha256, make_table
from dva.ops.rotation import matrix_to_rotvec, rotvec_to_matrix

REQUIRED = (
    "uid",
    "blob/path",
    "blob/idx",
    "blob/shape",
    "blob/psize_A",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
)
POSE = ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A")


def load_cs(path: str | Path) -> np.ndarray:
    """The structured array of a .cs file; one-line error when missing, unreadable or pickled."""
    path = Path(path)
    if not path.is_file():
        raise DvaInputError(f"{path}: file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DvaInputError(f"{path}: holds Python objects (needs pickle); dva never unpickles files") from None
        raise DvaInputError(f"{path}: not a readable .cs file ({exc})") from None
    except Exception as exc:
        raise DvaInputError(f"{path}: not a readable .cs file ({exc})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        raise DvaInputError(f"{path}: not a CryoSPARC .cs file (no structured array)")
    return arr


def _unique_uids(arr: np.ndarray, path: Path) -> None:
    if "uid" not in arr.dtype.names:
        raise DvaInputError(f"{path}: field uid missing")
    uids, counts = np.unique(arr["uid"], return_counts=True)
    if (counts > 1).any():
        raise DvaInputError(f"{path}: uid {uids[np.argmax(counts > 1)]} appears {counts.max()} times")


def join_passthrough(main: np.ndarray, passthrough: np.ndarray, path: Path) -> np.ndarray:
    """Fields of `passthrough` missing from `main`, joined on `uid`, in `main`'s row order."""
    _unique_uids(passthrough, path)
    if len(passthrough) == 0:
        raise DvaInputError(f"{path}: the passthrough file has no rows")
    new = [n for n in passthrough.dtype.names if n not in main.dtype.names]
    order = np.argsort(passthrough["uid"])
    pos = np.searchsorted(passthrough["uid"], main["uid"], sorter=order)
    pos = np.minimum(pos, len(order) - 1)
    rows = order[pos]
    missing = passthrough["uid"][rows] != main["uid"]
    if missing.any():
        raise DvaInputError(f"{path}: uid {main['uid'][np.argmax(missing)]} of the main file is missing here")
    descr = main.dtype.descr + [d for d in passthrough.dtype.descr if d[0] in new]
    out = np.empty(len(main), dtype=descr)
    for name in main.dtype.names:
        out[name] = main[name]
    for name in new:
        out[name] = passthrough[name][rows]
    return out


def read_cs_array(path: Path, passthrough: Path | None) -> np.ndarray:
    """The main file's rows with passthrough fields joined on uid."""
    arr = load_cs(path)
    _unique_uids(arr, path)
    if passthrough is not None:
        arr = join_passthrough(arr, load_cs(passthrough), passthrough)
    return arr


def _field(path: Path, arr: np.ndarray, name: str) -> np.ndarray:
    if name not in arr.dtype.names:
        raise DvaInputError(f"{path}: field {name} missing")
    values = arr[name]
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        row = int(np.argmax(~np.isfinite(values).reshape(len(values), -1).all(axis=1)))
        raise DvaInputError(f"{path}: field {name} is not finite in row {row}")
    return values


def read_cs(
    path: str | Path,
    *,
    passthrough: str | Path | None = None,
    datadir: str | Path | None = None,
) -> xr.Dataset:
    """Read a CryoSPARC particle .cs (plus optional passthrough .cs) into the per-particle table."""
    path = Path(path)
    passthrough = Path(passthrough) if passthrough is not None else None
    arr = read_cs_array(path, passthrough)
    for name in REQUIRED:
        _field(path, arr, name)
    names = set(arr.dtype.names)
    n = len(arr)
    if n == 0:
        raise DvaInputError(f"{path}: no particles (zero rows)")
    shape = arr["blob/shape"].reshape(n, -1)
    if n and (shape[:, 0] != shape[:, -1]).any():
        row = int(np.argmax(shape[:, 0] != shape[:, -1]))
        raise DvaInputError(f"{path}: field blob/shape row {row} is {shape[row].tolist()}, not square")
    psize = _field(path, arr, "blob/psize_A").astype(np.float64)
    check_pixel_sizes(str(path), psize)

    present = [f for f in POSE if f in names]
    has_poses = bool(present)
    if has_poses:
        for f in POSE:
            _field(path, arr, f)
        rotation = rotvec_to_matrix(arr["alignments3D/pose"])
        shift = (
            arr["alignments3D/shift"].astype(np.float64)
            * (arr["alignments3D/psize_A"].astype(np.float64) / psize)[:, None]
        )
    else:
        rotation = np.full((n, 3, 3), np.nan)
        shift = np.zeros((n, 2))

    def opt(name: str, default: float) -> np.ndarray:
        return _field(path, arr, name).astype(np.float64) if name in names else np.full(n, default)

    raw_paths = arr["blob/path"]
    if raw_paths.dtype.kind == "S":
        raw_paths = np.char.decode(raw_paths, "utf-8")
    blob_paths = np.char.lstrip(raw_paths.astype(str), ">")
    datadir = Path(datadir) if datadir is not None else None
    stack, stacks = stack_ids(blob_paths, path.parent.absolute(), datadir)
    split = arr["alignments3D/split"].astype(np.int64) if "alignments3D/split" in names else np.full(n, -1)
    return make_table(
        rotation=rotation,
        shift_px=shift,
        stacks=stacks,
        source=str(path.absolute()),
        source_sha256=file_sha256(path),
        source_format="cs",
        has_poses=has_poses,
        defocus_u_A=opt("ctf/df1_A", 0),
        defocus_v_A=opt("ctf/df2_A", 0),
        defocus_angle_rad=opt("ctf/df_angle_rad", 0),
        voltage_kV=opt("ctf/accel_kv", 0),
        cs_mm=opt("ctf/cs_mm", 0),
        amp_contrast=opt("ctf/amp_contrast", 0),
        phase_shift_rad=opt("ctf/phase_shift_rad", 0.0),
        bfactor_A2=opt("ctf/bfactor", 0.0),
        ctf_scale=opt("ctf/scale", 1.0),
        ctf_premultiplied=False,
        pixel_size_A=psize,
        image_size=shape[:, 0].astype(np.int64),
        data_sign=opt("blob/sign", 1.0),
        halfset=np.where((split == 0) | (split == 1), split, -1),
        uid=arr["uid"],
        optics_group=opt("ctf/exp_group_id", 0).astype(np.int32) + 1,
        stack=stack,
        stack_index=arr["blob/idx"].astype(np.int64),
        source_row=np.arange(n),
    ).assign_attrs(
        passthrough=str(passthrough.absolute()) if passthrough else "",
        passthrough_sha256=file_sha256(passthrough) if passthrough else "",
    )


def to_cs_array(table: xr.Dataset, out_dir: Path, extra_fields: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A CryoSPARC structured array for `table`; every input field carried through from a .cs."""
    n = table.sizes["particle"]
    pixel = table["pixel_size_A"].to_numpy()
    box = known_image_sizes(table)
    names = np.asarray(relative_stack_names(table.attrs["stacks"], out_dir), dtype=object)
    paths = names[table["stack"].to_numpy()].astype("S")
    ours: dict[str, np.ndarray] = {
        "uid": table["uid"].to_numpy(),
        "blob/path": paths,
        "blob/idx": table["stack_index"].to_numpy().astype(np.uint32),
        "blob/shape": np.stack([box, box], -1).astype(np.uint32),
        "blob/psize_A": pixel.astype(np.float32),
        "blob/sign": table["data_sign"].to_numpy().astype(np.float32),
        "ctf/exp_group_id": (table["optics_group"].to_numpy() - 1).astype(np.uint32),
        "ctf/accel_kv": table["voltage_kV"].to_numpy().astype(np.float32),
        "ctf/cs_mm": table["cs_mm"].to_numpy().astype(np.float32),
        "ctf/amp_contrast": table["amp_contrast"].to_numpy().astype(np.float32),
        "ctf/df1_A": table["defocus_u_A"].to_numpy().astype(np.float32),
        "ctf/df2_A": table["defocus_v_A"].to_numpy().astype(np.float32),
        "ctf/df_angle_rad": table["defocus_angle_rad"].to_numpy().astype(np.float32),
        "ctf/phase_shift_rad": table["phase_shift_rad"].to_numpy().astype(np.float32),
        "ctf/scale": table["ctf_scale"].to_numpy().astype(np.float32),
        "ctf/bfactor": table["bfactor_A2"].to_numpy().astype(np.float32),
    }
    if table.attrs["has_poses"]:
        ours |= {
            "alignments3D/pose": matrix_to_rotvec(table["rotation"].to_numpy()).astype(np.float32),
            "alignments3D/shift": table["shift_px"].to_numpy().astype(np.float32),
            "alignments3D/psize_A": pixel.astype(np.float32),
        }
    half = table["halfset"].to_numpy()
    if (half >= 0).all():
        ours["alignments3D/split"] = half.astype(np.uint32)
    ours |= extra_fields or {}

    if table.attrs.get("source_format") == "cs":
        src = check_source(table)
        passthrough = None
        if table.attrs.get("passthrough"):
            passthrough = Path(table.attrs["passthrough"])
            if not passthrough.is_file() or file_sha256(passthrough) != table.attrs["passthrough_sha256"]:
                raise DvaInputError(f"{passthrough}: the passthrough file is gone or changed since it was read")
        carried = read_cs_array(src, passthrough)[table["source_row"].to_numpy()]
    else:
        carried = np.empty(n, dtype=[])
    descr = list(carried.dtype.descr)
    known = set(carried.dtype.names or ())
    for name, values in ours.items():
        values = np.asarray(values)
        if name not in known:
            descr.append((name, values.dtype.str, values.shape[1:]) if values.ndim > 1 else (name, values.dtype.str))
    if "alignments3D/pose" in known and "alignments3D/pose" in ours:
        # Keep the input's axis-angle vector (|v| may exceed π) wherever it is the same rotation.
        same = (
            np.abs(rotvec_to_matrix(carried["alignments3D/pose"]) - table["rotation"].to_numpy()).max(axis=(1, 2))
            < 1e-6
        )
        ours["alignments3D/pose"] = np.where(same[:, None], carried["alignments3D/pose"], ours["alignments3D/pose"])
    out = np.zeros(n, dtype=descr)
    for name in carried.dtype.names or ():
        out[name] = carried[name]
    for name, values in ours.items():
        if name == "blob/path" and name in known and out.dtype[name].itemsize < values.dtype.itemsize:
            out = _widen(out, name, values.dtype)
        out[name] = values
    return out


def _widen(arr: np.ndarray, name: str, dtype: np.dtype) -> np.ndarray:
    descr = [(d[0], dtype.str) if d[0] == name else d for d in arr.dtype.descr]
    out = np.zeros(len(arr), dtype=descr)
    for f in arr.dtype.names:
        out[f] = arr[f]
    return out


def write_cs(path: str | Path, table: xr.Dataset, *, extra_fields: dict[str, np.ndarray] | None = None) -> None:
    """Write `table` as a CryoSPARC .cs file, atomically; input fields carried through."""
    path = Path(path)
    arr = to_cs_array(table, path.parent, extra_fields)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
