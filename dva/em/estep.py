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
from dva.ops.slice import gather, slice_stencil, view_order

BATCH = 128  # particles per vectorised step on CPU workers (their cache; 32 and 16 were no faster)
GPU_POINTS = 2**22  # samples per vectorised step on GPU workers (~1 GB of temporaries at K = 3)
ALPHA_RANGE = (0.1, 10.0)  # optimal per-particle scales are clipped to this range


def batch_size(pixels: int, xp: ModuleType = np) -> int:
    """Particles per vectorised step for images of `pixels` samples: `BATCH` on CPU workers; on GPU
    workers as many as make `GPU_POINTS` samples (666 at box 128), so that each of the step's few
    dozen kernel launches has work to do (unmeasured on a GPU)."""
    return BATCH if xp is np else max(1, GPU_POINTS // max(pixels, 1))


def pair_index(k: int) -> list[tuple[int, int]]:
    """The (a, b) pairs with a ≤ b of a symmetric K×K matrix, in the order of the G channels."""
    return [(a, b) for a in range(k) for b in range(a, k)]


def add_statistics(sums, index, weights, ctf, half_weight, residual, za, xp: ModuleType = np) -> None:
    """Insert the M-step channels of n particles' samples `(n, P)` into `sums (D³, C)` float64, in
    place: K(K+1)/2 of `c²·W·α²z_a z_b` (a ≤ b, `pair_index`), then `c·W·Re(r)·αz_a` and
    `c·W·Im(r)·αz_a` per mode a. `ctf` c, `half_weight` W `(P,)`, `residual` r, `za` αz `(n, K)`,
    stencil `(n·P, 8)`. Made and inserted in one compiled loop (no `(n·P, C)` array of them)."""
    if xp is np:
        from dva.ops.cpu import insert_statistics_cpu

        insert_statistics_cpu(index, weights, ctf, half_weight, residual, za, sums)
    else:
        from dva.ops.kernels import insert_statistics_cuda

        insert_statistics_cuda(index, weights, ctf, half_weight, residual, za, sums)


def slice_gram(s, weight, y, xp: ModuleType = np) -> tuple:
    """`Re(SᵢᴴWSᵢ)` `(n, K+1, K+1)` and `Re(SᵢᴴWyᵢ)` `(n, K+1)` in float64 of n particles' slices
    `s (n, P, K+1)`, noise weights `W (P,)` float64 and data `y (n, P)`: in one compiled pass on CPU
    workers, as batched complex128 GEMMs on GPU workers (the slices times float64 weights)."""
    if xp is np:
        from dva.ops.cpu import gram_cpu

        return gram_cpu(s, weight, y)
    ws = s * weight[None, :, None]
    gram = (xp.conj(s).transpose(0, 2, 1) @ ws).real.astype(xp.float64)  # batched GEMM, not einsum
    return gram, (xp.conj(ws).transpose(0, 2, 1) @ y[..., None])[..., 0].real.astype(xp.float64)


def em_statistics(
    chunk: Chunk, model: Model, band: Band, *, statistics: bool = True, keep=None, xp: ModuleType = np
) -> dict:
    """E-step for the chunk's particles and, when `statistics`, its partial M-step sums.

    `keep (n,)` bool restricts everything to those particles. Returns `particles` (how many),
    `z (n, K)`, `alpha (n,)`, `zsum` (Σ_i z_i), `zcov` (Σ_i (G_i + ridge)⁻¹/α_i², the noise
    covariance of the coordinates summed), `objective` (Σ W|residual|²), `baseline` (the same after the
    mean alone, so `1 − objective/baseline` is the fraction the components explain), `power`/`count` per shell of the
    residual and, with `statistics`, `G (D³, K(K+1)/2)` and `b (D³, 2K)` (re, im per mode) in float64,
    voxel-major (each voxel's channels side by side, as the insertion adds them).
    """
    if keep is not None:  # only these particles (a half-set)
        chosen = xp.flatnonzero(xp.asarray(keep))
        chunk = Chunk(chunk.y[chosen], chunk.ctf[chosen], chunk.rotation[chosen], chunk.scale[chosen])
    box, k = band.box, model.modes
    weight = model.noise_inverse[band.shell] * band.multiplicity  # (P,): W, counting both halves
    lo_px, hi_px = model.pixels or (0, len(band.flat))
    inner = slice(lo_px, hi_px)
    outer = [part for part in (slice(0, lo_px), slice(hi_px, len(band.flat))) if part.stop > part.start]
    mean_volume = xp.ascontiguousarray(model.volumes[:, :1]) if outer else None
    pairs = pair_index(k)
    out = {
        "z": [],
        "alpha": [],
        "objective": 0.0,
        "baseline": 0.0,
        "zcov": xp.zeros((k, k)),
        "particles": len(chunk.y),
        "zsum": xp.zeros(k),
        "alpha_moments": xp.zeros(3),
        "power": xp.zeros(band.shells),
        "count": band.shell_counts(len(chunk.y), xp),
    }
    if statistics:
        sums = xp.zeros((box**3, len(pairs) + 2 * k))
    batch = batch_size(len(band.flat), xp)
    order = view_order(chunk.rotation, batch, xp)  # batches of nearby slice planes (cache locality)
    for lo in range(0, len(chunk.y), batch):
        sl = order[lo : lo + batch]
        y, c = chunk.y[sl] * model.data_sign, chunk.ctf[sl]
        n = len(y)
        stencil = slice_stencil(chunk.rotation[sl], band.kx, band.ky, box, xp)
        full_index, full_weights = (a.reshape(n, -1, 8) for a in stencil)
        index, weights = full_index[:, inner].reshape(-1, 8), full_weights[:, inner].reshape(-1, 8)
        s = gather(model.volumes, index, weights, xp).reshape(n, -1, k + 1) * c[:, inner, None]  # (n, inner, K+1)
        comps = s[..., 1:]
        gram, proj = slice_gram(s, weight[inner], y[:, inner], xp)
        s0 = xp.empty(y.shape, dtype=s.dtype)  # the mean's slice over the whole band
        s0[:, inner] = s[..., 0]
        for part in outer:
            mean = gather(mean_volume, full_index[:, part].reshape(-1, 8), full_weights[:, part].reshape(-1, 8), xp)
            s0[:, part] = mean.reshape(n, -1) * c[:, part]
        if outer:  # the mean's terms over the whole band
            gram[:, 0, 0] = ((xp.abs(s0) ** 2) * weight).sum(-1)
            proj[:, 0] = (xp.conj(s0) * weight * y).real.sum(-1)
        g = gram[:, 1:, 1:]
        ridge = (model.eps * xp.trace(g, axis1=1, axis2=2) / k + 1e-30)[:, None, None] * xp.eye(k)
        if model.scale == "optimal":
            # α and u = α·z fitted together (y ≈ α s_0 + Σ u_k s_k is linear in both), so the
            # scale does not soak up variability that projects onto the mean; then shrunk towards
            # the population by its noise (empirical Bayes, `Model.scale_prior`).
            joint = gram.copy()
            joint[:, 1:, 1:] += ridge
            joint_inverse = xp.linalg.inv(joint)
            alpha_ls = xp.einsum("nl,nl->n", joint_inverse[:, 0], proj)
            alpha_var = joint_inverse[:, 0, 0]
            out["alpha_moments"] += xp.stack([alpha_ls.sum(), (alpha_ls**2).sum(), alpha_var.sum()])
            alpha = alpha_ls
            if model.scale_prior is not None:
                centre, spread = model.scale_prior
                alpha = centre + (alpha_ls - centre) * (spread / (spread + alpha_var))
            alpha = xp.clip(alpha, *ALPHA_RANGE)
        elif model.scale == "input":
            alpha = chunk.scale[sl]
        else:
            alpha = xp.ones(n)
        r = y - alpha[:, None] * s0
        bvec = proj[:, 1:] - alpha[:, None] * gram[:, 1:, 0]  # Re(S_iᴴ W r_i)
        inverse = xp.linalg.inv(g + ridge)
        z = xp.einsum("nkl,nl->nk", inverse, bvec) / alpha[:, None]
        out["zcov"] += (inverse / (alpha**2)[:, None, None]).sum(0)
        out["zsum"] += z.sum(0)
        resid = r.copy()
        resid[:, inner] -= alpha[:, None] * (comps @ z.astype(comps.dtype)[..., None])[..., 0]
        res2 = xp.abs(resid) ** 2 * band.multiplicity
        out["objective"] += float((res2 * model.noise_inverse[band.shell]).sum())
        out["baseline"] += float(((xp.abs(r) ** 2) * weight).sum())
        out["power"] += xp.bincount(
            xp.broadcast_to(band.shell, res2.shape).ravel(), weights=res2.ravel(), minlength=band.shells
        )
        out["z"].append(z)
        out["alpha"].append(alpha)
        if statistics:  # W/2: each sample stands for itself and its mate (`symmetrize`)
            add_statistics(sums, index, weights, c[:, inner], weight[inner] / 2, r[:, inner], alpha[:, None] * z, xp)
    if statistics:
        out["G"], out["b"] = sums[:, : len(pairs)], sums[:, len(pairs) :]
    for name, empty in (("z", (0, k)), ("alpha", (0,))):  # back to the chunk's order
        done = xp.concatenate(out[name]) if out[name] else xp.zeros(empty)
        out[name] = xp.empty_like(done)
        out[name][order] = done
    return out
