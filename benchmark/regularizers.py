"""Differentiable divergences between a batch of codes z (B, D) and the prior N(0, I).

These are the regularisers of the deterministic-encoder variants (see ``variants.py``); the evaluation
metrics reuse the same formulas where they coincide. Every function returns a scalar tensor.
"""

import math

import torch
from torch import Tensor


def gaussian_kl_to_standard(mean: Tensor, cov: Tensor, jitter: float = 1e-6) -> Tensor:
    """KL(N(mean, cov) || N(0, I)) = 1/2 (tr(cov) + |mean|^2 - D - log det cov).

    A singular covariance (collapsed or low-rank codes) has an infinite KL; ``jitter`` * I is added to the
    covariance so the value stays finite and large (about D_collapsed / 2 * log(1 / jitter)), never NaN.
    """
    d = mean.shape[-1]
    cov = cov + jitter * torch.eye(d, dtype=cov.dtype, device=cov.device)
    logdet = torch.linalg.cholesky(cov).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2
    return 0.5 * (cov.diagonal(dim1=-2, dim2=-1).sum(-1) + mean.pow(2).sum(-1) - d - logdet)


def batch_moments(z: Tensor) -> tuple[Tensor, Tensor]:
    """The codes' mean (D,) and sample covariance (D, D), ddof = 1."""
    mean = z.mean(0)
    zc = z - mean
    return mean, zc.T @ zc / (z.shape[0] - 1)


def moment_kl(z: Tensor) -> Tensor:
    """KL(N(mean_B, cov_B) || N(0, I)) of the batch's first two moments: the literal proposal
    "make the empirical distribution of the codes close to N(0, I)"."""
    return gaussian_kl_to_standard(*batch_moments(z))


def imq_mmd(z: Tensor, z_prior: Tensor, scales=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)) -> Tensor:
    """Unbiased MMD^2 with the multi-scale inverse multiquadratic kernel k(x, y) = C / (C + |x - y|^2),
    C = 2 D s, summed over scales s (Tolstikhin et al. 2018, WAE, Algorithm 2 and Section 4)."""
    n, d = z.shape
    zz = torch.cat([z, z_prior])
    sq = torch.cdist(zz, zz).pow(2)  # (2n, 2n)
    k = sum((2 * d * s) / (2 * d * s + sq) for s in scales)
    off = 1 - torch.eye(n, device=z.device, dtype=z.dtype)
    k_qq, k_pp, k_qp = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((k_qq * off).sum() + (k_pp * off).sum()) / (n * (n - 1)) - 2 * k_qp.mean()


def projections(d: int, n_projections: int, generator: torch.Generator | None = None,
                like: Tensor | None = None) -> Tensor:
    """(D, L) directions uniform on the unit sphere, on ``like``'s device and dtype."""
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    theta = torch.randn(d, n_projections, generator=generator, **kw)
    return theta / theta.norm(dim=0, keepdim=True)


def sliced_wasserstein(z: Tensor, n_projections: int = 50, p: int = 2,
                       generator: torch.Generator | None = None, theta: Tensor | None = None) -> Tensor:
    """Sliced p-Wasserstein distance (to the p-th power) between the codes and N(0, I)
    (Kolouri et al. 2019, SWAE, Eq. 9). Projections of N(0, I) on unit directions are N(0, 1), so the
    target's sorted projections are the exact normal quantiles at (i - 1/2) / B instead of prior samples.
    The directions ``theta`` (D, L) are given, or drawn uniform on the sphere from ``generator`` (a seeded one
    makes a metric of it)."""
    b, d = z.shape
    if theta is None:
        theta = projections(d, n_projections, generator, like=z)
    proj = (z @ theta).sort(dim=0).values  # (B, L)
    u = (torch.arange(b, device=z.device, dtype=z.dtype) + 0.5) / b
    quantiles = math.sqrt(2) * torch.erfinv(2 * u - 1)  # (B,)
    return (proj - quantiles[:, None]).abs().pow(p).mean()
