from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
import xarray as xr
import zarr
from typer.testing import CliRunner

from dva.cli import app
from dva.errors import DvaFormatWarning, DvaInputError
from dva.io.cs import read_cs, write_cs
from dva.io.mrc import StackReader
from dva.io.particles import read_particles
from dva.io.star import read_star, write_star
from dva.io.store import import_particles, inner_chunk, open_store
from dva.sim.simulate import simulate_dataset

runner = CliRunner()


def _cosines(box: int, terms) -> np.ndarray:
    """Σ a·cos(2π(fx·(x − c) + fy·(y − c))/box + φ) on a `box`² grid (c = box//2); f in cycles/box."""
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return sum(a * np.cos(2 * np.pi * (fx * x + fy * y) / box + ph) for a, fx, fy, ph in terms)


def test_import_relion31_images_and_table(drgn, tmp_path):
    table = read_star(drgn / "relion31.star")
    import_particles(table, tmp_path / "s.zarr", chunk_size=2)
    images, stored, attrs = open_store(tmp_path / "s.zarr")
    assert images.shape == (5, 256, 256) and images.shards == images.chunks == (2, 256, 256)
    np.testing.assert_array_equal(images[:], mrcfile.read(drgn / "relion31.mrcs"))
    for name in table.data_vars:
        np.testing.assert_array_equal(stored[name].values, table[name].values, err_msg=name)
    assert attrs["box"] == 256 and attrs["dva_version"]
    assert stored.attrs["stacks"] == table.attrs["stacks"]


def test_import_fourier_crop_is_exact_for_band_limited_images(tmp_path):
    """Cosines below the new Nyquist survive a crop from 64 to 32 px exactly (analytic reference)."""
    rng = np.random.default_rng(0)
    terms = [[(rng.uniform(0.5, 2), *rng.integers(-15, 16, 2), rng.uniform(0, 6)) for _ in range(4)] for _ in range(5)]
    mrcfile.write(tmp_path / "s.mrcs", np.stack([_cosines(64, t) for t in terms]).astype(np.float32))
    _write_minimal_star(tmp_path / "p.star", 5)
    table = read_star(tmp_path / "p.star")
    import_particles(table, tmp_path / "c.zarr", box=32, chunk_size=2)
    images, stored, attrs = open_store(tmp_path / "c.zarr")
    np.testing.assert_allclose(images[:], np.stack([_cosines(32, t) for t in terms]), atol=1e-4)
    # The table keeps the source's units; the crop is recorded in the attributes.
    assert (attrs["box"], attrs["original_box"]) == (32, 64) and attrs["pixel_size_A"] == 4.0
    np.testing.assert_array_equal(stored["pixel_size_A"].values, 2.0)
    np.testing.assert_array_equal(stored["image_size"].values, 64)
    np.testing.assert_array_equal(stored["shift_px"].values, table["shift_px"].values)


def test_cryosparc_sign_applied_and_overridable(drgn, tmp_path):
    table = read_cs(drgn / "empiar_10076_7.cs")
    raw = StackReader(drgn / "empiar_10076_7.mrc").read(np.arange(7))
    import_particles(table, tmp_path / "a.zarr")
    np.testing.assert_array_equal(open_store(tmp_path / "a.zarr")[0][:], -raw)
    import_particles(table, tmp_path / "b.zarr", data_sign="1")
    images, stored, _ = open_store(tmp_path / "b.zarr")
    np.testing.assert_array_equal(images[:], raw)
    np.testing.assert_array_equal(stored["data_sign"].values, 1)


def test_interleaved_stacks_stream_in_chunks(drgn, tmp_path):
    table = read_star(drgn / "relion5.star", datadir=drgn / "toy_datadir")
    with pytest.warns(DvaFormatWarning, match="metadata says box 448 but the stacks hold 30 px"):
        import_particles(table, tmp_path / "r5.zarr", chunk_size=4, max_particles=15)
    images, stored, _ = open_store(tmp_path / "r5.zarr")
    assert images.shape == (15, 30, 30)
    stacks = [mrcfile.read(p) for p in table.attrs["stacks"]]
    for i in range(15):
        s, k = int(table["stack"][i]), int(table["stack_index"][i])
        np.testing.assert_array_equal(images[i], stacks[s][k])
    np.testing.assert_array_equal(stored["image_size"].values, 30)


