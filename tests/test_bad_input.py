"""Every kind of bad input: one line on stderr naming file and field, exit code 2, nothing written."""

from __future__ import annotations

import shutil
import warnings

import mrcfile
import numpy as np
import pytest
import starfile
from typer.testing import CliRunner

from dva.cli import app
from tests.test_import import _write_minimal_star

runner = CliRunner()


def _import(tmp_path, input, *extra):
    out = tmp_path / "out.zarr"
    result = runner.invoke(app, ["import", str(input), "--out", str(out), "--quiet", *extra])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.zarr")]
    return lines[0]


@pytest.fixture
def good(tmp_path):
    """A valid minimal star + stack in tmp_path (8 images, 16 px)."""
    mrcfile.write(tmp_path / "s.mrcs", np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32))
    _write_minimal_star(tmp_path / "p.star", 8)
    return tmp_path / "p.star"


def _edit(path, block, fn):
    data = starfile.read(path, always_dict=True)
    data[block] = fn(data[block])
    starfile.write(data, path)
    return path


def test_good_input_imports(good, tmp_path):
    result = runner.invoke(app, ["import", str(good), "--out", str(tmp_path / "ok.zarr"), "--quiet"])
    assert result.exit_code == 0, result.output


def test_missing_file(tmp_path):
    line = _import(tmp_path, tmp_path / "nope.star")
    assert "nope.star: file not found" in line


def test_unreadable_star(tmp_path):
    (tmp_path / "bad.star").write_bytes(b"\x00\xff garbage \x01 loop_ _rln")
    line = _import(tmp_path, tmp_path / "bad.star")
    assert "bad.star" in line


def test_star_without_particle_table(formats, tmp_path):
    line = _import(tmp_path, formats / "starfile-teamtomo" / "postprocess.star")
    assert "postprocess.star: no particle table" in line


@pytest.mark.parametrize("column", ["rlnAngleTilt", "rlnDefocusU", "rlnVoltage"])
def test_missing_pose_or_ctf_column(good, tmp_path, column):
    block = "optics" if column == "rlnVoltage" else "particles"
    _edit(good, block, lambda df: df.drop(columns=column))
    line = _import(tmp_path, good)
    assert f"p.star: column {column} missing" in line


def test_missing_image_column(good, tmp_path):
    _edit(good, "particles", lambda df: df.drop(columns="rlnImageName"))
    line = _import(tmp_path, good)
    assert "p.star: no particle table" in line and "rlnImageName" in line


def test_index_past_end_of_stack(good, tmp_path):
    _edit(good, "particles", lambda df: df.assign(rlnImageName=[f"{i + 3:06d}@s.mrcs" for i in range(len(df))]))
    line = _import(tmp_path, good)
    assert "s.mrcs: image index 10 (1-based) is past the end of the stack (8 images)" in line


def test_stacks_of_different_box_sizes(good, tmp_path):
    mrcfile.write(tmp_path / "t.mrcs", np.zeros((8, 18, 18), np.float32))
    names = [f"{i + 1:06d}@{'s' if i < 4 else 't'}.mrcs" for i in range(8)]
    _edit(good, "particles", lambda df: df.assign(rlnImageName=names))
    line = _import(tmp_path, good)
    assert "t.mrcs: images are 18 px but" in line and "s.mrcs has 16 px" in line


def test_non_square_images(good, tmp_path):
    mrcfile.write(tmp_path / "s.mrcs", np.zeros((8, 16, 18), np.float32), overwrite=True)
    line = _import(tmp_path, good)
    assert "s.mrcs: images are 18x16 pixels, not square" in line


def test_missing_stack(good, tmp_path):
    (tmp_path / "s.mrcs").unlink()
    line = _import(tmp_path, good)
    assert "s.mrcs: image stack not found" in line


def test_optics_group_that_does_not_exist(good, tmp_path):
    _edit(good, "particles", lambda df: df.assign(rlnOpticsGroup=[1] * 7 + [3]))
    line = _import(tmp_path, good)
    assert "p.star: rlnOpticsGroup 3 does not exist in the optics table" in line


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_pixels(good, tmp_path, value):
    data = np.zeros((8, 16, 16), np.float32)
    data[6, 2, 2] = value
    with mrcfile.new(tmp_path / "s.mrcs", overwrite=True) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile's, on writing the bad file on purpose
        m.set_data(data)
    line = _import(tmp_path, good, "--chunk-size", "3")
    assert "s.mrcs: image 7 (1-based) has NaN or Inf pixels" in line


