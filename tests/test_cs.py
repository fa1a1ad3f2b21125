from __future__ import annotations

import numpy as np
import pytest

from dva.errors import DvaInputError
from dva.io.cs import load_cs, read_cs, write_cs
from dva.io.star import read_star, write_star
from tests.conftest import load_pickle

P12 = "cryosparc_P12_J24_001_particles.cs"


def test_poses_and_shifts_equal_cryodrgn(drgn):
    t = read_cs(drgn / P12)
    rot, trans = load_pickle(drgn / "pose.cs.pkl")
    np.testing.assert_allclose(t["rotation"].values, rot, atol=1e-6)
    np.testing.assert_allclose(t["shift_px"].values / 180, trans, atol=1e-6)
    np.testing.assert_allclose(t["shift_px"].values[0] * 2.95, [33.4364, -5.3930], atol=1e-3)


def test_ctf_equals_cryodrgn(drgn):
    t = read_cs(drgn / P12)
    ref = load_pickle(drgn / "ctf2.pkl")  # D, Apix, DefocusU, DefocusV, angle°, kV, Cs, Q0, phase°
    ours = np.stack(
        [
            t["image_size"],
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
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    assert set(np.unique(t["halfset"].values)) == {0, 1}
    np.testing.assert_array_equal(t["data_sign"].values, -1)


def test_star_and_cs_of_the_same_particles_agree(drgn):
    s = read_star(drgn / "empiar_10076_7.star")
    c = read_cs(drgn / "empiar_10076_7.cs")
    for name in (
        "defocus_u_A",
        "defocus_v_A",
        "defocus_angle_rad",
        "voltage_kV",
        "cs_mm",
        "amp_contrast",
        "phase_shift_rad",
        "pixel_size_A",
        "stack_index",
        "shift_px",
    ):
        np.testing.assert_allclose(s[name].values, c[name].values, rtol=2e-6, atol=1e-6, err_msg=name)
    assert s.attrs["stacks"] == c.attrs["stacks"] == [str(drgn / "empiar_10076_7.mrc")]
    assert not s.attrs["has_poses"] and not c.attrs["has_poses"]
    # Only the sign differs: RELION has no record of it, CryoSPARC says -1.
    assert (s["data_sign"].values == 1).all() and (c["data_sign"].values == -1).all()


def test_cs_round_trip_keeps_every_field(drgn, tmp_path):
    t = read_cs(drgn / P12)
    write_cs(tmp_path / "out.cs", t)
    src, out = load_cs(drgn / P12), load_cs(tmp_path / "out.cs")
    for name in src.dtype.names:
        if name != "blob/path":  # resolved to where the stacks are looked for
            np.testing.assert_array_equal(out[name], src[name], err_msg=name)
    back = read_cs(tmp_path / "out.cs")
    np.testing.assert_allclose(back["rotation"].values, t["rotation"].values, atol=1e-6)
    assert back.attrs["stacks"] == t.attrs["stacks"]


def test_cs_to_star_and_back(drgn, tmp_path):
    t = read_cs(drgn / P12)
    write_star(tmp_path / "p.star", t)
    s = read_star(tmp_path / "p.star")
    for name in (
        "rotation",
        "shift_px",
        "defocus_u_A",
        "defocus_v_A",
        "defocus_angle_rad",
        "pixel_size_A",
        "halfset",
        "stack_index",
        "optics_group",
        "image_size",
    ):
        np.testing.assert_allclose(s[name].values, t[name].values, rtol=1e-6, atol=1e-6, err_msg=name)
    write_cs(tmp_path / "p.cs", s)
    c = read_cs(tmp_path / "p.cs")
    np.testing.assert_allclose(c["rotation"].values, t["rotation"].values, atol=1e-6)


def test_passthrough_joined_on_uid(drgn, tmp_path):
    full = load_cs(drgn / P12)
    main_fields = ["uid"] + [n for n in full.dtype.names if n.startswith("alignments3D/")]
    rest = ["uid"] + [n for n in full.dtype.names if n not in main_fields]
    order = np.random.default_rng(0).permutation(len(full))
    with open(tmp_path / "main.cs", "wb") as f:
        np.save(f, full[main_fields].copy())
    with open(tmp_path / "pass.cs", "wb") as f:
        np.save(f, np.asarray(full[rest])[order].copy())
    joined = read_cs(tmp_path / "main.cs", passthrough=tmp_path / "pass.cs", datadir=drgn)
    direct = read_cs(drgn / P12)
    for name in direct.data_vars:
        np.testing.assert_array_equal(joined[name].values, direct[name].values, err_msg=name)
    with open(tmp_path / "short.cs", "wb") as f:
        np.save(f, np.asarray(full[rest])[:10].copy())
    with pytest.raises(DvaInputError, match="short.cs: uid .* missing"):
        read_cs(tmp_path / "main.cs", passthrough=tmp_path / "short.cs")


def test_exported_prefix_and_2d_alignments(drgn):
    t = read_cs(drgn / "cryosparc_J2_particles_exported.cs")
    assert not t.attrs["has_poses"]  # 2D alignments are not poses
    assert all(">" not in s for s in t.attrs["stacks"])
    assert t.attrs["stacks"][0].endswith("J1/imported/000090334788266266069_18jam15b_0345_ali_DW.mrcs")


def test_zero_row_file_with_many_fields(formats):
    arr = load_cs(formats / "cryosparc-tools" / "4k_dataset.cs")
    assert len(arr) == 0 and "alignments3D/pose" in arr.dtype.names
    with pytest.raises(DvaInputError, match="4k_dataset.cs: field blob/path missing"):
        read_cs(formats / "cryosparc-tools" / "4k_dataset.cs")


def test_pickled_cs_is_refused(tmp_path):
    with open(tmp_path / "bad.cs", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DvaInputError, match="bad.cs: holds Python objects"):
        read_cs(tmp_path / "bad.cs")