@pytest.mark.parametrize(
    "args",
    [
        ["relion31.star"],
        ["relion31.v2.star"],
        ["relion5.star", "--datadir", "{d}/toy_datadir"],
        ["empiar_10076_7.star"],
        ["empiar_10076_7.cs"],
        ["toy_projections.star", "--pixel-size", "1.0"],
    ],
)
def test_every_format_file_with_images_imports(drgn, tmp_path, args):
    args = [a.format(d=drgn) for a in args]
    out = tmp_path / "x.zarr"
    result = runner.invoke(app, ["import", str(drgn / args[0]), "--out", str(out), "--quiet", *args[1:]])
    assert result.exit_code == 0, result.output
    assert "particles" in result.stdout
    if "relion5" in args[0]:
        assert "warning:" in result.stderr and "box 448" in result.stderr
    images, table, _ = open_store(out)
    assert images.shape[0] == table.sizes["particle"] > 0


def test_failed_import_leaves_nothing(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32)
    data[4, 3, 3] = np.nan
    mrcfile.write(tmp_path / "s.mrcs", data)
    _write_minimal_star(tmp_path / "p.star", 6)
    table = read_star(tmp_path / "p.star")
    with pytest.raises(DvaInputError, match=r"s.mrcs: image 5 \(1-based\) has NaN or Inf pixels"):
        import_particles(table, tmp_path / "p.zarr", chunk_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.star", "s.mrcs"]


def _write_minimal_star(path, n, stack="s.mrcs"):
    import pandas as pd
    import starfile

    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [2.0],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
            "rlnOpticsGroup": 1,
            "rlnDefocusU": 10000.0,
            "rlnDefocusV": 9000.0,
            "rlnDefocusAngle": 10.0,
            "rlnAngleRot": 0.0,
            "rlnAngleTilt": 0.0,
            "rlnAnglePsi": 0.0,
        }
    )
    starfile.write({"optics": optics, "particles": particles}, path)


def test_simulated_dataset_round_trips(tmp_path):
    sim = simulate_dataset(tmp_path / "sim", "tiny", particles=300, seed=3)
    truth = np.load(sim / "truth" / "truth.npz")
    assert truth["latent"].shape == (300,)
    star = read_particles(sim / "particles.star")
    cs = read_particles(sim / "particles.cs")
    import_particles(star, tmp_path / "sim.zarr", chunk_size=128)
    _, stored, _ = open_store(tmp_path / "sim.zarr")
    (tmp_path / "out").mkdir()
    write_star(tmp_path / "out" / "again.star", stored)
    write_cs(tmp_path / "out" / "again.cs", stored)
    raw_in, raw_out = starfile.read(sim / "particles.star"), starfile.read(tmp_path / "out" / "again.star")
    for col in raw_in["particles"].columns:
        if col != "rlnImageName":
            np.testing.assert_allclose(raw_out["particles"][col], raw_in["particles"][col], rtol=1e-9, err_msg=col)
    again = [read_particles(tmp_path / "out" / "again.star"), read_particles(tmp_path / "out" / "again.cs")]
    for other in [cs, *again]:
        for name in set(star.data_vars) - {"uid", "source_row", "data_sign", "stack"}:
            tol = 1e-6 if other is not again[0] else 1e-9
            np.testing.assert_allclose(
                other[name].values.astype(float), star[name].values.astype(float), rtol=tol, atol=tol, err_msg=name
            )
        assert other.attrs["stacks"] == star.attrs["stacks"]
    np.testing.assert_array_equal(again[1]["uid"].values, stored["uid"].values)


