"""Low-rank factorization math on tensors only: truncated SVD, rank choice by spectral energy
or by a global weight budget, Tucker-2 and CP of convolution kernels (through tensorly).

Everything is computed in float64; callers cast the factors to the layer's dtype.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [out, in] = ``U diag(s) Vh``: U [out, k], s (k,) descending, Vh [k, in], k = min(out, in)."""
    w = w.detach().double()
    if w.shape[0] < w.shape[1]:                 # LAPACK is several times faster on tall matrices
        u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(w, full_matrices=False)


def low_rank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``w`` [out, in] as two factors (Eckart & Young 1936):
    ``second @ first`` with ``first = diag(sqrt s_r) Vh_r`` [rank, in] and
    ``second = U_r diag(sqrt s_r)`` [out, rank] (the singular values split evenly, so both
    factors have the same scale). Also returns all singular values s (min(out, in),).

    ``||w - second @ first||_F = sqrt(sum_{i >= rank} s_i^2)`` (the Eckart-Young bound).

    Raises ValueError when ``rank`` is not in [1, min(out, in)].
    """
    u, s, vh = svd(w)
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank {rank} is outside [1, {s.numel()}] for a {tuple(w.shape)} matrix")
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :], s


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest r with ``sum_{i<r} s_i^2 >= energy * sum s_i^2`` (s descending; r >= 1).

    ``energy`` in (0, 1]; a matrix of zeros gives 1.
    """
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(e, 0) / total
    # a relative tolerance so that energy 1.0 is reached despite rounding in the cumulative sum
    return min(int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1, s.numel())


def ranks_for_budget(spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks for several matrices sharing one weight ``budget``, keeping the most spectral energy.

    Each singular value ``i`` of matrix ``m`` costs ``costs[m]`` weights (in + out for a Linear)
    and keeps ``s_i^2 / sum s^2`` of that matrix's energy (normalized, so matrices of different
    scales compare). Values are taken in decreasing order of energy per weight while they fit in
    ``budget``; since ``s`` descends, each matrix gets a prefix. Every matrix keeps
    at least rank 1.
    """
    items = []
    for name, s in spectra.items():
        e = s.double().square()
        e = e / e.sum() if float(e.sum()) > 0 else torch.zeros_like(e)
        items += [(float(v) / costs[name], i, name) for i, v in enumerate(e.tolist())]
    ranks = {name: 1 for name in spectra}
    spent = sum(costs.values())
    for _, i, name in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        if i == 0:
            continue
        if spent + costs[name] > budget:
            continue                  # a cheaper matrix's value may still fit
        ranks[name] = max(ranks[name], i + 1)
        spent += costs[name]
    return ranks


def unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding of ``w``: [w.shape[mode], numel / w.shape[mode]], float64."""
    return w.detach().double().movedim(mode, 0).reshape(w.shape[mode], -1)


def _gram_eig(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of ``m m^T``: the squared singular values and
    left singular vectors of a wide ``m``, from a [rows, rows] problem instead of an SVD of ``m``."""
    vals, vecs = torch.linalg.eigh(m @ m.T)
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


def unfold_spectrum(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of ``w``'s mode-``mode`` unfolding, descending (through its Gram matrix:
    accurate to about 1e-8 of the largest, ample for energies and plots)."""
    return _gram_eig(unfold(w, mode))[0].sqrt()


def _tensorly():
    import tensorly  # optional: the lowrank extra; check_ready says so before any work
    return tensorly


def tucker2(w: torch.Tensor, rank_out: int, rank_in: int, iterations: int = 10
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a kernel ``w`` [C_out, C_in, k_h, k_w] over its two channel modes (HOOI from an
    HOSVD start, tensorly's ``partial_tucker``; Kim et al. 2016, eq. 4):
    ``w ~ core x_0 U_out x_1 U_in`` with core [rank_out, rank_in, k_h, k_w], U_out [C_out, rank_out],
    U_in [C_in, rank_in] (orthonormal columns). Deterministic."""
    tl = _tensorly()
    from tensorly.decomposition import partial_tucker

    w = w.detach().double().cpu()
    # the HOSVD start: leading vectors of each unfolding [C, C' k_h k_w] from its [C, C] Gram
    # matrix, ten times faster than the full SVD tensorly would take of a wide unfolding
    u_out = _gram_eig(unfold(w, 0))[1][:, :rank_out]
    u_in = _gram_eig(unfold(w, 1))[1][:, :rank_in]
    core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
    start = (tl.tensor(core.numpy()), [tl.tensor(u_out.numpy()), tl.tensor(u_in.numpy())])
    (core, (u_out, u_in)), _ = partial_tucker(tl.tensor(w.numpy()), rank=[rank_out, rank_in], modes=[0, 1],
                                              init=start, n_iter_max=iterations, random_state=0)
    return tuple(torch.from_numpy(tl.to_numpy(t).copy()) for t in (core, u_out, u_in))


def cp(w: torch.Tensor, rank: int, iterations: int = 50
       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` CP decomposition of a kernel ``w`` [C_out, C_in, k_h, k_w] by alternating least
    squares (tensorly's ``parafac``; Lebedev et al. 2015, eq. 3):
    ``w[o, i, h, v] ~ sum_r A[o, r] B[i, r] C[h, r] D[v, r]``; returns A [C_out, R] (the component
    weights folded in), B [C_in, R], C [k_h, R], D [k_w, R]. Seeded, so deterministic."""
    tl = _tensorly()
    from tensorly.decomposition import parafac

    w = w.detach().double().cpu()
    # tensorly's "svd" start, with each mode's leading vectors from its Gram matrix (fast for wide
    # unfoldings); a rank above a mode's size fills the rest with seeded Gaussian columns
    g = torch.Generator().manual_seed(0)
    start = []
    for mode, size in enumerate(w.shape):
        vecs = _gram_eig(unfold(w, mode))[1][:, :rank]
        extra = torch.randn(size, rank - vecs.shape[1], generator=g, dtype=torch.float64)
        start.append(tl.tensor(torch.cat([vecs, extra], 1).numpy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tensorly warns about its own convergence
        weights, (a, b, c, d) = parafac(tl.tensor(w.numpy()), rank=rank, n_iter_max=iterations, tol=1e-6,
                                        init=(tl.tensor(np.ones(rank)), start), random_state=0)
    a = tl.to_numpy(a) * tl.to_numpy(weights)[None, :]
    return tuple(torch.from_numpy(t.copy()) for t in (a, tl.to_numpy(b), tl.to_numpy(c), tl.to_numpy(d)))


def cp_rank_for_fraction(shape: tuple[int, ...], fraction: float) -> int:
    """The CP rank whose four factors hold about ``fraction`` of a [C_out, C_in, k_h, k_w] kernel's
    weights: ``floor(fraction * prod(shape) / sum(shape))``, at least 1."""
    return max(1, math.floor(fraction * math.prod(shape) / sum(shape)))
