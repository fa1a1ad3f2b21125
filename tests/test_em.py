"""The 3DVA engine against simulated truth (independent: analytic blob phantom, real-space projections)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr
from scipy.stats import spearmanr

from dva.em.finish import principal_axes
from dva.em.model import scale_prior
from dva.em.mstep import band_filter
from dva.engine.cluster import connect
from dva.engine.loop import RunParams, run_3dva
from dva.io.mrc import read_volume
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.ops.filters import filter_real
from dva.sim.score import score
from dva.sim.simulate import simulate_dataset

FILTER_A = 12.0


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """3,000 particles of the tiny preset (box 32, 4 Å, SNR 0.5), imported in chunks of 500 and of 700."""
    out = tmp_path_factory.mktemp("em")
    simulate_dataset(out / "sim", "tiny", particles=3000, seed=0)
    table = read_star(out / "sim" / "particles.star")
    import_particles(table, out / "s.zarr", chunk_size=500)
    import_particles(table, out / "s700.zarr", chunk_size=700)  # other chunks: other tasks and sum tree
    return out


@pytest.fixture(scope="module")
def two_workers():
    cluster = connect(workers=2)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def result(sim, two_workers):
    return run_3dva(sim / "s.zarr", sim / "sim" / "mask.mrc", RunParams(filter_res_A=FILTER_A), two_workers)


def _filtered_truth(sim, result):
    truth = np.load(sim / "sim" / "truth" / "truth.npz")
    mask, _ = read_volume(sim / "sim" / "mask.mrc")
    filt = band_filter(result.box, result.pixel_size_A, FILTER_A, 1.5, None, 8)
    return truth, mask, filt


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_mean_matches_the_true_mean_within_the_band(sim, result):
    truth, _, filt = _filtered_truth(sim, result)
    c = _corr(filter_real(truth["mean"], filt), filter_real(result.mean, filt))
    assert c >= 0.99


def test_subspace_and_coordinates_against_truth(sim, result):
    truth, mask, filt = _filtered_truth(sim, result)
    strong = [c for c, f in zip(truth["components"], truth["variance_fraction"], strict=True) if f >= 0.25]
    assert len(strong) == 2  # the motion and the subunit
    t = np.stack([filter_real(c * mask, filt) for c in strong]).reshape(len(strong), -1)
    q_true, _ = np.linalg.qr(t.T)
    q_est, _ = np.linalg.qr(result.components.reshape(len(result.components), -1).T)
    per_mode = ((q_true.T @ q_est) ** 2).sum(1)
    # Measured 0.85 and 0.76 at 3,000 particles and SNR 0.5 (0.98 and 0.97 at SNR 20): estimation
    # noise. The accuracy target is `test_recovers_the_true_subspace_at_high_snr`.
    assert per_mode.min() >= 0.72 and per_mode.mean() >= 0.78
    # With two close variances the first two axes can swap at this size (the demo's 5,000 particles
    # at SNR 0.1 give |ρ(z0, latent)| = 0.94); here the best component is asserted.
    rho = max(abs(spearmanr(result.z[:, k], truth["latent"]).statistic) for k in range(3))
    assert rho >= 0.75  # measured 0.82
    present = truth["present"]
    assert max(abs(_corr(result.z[:, k], present)) for k in range(3)) >= 0.7


def test_components_are_orthonormal_and_ordered(result):
    flat = result.components.reshape(len(result.components), -1).astype(np.float64)
    np.testing.assert_allclose(flat @ flat.T, np.eye(len(flat)), atol=1e-5)
    assert np.all(np.diff(result.variances) <= 0)
    assert result.metrics[-1]["subspace_change_deg"] < result.metrics[0]["subspace_change_deg"]


def test_principal_axes_keep_the_volumes_and_sort(xp):
    from dva.engine.tasks import to_numpy

    rng = np.random.default_rng(0)
    comps = rng.normal(size=(3, 4, 4, 4))
    z = rng.normal(size=(500, 3)) * [0.5, 3.0, 1.0]
    axes = principal_axes(xp.asarray(comps), xp.asarray(z), np.zeros((3, 3)), xp)
    rotated, coords, variances = (to_numpy(a) for a in axes)
    before = z @ comps.reshape(3, -1)
    after = coords @ rotated.reshape(3, -1)
    np.testing.assert_allclose(after, before, atol=1e-9)
    assert np.all(np.diff(variances) < 0)
    np.testing.assert_allclose(coords.T @ coords / len(coords), np.diag(variances), atol=1e-9)  # ZᵀZ/N


def test_one_worker_and_other_chunks_give_the_same_result(sim, result):
    """Same seed, 1 worker instead of 2, chunks of 700 instead of 500: the same components and z."""
    one = connect(workers=1)
    try:
        again = run_3dva(sim / "s700.zarr", sim / "sim" / "mask.mrc", RunParams(filter_res_A=FILTER_A), one)
    finally:
        one.close()
    for a, b in zip(result.components, again.components, strict=True):
        assert _corr(a, b) >= 0.9999
    for k in range(result.z.shape[1]):
        assert _corr(result.z[:, k], again.z[:, k]) >= 0.9999


def test_more_modes_keep_the_first(sim, result, two_workers):
    six = run_3dva(sim / "s.zarr", sim / "sim" / "mask.mrc", RunParams(filter_res_A=FILTER_A, modes=6), two_workers)
    assert abs(_corr(six.components[0], result.components[0])) >= 0.98  # measured 0.992


def test_scale_prior_removes_the_estimates_noise():
    rng = np.random.default_rng(0)
    true = rng.uniform(0.6, 1.4, 200_000)  # variance 0.8²/12
    noise_var = rng.uniform(0.01, 0.05, true.size)
    estimates = true + rng.normal(size=true.size) * np.sqrt(noise_var)
    centre, spread = scale_prior(np.array([estimates.sum(), (estimates**2).sum(), noise_var.sum()]), true.size)
    assert centre == pytest.approx(1.0, abs=2e-3)
    assert spread == pytest.approx(0.8**2 / 12, rel=0.02)
    assert scale_prior(np.array([10.0, 10.0, 5.0]), 10) == (1.0, 0.0)  # all noise: no spread


def test_optimal_scale_finds_per_particle_scales(sim, two_workers, tmp_path):
    """Images multiplied by known factors: `--scale optimal` finds them; `none` leaves z worse."""
    scales = np.random.default_rng(5).uniform(0.6, 1.4, 3000)
    store = tmp_path / "scaled.zarr"
    shutil.copytree(sim / "s.zarr", store)
    images = zarr.open_group(store, mode="r+")["images"]
    images[:] = images[:] * scales[:, None, None].astype(np.float32)
    params = RunParams(filter_res_A=FILTER_A, iterations=12)
    found = run_3dva(store, sim / "sim" / "mask.mrc", params, two_workers)
    assert _corr(found.alpha, scales) >= 0.9
    assert found.metrics[-1]["scale_std"] == pytest.approx(0.8 / np.sqrt(12), rel=0.25)
    latent = np.load(sim / "sim" / "truth" / "truth.npz")["latent"]
    rho = max(abs(spearmanr(found.z[:, k], latent).statistic) for k in range(3))
    assert rho >= 0.75


@pytest.fixture(scope="module")
def small_hi(tmp_path_factory):
    """3,000 particles of the small preset (box 64, 3 Å) at SNR 20, imported at the full box."""
    out = tmp_path_factory.mktemp("small")
    simulate_dataset(out / "sim", "small", particles=3000, snr=20.0, seed=0)
    import_particles(read_star(out / "sim" / "particles.star"), out / "s.zarr", chunk_size=500)
    return out


def test_recovers_the_true_subspace_at_high_snr(small_hi, two_workers):
    """Every true component with ≥5% of the variance found (capture ≥ 0.9), run with `--box 48`."""
    params = RunParams(filter_res_A=FILTER_A, box=48)
    result = run_3dva(small_hi / "s.zarr", small_hi / "sim" / "mask.mrc", params, two_workers)
    found = score(result, small_hi / "sim", FILTER_A)
    assert found["true_components"] == 3
    # Measured 0.98 (0.99, 0.99, 0.96); at the demo's SNR 0.1 with 5,000 particles, 0.90.
    assert found["capture"] >= 0.9 and min(found["capture_per_component"]) >= 0.85
    assert found["spearman_z0_latent"] >= 0.9  # measured 0.98
    assert found["best_correlation_state"] >= 0.9


def test_import_box_equals_run_box(sim, two_workers, tmp_path):
    """Fourier-cropping at import or on the fly in the run gives the same result."""
    table = read_star(sim / "sim" / "particles.star")
    import_particles(table, tmp_path / "b24.zarr", chunk_size=500, box=24)
    params = RunParams(filter_res_A=FILTER_A, iterations=4, modes=2)
    at_import = run_3dva(tmp_path / "b24.zarr", sim / "sim" / "mask.mrc", params, two_workers)
    in_run = run_3dva(sim / "s.zarr", sim / "sim" / "mask.mrc", replace(params, box=24), two_workers)
    assert at_import.box == in_run.box == 24 and at_import.pixel_size_A == pytest.approx(in_run.pixel_size_A)
    for a, b in zip(at_import.components, in_run.components, strict=True):
        assert _corr(a, b) >= 0.999
    for k in range(2):
        assert _corr(at_import.z[:, k], in_run.z[:, k]) >= 0.999


def test_halfsets_tell_real_modes_from_noise(sim, two_workers):
    """K=5 where two modes are strong (65%, 29%) and a third weak (6%): the two halves, each fitted
    alone from its own random start, agree on the strong modes and not on the noise-fitting ones."""
    params = RunParams(filter_res_A=FILTER_A, modes=5, iterations=12, halfsets=True)
    halves = run_3dva(sim / "s.zarr", sim / "sim" / "mask.mrc", params, two_workers).halves
    assert sum(halves["particles"]) == 3000 and min(halves["particles"]) > 1400
    res, corr = halves["resolution_A"], halves["coordinate_correlation"]
    # Measured on this set: resolution 16.6, 18.5 Å then none; coordinates 0.50, 0.79, 0.05, 0.03, 0.00.
    assert res[0] is not None and res[1] is not None
    assert all(r is None or r > max(res[:2]) for r in res[3:])  # coarser, or never above 0.143
    assert min(corr[:2]) > max(corr[3:]) + 0.3
    for a, b in zip(*halves["components"], strict=True):
        assert a.shape == b.shape == (32, 32, 32)
