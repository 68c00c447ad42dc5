"""Posteriors q(z|x): heads that turn the encoder's output h into a ``torch.distributions`` object.

Every variant's encoder flows through the same path, ``qz_x = head(h)``, ``z = reparametrize(qz_x, eps)``
with the step's standard-normal eps (``qz_x.rsample()`` for a deterministic head); a deterministic encoder is a
``Delta`` posterior, a mean-only encoder a ``Normal`` of fixed scale. A new posterior needs its
reparametrisation registered (``register_reparametrization``; a subclass of a registered class inherits it) and
its KL to the prior (``register_kl``, or the Monte Carlo fallback in ``kl``).

Distributions are built with ``validate_args=False``. Their arguments come from the heads below (a softplus
plus a floor for every scale), and each check reads its result back to the host: on a GPU, a synchronisation
per distribution, several every training step. A NaN argument gives a NaN loss, which ``DivergenceGuard``
stops at the epoch's end.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (Distribution, Independent, MultivariateNormal, Normal, constraints,
                                 kl_divergence, register_kl)
from torch.distributions.kl import _kl_multivariatenormal_multivariatenormal


class Delta(Distribution):
    """Point mass at ``loc`` (B, D): the posterior of a deterministic encoder. Its KL to any density is +inf,
    which is why such models need a post-hoc posterior for their ELBO (see ``benchmark.evaluation``)."""

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor):
        self.loc = loc
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return torch.zeros_like(self.loc)  # so ``stddev`` is 0 through the ``Distribution`` interface

    def rsample(self, sample_shape=torch.Size()):
        return self.loc.expand(torch.Size(sample_shape) + self.loc.shape)

    def log_prob(self, value):
        return torch.where((value == self.loc).all(-1), 0.0, -math.inf)


@register_kl(Delta, Distribution)
def _kl_delta_any(q, p):
    return torch.full(q.batch_shape, math.inf, device=q.loc.device)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal(q, p):
    """KL(full covariance || diagonal Normal) in closed form, by seeing p as a MultivariateNormal."""
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    p_mvn = MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale),
                               validate_args=False)
    return _kl_multivariatenormal_multivariatenormal(q, p_mvn)


def kl(q: Distribution, p: Distribution, z: Tensor | None = None) -> Tensor:
    """KL(q || p) per item: closed form where registered, else the one-sample Monte Carlo estimate at z."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        z = q.rsample() if z is None else z
        return q.log_prob(z) - p.log_prob(z)


_REPARAMETRIZATIONS: dict[type, object] = {}


def register_reparametrization(cls: type):
    """Decorator: ``fn(q, eps) -> z`` is how a ``cls`` posterior turns standard-normal noise into its sample
    (the way ``torch.distributions.register_kl`` registers a KL); a subclass inherits it."""
    def decorate(fn):
        if cls in _REPARAMETRIZATIONS:
            raise ValueError(f"a reparametrisation of {cls.__name__} is registered already")
        _REPARAMETRIZATIONS[cls] = fn
        return fn
    return decorate


def reparametrize(q: Distribution, eps: Tensor) -> Tensor:
    """z = g(eps; q) for given standard-normal noise eps (..., B, D): the sample q.rsample() would draw with
    that noise. Lets the evaluation tie the noise to each image, so results do not depend on batching or on
    how many processes share the test split. Dispatches on q's type (its nearest registered class)."""
    fn = next((_REPARAMETRIZATIONS[c] for c in type(q).__mro__ if c in _REPARAMETRIZATIONS), None)
    if fn is None:
        raise NotImplementedError(f"no reparametrisation for {type(q).__name__}; register one with "
                                  f"@register_reparametrization({type(q).__name__}) in benchmark.latents")
    return fn(q, eps)


@register_reparametrization(Delta)
def _reparametrize_delta(q, eps):
    return q.loc.expand_as(eps)


@register_reparametrization(Normal)
def _reparametrize_normal(q, eps):
    return q.loc + q.scale * eps


@register_reparametrization(Independent)
def _reparametrize_independent(q, eps):  # reinterpreting batch dimensions leaves the draw as it is
    return reparametrize(q.base_dist, eps)


@register_reparametrization(MultivariateNormal)
def _reparametrize_mvn(q, eps):
    return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)


def standard_normal(latent_dim: int, like: Tensor, batch_shape=()) -> Distribution:
    """The prior p(z) = N(0, I), on ``like``'s device and dtype."""
    zeros = like.new_zeros(*batch_shape, latent_dim)
    return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)


