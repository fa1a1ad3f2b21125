"""`dva display --mode simple`: frames, ranges, resampling, names and the ChimeraX script."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from typer.testing import CliRunner

from dva.cli import app
from dva.display.volumes import VolumeOptions, prepare_volume
from dva.engine.loop import Result
from dva.io.mrc import read_volume
from dva.io.results import read_results, write_results
from dva.io.star import read_star
from dva.sim.phantom import render_volume
from dva.sim.simulate import simulate_dataset

runner = CliRunner()
BOX, PIXEL = 32, 4.0
N = 101  # particles: coordinates linspace(−1, 1, 101) have known percentiles


def _blob(centre_A, sigma_A, box=BOX, pixel=PIXEL):
    return render_volume(np.array([centre_A], float), np.array([sigma_A]), np.array([1.0]), box, pixel)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Outputs of a run written from known volumes and coordinates (no EM involved)."""
    tmp = tmp_path_factory.mktemp("display")
    table = read_star(simulate_dataset(tmp / "sim", "tiny", particles=N, seed=3) / "particles.star")
    mean = _blob((0, 0, 0), 10.0)
    components = np.stack([_blob((8, 0, 0), 6.0), _blob((0, -8, 0), 6.0), _blob((0, 0, 8), 6.0)])
    z = np.stack([np.linspace(-1, 1, N), np.linspace(0, 10, N), -np.linspace(-2, 2, N)], 1)
    result = Result(
        mean=mean.astype(np.float32),
        components=components.astype(np.float32),
        z=z.astype(np.float32),
        alpha=np.ones(N, np.float32),
        variances=np.array([3.0, 2.0, 1.0]),
        box=BOX,
        pixel_size_A=PIXEL,
        particles=N,
    )
    write_results(tmp / "r", "dva", result, table, {"input": "test"})
    return tmp / "r"


def _display(run_dir, out, *extra):
    r = runner.invoke(app, ["display", str(run_dir), "--out", str(out), "--quiet", *extra])
    assert r.exit_code == 0, r.output
    return out


def test_frames_are_mean_plus_t_component_over_the_percentile_range(run_dir, tmp_path):
    out = _display(run_dir, tmp_path / "d", "--frames", "5", "--range-percentile", "3")
    run = read_results(run_dir)
    # linspace(−1, 1, 101): the 3rd percentile is −0.94 and the 97th +0.94 (linear interpolation).
    expected_t = {0: np.linspace(-0.94, 0.94, 5), 1: np.linspace(0.3, 9.7, 5), 2: np.linspace(-1.88, 1.88, 5)}
    for k, ts in expected_t.items():
        for f, t in enumerate(ts):
            vol, voxel = read_volume(out / f"component_{k}" / f"frame_{f:03d}.mrc")
            assert voxel == pytest.approx(PIXEL)
            np.testing.assert_allclose(vol, run.mean + t * run.components[k], rtol=0, atol=2e-6)


def test_script_and_zips_name_exactly_the_frames_written(run_dir, tmp_path):
    out = _display(run_dir, tmp_path / "d", "--frames", "4")
    written = sorted(str(p.relative_to(out)) for p in out.glob("component_*/frame_*.mrc"))
    assert len(written) == 12
    opened = []
    for line in (out / "dva_series.cxc").read_text().splitlines():
        if line.startswith("open "):
            assert line.endswith(" vseries true")
            opened += line.split()[1:-2]
    assert sorted(opened) == written
    for k in range(3):
        with zipfile.ZipFile(out / f"dva_component_{k:03d}.zip") as zf:
            names = sorted(zf.namelist())
            assert names == [w for w in written if w.startswith(f"component_{k}/")]
            assert all(zf.read(n) == (out / n).read_bytes() for n in names)


