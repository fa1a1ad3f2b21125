"""The M-step's solves and transforms against direct references: `linalg.solve`, QR, full FFTs."""

from __future__ import annotations

import numpy as np
import pytest

from dva.em.chunk import band_rows, inside_band_half
from dva.em.estep import pair_index
from dva.em.finish import subspace_angle_deg
from dva.em.mstep import gram_schmidt, solve_components, solve_spd
from dva.ops.filters import filter_real, half_spectrum, radius_3d, to_real
from dva.ops.slice import complete_plane, completed_rows, gridding_correction, half_rows
from tests.conftest import half_of, to_host, unfold


@pytest.mark.parametrize("k", [1, 3, 6])
def test_solve_spd_equals_linalg_solve(xp, k):
    rng = np.random.default_rng(k)
    m = 500
    x = rng.normal(size=(m, k, k + 2))
    a = x @ x.transpose(0, 2, 1) + 0.01 * np.eye(k)
    b = rng.normal(size=(m, k, 2))
    packed = np.stack([a[:, i, j] for i, j in pair_index(k)])  # the upper triangle, as `G` holds it
    got = solve_spd(xp.asarray(packed), xp.asarray(b.transpose(1, 2, 0).copy()), xp)
    np.testing.assert_allclose(to_host(got).transpose(2, 0, 1), np.linalg.solve(a, b), rtol=1e-9, atol=1e-12)


def test_solve_spd_gives_zero_where_nothing_was_seen():
    """A voxel no sample reached (all-zero system) solves to zero, not NaN."""
    packed, b = np.zeros((6, 4)), np.zeros((3, 2, 4))
    assert not solve_spd(packed, b).any()


def test_completed_rows_are_those_of_the_completed_volume(xp):
    """`completed_rows` at the band's rows, and `complete_plane` at every row, equal the half of the
    full grid written out (`unfold`), for both signs (the kx = 0 plane gets its mirror's sums; the
    self-mirrored voxels double or cancel): from sums held at every row of the half spectra, and
    from those held at the band's rows only (`band_rows`)."""
    box = 8
    rng = np.random.default_rng(5)
    sums = rng.normal(size=(half_rows(box), 3))
    rows = np.flatnonzero(inside_band_half(box))
    for stored in (np.arange(half_rows(box)), band_rows(box)):
        at = np.searchsorted(stored, rows)  # where the rows are among the stored ones
        held, kept = xp.asarray(sums[stored]), xp.asarray(stored)
        for sign in (1.0, -1.0):
            want = half_of(unfold(sums.T, box, sign), box)
            got = completed_rows(held, xp.asarray(at), kept, box, sign, xp)
            np.testing.assert_array_equal(to_host(got), want[:, rows])
            np.testing.assert_array_equal(to_host(complete_plane(held.T, kept, box, sign, xp)), want[:, stored])
    with pytest.raises(ValueError, match="not the 35 stored"):  # sums of other rows: refused
        complete_plane(xp.asarray(sums.T), xp.asarray(stored[:35]), box, 1.0, xp)


def test_subspace_angle_is_the_rotation_between_the_planes(xp):
    """span{e1, e2} against span{e1, cos θ e2 + sin θ e3}, scaled and in another order: θ."""
    rng = np.random.default_rng(3)
    e = np.linalg.qr(rng.normal(size=(8**3, 3)))[0].T.reshape(3, 8, 8, 8)
    for theta in (0.3, 12.0, 70.0):
        t = np.radians(theta)
        old = np.stack([e[0], e[1]])
        new = np.stack([5 * (np.cos(t) * e[1] + np.sin(t) * e[2]), -2 * e[0]])
        assert subspace_angle_deg(xp.asarray(old), xp.asarray(new), xp) == pytest.approx(theta, abs=1e-9)


def _full_inverse(spectrum):
    """The real part of the full inverse FFT of a centred spectrum (NumPy): the reference."""
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(spectrum))).real


