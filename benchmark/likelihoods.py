"""Observation models p(x|z). The decoder outputs the distribution's natural parameter per pixel; the
log-likelihood is summed over pixels (nats per image), in the training loss and in the ELBO alike."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from benchmark.errors import UsageError


class BernoulliLikelihood(nn.Module):
    """Independent Bernoulli pixels, parametrised by logits: for binarised data."""

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=logits, validate_args=False), 3)

    def check(self, x: Tensor):
        if not torch.all((x == 0) | (x == 1)):
            raise UsageError("the Bernoulli likelihood needs binary data but the images are continuous; "
                             "set data.binarize to dynamic or static, or use likelihood: gaussian")


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
        return Independent(Normal(loc, self.log_sigma.exp().expand_as(loc), validate_args=False), 3)

    def check(self, x: Tensor):
        pass


def make_likelihood(name: str, sigma: float = 1.0, learn_sigma: bool = False) -> nn.Module:
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(sigma, learn_sigma)
    raise UsageError(f"unknown likelihood {name!r}; choose bernoulli or gaussian")
