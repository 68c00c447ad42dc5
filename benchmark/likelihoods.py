"""Observation models p(x|z). The decoder outputs the distribution's natural parameter per pixel; the
log-likelihood is summed over pixels (nats per image), in the training loss and in the ELBO alike."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, constraints

from benchmark.errors import UsageError


class BernoulliLikelihood(nn.Module):
    """Independent Bernoulli pixels, parametrised by logits: for binarised data."""

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=logits, validate_args=False), 3)

    def check(self, x: Tensor):
        if not torch.all((x == 0) | (x == 1)):
            raise UsageError("the Bernoulli likelihood needs binary data but the images are continuous; "
                             "set data.binarize to dynamic or static, or use likelihood: gaussian")


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


class GaussianLikelihood(nn.Module):
    """Independent Gaussian pixels with one scalar sigma, fixed or learned (log-parametrised)."""

    def __init__(self, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__()
        if sigma <= 0:
            raise UsageError(f"sigma must be positive, got {sigma}")
        log_sigma = torch.tensor(float(sigma)).log()
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def forward(self, loc: Tensor) -> Distribution:
        # unchecked: ``loc == loc`` over every decoded image was 13% of the IWAE on a CPU, and a GPU sync
        return IsotropicNormal(loc, self.log_sigma, validate_args=False)

    def check(self, x: Tensor):
        pass


def make_likelihood(name: str, sigma: float = 1.0, learn_sigma: bool = False) -> nn.Module:
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(sigma, learn_sigma)
    raise UsageError(f"unknown likelihood {name!r}; choose bernoulli or gaussian")