def test_nan_in_metadata(good, tmp_path):
    _edit(good, "particles", lambda df: df.assign(rlnDefocusU=[1e4] * 5 + [np.nan] * 3))
    line = _import(tmp_path, good)
    assert "p.star: column rlnDefocusU is not finite in row 6" in line


def test_cs_that_needs_pickle(tmp_path):
    with open(tmp_path / "bad.cs", "wb") as f:
        np.save(f, np.array([{"uid": 1}], dtype=object), allow_pickle=True)
    line = _import(tmp_path, tmp_path / "bad.cs")
    assert "bad.cs: holds Python objects (needs pickle)" in line


def test_cs_missing_ctf_field(drgn, tmp_path):
    arr = np.load(drgn / "empiar_10076_7.cs")
    keep = [n for n in arr.dtype.names if n != "ctf/df1_A"]
    with open(tmp_path / "p.cs", "wb") as f:
        np.save(f, arr[keep].copy())
    line = _import(tmp_path, tmp_path / "p.cs", "--datadir", str(drgn))
    assert "p.cs: field ctf/df1_A missing" in line


def test_existing_output_is_kept(good, tmp_path):
    (tmp_path / "out.zarr").mkdir()
    result = runner.invoke(app, ["import", str(good), "--out", str(tmp_path / "out.zarr")])
    assert result.exit_code == 2 and "already exists" in result.stderr


def test_input_is_never_modified(good, tmp_path):
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    shutil.copy(good, tmp_path / "copy.star")
    result = runner.invoke(app, ["import", str(good), "--out", str(tmp_path / "ok.zarr"), "--box", "8"])
    assert result.exit_code == 0, result.output
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())


def test_bad_box(good, tmp_path):
    line = _import(tmp_path, good, "--box", "32")
    assert "--box 32" in line


def test_complex_mrc_mode(good, tmp_path):
    with mrcfile.new(tmp_path / "s.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((8, 16, 16), np.complex64))
    line = _import(tmp_path, good)
    assert "s.mrcs: MRC mode 4 holds no real-valued images" in line


def test_truncated_stack(good, tmp_path):
    data = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(data[: len(data) - 100])
    line = _import(tmp_path, good)
    assert "s.mrcs: file is shorter than its header says" in line


def test_empty_particle_table(good, tmp_path):
    _edit(good, "particles", lambda df: df.iloc[:0])
    assert "p.star" in _import(tmp_path, good)


def test_duplicate_optics_group_rows(good, tmp_path):
    import pandas as pd

    _edit(good, "optics", lambda df: pd.concat([df, df]))
    line = _import(tmp_path, good)
    assert "p.star: rlnOpticsGroup 1 appears twice in the optics table" in line


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_pixel_size_not_positive(good, tmp_path, value):
    _edit(good, "optics", lambda df: df.assign(rlnImagePixelSize=value))
    assert "p.star: pixel size" in _import(tmp_path, good)


@pytest.mark.parametrize(("flag", "value"), [("--chunk-size", "0"), ("--chunk-size", "-3"), ("--max-particles", "0")])
def test_bad_counts(good, tmp_path, flag, value):
    assert f"{flag} {value}: must be at least 1" in _import(tmp_path, good, flag, value)


def _save(path, arr):
    with open(path, "wb") as f:
        np.save(f, arr)


def test_duplicate_uids(drgn, tmp_path):
    arr = np.load(drgn / "empiar_10076_7.cs")
    arr["uid"][3] = arr["uid"][1]
    _save(tmp_path / "d.cs", arr)
    assert f"d.cs: uid {arr['uid'][1]} appears 2 times" in _import(tmp_path, tmp_path / "d.cs", "--datadir", str(drgn))


def test_duplicate_uids_in_passthrough(drgn, tmp_path):
    arr = np.load(drgn / "empiar_10076_7.cs")
    _save(tmp_path / "main.cs", arr[["uid"]].copy())
    rest = arr.copy()
    rest["uid"][0] = rest["uid"][1]
    _save(tmp_path / "pass.cs", rest)
    line = _import(tmp_path, tmp_path / "main.cs", "--passthrough", str(tmp_path / "pass.cs"))
    assert "pass.cs: uid" in line and "appears 2 times" in line


def test_zero_row_cs(formats, tmp_path):
    arr = np.load(formats / "cryodrgn" / "empiar_10076_7.cs")[:0]
    _save(tmp_path / "z.cs", arr)
    assert "z.cs: no particles" in _import(tmp_path, tmp_path / "z.cs")
