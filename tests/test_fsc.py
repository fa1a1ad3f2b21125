"""FSC against analytic cases."""

from __future__ import annotations

import numpy as np
import pytest

from dva.ops.fsc import fsc, resolution_A


def test_fsc_of_signal_plus_independent_noise_is_snr_over_one_plus_snr():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(48,) * 3)
    a = signal + rng.normal(size=signal.shape) * 0.5  # SNR 4 at every frequency: FSC = 4/5
    b = signal + rng.normal(size=signal.shape) * 0.5
    freq, curve = fsc(a, b, 2.0)
    assert freq[0] == pytest.approx(1 / 96) and len(curve) == 23
    np.testing.assert_allclose(curve[4:], 0.8, atol=0.03)  # inner shells have few voxels
    freq, same = fsc(a, a, 2.0)
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    _, unrelated = fsc(rng.normal(size=a.shape), rng.normal(size=a.shape), 2.0)
    assert np.abs(unrelated[4:]).max() < 0.1


def test_resolution_interpolates_the_crossing():
    freq = np.array([0.01, 0.02, 0.03, 0.04])
    assert resolution_A(freq, np.array([0.9, 0.5, 0.1, 0.0])) == pytest.approx(1 / (0.02 + 0.01 * 0.357 / 0.4))
    assert resolution_A(freq, np.array([0.9, 0.8, 0.7, 0.6])) == pytest.approx(25.0)  # never crosses
    assert resolution_A(freq, np.array([0.1, 0.8, 0.7, 0.6])) == float("inf")