def test_store_metadata_is_an_xarray_dataset(drgn, tmp_path):
    import_particles(read_star(drgn / "relion31.star"), tmp_path / "s.zarr")
    ds = xr.open_zarr(tmp_path / "s.zarr", group="particles", consolidated=False)
    assert ds["rotation"].dims == ("particle", "i", "j")
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert root["images"].metadata.dimension_names == ("particle", "y", "x")
    assert root["images"].compressors == ()


def test_project_relative_paths_found_from_a_job_folder(tmp_path, monkeypatch):
    """RELION names stacks relative to the project folder; the star lives in a job folder."""
    project = tmp_path / "project"
    (project / "Extract" / "job005").mkdir(parents=True)
    (project / "Refine3D" / "job010").mkdir(parents=True)
    data = np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32)
    mrcfile.write(project / "Extract" / "job005" / "s.mrcs", data)
    star = project / "Refine3D" / "job010" / "run_data.star"
    _write_minimal_star(star, 4, stack="Extract/job005/s.mrcs")
    monkeypatch.chdir(tmp_path)  # not the project folder: found by walking up from the star
    table = read_star(star)
    assert table.attrs["stacks"] == [str(project / "Extract" / "job005" / "s.mrcs")]
    import_particles(table, tmp_path / "p.zarr")
    np.testing.assert_array_equal(open_store(tmp_path / "p.zarr")[0][:], data)


def test_stacks_are_looked_for_beside_the_star_before_the_working_directory(tmp_path, monkeypatch):
    for name, value in (("projA", 1.0), ("projB", 2.0)):
        (tmp_path / name / "Extract").mkdir(parents=True)
        (tmp_path / name / "Refine").mkdir()
        mrcfile.write(tmp_path / name / "Extract" / "s.mrcs", np.full((2, 8, 8), value, np.float32))
        _write_minimal_star(tmp_path / name / "Refine" / "run.star", 2, stack="Extract/s.mrcs")
    monkeypatch.chdir(tmp_path / "projA")
    table = read_star(tmp_path / "projB" / "Refine" / "run.star")
    assert table.attrs["stacks"] == [str(tmp_path / "projB" / "Extract" / "s.mrcs")]


def test_relion_type_suffix_in_image_names(tmp_path):
    mrcfile.write(tmp_path / "s.mrcs", np.zeros((3, 8, 8), np.float32))
    _write_minimal_star(tmp_path / "p.star", 3, stack="s.mrcs:mrcs")
    assert read_star(tmp_path / "p.star").attrs["stacks"] == [str(tmp_path / "s.mrcs")]


def test_writers_refuse_a_changed_source(drgn, tmp_path):
    import shutil

    shutil.copy(drgn / "relion31.star", tmp_path / "r.star")
    shutil.copy(drgn / "relion31.mrcs", tmp_path / "relion31.mrcs")
    table = read_star(tmp_path / "r.star")
    write_star(tmp_path / "ok.star", table)
    text = (tmp_path / "r.star").read_text()
    (tmp_path / "r.star").write_text(text.replace("opticsGroup1", "opticsGroupX"))
    with pytest.raises(DvaInputError, match="r.star: the input file changed"):
        write_star(tmp_path / "bad.star", table)
    (tmp_path / "r.star").unlink()
    with pytest.raises(DvaInputError, match="r.star: the input file is gone"):
        write_star(tmp_path / "bad.star", table)
    write_cs(tmp_path / "fine.cs", table)  # a .cs carries nothing from a .star


@pytest.mark.parametrize(
    ("shard", "inner"), [(8192, 1024), (4096, 1024), (3000, 1000), (1000, 1000), (100, 100), (1, 1), (2062, 2062)]
)
def test_shards_are_read_by_inner_chunks_dividing_them(shard, inner):
    """The largest divisor up to 1,024 particles; a shard with none above 256 (2,062 = 2 × 1,031) is
    read whole rather than 2 particles at a time."""
    assert inner_chunk(shard) == inner
