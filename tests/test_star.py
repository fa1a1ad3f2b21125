from __future__ import annotations

import numpy as np
import pytest
import starfile

from dva.errors import DvaFormatWarning, DvaInputError
from dva.io.star import read_star, write_star
from dva.ops.rotation import euler_to_matrix
from tests.conftest import load_pickle

PFCRT = "FinalRefinement-OriginalParticles-PfCRT.star"


def _read_pfcrt(drgn):
    with pytest.warns(DvaFormatWarning, match="rlnAmplitudeContrast"):
        return read_star(drgn / PFCRT)


def test_relion30_poses_and_shifts_equal_cryodrgn(drgn):
    t = _read_pfcrt(drgn)
    rot, trans = load_pickle(drgn / "pose.star.pkl")
    np.testing.assert_allclose(t["rotation"].values, rot, atol=1e-6)
    # cryoDRGN stores OriginX/Y divided by the box (300).
    np.testing.assert_allclose(t["shift_px"].values / 300, trans, atol=1e-6)
    assert t.attrs["has_poses"]


def test_relion30_ctf_equals_cryodrgn(drgn):
    t = _read_pfcrt(drgn)
    ref = load_pickle(drgn / "ctf1.pkl")  # D, Apix, DefocusU, DefocusV, angle°, kV, Cs, Q0, phase°
    ours = np.stack(
        [
            t["pixel_size_A"],
            t["defocus_u_A"],
            t["defocus_v_A"],
            np.rad2deg(t["defocus_angle_rad"]),
            t["voltage_kV"],
            t["cs_mm"],
            t["amp_contrast"],
            np.rad2deg(t["phase_shift_rad"]),
        ],
        -1,
    )
    np.testing.assert_allclose(ours, ref[:, 1:], rtol=1e-6)
    np.testing.assert_array_equal(t["halfset"].values, [1, 0, 1, 1, 1])  # rlnRandomSubset 2 1 2 2 2


def test_relion31_spot_values_and_block_order(drgn):
    a = read_star(drgn / "relion31.star")
    b = read_star(drgn / "relion31.v2.star")
    for name in set(a.data_vars) - {"uid"}:  # uids hash the file path
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a["pixel_size_A"].values[0] == 2.806
    np.testing.assert_allclose(a["shift_px"].values[0], [0.006887, -0.230527], atol=1e-6)
    np.testing.assert_allclose(
        a["rotation"].values[0],
        [[0.819418, -0.100807, 0.564262], [-0.532881, 0.228689, 0.814702], [-0.211169, -0.968266, 0.133674]],
        atol=2e-6,
    )
    assert a["image_size"].values[0] == 256
    assert a.attrs["stacks"] == [str(drgn / "relion31.mrcs")]
    np.testing.assert_array_equal(a["stack_index"].values, np.arange(5))
    np.testing.assert_array_equal(a["halfset"].values, 0)  # rlnRandomSubset 1 everywhere


def test_six_optics_groups_lookup(drgn):
    path = drgn / "relion31.6opticsgroups.star"
    t = read_star(path)
    raw = starfile.read(path)
    optics = raw["optics"].set_index("rlnOpticsGroup")
    group = raw["particles"]["rlnOpticsGroup"].to_numpy()
    assert t.sizes["particle"] == 139
    np.testing.assert_array_equal(t["optics_group"].values, group)
    np.testing.assert_allclose(t["pixel_size_A"].values, optics.loc[group, "rlnImagePixelSize"].to_numpy())
    np.testing.assert_allclose(t["cs_mm"].values, optics.loc[group, "rlnSphericalAberration"].to_numpy())
    shift_A = raw["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(t["shift_px"].values * t["pixel_size_A"].values[:, None], shift_A)


def test_relion5_with_datadir_and_column_order(drgn):
    t = read_star(drgn / "relion5.star", datadir=drgn / "toy_datadir")
    raw = starfile.read(drgn / "relion5.star")["particles"]
    assert sorted(t.attrs["stacks"]) == [
        str(drgn / "toy_datadir" / n) for n in ("toy_images_a.mrcs", "toy_images_b.mrcs")
    ]
    ref = euler_to_matrix(raw["rlnAngleRot"], raw["rlnAngleTilt"], raw["rlnAnglePsi"])
    np.testing.assert_allclose(t["rotation"].values, ref)
    np.testing.assert_array_equal(t["stack_index"].values, raw["rlnImageName"].str.split("@").str[0].astype(int) - 1)


def test_star_without_particle_table(formats):
    with pytest.raises(DvaInputError, match="postprocess.star: no particle table"):
        read_star(formats / "starfile-teamtomo" / "postprocess.star")


def test_write_read_round_trip_carries_columns(drgn, tmp_path):
    t = read_star(drgn / "relion31.star")
    out = tmp_path / "out.star"
    write_star(out, t, extra_columns={"dvaComponent0": np.arange(5.0)})
    back = read_star(out)
    for name in (
        "rotation",
        "shift_px",
        "defocus_u_A",
        "defocus_v_A",
        "defocus_angle_rad",
        "voltage_kV",
        "cs_mm",
        "amp_contrast",
        "pixel_size_A",
        "image_size",
        "halfset",
        "stack_index",
        "optics_group",
        "phase_shift_rad",
        "ctf_scale",
        "bfactor_A2",
    ):
        np.testing.assert_allclose(back[name].values, t[name].values, atol=1e-6, err_msg=name)
    assert back.attrs["stacks"] == t.attrs["stacks"]
    raw_in, raw_out = starfile.read(drgn / "relion31.star"), starfile.read(out)
    for col in raw_in["particles"].columns:
        if col not in ("rlnImageName",):
            assert col in raw_out["particles"].columns, col
    np.testing.assert_array_equal(raw_out["particles"]["rlnCoordinateX"], raw_in["particles"]["rlnCoordinateX"])
    np.testing.assert_array_equal(raw_out["particles"]["rlnMicrographName"], raw_in["particles"]["rlnMicrographName"])
    assert raw_out["optics"]["rlnMicrographOriginalPixelSize"].iloc[0] == 1.403
    np.testing.assert_array_equal(raw_out["particles"]["dvaComponent0"], np.arange(5.0))


def test_relion30_written_as_relion31(drgn, tmp_path):
    t = _read_pfcrt(drgn)
    # RELION 3.0 has no rlnImageSize: it comes from the stack, which this fixture lacks.
    with pytest.raises(DvaInputError, match="PfCRT.mrcs: image stack not found"):
        write_star(tmp_path / "p.star", t)
    t["image_size"][:] = 300
    write_star(tmp_path / "p.star", t)
    raw = starfile.read(tmp_path / "p.star")
    assert set(raw) == {"optics", "particles"}
    assert "rlnOriginX" not in raw["particles"].columns and "rlnMagnification" not in raw["particles"].columns
    back = read_star(tmp_path / "p.star")
    np.testing.assert_allclose(back["shift_px"].values, t["shift_px"].values, atol=1e-9)
    np.testing.assert_allclose(back["pixel_size_A"].values, 1.035)
