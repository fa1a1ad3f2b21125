"""RELION .star particle files: 3.0 (one table) and 3.1/4/5 (optics + particles).

Values are looked up in the particle row first, then in its optics group's row. Pixel size
comes from `rlnImagePixelSize`, else 3.0's `rlnDetectorPixelSize·1e4/rlnMagnification`.
Origins are Å (`rlnOriginXAngst`) in 3.1+ and pixels (`rlnOriginX`) in 3.0.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import xarray as xr

from dva.errors import DvaFormatWarning, DvaInputError
from dva.io.atomic import atomic_path
from dva.io.paths import known_image_sizes, relative_stack_names, stack_ids
from dva.io.table import check_pixel_sizes, check_source, file_sha256, make_table, uids_from_rows
from dva.ops.rotation import euler_to_matrix, matrix_to_euler

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_REQUIRED = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration")
DEFAULT_AMP_CONTRAST = 0.1
OPTICS_COLUMNS = (
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
    "rlnCtfDataAreCtfPremultiplied",
)
# Columns the writer recomputes from the table; 3.0 forms are replaced by their 3.1 forms.
_REPLACED = (
    *ANGLES,
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnImageName",
    "rlnOpticsGroup",
    "rlnRandomSubset",
    "rlnDetectorPixelSize",
    "rlnMagnification",
    *OPTICS_COLUMNS[1:],
)


def read_blocks(path: Path) -> dict:
    """All data blocks of a STAR file, as starfile gives them; one-line error when unreadable."""
    if not path.is_file():
        raise DvaInputError(f"{path}: file not found")
    try:
        return starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed text
        raise DvaInputError(f"{path}: not a readable STAR file ({exc})") from None


def _tables(path: Path, blocks: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    particles = [k for k, v in loops.items() if "rlnImageName" in v.columns]
    if not particles:
        raise DvaInputError(f"{path}: no particle table (no data block has a rlnImageName column)")
    if len(particles) > 1:
        raise DvaInputError(f"{path}: several particle tables ({', '.join(particles)})")
    optics = [k for k, v in loops.items() if "rlnOpticsGroup" in v.columns and k not in particles]
    return loops[particles[0]], (loops[optics[0]] if optics else None)


def _merge_optics(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> pd.DataFrame:
    if optics is None:
        return particles
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise DvaInputError(f"{path}: column rlnOpticsGroup missing in the particle table")
        particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    if optics["rlnOpticsGroup"].duplicated().any():
        dup = optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()].iloc[0]
        raise DvaInputError(f"{path}: rlnOpticsGroup {dup} appears twice in the optics table")
    groups = optics.set_index("rlnOpticsGroup")
    unknown = sorted(set(particles["rlnOpticsGroup"]) - set(groups.index))
    if unknown:
        raise DvaInputError(f"{path}: rlnOpticsGroup {unknown[0]} does not exist in the optics table")
    merged = particles.copy()
    for col in groups.columns:
        if col not in merged.columns:
            merged[col] = particles["rlnOpticsGroup"].map(groups[col]).to_numpy()
    return merged


def _numeric(path: Path, df: pd.DataFrame, col: str) -> np.ndarray:
    try:
        values = pd.to_numeric(df[col]).to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise DvaInputError(f"{path}: column {col} is not numeric") from None
    bad = ~np.isfinite(values)
    if bad.any():
        raise DvaInputError(f"{path}: column {col} is not finite in row {int(np.argmax(bad)) + 1}")
    return values


def _require(path: Path, df: pd.DataFrame, cols) -> None:
    for col in cols:
        if col not in df.columns:
            raise DvaInputError(f"{path}: column {col} missing in the particle table")


def _parse_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    parts = names.astype(str).str.split("@", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        row = int(np.argmax(parts[1].isna().to_numpy())) if parts.shape[1] == 2 else 0
        raise DvaInputError(f"{path}: rlnImageName row {row + 1} '{names.iloc[row]}' is not index@stack")
    index = pd.to_numeric(parts[0], errors="coerce").to_numpy()
    bad = ~np.isfinite(index) | (index < 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DvaInputError(f"{path}: rlnImageName row {row + 1} '{names.iloc[row]}' has no valid 1-based index")
    # RELION also writes `k@stack.mrcs:mrcs` (an explicit type suffix).
    return index.astype(np.int64) - 1, parts[1].str.replace(r":mrcs?$", "", regex=True).to_numpy()


def _pixel_size(path: Path, df: pd.DataFrame, override: float | None) -> np.ndarray:
    if override is not None:
        return np.full(len(df), float(override))
    if "rlnImagePixelSize" in df.columns:
        return _numeric(path, df, "rlnImagePixelSize")
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        return _numeric(path, df, "rlnDetectorPixelSize") * 1e4 / _numeric(path, df, "rlnMagnification")
    raise DvaInputError(
        f"{path}: no pixel size (column rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification); give --pixel-size"
    )


def read_star(path: str | Path, *, datadir: str | Path | None = None, pixel_size_A: float | None = None) -> xr.Dataset:
    """Read a RELION particle .star file into the per-particle table (`dva.io.table`).

    `pixel_size_A` overrides the pixel size of the metadata (needed when it has none).
    """
    path = Path(path)
    particles, optics = _tables(path, read_blocks(path))
    if len(particles) == 0:
        raise DvaInputError(f"{path}: the particle table has no rows")
    df = _merge_optics(path, particles, optics)
    _require(path, df, ("rlnImageName", *CTF_REQUIRED))
    n = len(df)
    pixel = _pixel_size(path, df, pixel_size_A)
    check_pixel_sizes(str(path), pixel)

    present = [c for c in ANGLES if c in df.columns]
    has_poses = bool(present)
    if has_poses:
        _require(path, df, ANGLES)
        rotation = euler_to_matrix(*(_numeric(path, df, c) for c in ANGLES))
    else:
        rotation = np.full((n, 3, 3), np.nan)
    if "rlnOriginXAngst" in df.columns:
        _require(path, df, ("rlnOriginYAngst",))
        shift = np.stack([_numeric(path, df, c) for c in ("rlnOriginXAngst", "rlnOriginYAngst")], -1)
        shift /= pixel[:, None]
    elif "rlnOriginX" in df.columns:
        _require(path, df, ("rlnOriginY",))
        shift = np.stack([_numeric(path, df, c) for c in ("rlnOriginX", "rlnOriginY")], -1)
    else:
        shift = np.zeros((n, 2))

    def opt(col: str, default: float) -> np.ndarray:
        return _numeric(path, df, col) if col in df.columns else np.full(n, default)

    if "rlnAmplitudeContrast" not in df.columns:
        warnings.warn(
            f"{path}: rlnAmplitudeContrast missing; using {DEFAULT_AMP_CONTRAST}",
            DvaFormatWarning,
            stacklevel=2,
        )
    subset = opt("rlnRandomSubset", 0).astype(np.int64)
    stack_index, stack_names = _parse_image_names(path, df["rlnImageName"])
    datadir = Path(datadir) if datadir is not None else None
    stack, stacks = stack_ids(stack_names, path.parent.absolute(), datadir)
    return make_table(
        rotation=rotation,
        shift_px=shift,
        stacks=stacks,
        source=str(path.absolute()),
        source_sha256=file_sha256(path),
        source_format="star",
        has_poses=has_poses,
        defocus_u_A=_numeric(path, df, "rlnDefocusU"),
        defocus_v_A=_numeric(path, df, "rlnDefocusV"),
        defocus_angle_rad=np.deg2rad(_numeric(path, df, "rlnDefocusAngle")),
        voltage_kV=_numeric(path, df, "rlnVoltage"),
        cs_mm=_numeric(path, df, "rlnSphericalAberration"),
        amp_contrast=opt("rlnAmplitudeContrast", DEFAULT_AMP_CONTRAST),
        phase_shift_rad=np.deg2rad(opt("rlnPhaseShift", 0.0)),
        bfactor_A2=opt("rlnCtfBfactor", 0.0),
        ctf_scale=opt("rlnCtfScalefactor", 1.0),
        ctf_premultiplied=opt("rlnCtfDataAreCtfPremultiplied", 0.0) != 0,
        pixel_size_A=pixel,
        image_size=opt("rlnImageSize", 0).astype(np.int64),
        data_sign=1.0,
        halfset=np.where((subset == 1) | (subset == 2), subset - 1, -1),
        uid=uids_from_rows(str(path.absolute()), n),
        optics_group=opt("rlnOpticsGroup", 1).astype(np.int32),
        stack=stack,
        stack_index=stack_index,
        source_row=np.arange(n),
    )


def _image_names(table: xr.Dataset, out_dir: Path) -> np.ndarray:
    stacks = relative_stack_names(table.attrs["stacks"], out_dir)
    names = np.asarray(stacks, dtype=object)[table["stack"].to_numpy()]
    index = (table["stack_index"].to_numpy() + 1).astype(str)
    return np.char.add(np.char.add(np.char.zfill(index, 6), "@"), names.astype(str))


def _source_frames(table: xr.Dataset) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The input's particle rows (in table order) and optics table, when the input was a star."""
    if table.attrs.get("source_format") != "star":
        return None, None
    path = check_source(table)
    particles, optics = _tables(path, read_blocks(path))
    return particles.iloc[table["source_row"].to_numpy()].reset_index(drop=True), optics


