from __future__ import annotations

import numpy as np
from scipy import ndimage

from dva.ops.masks import distance_px, soft_mask
from tests.conftest import to_host


def test_distance_transform_matches_scipy_within_reach(xp):
    rng = np.random.default_rng(11)
    inside = rng.random((20, 22, 18)) > 0.995
    reach = 6
    ref = ndimage.distance_transform_edt(~inside)
    got = to_host(distance_px(xp.asarray(inside), reach, xp))
    near = ref <= reach
    np.testing.assert_allclose(got[near], ref[near], atol=1e-12)
    assert np.all(got[~near] > reach)


def test_soft_mask_threshold_dilate_and_raised_cosine(xp):
    vol = np.zeros((24, 24, 24))
    vol[10:14, 10:14, 10:14] = 1.0
    mask = to_host(soft_mask(xp.asarray(vol), 0.5, dilate_px=2, soft_px=4, xp=xp))
    dist = ndimage.distance_transform_edt(vol <= 0.5)  # independent reference
    expected = np.where(dist <= 2, 1.0, np.where(dist >= 6, 0.0, 0.5 * (1 + np.cos(np.pi * (dist - 2) / 4))))
    np.testing.assert_allclose(mask, expected, atol=1e-6)
    assert mask.dtype == np.float32
    hard = to_host(soft_mask(xp.asarray(vol), 0.5, xp=xp))
    np.testing.assert_array_equal(hard, (vol > 0.5).astype(np.float32))