def lower_triangular(diagonal: Tensor, off: Tensor) -> Tensor:
    """The (..., D, D) lower-triangular matrix with ``diagonal`` (..., D) on its diagonal and ``off``
    (..., D(D-1)/2) below it, row by row (``torch.tril_indices`` order)."""
    d = diagonal.shape[-1]
    rows, cols = torch.tril_indices(d, d, offset=-1, device=diagonal.device)
    tril = torch.diag_embed(diagonal)
    tril[..., rows, cols] = off
    return tril


class Posterior(nn.Module):
    """A head mapping encoder features h (B, n_params(D)) to q(z|x) with event shape (D,); a ``stochastic``
    one's sample is ``reparametrize(q, eps)`` with standard-normal eps (B, D)."""

    stochastic = True

    def n_params(self, latent_dim: int) -> int:
        raise NotImplementedError

    def init_output(self, layer: nn.Linear):
        """Initialise the encoder's output layer (which produces h) for this head; nothing by default."""

    def forward(self, h: Tensor) -> Distribution:
        raise NotImplementedError


class Deterministic(Posterior):
    """z = f(x): the autoencoder family."""

    stochastic = False

    def n_params(self, latent_dim):
        return latent_dim

    def forward(self, h):
        return Delta(h)


class FixedScale(Posterior):
    """z = mu(x) + sigma0 * eps with a fixed sigma0 (sigma0 = 1: mean-only VAE; 0.7: the CV-VAE of
    Ghosh et al. 2020, Section 2)."""

    def __init__(self, sigma0: float = 1.0):
        super().__init__()
        self.sigma0 = sigma0

    def n_params(self, latent_dim):
        return latent_dim

    def forward(self, h):
        return Independent(Normal(h, torch.full_like(h, self.sigma0), validate_args=False), 1)


class Diagonal(Posterior):
    """z = mu(x) + sigma(x) * eps, sigma = softplus(.) + 1e-4 (Kingma & Welling 2014, Eq. 10)."""

    def n_params(self, latent_dim):
        return 2 * latent_dim

    def forward(self, h):
        mu, s = h.chunk(2, dim=-1)
        return Independent(Normal(mu, F.softplus(s) + 1e-4, validate_args=False), 1)


class FullCovariance(Posterior):
    """z = mu(x) + L(x) eps with L lower-triangular: the full-covariance Gaussian posterior (Kingma et al. 2016,
    Section 3, "full covariance Gaussian").

    The encoder's output is laid out as [mu (D), s (D), off (D(D-1)/2)]: the diagonal of L is
    softplus(s) + 1e-4, exactly as in ``Diagonal``, and the strictly lower entries are ``offdiag_scale * off``.
    ``init_output`` zeroes the encoder's weights for ``off``, so at initialisation the posterior *is* the diagonal
    one, and the scale sets the rate at which correlations are learned: with Adam, whose steps do not depend on
    the gradient's scale, a factor c on an output moves it c times as fast as the means. With c = 1 the D(D-1)/2
    entries moved at the means' step size and grew to 40-50 % of the posterior variance within an epoch, and
    the ELBO was 12-17 nats below the diagonal VAE's."""

    def __init__(self, offdiag_scale: float = 0.01):
        super().__init__()
        self.offdiag_scale = offdiag_scale

    def n_params(self, latent_dim):
        return latent_dim + latent_dim * (latent_dim + 1) // 2

    def init_output(self, layer: nn.Linear):
        with torch.no_grad():
            d = int((math.isqrt(8 * layer.out_features + 9) - 3) // 2)
            layer.weight[2 * d:].zero_()
            layer.bias[2 * d:].zero_()

    def forward(self, h):
        d = int((math.isqrt(8 * h.shape[-1] + 9) - 3) // 2)  # solves d + d(d+1)/2 = n
        mu, s, off = h[..., :d], h[..., d: 2 * d], h[..., 2 * d:]
        tril = lower_triangular(F.softplus(s) + 1e-4, self.offdiag_scale * off)
        return MultivariateNormal(mu, scale_tril=tril, validate_args=False)


class NoInformation(Posterior):
    """z = eps, independent of x: q(z|x) = p(z). The floor: the decoder can only learn the mean image."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def n_params(self, latent_dim):
        return 0

    def forward(self, h):
        return standard_normal(self.latent_dim, h, h.shape[:-1])
