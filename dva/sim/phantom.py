"""A heterogeneous phantom of isotropic 3D Gaussian blobs with known truth.

The molecule has a rigid core, a domain that swings about a hinge (continuous change, one
latent value per particle in [-1, 1]) and a subunit present in only some particles (discrete
change). Volumes and projections are computed analytically from the blobs, so code that
slices Fourier transforms can be tested against something that shares no code with it.

Conventions (DESIGN.md §1): coordinates `(x, y, z)` in Å relative to the box centre, voxel
index i on every axis at `(i - box//2) · pixel_size_A`; volumes are `vol[z, y, x]`, images
`img[y, x]`; a map point p lands at image position `(A·p)_xy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dva.ops import masks

_PARTICLE_BATCH = 256  # particles per vectorised step of `project_blobs`
_MASK_STATES = 33  # latent values whose union makes the mask
_MASK_THRESHOLD = 0.1  # fraction of the weakest blob's peak that counts as density


@dataclass(frozen=True)
class Phantom:
    """Blobs of a molecule at rest (latent 0, every subunit present).

    Attributes
    ----------
    centres_A : `(b, 3)` blob centres (x, y, z) in Å relative to the box centre.
    sigma_A : `(b,)` blob standard deviations in Å.
    amplitude : `(b,)` peak densities.
    moving : `(b,)` bool, blobs of the domain that turns by `latent · max_angle_rad`
        (right-handed) about the line through `pivot_A` along `axis`.
    optional : `(b,)` bool, blobs of the subunit present in only some particles; disjoint
        from `moving`.
    pivot_A : `(3,)` a point on the hinge axis, Å.
    axis : `(3,)` unit vector of the hinge axis.
    max_angle_rad : rotation of the moving domain at latent ±1, radians.
    box : box size in pixels.
    pixel_size_A : pixel size in Å.
    """

    centres_A: np.ndarray
    sigma_A: np.ndarray
    amplitude: np.ndarray
    moving: np.ndarray
    optional: np.ndarray
    pivot_A: np.ndarray
    axis: np.ndarray
    max_angle_rad: float
    box: int
    pixel_size_A: float

    def __post_init__(self) -> None:
        if np.any(self.moving & self.optional):
            raise ValueError("Phantom: a blob cannot be both moving and optional")


def _scatter(
    rng: np.random.Generator,
    count: int,
    centre: np.ndarray,
    semi_axes: np.ndarray,
    min_dist: float,
    taken: np.ndarray,
) -> np.ndarray:
    """`(count, 3)` points uniform in an ellipsoid, `min_dist` apart and from `taken`."""
    points = list(taken)
    new: list[np.ndarray] = []
    for _ in range(10_000):
        u = rng.uniform(-1.0, 1.0, 3)
        if u @ u > 1.0:
            continue
        p = centre + u * semi_axes
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
            new.append(p)
            if len(new) == count:
                return np.array(new)
    raise RuntimeError("make_phantom: could not place the blobs; this is a bug")


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def make_phantom(box: int, pixel_size_A: float, rng: np.random.Generator) -> Phantom:
    """A random compact molecule: 12–20 core blobs, a hinged domain of 4–6, a subunit of 3–4.

    Sizes scale with the box edge `L = box · pixel_size_A`: every blob centre stays within
    `0.27 L` of the box centre at every latent value; blob sigmas are 1.5 to 3 pixels
    (at most `0.07 · box` pixels); the hinge turns by 25–35° at latent ±1.
    """
    edge = box * pixel_size_A
    sigma_px_max = min(3.0, 0.07 * box)
    core = _scatter(
        rng,
        int(rng.integers(12, 21)),
        np.zeros(3),
        np.array([0.16, 0.13, 0.10]) * edge,
        0.06 * edge,
        np.empty((0, 3)),
    )
    side = _random_unit(rng)
    axis = np.cross(side, _random_unit(rng))
    axis /= np.linalg.norm(axis)
    domain = _scatter(
        rng,
        int(rng.integers(4, 7)),
        0.21 * edge * side,
        np.full(3, 0.06 * edge),
        0.045 * edge,
        core,
    )
    other = _random_unit(rng)
    while other @ side > -0.2:
        other = _random_unit(rng)
    subunit = _scatter(
        rng,
        int(rng.integers(3, 5)),
        0.21 * edge * other,
        np.full(3, 0.05 * edge),
        0.045 * edge,
        np.concatenate([core, domain]),
    )
    sizes = np.array([len(core), len(domain), len(subunit)])
    kind = np.repeat(np.arange(3), sizes)
    b = int(sizes.sum())
    return Phantom(
        centres_A=np.concatenate([core, domain, subunit]),
        sigma_A=rng.uniform(1.5, max(1.5, sigma_px_max), b) * pixel_size_A,
        amplitude=rng.uniform(0.7, 1.0, b),
        moving=kind == 1,
        optional=kind == 2,
        pivot_A=0.12 * edge * side,
        axis=axis,
        max_angle_rad=float(np.deg2rad(rng.uniform(25.0, 35.0))),
        box=box,
        pixel_size_A=pixel_size_A,
    )


def blob_state(phantom: Phantom, latent: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blob centres and amplitudes of `n` particles.

    Parameters
    ----------
    phantom : the molecule.
    latent : `(n,)` hinge coordinate in [-1, 1]; the moving domain turns by
        `latent · max_angle_rad` about the hinge.
    present : `(n,)` bool, whether the optional subunit is there.

    Returns
    -------
    centres_A : `(n, b, 3)` blob centres (x, y, z) in Å.
    amplitude : `(n, b)` peak densities, 0 for optional blobs where absent.
    """
    latent = np.asarray(latent, dtype=np.float64).reshape(-1)
    present = np.asarray(present, dtype=bool).reshape(-1)
    angle = (latent * phantom.max_angle_rad)[:, None, None]
    n_vec = phantom.axis
    rel = phantom.centres_A[phantom.moving] - phantom.pivot_A
    turned = (
        rel * np.cos(angle)
        + np.cross(n_vec, rel) * np.sin(angle)
        + np.outer(rel @ n_vec, n_vec) * (1.0 - np.cos(angle))
    )
    centres = np.repeat(phantom.centres_A[None], len(latent), axis=0)
    centres[:, phantom.moving] = phantom.pivot_A + turned
    amplitude = np.where(phantom.optional & ~present[:, None], 0.0, phantom.amplitude)
    return centres, amplitude


