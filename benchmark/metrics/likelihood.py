"""ELBO and importance-weighted log-likelihood: pure functions plus one sum-reducible ``Metric``.

All values are nats per image. ``decode`` maps codes z (..., D) to p(x|z) with batch shape (...).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution
from torchmetrics import Metric

from benchmark.latents import kl, reparametrize
from benchmark.metrics import keys

Decode = Callable[[Tensor], Distribution]


def index_noise(index: Tensor, shape: tuple[int, ...], seed: int) -> Tensor:
    """Standard-normal noise (*shape, B, D) for the images of dataset indices ``index`` (B,), from one
    generator per image seeded by (seed, index): the same image gets the same noise whatever the batch or
    the process it lands in. ``shape`` is (..., D) without the batch axis, e.g. (K, D) or (D,)."""
    g = torch.Generator()
    noise = [torch.randn(shape, generator=g.manual_seed(seed * 1_000_003 + int(i))) for i in index.tolist()]
    return torch.stack(noise, dim=-2).to(index.device)  # (..., B, D)


def elbo_terms(x: Tensor, qz_x: Distribution, decode: Decode, pz: Distribution,
               eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(distortion, rate) per image: -E_q[log p(x|z)] by one reparametrised sample (drawn with the noise
    ``eps`` (B, D) when given), and KL(q(z|x) || p(z)) in closed form where registered (Monte Carlo at the
    same sample otherwise). ELBO = -(distortion + rate)."""
    z = qz_x.rsample() if eps is None else reparametrize(qz_x, eps)  # (B, D)
    distortion = -decode(z).log_prob(x)
    return distortion, kl(qz_x, pz, z)


