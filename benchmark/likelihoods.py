"""Observation models p(x|z). The decoder outputs the distribution's natural parameter per pixel; the
log-likelihood is summed over pixels (nats per image), in the training loss and in the ELBO alike.

Images on a grid of ``levels`` intensities are stored as x = k / (levels - 1), k = 0 .. levels - 1. The
Bernoulli and the discretised heads give the probability of those values (``discrete = True``); the Gaussian
head gives a density, which is a likelihood of the discrete data only through dequantisation
(``benchmark.metrics.likelihood.bits_per_dim``). Heads are registered by name (``LIKELIHOODS``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, constraints
from torch.special import log_ndtr

from benchmark.errors import UsageError

LIKELIHOODS: dict[str, type["Likelihood"]] = {}


def register_likelihood(name: str) -> Callable[[type], type]:
    """Add a head to ``LIKELIHOODS`` under ``name``; a duplicate name or a class that is no ``Likelihood``
    is an error at import time, not a silently shadowed head."""
    def wrap(cls):
        if name in LIKELIHOODS:
            raise KeyError(f"likelihood {name!r} is already registered (by {LIKELIHOODS[name].__name__})")
        if not (isinstance(cls, type) and issubclass(cls, Likelihood)):
            raise TypeError(f"likelihood {name!r} must subclass Likelihood, got {cls!r}")
        LIKELIHOODS[name] = cls
        return cls
    return wrap


def on_grid(x: Tensor, levels: int, atol: float = 1e-4) -> bool:
    """Whether every value is k / (levels - 1) for an integer k in [0, levels - 1]. ``atol`` is in units of
    k: float32 pixels k/255 are exact to about 1e-5 k."""
    k = x * (levels - 1)
    return bool(((k - k.round()).abs() <= atol).all() and (k >= -atol).all() and (k <= levels - 1 + atol).all())


class Likelihood(nn.Module):
    """A head: decoder output -> p(x|z) over the image event. ``discrete``: its ``log_prob`` is a
    log-probability of the grid values (else a density). ``build`` takes the model's likelihood arguments."""

    discrete: bool = False

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "Likelihood":
        return cls()

    def check(self, x: Tensor):
        """Refuse data this head cannot model, with a UsageError naming the fix."""


