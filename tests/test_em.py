"""The 3DVA engine against simulated truth (independent: analytic blob phantom, real-space projections)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from dva.em.finish import principal_axes
from dva.em.mstep import band_filter
from dva.engine.cluster import connect
from dva.engine.loop import RunParams, run_3dva
from dva.io.mrc import read_volume
from dva.io.star import read_star
from dva.io.store import import_particles
from dva.ops.filters import to_fourier, to_real
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
    c = _corr(to_real(to_fourier(truth["mean"]) * filt), to_real(to_fourier(result.mean) * filt))
    assert c >= 0.99


def test_subspace_and_coordinates_against_truth(sim, result):
    truth, mask, filt = _filtered_truth(sim, result)
    strong = [c for c, f in zip(truth["components"], truth["variance_fraction"], strict=True) if f >= 0.25]
    assert len(strong) == 2  # the motion and the subunit
    t = np.stack([to_real(to_fourier(c * mask) * filt) for c in strong]).reshape(len(strong), -1)
    q_true, _ = np.linalg.qr(t.T)
    q_est, _ = np.linalg.qr(result.components.reshape(len(result.components), -1).T)
    per_mode = ((q_true.T @ q_est) ** 2).sum(1)
    # Measured 0.90 and 0.78 at 3,000 particles and SNR 0.5 (0.98 and 0.96 at SNR 20): estimation noise.
    assert per_mode.min() >= 0.72 and per_mode.mean() >= 0.8
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


def test_principal_axes_keep_the_volumes_and_sort():
    rng = np.random.default_rng(0)
    comps = rng.normal(size=(3, 4, 4, 4))
    z = rng.normal(size=(500, 3)) * [0.5, 3.0, 1.0]
    rotated, coords, variances = principal_axes(comps, z, np.zeros((3, 3)))
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


@pytest.mark.xfail(
    strict=True,
    reason="issue 3 open: with K=6 the extra, noise-fitting modes tilt the principal axes (measured 0.76)",
)
def test_more_modes_keep_the_first(sim, result, two_workers):
    six = run_3dva(sim / "s.zarr", sim / "sim" / "mask.mrc", RunParams(filter_res_A=FILTER_A, modes=6), two_workers)
    assert abs(_corr(six.components[0], result.components[0])) >= 0.98