def _grid_px(box: int) -> np.ndarray:
    return np.arange(box, dtype=np.float64) - box // 2


def render_volume(
    centres_A: np.ndarray,
    sigma_A: np.ndarray,
    amplitude: np.ndarray,
    box: int,
    pixel_size_A: float,
) -> np.ndarray:
    """Sample `Σ amplitude · exp(-|r - c|² / 2σ²)` on the voxel grid.

    Parameters
    ----------
    centres_A : `(b, 3)` blob centres (x, y, z) in Å relative to the box centre.
    sigma_A : `(b,)` blob standard deviations in Å.
    amplitude : `(b,)` peak densities.
    box, pixel_size_A : grid size in pixels and spacing in Å.

    Returns
    -------
    `(box, box, box)` float64 volume `vol[z, y, x]`, density per voxel (peak value, not
    normalised). Memory of the temporaries is `O(b · box²)`.
    """
    r = _grid_px(box) * pixel_size_A
    centres_A = np.asarray(centres_A, dtype=np.float64)
    inv = 1.0 / (2.0 * np.asarray(sigma_A, dtype=np.float64) ** 2)
    gx, gy, gz = (np.exp(-((r - centres_A[:, i, None]) ** 2) * inv[:, None]) for i in range(3))
    zy = (gz[:, :, None] * gy[:, None, :]).reshape(len(inv), box * box)
    return (zy.T @ (np.asarray(amplitude, dtype=np.float64)[:, None] * gx)).reshape(box, box, box)


def project_blobs(
    centres_A: np.ndarray,
    sigma_A: np.ndarray,
    amplitude: np.ndarray,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    box: int,
    pixel_size_A: float,
) -> np.ndarray:
    """Exact projections `img(x, y) = ∫ V(Aᵀ(x, y, z)) dz` of blob molecules, shifted.

    A blob projects to a 2D Gaussian of the same sigma at `(A·c)_xy` with peak
    `amplitude · √(2π) · σ / pixel_size_A`, so an image equals the `render_volume` of the
    rotated molecule summed along z (density · pixels).

    Parameters
    ----------
    centres_A : `(n, b, 3)` blob centres (x, y, z) in Å, per particle.
    sigma_A : `(b,)` blob standard deviations in Å.
    amplitude : `(n, b)` peak densities, per particle.
    rotations : `(n, 3, 3)` RELION matrices A.
    shifts_px : `(n, 2)` shifts t (x, y) in pixels that centre the stored image,
        `centred(r) = stored(r - t)`: a blob at p in the centred image is at `p - t` here.
    box, pixel_size_A : image size in pixels and pixel size in Å.

    Returns
    -------
    `(n, box, box)` float32 stored images `img[y, x]`, pixel j at `j - box//2`.
    """
    centres_A = np.asarray(centres_A, dtype=np.float64)
    rotations = np.asarray(rotations, dtype=np.float64)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    sigma_px = np.asarray(sigma_A, dtype=np.float64) / pixel_size_A
    peak = np.asarray(amplitude, dtype=np.float64) * np.sqrt(2 * np.pi) * sigma_px
    inv = (1.0 / (2.0 * sigma_px**2))[None, :, None]
    grid = _grid_px(box)
    n = len(rotations)
    out = np.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, _PARTICLE_BATCH):
        sel = slice(s, s + _PARTICLE_BATCH)
        rotated = np.einsum("nij,nbj->nbi", rotations[sel, :2], centres_A[sel]) / pixel_size_A
        pos = rotated - shifts_px[sel, None, :]
        gx = np.exp(-((grid - pos[..., 0, None]) ** 2) * inv)
        gy = np.exp(-((grid - pos[..., 1, None]) ** 2) * inv) * peak[sel, :, None]
        out[sel] = np.swapaxes(gy, 1, 2) @ gx
    return out


