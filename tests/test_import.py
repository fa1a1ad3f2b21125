from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from dva.cli import app
from dva.errors import DvaFormatWarning, DvaInputError
from dva.io.cs import read_cs, write_cs
from dva.io.mrc import StackReader
from dva.io.particles import read_particles
from dva.io.star import read_star, write_star
from dva.io.store import import_particles, open_store
from dva.sim.simulate import simulate_dataset

runner = CliRunner()


def _centred_crop_reference(images: np.ndarray, new_box: int) -> np.ndarray:
    """Fourier crop in float64 written out independently of dva.ops.fourier."""
    d = images.shape[-1]
    f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(images.astype(np.float64), axes=(-2, -1))), axes=(-2, -1))
    lo = d // 2 - new_box // 2
    g = f[:, lo : lo + new_box, lo : lo + new_box]
    out = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(g, axes=(-2, -1))), axes=(-2, -1)).real
    return out * (new_box / d) ** 2


def test_import_relion31_images_and_table(drgn, tmp_path):
    table = read_star(drgn / "relion31.star")
    import_particles(table, tmp_path / "s.zarr", chunk_size=2)
    images, stored, attrs = open_store(tmp_path / "s.zarr")
    assert images.shape == (5, 256, 256) and images.chunks == (2, 256, 256)
    np.testing.assert_array_equal(images[:], mrcfile.read(drgn / "relion31.mrcs"))
    for name in table.data_vars:
        np.testing.assert_array_equal(stored[name].values, table[name].values, err_msg=name)
    assert attrs["box"] == 256 and attrs["dva_version"]
    assert stored.attrs["stacks"] == table.attrs["stacks"]


def test_import_fourier_crop_rescales_pixel_size_and_shifts(drgn, tmp_path):
    table = read_star(drgn / "relion31.star")
    import_particles(table, tmp_path / "c.zarr", box=64)
    images, stored, _ = open_store(tmp_path / "c.zarr")
    ref = _centred_crop_reference(mrcfile.read(drgn / "relion31.mrcs"), 64)
    np.testing.assert_allclose(images[:], ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(stored["pixel_size_A"].values, 2.806 * 4)
    np.testing.assert_allclose(stored["shift_px"].values, table["shift_px"].values / 4)
    np.testing.assert_array_equal(stored["image_size"].values, 64)
    # The shift in Å is unchanged.
    np.testing.assert_allclose(
        stored["shift_px"].values * stored["pixel_size_A"].values[:, None],
        table["shift_px"].values * table["pixel_size_A"].values[:, None],
    )


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