def test_components_option_keeps_the_runs_numbers(run_dir, tmp_path):
    out = _display(run_dir, tmp_path / "d", "--components", "2,0", "--frames", "3")
    assert sorted(p.name for p in out.iterdir()) == [
        "component_0",
        "component_2",
        "dva_component_000.zip",
        "dva_component_002.zip",
        "dva_series.cxc",
    ]
    run = read_results(run_dir)
    last, _ = read_volume(out / "component_2" / "frame_002.mrc")
    np.testing.assert_allclose(last, run.mean + 1.88 * run.components[2], atol=2e-6)


def test_downsample_then_crop_keeps_voxel_size_and_low_frequencies(run_dir, tmp_path):
    out = _display(run_dir, tmp_path / "d", "--frames", "2", "--downsample", "24", "--crop", "16")
    vol, voxel = read_volume(out / "component_0" / "frame_000.mrc")
    assert vol.shape == (16, 16, 16) and voxel == pytest.approx(PIXEL * 32 / 24)
    # The same smooth blobs rendered analytically at 24 px of 16/3 Å, central 16³ (index 12 ↔ 8).
    pixel = PIXEL * 32 / 24
    big = _blob((0, 0, 0), 10.0, 24, pixel) - 0.94 * _blob((8, 0, 0), 6.0, 24, pixel)
    np.testing.assert_allclose(vol, big[4:20, 4:20, 4:20], atol=2e-3 * np.abs(big).max())


def test_flip_hand_mirrors_z_about_the_centre():
    vol = _blob((4, -4, 8), 3.0)
    flipped = prepare_volume(vol, PIXEL, VolumeOptions(flip_hand=True))
    np.testing.assert_allclose(flipped, _blob((4, -4, -8), 3.0), atol=1e-6)


def test_low_pass_is_butterworth_at_the_given_resolution():
    noise = np.random.default_rng(0).normal(size=(BOX,) * 3)
    filtered = prepare_volume(noise, PIXEL, VolumeOptions(filter_res_A=16.0))
    gain = np.abs(np.fft.fftn(filtered)) / np.abs(np.fft.fftn(noise))
    for i in (1, 4, 8, 14):
        f = i / (BOX * PIXEL)  # Å⁻¹ along x
        assert gain[0, 0, i] == pytest.approx(1 / (1 + (f * 16.0) ** 3), rel=1e-4)  # order 1.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "movie"], "--mode movie"),
        (["--components", "3"], "--components 3"),
        (["--components", "a"], "--components a"),
        (["--downsample", "40"], "--downsample 40"),
        (["--crop", "30", "--downsample", "24"], "--crop 30"),
        (["--frames", "1"], "--frames 1"),
        (["--filter-res", "5"], "--filter-res 5"),
    ],
)
def test_bad_options_are_one_line_errors(run_dir, tmp_path, args, message):
    r = runner.invoke(app, ["display", str(run_dir), "--out", str(tmp_path / "d"), "--quiet", *args])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d").exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    r = runner.invoke(app, ["display", str(tmp_path), "--out", str(tmp_path / "d"), "--quiet"])
    assert r.exit_code == 2 and "job.json" in r.output


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """`dva run` (K=2, 12 Å) on 6,000 tiny-preset particles at SNR 20 (the .star is the input): with
    2,000 the intermediates-vs-linear comparison below was decided by the noise (seeds 4-7 at
    2,000: 5 of 8 ends favour intermediates, by <= 0.001 in correlation; at 6,000 seeds 4 and 5: 4 of
    4, by 0.0003-0.0012)."""
    tmp = tmp_path_factory.mktemp("real")
    sim = simulate_dataset(tmp / "sim", "tiny", particles=6000, snr=20.0, seed=4)
    args = ["run", str(sim / "particles.star"), "--mask", str(sim / "mask.mrc"), "--filter-res", "12"]
    r = runner.invoke(app, [*args, "--modes", "2", "--iterations", "12", "--out", str(tmp / "r"), "--workers", "2"])
    assert r.exit_code == 0, r.output
    return tmp