def to_star_frames(
    table: xr.Dataset, out_dir: Path, extra_columns: dict[str, np.ndarray] | None = None
) -> dict[str, pd.DataFrame]:
    """RELION 3.1 `optics` and `particles` tables for `table`, input columns carried through."""
    carried, source_optics = _source_frames(table)
    n = table.sizes["particle"]
    pixel = table["pixel_size_A"].to_numpy()
    image_size = known_image_sizes(table)
    key = pd.DataFrame(
        {
            "group": table["optics_group"].to_numpy(),
            "rlnVoltage": table["voltage_kV"].to_numpy(),
            "rlnSphericalAberration": table["cs_mm"].to_numpy(),
            "rlnAmplitudeContrast": table["amp_contrast"].to_numpy(),
            "rlnImagePixelSize": pixel,
            "rlnImageSize": image_size,
            "rlnCtfDataAreCtfPremultiplied": table["ctf_premultiplied"].to_numpy().astype(int),
        }
    )
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(key))
    optics = pd.DataFrame(list(uniques), columns=key.columns)
    # Keep the input's group numbers unless a group has to split (its particles differ in optics).
    numbers = optics["group"].to_numpy()
    if len(np.unique(numbers)) != len(numbers):
        numbers = np.arange(1, len(optics) + 1)
    optics.insert(0, "rlnOpticsGroup", numbers)
    if source_optics is not None:
        old = source_optics.set_index("rlnOpticsGroup")
        kept = [c for c in old.columns if c not in optics.columns]
        for c in kept:
            optics[c] = optics["group"].map(old[c]).to_numpy()
        if "rlnOpticsGroupName" in old.columns:
            optics["rlnOpticsGroupName"] = optics["group"].map(old["rlnOpticsGroupName"]).to_numpy()
    if "rlnOpticsGroupName" not in optics.columns or optics["rlnOpticsGroupName"].isna().any():
        optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
    optics["rlnImageDimensionality"] = 2
    optics = optics.drop(columns="group")
    optics = optics[
        ["rlnOpticsGroup", "rlnOpticsGroupName"]
        + [c for c in optics.columns if c not in ("rlnOpticsGroup", "rlnOpticsGroupName")]
    ]

    rot, tilt, psi = matrix_to_euler(table["rotation"].to_numpy())
    shift_A = table["shift_px"].to_numpy() * pixel[:, None]
    half = table["halfset"].to_numpy()
    ours = {
        "rlnImageName": _image_names(table, out_dir),
        "rlnOpticsGroup": numbers[codes],
        "rlnDefocusU": table["defocus_u_A"].to_numpy(),
        "rlnDefocusV": table["defocus_v_A"].to_numpy(),
        "rlnDefocusAngle": np.rad2deg(table["defocus_angle_rad"].to_numpy()),
        "rlnPhaseShift": np.rad2deg(table["phase_shift_rad"].to_numpy()),
        "rlnCtfBfactor": table["bfactor_A2"].to_numpy(),
        "rlnCtfScalefactor": table["ctf_scale"].to_numpy(),
    }
    if table.attrs["has_poses"]:
        ours |= {
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": shift_A[:, 0],
            "rlnOriginYAngst": shift_A[:, 1],
        }
    if (half >= 0).all():
        ours["rlnRandomSubset"] = half + 1
    if carried is not None and table.attrs["has_poses"] and all(c in carried.columns for c in ANGLES):
        # Keep the input's angles wherever they give the same rotation (Euler triples are not unique).
        old = [pd.to_numeric(carried[c]).to_numpy() for c in ANGLES]
        same = np.abs(euler_to_matrix(*old) - table["rotation"].to_numpy()).max(axis=(1, 2)) < 1e-9
        for col, o in zip(ANGLES, old, strict=True):
            ours[col] = np.where(same, o, ours[col])
    particles = pd.DataFrame(index=range(n))
    if carried is not None:
        particles = carried.drop(columns=[c for c in _REPLACED if c in carried.columns])
    for col, values in {**ours, **(extra_columns or {})}.items():
        particles[col] = values
    return {"optics": optics, "particles": particles}


def write_star(path: str | Path, table: xr.Dataset, *, extra_columns: dict[str, np.ndarray] | None = None) -> None:
    """Write `table` as a RELION 3.1 particle star file (optics + particles), atomically.

    When the table came from a .star, every input column is carried through and only the
    values dva knows are rewritten. `extra_columns` (e.g. reaction coordinates) are appended.
    """
    path = Path(path)
    frames = to_star_frames(table, path.parent, extra_columns)
    with atomic_path(path) as tmp:
        starfile.write(frames, tmp, float_format="%.10g")