def true_mean_and_components(
    phantom: Phantom,
    p_present: float,
    k: int,
    n_samples: int = 25,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and top-k eigenvectors of the covariance of the phantom's volumes.

    Latent ~ Uniform(-1, 1) and present ~ Bernoulli(p_present), independently. With
    `V = M(latent) + present · S` (core and hinged domain M, subunit S, which does not move),
    `Cov V = Cov M + p(1 - p) S Sᵀ`; the expectation over the latent is a Gauss–Legendre
    quadrature with `n_samples` nodes, so the result is deterministic, and the eigenvectors
    come from the Gram matrix of the `n_samples + 1` weighted centred volumes (float64,
    `(n_samples + 1) · box³ · 8` bytes).

    Parameters
    ----------
    phantom : the molecule; volumes are `phantom.box`³ at `phantom.pixel_size_A`.
    p_present : probability that the optional subunit is there.
    k : number of components, at most `n_samples + 1`.
    n_samples : quadrature nodes over the latent; 25 is exact to rounding at box 128.

    Returns
    -------
    mean : `(D, D, D)` mean volume `vol[z, y, x]`.
    components : `(k, D, D, D)` orthonormal (unit L2 norm over voxels), largest variance
        first, each signed so that its largest-|value| voxel is positive.
    variances : `(k,)` eigenvalues of the covariance (density² summed over voxels).
    variance_fraction : `(k,)` eigenvalue over the total variance (trace of the covariance).
    """
    if not 1 <= k <= n_samples + 1:
        raise ValueError(f"k must be in [1, n_samples + 1 = {n_samples + 1}], got {k}")
    box, px = phantom.box, phantom.pixel_size_A
    nodes, weights = np.polynomial.legendre.leggauss(n_samples)
    weights = weights / 2.0  # density of Uniform(-1, 1)
    centres, amplitude = blob_state(phantom, nodes, np.zeros(n_samples, dtype=bool))
    rows = np.empty((n_samples + 1, box**3))
    for i in range(n_samples):
        rows[i] = render_volume(centres[i], phantom.sigma_A, amplitude[i], box, px).ravel()
    mean_m = weights @ rows[:-1]
    opt = phantom.optional
    subunit = render_volume(phantom.centres_A[opt], phantom.sigma_A[opt], phantom.amplitude[opt], box, px).ravel()
    rows[:-1] -= mean_m
    rows[:-1] *= np.sqrt(weights)[:, None]
    rows[-1] = np.sqrt(p_present * (1.0 - p_present)) * subunit
    gram = rows @ rows.T
    eigval, eigvec = np.linalg.eigh(gram)
    order = np.argsort(eigval)[::-1][:k]
    variances = eigval[order]
    components = (eigvec[:, order].T @ rows) / np.sqrt(variances)[:, None]
    components /= np.linalg.norm(components, axis=1, keepdims=True)
    peak = components[np.arange(k), np.argmax(np.abs(components), axis=1)]
    components *= np.sign(peak)[:, None]
    mean = (mean_m + p_present * subunit).reshape(box, box, box)
    fraction = variances / np.trace(gram)
    return mean, components.reshape(k, box, box, box), variances, fraction


def soft_mask(phantom: Phantom, p_present: float, *, dilate_px: float = 3, soft_px: float = 3) -> np.ndarray:
    """Soft mask covering the molecule in every state.

    The support is the union over latent values in [-1, 1] (with the subunit when
    `p_present > 0`) of the voxels whose density exceeds 10% of the weakest blob's peak.
    The mask is 1 within `dilate_px` pixels of the support and falls to 0 with a
    raised-cosine edge `soft_px` pixels wide.

    Returns
    -------
    `(D, D, D)` float32 mask `vol[z, y, x]` with values in [0, 1].
    """
    latent = np.linspace(-1.0, 1.0, _MASK_STATES)
    centres, amplitude = blob_state(phantom, latent, np.full(_MASK_STATES, p_present > 0))
    box, px = phantom.box, phantom.pixel_size_A
    density = np.zeros((box, box, box))
    for c, a in zip(centres, amplitude, strict=True):
        np.maximum(density, render_volume(c, phantom.sigma_A, a, box, px), out=density)
    threshold = _MASK_THRESHOLD * phantom.amplitude[phantom.amplitude > 0].min()
    return masks.soft_mask(density, threshold, dilate_px=dilate_px, soft_px=soft_px)