def _filtered(vol, pixel):
    return prepare_volume(vol, pixel, VolumeOptions(filter_res_A=12.0))


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_cluster_mode_finds_the_discrete_states(real_run, tmp_path):
    """Clustering the coordinate that carries the subunit (as a user picks it from the plots)."""
    truth = np.load(real_run / "sim" / "truth" / "truth.npz")
    present = truth["present"]
    z = read_results(real_run / "r").z
    j = int(np.argmax([abs(_corr(z[:, k], present)) for k in range(2)]))
    args = ["--mode", "cluster", "--frames", "2", "--components", str(j), "--workers", "2"]
    out = _display(real_run / "r", tmp_path / "c", *args)
    labels = np.zeros(len(present), dtype=int)
    for c in range(2):
        sub = read_star(out / f"dva_cluster_{c:03d}_particles.star")
        rows = sub["stack_index"].to_numpy()  # the simulated stack holds the particles in order
        labels[rows] = c
        assert sub.sizes["particle"] == len(set(rows))
    assert sum(read_star(out / f"dva_cluster_{c:03d}_particles.star").sizes["particle"] for c in range(2)) == len(
        present
    )
    # Which cluster is "present" is arbitrary: take the better matching.
    accuracy = max(np.mean(labels == present), np.mean(labels != present))
    assert accuracy >= 0.95
    with_subunit = int(np.mean(labels[present]) > 0.5)
    pixel = float(truth["pixel_size_A"])
    states = {
        with_subunit: truth["mean"] + 0.5 * truth["subunit"],
        1 - with_subunit: truth["mean"] - 0.5 * truth["subunit"],
    }
    for c in range(2):
        vol, _ = read_volume(out / f"dva_cluster_{c:03d}.mrc")
        assert _corr(_filtered(vol, pixel), _filtered(states[c], pixel)) >= 0.9
    script = (out / "dva_clusters.cxc").read_text()
    assert "open dva_cluster_000.mrc" in script and "open dva_cluster_001.mrc" in script


def test_intermediates_beat_linear_frames_at_the_ends(real_run, tmp_path):
    """Along the motion, frames reconstructed from their particles match the true volumes of those
    particles better than V_0 + t·V_k does (the motion is a rotation: not linear in density)."""
    from dva.sim.phantom import blob_state, make_phantom, render_volume
    from dva.sim.simulate import PRESETS, SUBUNIT_CONTRAST

    truth = np.load(real_run / "sim" / "truth" / "truth.npz")
    run = read_results(real_run / "r")
    k = int(np.argmax([abs(_corr(run.z[:, j], truth["latent"])) for j in range(2)]))
    common = ["--components", str(k), "--frames", "5", "--workers", "2"]
    inter = _display(
        real_run / "r", tmp_path / "i", "--mode", "intermediates", "--window", "0", "--export-frame-particles", *common
    )
    simple = _display(real_run / "r", tmp_path / "s", *common)
    p = PRESETS["tiny"]
    phantom = make_phantom(p.box, p.pixel_size_A, np.random.default_rng(4))
    amplitude = np.where(phantom.optional, SUBUNIT_CONTRAST, 1.0) * phantom.amplitude
    better = 0
    for f in (0, 4):
        rows = read_star(inter / f"component_{k}" / f"frame_{f:03d}_particles.star")["stack_index"].to_numpy()
        # The true average volume of the frame's particles (latent binned finely; subunit at its rate).
        bins = np.linspace(-1, 1, 21)
        which = np.clip(np.digitize(truth["latent"][rows], bins) - 1, 0, 19)
        true = (
            sum(
                np.sum(which == b)
                * render_volume(
                    blob_state(phantom, np.array([(bins[b] + bins[b + 1]) / 2]), np.array([False]))[0][0],
                    phantom.sigma_A,
                    amplitude * ~phantom.optional,
                    p.box,
                    p.pixel_size_A,
                )
                for b in range(20)
                if np.any(which == b)
            )
            / len(rows)
            + truth["present"][rows].mean() * truth["subunit"]
        )
        got_inter, _ = read_volume(inter / f"component_{k}" / f"frame_{f:03d}.mrc")
        got_simple, _ = read_volume(simple / f"component_{k}" / f"frame_{f:03d}.mrc")
        c_inter = _corr(_filtered(got_inter, p.pixel_size_A), _filtered(true, p.pixel_size_A))
        c_simple = _corr(_filtered(got_simple, p.pixel_size_A), _filtered(true, p.pixel_size_A))
        print(f"frame {f}: intermediates {c_inter:.4f}, simple {c_simple:.4f}")
        better += c_inter > c_simple
    assert better == 2