def test_half_spectrum_transforms_equal_the_full_ones(xp):
    """`half_spectrum` is the x ≥ D/2 half of the full centred FFT; `to_real` inverts it (for a volume
    with nothing on the kx = D/2 plane, which the half leaves out); `filter_real` is the filter
    applied to the full spectrum."""
    rng = np.random.default_rng(4)
    box = 12
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rng.normal(size=(box,) * 3))))
    spectrum[..., 0] = 0  # the kx = D/2 plane (its own mirror: the spectrum stays Hermitian)
    vol = _full_inverse(spectrum)
    filt = 1.0 / (1.0 + (radius_3d(box) / 0.2) ** 3)
    half = to_host(half_spectrum(xp.asarray(vol), xp))
    np.testing.assert_allclose(half, spectrum[..., box // 2 :], atol=1e-12)
    np.testing.assert_allclose(to_host(to_real(xp.asarray(half), xp)), vol, atol=1e-12)
    filtered = to_host(filter_real(xp.asarray(vol), xp.asarray(filt), xp))
    np.testing.assert_allclose(filtered, _full_inverse(spectrum * filt), atol=1e-12)


@pytest.mark.parametrize("epsilon", [1.0, 1e-4, 1e-9])
def test_gram_schmidt_is_q_of_the_qr_also_for_nearly_dependent_volumes(xp, epsilon):
    """Against NumPy's Householder QR (R's diagonal positive); the fourth volume is the third plus
    ε·noise (condition numbers from ~1 to ~1e9: past ~1e7 the Cholesky route is not orthonormal)."""
    rng = np.random.default_rng(9)
    volumes = rng.normal(size=(5, 12, 12, 12))
    volumes[3] = volumes[2] + epsilon * rng.normal(size=volumes[2].shape)
    got = to_host(gram_schmidt(xp.asarray(volumes), xp)).reshape(5, -1)
    np.testing.assert_allclose(got @ got.T, np.eye(5), atol=1e-12)
    q, r = np.linalg.qr(volumes.reshape(5, -1).T)
    np.testing.assert_allclose(got, (q * np.sign(np.diag(r))).T, atol=1e-6 if epsilon < 1e-6 else 1e-10)


def test_gram_schmidt_does_not_trust_a_cholesky_that_fails_quietly():
    """CuPy's Cholesky gives NaN where NumPy's raises (cuSOLVER's flag unchecked by default): the
    result is checked, and QR taken instead. NumPy with such a Cholesky stands in for CuPy."""
    from types import SimpleNamespace

    def cholesky(a):
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            return np.full_like(a, np.nan)

    linalg = SimpleNamespace(cholesky=cholesky, inv=np.linalg.inv, qr=np.linalg.qr)
    quiet = SimpleNamespace(
        **{n: getattr(np, n) for n in ("float64", "all", "abs", "eye", "where", "diag")}, linalg=linalg
    )
    rng = np.random.default_rng(9)
    volumes = rng.normal(size=(5, 12, 12, 12))
    volumes[3] = volumes[2] + 1e-9 * rng.normal(size=volumes[2].shape)
    q, r = np.linalg.qr(volumes.reshape(5, -1).T)
    np.testing.assert_allclose(gram_schmidt(volumes, quiet).reshape(5, -1), (q * np.sign(np.diag(r))).T, atol=1e-12)


def test_solve_components_equals_a_per_voxel_solve():
    """Random summed statistics on the whole half spectra, given to `solve_components` on the band's
    rows only: against each voxel's K×K system built on the full grid from all of them (the half
    unfolded, `tests.conftest.unfold`) and solved with `linalg.solve` (complex right-hand side),
    shell means over the full grid, the full inverse FFT and the gridding correction."""
    rng = np.random.default_rng(5)
    box, k, lam = 10, 3, 0.05
    pairs = pair_index(k)
    z = rng.normal(size=(half_rows(box), k, 4))
    full = z @ z.transpose(0, 2, 1)  # PSD per voxel
    stats = {  # sums on the half spectra
        "G": np.stack([full[:, a, b] for a, b in pairs], -1),
        "b": rng.normal(size=(half_rows(box), 2 * k)),
    }
    rows = band_rows(box)
    assert 0.4 < len(rows) / half_rows(box) < 0.6
    got = solve_components({name: sums[rows] for name, sums in stats.items()}, box, k, lam)
    g = unfold(stats["G"].T, box, 1.0)
    matrices = np.zeros((box**3, k, k))
    for c, (a, b) in enumerate(pairs):
        matrices[:, a, b] = matrices[:, b, a] = g[c]
    rhs = unfold(stats["b"][:, 0::2].T, box, 1.0) + 1j * unfold(stats["b"][:, 1::2].T, box, -1.0)
    radius = radius_3d(box).ravel() * box
    shell = np.minimum(np.rint(radius).astype(int), box // 2)
    trace = np.trace(matrices, axis1=1, axis2=2) / k
    scale = (np.bincount(shell, weights=trace) / np.bincount(shell))[shell]
    inside = radius <= box // 2 - 1
    spectrum = np.zeros((k, box**3), complex)
    solved = np.linalg.solve(matrices + (lam * scale + 1e-30)[:, None, None] * np.eye(k), rhs.T[..., None])[..., 0]
    spectrum[:, inside] = solved[inside].T
    expected = np.stack([_full_inverse(s.reshape((box,) * 3)) for s in spectrum]) / gridding_correction(box)
    np.testing.assert_allclose(got, expected, atol=1e-10 * np.abs(expected).max())
    # sums of the whole half spectra: refused, not misread
    with pytest.raises(ValueError, match="rows, not the .* stored"):
        solve_components(stats, box, k, lam)


def test_solve_mean_equals_a_per_voxel_ratio():
    """Random mean sums on the whole half spectra, given to `solve_mean` on the band's rows only:
    against num / (den + τ) on the full grid from all of them (τ = `MEAN_TAU` × the shell's mean
    denominator over the full grid), zero outside the band, the full inverse FFT and the gridding
    correction."""
    from dva.em.mean import MEAN_TAU, solve_mean

    rng = np.random.default_rng(6)
    box = 12
    num, den = rng.normal(size=(2, half_rows(box))), rng.uniform(0.5, 2.0, (1, half_rows(box)))
    rows = band_rows(box)
    got = solve_mean(num[:, rows], den[0, rows], box)
    full_num = unfold(num[:1], box, 1.0)[0] + 1j * unfold(num[1:], box, -1.0)[0]
    full_den = unfold(den, box, 1.0)[0]
    radius = radius_3d(box).ravel() * box
    shell = np.minimum(np.rint(radius).astype(int), box // 2)
    tau = MEAN_TAU * (np.bincount(shell, weights=full_den) / np.bincount(shell))[shell]
    spectrum = np.where(radius <= box // 2 - 1, full_num / (full_den + tau), 0)
    expected = _full_inverse(spectrum.reshape((box,) * 3)) / gridding_correction(box)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="rows, not the .* stored"):
        solve_mean(num, den[0], box)


def test_completed_rows_refuse_stored_rows_without_their_mirrors():
    """Sums held on rows whose kx = 0 mirrors are missing cannot be completed: refused, not read
    from a neighbouring row."""
    box = 8
    stored = np.flatnonzero(np.arange(half_rows(box)) % (box // 2) == 0)[:-3]  # the plane, less three
    sums = np.ones((len(stored), 2))
    with pytest.raises(ValueError, match="mirror"):
        completed_rows(sums, np.arange(len(stored)), stored, box, 1.0, np)