def iw_log_weights(x: Tensor, qz_x: Distribution, decode: Decode, pz: Distribution, k: int,
                   max_decoded: int | None = None, eps: Tensor | None = None) -> Tensor:
    """Log importance weights (K, B): log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x). The K samples are drawn in
    chunks so that at most ``max_decoded`` images are decoded at once; every image of the batch is done
    together. ``eps`` (K, B, D), when given, is the standard-normal noise of the K samples."""
    if max_decoded is None:  # large launches for a GPU; on a CPU, chunks that stay in cache run twice as fast
        max_decoded = 1 << 16 if x.is_cuda else 1 << 10
    b = x.shape[0]
    chunk = max(1, max_decoded // b)
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        with torch.no_grad():
            z = qz_x.sample((n,)) if eps is None else reparametrize(qz_x, eps[start: start + n])  # (n, B, D)
        log_w.append(decode(z).log_prob(x) + pz.log_prob(z) - qz_x.log_prob(z))  # (n, B)
    return torch.cat(log_w)  # (K, B)


def iw_ladder(log_w: Tensor, ks: Sequence[int]) -> Tensor:
    """L_K for each K of ``ks`` (len(ks), B) from the first K of the log-weights ``log_w`` (K_max, B):
    log 1/K sum_{k<=K} w_k (Burda et al. 2016, Eq. 8), by one cumulative logsumexp. Nested prefixes of one
    sample set: E[L_K] rises with K (Burda et al. 2016, Theorem 1), and the ladder costs the largest K alone."""
    index = torch.as_tensor([k - 1 for k in ks], device=log_w.device)
    log_k = torch.as_tensor([math.log(k) for k in ks], dtype=log_w.dtype, device=log_w.device)
    return torch.logcumsumexp(log_w, dim=0)[index] - log_k[:, None]  # (len(ks), B)


def iw_log_likelihood(x: Tensor, qz_x: Distribution, decode: Decode, pz: Distribution, k: int,
                      max_decoded: int | None = None, eps: Tensor | None = None) -> Tensor:
    """log p(x) per image (B,) by the importance-weighted bound L_K (Burda et al. 2016, Eq. 8):
    log 1/K sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), by logsumexp (see ``iw_log_weights``)."""
    log_w = iw_log_weights(x, qz_x, decode, pz, k, max_decoded, eps)  # (K, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


# What a likelihood value is a likelihood of, in the run protocol's ``likelihood_kind``.
DISCRETE = "discrete"                # a probability of the grid values (Bernoulli, discretised heads)
DEQUANTIZED = "dequantized"          # a density on (k + u) / levels: a lower bound on the discrete one
DENSITY_ON_GRID = "density_on_grid"  # a density at the grid values themselves: no probability of anything
LIKELIHOOD_KINDS = (DISCRETE, DEQUANTIZED, DENSITY_ON_GRID)


def likelihood_kind(discrete: bool, dequantized: bool) -> str:
    return DISCRETE if discrete else DEQUANTIZED if dequantized else DENSITY_ON_GRID


def bits_per_dim(log_px, dims: int, levels: int | None = None):
    """-log2 P(x_discrete) / D from a log-likelihood (or bound) ``log_px`` in nats per image.

    For a discrete likelihood ``log_px`` is already log P(x_discrete) (``levels`` None). For a density p on
    data dequantised to [0, 1]^D, x = (k + u) / levels, give ``levels``: P(k) = int over the bin of p, whose
    volume is levels^-D, so log P(k) >= E_u[log p((k + u) / levels)] - D log levels (Theis et al. 2016;
    Ho et al. 2019, Section 3.1), and bits/dim add log2 levels. A uniform model gives exactly log2 levels."""
    nll = -log_px if levels is None else -log_px + dims * math.log(levels)
    return nll / (dims * math.log(2))


def bpd_metrics(results: dict[str, float], dims: int, levels: int, kind: str) -> dict[str, float]:
    """``<key>_bpd`` of every likelihood key of ``results`` (``keys.BPD_SOURCES``); none for a density on the
    raw grid values, whose value is no probability of the discrete data."""
    if kind not in LIKELIHOOD_KINDS:
        raise ValueError(f"unknown likelihood kind {kind!r}; one of {LIKELIHOOD_KINDS}")
    if kind == DENSITY_ON_GRID:
        return {}
    out = {}
    for key in keys.BPD_SOURCES:
        if key in results:
            log_px = -results[key] if key == keys.NLL_IW else results[key]
            out[key + keys.BPD_SUFFIX] = float(bits_per_dim(log_px, dims, levels if kind == DEQUANTIZED else None))
    return out


class LikelihoodBounds(Metric):
    """Means over a split of the ELBO and its two terms and, for each K of a ladder, of the IWAE estimate
    -L_K of -log p(x). ``suffix`` names the posterior the ELBO is of (``keys.POSTHOC`` or the encoder's "").

    Sum-reducible: each rank adds its images' values, so a DDP run equals a single-process run."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (), suffix: str = "", **kwargs):
        super().__init__(**kwargs)
        self.ks, self.suffix = tuple(ks), suffix
        for name in ("distortion", "rate", "n"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nll_iw", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")  # (len(ks),)

    def update(self, distortion: Tensor, rate: Tensor, log_px: Tensor | None = None):
        """``log_px`` (len(ks), B): L_K of each image for each K of the ladder (``iw_ladder``)."""
        self.distortion += distortion.double().sum()
        self.rate += rate.double().sum()
        if log_px is not None:
            self.nll_iw -= log_px.double().sum(-1)
        self.n += distortion.numel()

    def compute(self) -> dict[str, Tensor]:
        distortion, rate = self.distortion / self.n, self.rate / self.n
        out = {keys.ELBO + self.suffix: -(distortion + rate), keys.DISTORTION + self.suffix: distortion,
               keys.RATE + self.suffix: rate}
        nll = self.nll_iw / self.n  # (len(ks),)
        out.update({keys.nll_iw_k(k): v for k, v in zip(self.ks, nll)})
        if self.ks:
            out[keys.NLL_IW] = nll[self.ks.index(max(self.ks))]
        return out