def test_exported_frame_particles_reimport(real_run, tmp_path):
    out = _display(
        real_run / "r",
        tmp_path / "e",
        "--mode",
        "intermediates",
        "--components",
        "0",
        "--frames",
        "3",
        "--window",
        "-1",
        "--skip-reconstruction",
        "--export-frame-particles",
    )
    assert not list(out.glob("component_0/frame_*.mrc"))  # skipped
    uids = []
    for f in range(3):
        for ext in ("star", "cs"):
            r = runner.invoke(
                app,
                [
                    "import",
                    str(out / f"component_0/frame_{f:03d}_particles.{ext}"),
                    "--out",
                    str(tmp_path / f"{f}{ext}.zarr"),
                    "--quiet",
                ],
            )
            assert r.exit_code == 0, r.output
        sub = read_star(out / f"component_0/frame_{f:03d}_particles.star")
        assert sub.sizes["particle"] == 2000  # equal counts of 6,000
        uids.append(set(sub["stack_index"].to_numpy().tolist()))
    assert len(set.union(*uids)) == 6000


def _sphere_map(path, radius_px, centre=(0, 0, 0), box=BOX, pixel=1.5):
    from dva.io.mrc import write_volume

    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2)
    write_volume(path, (r <= radius_px).astype(np.float32), pixel)
    return r


def test_mask_threshold_dilate_soft_edge_and_exclude(tmp_path):
    r = _sphere_map(tmp_path / "map.mrc", 8)
    args = ["mask", str(tmp_path / "map.mrc"), "--threshold", "0.5", "--dilate", "3", "--soft-edge", "3"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m.mrc")])
    assert result.exit_code == 0, result.output
    m, voxel = read_volume(tmp_path / "m.mrc")
    assert voxel == pytest.approx(1.5)
    # Sphere of 8 px, dilated by 2 px (3 Å at 1.5 Å/px), then a 2 px raised-cosine edge; distances
    # from scipy's exact transform to the thresholded voxels.
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(r > 8)
    expected = 0.5 * (1 + np.cos(np.pi * np.clip((dist - 2) / 2, 0, 1)))
    np.testing.assert_allclose(m, expected, atol=1e-5)
    assert np.all(m[r <= 9] == 1) and np.all(m[r >= 12] == 0)
    # Leaving out a second sphere (say a micelle) at +10 px along x.
    r2 = _sphere_map(tmp_path / "micelle.mrc", 4, centre=(10, 0, 0))
    result = runner.invoke(app, [*args, "--exclude", str(tmp_path / "micelle.mrc"), "--out", str(tmp_path / "c.mrc")])
    assert result.exit_code == 0, result.output
    cut, _ = read_volume(tmp_path / "c.mrc")
    assert np.all(cut[r2 <= 4] == 0) and np.all(cut[(r <= 9) & (r2 >= 7)] == 1)


def test_mask_bad_input_is_one_line(tmp_path):
    _sphere_map(tmp_path / "map.mrc", 8)
    _sphere_map(tmp_path / "other.mrc", 4, box=24)
    base = ["mask", str(tmp_path / "map.mrc"), "--out", str(tmp_path / "m.mrc")]
    for extra, message in [
        (["--threshold", "2"], "no voxel above --threshold 2"),
        (["--threshold", "0.5", "--exclude", str(tmp_path / "other.mrc")], "does not match"),
        (["--threshold", "0.5", "--dilate", "-1"], "--dilate -1"),
    ]:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "m.mrc").exists()
