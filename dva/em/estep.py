"""One pass of an EM iteration over a chunk: E-step per particle and M-step statistics (DESIGN.md §2).

With slices `s_ik = c_i · S_i V_k` (k = 0..K) and noise weights W = 1/σ²:
`G_i = Re(S_iᴴ W S_i)`, `b_i = Re(S_iᴴ W (y_i − α_i s_i0))`, `z_i = (G_i + ε·tr(G_i)/K·I)⁻¹ b_i / α_i`,
where the optimal α_i is the least-squares scale of s_i0 fitted together with the components;
then per sample the M-step channels `α² c² W z_a z_b` (a ≤ b) and `α c W r z_a` are inserted.
The mean is sliced over the whole band (the scale, the residual power and the objective use it);
the components only over `Model.pixels`, the pixels their filter leaves above its tolerance.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from dva.em.chunk import Band, Chunk
from dva.em.model import Model
from dva.ops.slice import compact_rows, half_rows, view_order

# Particles per run of nearby slice planes in `view_order` (CPU caches): with 32 instead of 128 the
# insert pass ran 14-23% faster at box 128 (2,048-8,192 particles), 7% at box 256 (512), the same
# at box 64; 16 and 8 were no faster.
ORDER_RUN = 32
ALPHA_RANGE = (0.1, 10.0)  # optimal per-particle scales are clipped to this range


def mstep_channels(modes: int) -> int:
    """Channels of a task's M-step sums: G's K(K+1)/2 pairs (`pair_index`), then b's K real and K
    imaginary parts."""
    return modes * (modes + 1) // 2 + 2 * modes


def pair_index(k: int) -> list[tuple[int, int]]:
    """The (a, b) pairs with a ≤ b of a symmetric K×K matrix, in the order of the G channels."""
    return [(a, b) for a in range(k) for b in range(a, k)]


def _kernel_arguments(chunk: Chunk, model: Model, band: Band, xp: ModuleType) -> tuple:
    """The arguments the two passes' kernels share: poses, data, CTFs, volumes (re, im side by
    side), frequencies, noise weights W `(P,)` (both halves counted), the components' pixels
    `(P,)` uint8, box and the data sign."""
    box = band.box
    if model.volumes.shape[0] != half_rows(box):
        raise ValueError(
            f"volumes have {model.volumes.shape[0]} rows, not the {half_rows(box)} of box {box}'s half spectra"
        )
    inner = xp.ones(len(band.flat), xp.uint8) if model.pixels is None else xp.asarray(model.pixels, dtype=xp.uint8)
    volumes = xp.ascontiguousarray(model.volumes, dtype=xp.complex64)
    return (
        xp.ascontiguousarray(chunk.rotation, dtype=xp.float64),
        xp.ascontiguousarray(chunk.y, dtype=xp.complex64),
        xp.ascontiguousarray(chunk.ctf, dtype=xp.float32),
        volumes.view(xp.float32),
        xp.ascontiguousarray(band.kx, dtype=xp.float64),
        xp.ascontiguousarray(band.ky, dtype=xp.float64),
        xp.ascontiguousarray(model.noise_inverse[band.shell] * band.multiplicity, dtype=xp.float64),
        inner,
        box,
        float(model.data_sign),
    )


def estep_sums(order, shared: tuple, xp: ModuleType = np) -> tuple:
    """First pass, per particle in `order`: `Re(SᵢᴴWSᵢ)` `(n, K+1, K+1)`, `Re(SᵢᴴWyᵢ)` `(n, K+1)` and
    `yᵢᴴWyᵢ` `(n,)` in float64, with slices `s_ik = c_i·S_i V_k` gathered on the fly (the mean over
    the whole band, the components over their pixels; `shared` from `_kernel_arguments`). One
    compiled kernel per backend; no stencil or slice stack is stored."""
    width = shared[3].shape[1] // 2
    if xp is np:
        from dva.ops.cpu import estep_sums_cpu

        out = estep_sums_cpu(order, *shared)
    else:
        from dva.ops.kernels import estep_sums_cuda

        out = estep_sums_cuda(order, *shared)
    out = out.sum(1)  # over the segments a GPU thread each summed
    square = width * width
    return out[:, :square].reshape(-1, width, width), out[:, square:-1], out[:, -1]


def estep_insert(order, shared: tuple, band: Band, alpha, z, sums, xp: ModuleType = np):
    """Second pass, per particle in `order`, with the slices gathered again: the residual power per
    shell `(n, shells)` (`|yᵢ − αᵢ(s_i0 + Σ z_ik s_ik)|²`, both halves counted) returned, and the
    M-step channels of each component pixel inserted into `sums (half_rows, C)` float64:
    K(K+1)/2 of `c²·W/2·α²z_a z_b` (a ≤ b, `pair_index`), then `c·W/2·Re(r)·αz_a` and
    `c·W/2·Im(r)·αz_a` per mode a, with r = y − α s_0 (W/2: each sample stands for itself and its
    mate, `complete_plane`)."""
    if sums.shape[0] != half_rows(band.box):  # the kernels do not check their indices
        raise ValueError(
            f"sums have {sums.shape[0]} rows, not the {half_rows(band.box)} of box {band.box}'s half spectra"
        )
    n = len(alpha)
    power = xp.zeros((n, band.shells))
    arguments = (
        order,
        *shared[:8],
        xp.ascontiguousarray(band.shell, dtype=xp.int32),
        xp.ascontiguousarray(band.multiplicity, dtype=xp.float64),
        *shared[8:],
        xp.ascontiguousarray(alpha, dtype=xp.float64),
        xp.ascontiguousarray(z, dtype=xp.float64),
        power,
        sums,
    )
    if xp is np:
        from dva.ops.cpu import estep_insert_cpu

        estep_insert_cpu(*arguments)
    else:
        from dva.ops.kernels import estep_insert_cuda

        estep_insert_cuda(*arguments)
    return power


def em_statistics(
    chunk: Chunk, model: Model, band: Band, *, statistics: bool = True, keep=None, xp: ModuleType = np
) -> dict:
    """E-step for the chunk's particles and, when `statistics`, its partial M-step sums.

    `keep (n,)` bool restricts everything to those particles. Returns `particles` (how many),
    `z (n, K)`, `alpha (n,)`, `zsum` (Σ_i z_i), `zcov` (Σ_i (G_i + ridge)⁻¹/α_i², the noise
    covariance of the coordinates summed), `baseline` (Σ W|residual|² after the mean alone) and, with
    `statistics`, `objective` (the same after the components too, so `1 − objective/baseline` is the
    fraction they explain), `power`/`count` per shell of the residual and `G (R, K(K+1)/2)`
    and `b (R, 2K)` (re, im per mode) in float64 on the band's R rows of the half spectra
    (`dva.ops.slice`, `Band.rows`), voxel-major (each voxel's channels side by side, as the
    insertion adds them).

    One compiled kernel's pass over all the chunk's particles, in an order of nearby slice planes
    (cache locality), then the small per-particle solves and, with `statistics`, a second pass.
    """
    if keep is not None:  # only these particles (a half-set)
        chosen = xp.flatnonzero(xp.asarray(keep))
        chunk = chunk.map(lambda a: a[chosen])
    k, n = model.modes, len(chunk.y)
    pairs = pair_index(k)
    shared = _kernel_arguments(chunk, model, band, xp)
    order = xp.ascontiguousarray(view_order(chunk.rotation, ORDER_RUN, xp), dtype=xp.int64)
    gram, proj, data = estep_sums(order, shared, xp)
    g = gram[:, 1:, 1:]
    ridge = (model.eps * xp.trace(g, axis1=1, axis2=2) / k + 1e-30)[:, None, None] * xp.eye(k)
    alpha_moments = xp.zeros(3)
    if model.scale == "optimal":
        # α and u = α·z fitted together (y ≈ α s_0 + Σ u_k s_k is linear in both), so the
        # scale does not soak up variability that projects onto the mean; then shrunk towards
        # the population by its noise (empirical Bayes, `Model.scale_prior`).
        joint = gram.copy()
        joint[:, 1:, 1:] += ridge
        joint_inverse = xp.linalg.inv(joint)
        alpha_ls = xp.einsum("nl,nl->n", joint_inverse[:, 0], proj)
        alpha_var = joint_inverse[:, 0, 0]
        alpha_moments = xp.stack([alpha_ls.sum(), (alpha_ls**2).sum(), alpha_var.sum()])
        alpha = alpha_ls
        if model.scale_prior is not None:
            centre, spread = model.scale_prior
            alpha = centre + (alpha_ls - centre) * (spread / (spread + alpha_var))
        alpha = xp.clip(alpha, *ALPHA_RANGE)
    elif model.scale == "input":
        alpha = xp.asarray(chunk.scale, dtype=xp.float64)
    else:
        alpha = xp.ones(n)
    bvec = proj[:, 1:] - alpha[:, None] * gram[:, 1:, 0]  # Re(S_iᴴ W r_i), r_i = y_i − α_i s_i0
    inverse = xp.linalg.inv(g + ridge)
    z = xp.einsum("nkl,nl->nk", inverse, bvec) / alpha[:, None]
    out = {
        "particles": n,
        "z": z,
        "alpha": alpha,
        "zsum": z.sum(0),
        "zcov": (inverse / (alpha**2)[:, None, None]).sum(0),
        "alpha_moments": alpha_moments,
        "baseline": float((data - 2 * alpha * proj[:, 0] + alpha**2 * gram[:, 0, 0]).sum()),  # Σ W|r|²
    }
    if statistics:
        sums = xp.zeros((half_rows(band.box), mstep_channels(k)))
        power = estep_insert(order, shared, band, alpha, z, sums, xp).sum(0)
        out["objective"] = float((power * model.noise_inverse).sum())  # Σ W|residual|², W = 1/σ² · multiplicity
        out["power"], out["count"] = power, band.shell_counts(n, xp)
        kept = compact_rows(sums, band.rows)
        out["G"], out["b"] = kept[:, : len(pairs)], kept[:, len(pairs) :]
    return out