@register_likelihood("bernoulli")
class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels, parametrised by logits: for binarised data."""

    discrete = True

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=logits, validate_args=False), 3)

    def check(self, x: Tensor):
        if not torch.all((x == 0) | (x == 1)):
            raise UsageError("the Bernoulli likelihood needs binary data but the images are continuous; "
                             "set data.binarize to dynamic or static, or use likelihood: discretized_gaussian")


class IsotropicNormal(Distribution):
    """N(loc, sigma^2 I) over images (the last three dimensions are the event), with one scalar sigma.

    Equal to ``Independent(Normal(loc, sigma), 3)``, but its log-density is one pass over the pixels:
    the general Normal takes the log and square of a per-pixel scale, several times slower on a CPU where
    the importance-sampled likelihood evaluates it millions of times."""

    arg_constraints = {"loc": constraints.real}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, loc: Tensor, log_scale: Tensor, validate_args=None):
        self.loc, self.log_scale = loc, log_scale
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return (2 * self.log_scale).exp().expand_as(self.loc)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.log_scale.exp() * eps

    def log_prob(self, value: Tensor) -> Tensor:
        n = self.event_shape.numel()
        sq = (value - self.loc).square().sum((-3, -2, -1))
        return -0.5 * sq * (-2 * self.log_scale).exp() - n * (self.log_scale + 0.5 * math.log(2 * math.pi))


class ScalarSigma(Likelihood):
    """A head with one scalar scale sigma, fixed (a buffer) or learned (log-parametrised)."""

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__()
        if sigma <= 0:
            raise UsageError(f"sigma must be positive, got {sigma}")
        log_sigma = torch.tensor(float(sigma)).log()
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)


@register_likelihood("gaussian")
class GaussianLikelihood(ScalarSigma):
    """Independent Gaussian pixels with one scalar sigma, fixed or learned: a density on R^D."""

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "GaussianLikelihood":
        return cls(sigma, learn_sigma)

    def forward(self, loc: Tensor) -> Distribution:
        # unchecked: ``loc == loc`` over every decoded image was 13% of the IWAE on a CPU, and a GPU sync
        return IsotropicNormal(loc, self.log_sigma, validate_args=False)


# --- discretised likelihoods (Salimans et al. 2017, PixelCNN++, Section 2.1) -------------------------------

# e^-20 < sigma < e^20 keeps the standardised bin edges, their squares and the bin width finite in float32
# (a bin is 1/255 wide: these are far beyond any scale a decoder learns)
LOG_SCALE_RANGE = (-20.0, 20.0)


class Discretized(Distribution):
    """A continuous law (loc, scale) per pixel integrated over the bins of a ``levels``-value grid.

    Pixel value x_k = k / (levels - 1) owns the bin [x_k - h, x_k + h], h = 1 / (2 (levels - 1)); the first
    and last bins extend to -inf and +inf, so the ``levels`` probabilities sum to one (PixelCNN++, Eq. 2).
    ``log_scale`` is a scalar or per pixel (broadcast to ``loc``). Subclasses give the log-probability of a
    bin from its standardised edges (alpha, beta), computed in log space so that tiny scales and far tails
    stay finite. ``log_prob`` sums over the image (the last three dimensions)."""

    arg_constraints = {"loc": constraints.real}
    has_rsample = False

    def __init__(self, loc: Tensor, log_scale: Tensor, levels: int, validate_args=None):
        if levels < 2:
            raise UsageError(f"a discretised likelihood needs at least 2 levels, got {levels}")
        self.loc, self.levels = loc, levels
        self.log_scale = torch.as_tensor(log_scale, dtype=loc.dtype, device=loc.device).clamp(*LOG_SCALE_RANGE)
        super().__init__(loc.shape[:-3], loc.shape[-3:], validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.unit_interval, 3)

    @property
    def mean(self) -> Tensor:
        """The location clamped to [0, 1]: what sample and FID code shows as the decoded image. (The exact
        mean sums ``levels`` bins a pixel; the two agree as the scale shrinks below the bin width.)"""
        return self.loc.clamp(0, 1)

    def _bin_log_prob(self, alpha: Tensor, beta: Tensor, width: Tensor, k: Tensor) -> Tensor:
        """log P(bin k) from its standardised edges alpha < beta and width = beta - alpha (given apart: the
        difference of two large edges has lost its digits)."""
        raise NotImplementedError

    def _standard_sample(self, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def pixel_log_prob(self, value: Tensor) -> Tensor:
        """log P(pixel = value) for every pixel (the batch and event shape of ``loc``, broadcast)."""
        n = self.levels - 1
        k = (value * n).round().clamp(0, n)
        inv_s = (-self.log_scale).exp()
        # The bin's standardised edges, each computed as the same float for both bins it separates (so the
        # probabilities telescope to one however small the scale); finite for the edge bins too, whose open
        # side is replaced by the subclass (an infinite edge gives NaN gradients through torch.where).
        alpha, beta = ((k - 0.5) / n - self.loc) * inv_s, ((k + 0.5) / n - self.loc) * inv_s
        return self._bin_log_prob(alpha, beta, (inv_s / n).expand_as(alpha), k)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.pixel_log_prob(value).sum((-3, -2, -1))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            y = self.loc + self.log_scale.exp() * self._standard_sample(shape)
            n = self.levels - 1
            return (y * n).round().clamp(0, n) / n  # the bin y falls in: edges are the midpoints


class DiscretizedLogistic(Discretized):
    """Logistic(loc, s) per pixel, discretised: P(k) = sigmoid(beta) - sigmoid(alpha) (PixelCNN++, Eq. 2)."""

    def _bin_log_prob(self, alpha, beta, width, k):
        # sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - e^(a - b)): no difference of two probabilities,
        # so the log stays accurate for any scale
        inner = F.logsigmoid(beta) + F.logsigmoid(-alpha) + torch.log(-torch.expm1(-width))
        return torch.where(k == 0, F.logsigmoid(beta), torch.where(k == self.levels - 1, F.logsigmoid(-alpha), inner))

    def _standard_sample(self, shape):
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
        return torch.logit(u)


class _LogNdtr(torch.autograd.Function):
    """log Phi(x) with a gradient that stays right in the far lower tail: torch's own backward of ``log_ndtr``
    takes exp(log phi - log Phi), whose two terms of -x^2/2 cancel in float32 (at x = -1e3 it gives 956 for
    1000, at -1e6 zero; NaN once inf - inf). There d/dx log Phi = phi/Phi = 1/R(-x), R the Mills ratio,
    taken from its asymptotic series (Abramowitz & Stegun 26.2.12), accurate to 1e-6 for x < -10."""

    @staticmethod
    def forward(ctx, x):
        y = log_ndtr(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        t = (-x).clamp(min=10)
        t2 = t.square()
        tail = t / (1 - 1 / t2 + 3 / t2.square() - 15 / (t2 * t2.square()))
        near = (-0.5 * x.clamp(min=-10).square() - 0.5 * math.log(2 * math.pi) - y).exp()
        return grad * torch.where(x < -10, tail, near)


def _log_phi(x: Tensor) -> Tensor:
    return _LogNdtr.apply(x)


class DiscretizedNormal(Discretized):
    """N(loc, s^2) per pixel, discretised: P(k) = Phi(beta) - Phi(alpha), in log space via log Phi."""

    def _bin_log_prob(self, alpha, beta, width, k):
        # Reflect bins above the mean into the lower tail (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), where
        # log Phi is accurate: log(Phi(b) - Phi(a)) = log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))).
        upper = alpha > 0
        lo, hi = torch.where(upper, -beta, alpha), torch.where(upper, -alpha, beta)
        log_hi = _log_phi(hi)
        # clamped below 0: a log(0) in the branch torch.where drops would still make its gradient NaN
        gap = (_log_phi(lo) - log_hi).clamp(max=-1e-30)
        inner = log_hi + torch.log(-torch.expm1(gap))
        # A bin narrow against its distance from the mean: log Phi(a) - log Phi(b) has lost its digits, but the
        # midpoint rule with its Taylor corrections, phi(m) w (1 + (m^2-1) w^2/24 + (m^4-6m^2+3) w^4/1920),
        # is accurate to float32 there (error ~ (w max(|m|, 1))^6).
        m = 0.5 * (alpha + beta)
        narrow = width * m.abs().clamp(min=1) < 0.2
        m, w = torch.where(narrow, m, 0), torch.where(narrow, width, 1)  # no overflow where it is not used
        m2, w2 = m.square(), w.square()
        mid = (-0.5 * m2 - 0.5 * math.log(2 * math.pi) + w.log()
               + torch.log1p(w2 * (m2 - 1) / 24 + w2.square() * (m2.square() - 6 * m2 + 3) / 1920))
        inner = torch.where(narrow, mid, inner)
        return torch.where(k == 0, _log_phi(beta), torch.where(k == self.levels - 1, _log_phi(-alpha), inner))

    def _standard_sample(self, shape):
        return torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)


class DiscretizedHead(ScalarSigma):
    """A discretised head on the data's grid of ``levels`` values, with one scalar scale, fixed or learned."""

    discrete = True
    distribution: type[Discretized]

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False, levels: int = 256):
        super().__init__(sigma, learn_sigma)
        if levels < 2:
            raise UsageError(f"model.init_args.levels must be at least 2, got {levels}")
        self.levels = levels

    @classmethod
    def build(cls, sigma: float, learn_sigma: bool, levels: int) -> "DiscretizedHead":
        return cls(sigma, learn_sigma, levels)

    def forward(self, loc: Tensor) -> Distribution:
        return self.distribution(loc, self.log_sigma, self.levels, validate_args=False)

    def check(self, x: Tensor):
        if not on_grid(x, self.levels):
            raise UsageError(f"the discretised likelihood needs pixels on the grid k/{self.levels - 1} but the "
                             "images are not (dequantised?); set data.dequantize false, or use likelihood: gaussian")


@register_likelihood("discretized_logistic")
class DiscretizedLogisticLikelihood(DiscretizedHead):
    distribution = DiscretizedLogistic


@register_likelihood("discretized_gaussian")
class DiscretizedGaussianLikelihood(DiscretizedHead):
    distribution = DiscretizedNormal


def make_likelihood(name: str, sigma: float = 1.0, learn_sigma: bool = False, levels: int = 256) -> Likelihood:
    if name not in LIKELIHOODS:
        raise UsageError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name].build(sigma, learn_sigma, levels)
