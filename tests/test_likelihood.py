"""ELBO and importance-weighted log-likelihood against a model whose log p(x) is closed form.

Probabilistic PCA: z ~ N(0, I), x | z ~ N(W z + b, s^2 I), so p(x) = N(b, W W^T + s^2 I) and the exact
posterior is N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I (Tipping & Bishop 1999).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from benchmark.metrics.likelihood import LikelihoodBounds, elbo_terms, index_noise, iw_log_likelihood
from benchmark.variants import VAE, VAEFullCov

D, P, S = 2, 4, 0.5


def ppca(cls, shrink: float):
    """A linear VAE set to the pPCA decoder and to (a scaled copy of) its exact posterior. The diagonal VAE
    keeps only the posterior's marginal variances; ``shrink`` < 1 narrows the proposal further."""
    torch.manual_seed(0)
    w, b = torch.randn(P, D), torch.randn(P)
    m = cls(data_shape=(1, 2, 2), latent_dim=D, hidden=(), likelihood="gaussian", sigma=S)
    mm = w.T @ w + S**2 * torch.eye(D)
    a = torch.linalg.solve(mm, w.T)  # posterior mean = a (x - b)
    cov = S**2 * torch.linalg.inv(mm)
    enc, dec = m.encoder[1][0], m.decoder[0][0]
    with torch.no_grad():
        dec.weight.copy_(w)
        dec.bias.copy_(b)
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:D] = a
        enc.bias[:D] = -a @ b
        if cls is VAE:
            std = cov.diagonal().sqrt() * shrink
            enc.bias[D:] = std - 1e-4 + torch.log(-torch.expm1(-(std - 1e-4)))  # softplus^-1
        else:  # outputs [mu, s, off]: L's diagonal softplus(s) + 1e-4, its strictly lower part scale * off
            tril = torch.linalg.cholesky(cov) * shrink
            diag = tril.diagonal()
            enc.bias[D: 2 * D] = diag - 1e-4 + torch.log(-torch.expm1(-(diag - 1e-4)))
            rows, cols = torch.tril_indices(D, D, offset=-1)
            enc.bias[2 * D:] = tril[rows, cols] / m.head.offdiag_scale
    px = MultivariateNormal(b, w @ w.T + S**2 * torch.eye(P))
    return m, px


def bounds(m, x, k, seed=0):
    xi = x.reshape(-1, 1, 2, 2)
    q, pz = m.posterior(xi), m.prior(xi, xi.shape[:1])
    distortion, rate = elbo_terms(xi, q, m.decode, pz)
    return -(distortion + rate), iw_log_likelihood(xi, q, m.decode, pz, k)


@pytest.mark.parametrize("cls,shrink", [(VAE, 1.0), (VAE, 0.7), (VAEFullCov, 0.8)])
def test_iwae_converges_to_the_exact_log_likelihood_and_the_elbo_stays_below(cls, shrink):
    torch.manual_seed(1)
    m, px = ppca(cls, shrink)
    x = px.sample((400,))
    exact = px.log_prob(x).mean()
    with torch.no_grad():
        elbo, l1 = bounds(m, x, 1)
        _, l_big = bounds(m, x, 5000)
    assert elbo.mean() < exact
    assert abs(l_big.mean() - exact) < 0.1, (l_big.mean(), exact)
    assert l_big.mean() > elbo.mean() + 0.01  # the bound tightens with K


def test_exact_posterior_makes_every_bound_exact():
    """With the exact posterior (full covariance, no shrink) log p(x, z) - log q(z|x) = log p(x) for
    every z, so even K = 1 is exact, image by image."""
    m, px = ppca(VAEFullCov, 1.0)
    x = px.sample((50,))
    with torch.no_grad():
        _, l1 = bounds(m, x, 1)
    assert torch.allclose(l1, px.log_prob(x), atol=1e-3)


def test_iwae_is_numerically_stable_for_huge_log_weights():
    m, px = ppca(VAE, 0.05)  # a far too narrow proposal: log-weights spread over hundreds of nats
    x = px.sample((20,)) * 30
    with torch.no_grad():
        _, l = bounds(m, x, 500)
    assert torch.isfinite(l).all()


def test_chunking_and_per_image_noise_do_not_change_the_estimate():
    m, px = ppca(VAE, 0.8)
    x = px.sample((30,)).reshape(-1, 1, 2, 2)
    index = torch.arange(100, 130)
    eps = index_noise(index, (64, D), seed=3)  # (K, B, D)
    q, pz = m.posterior(x), m.prior(x, x.shape[:1])
    with torch.no_grad():
        whole = iw_log_likelihood(x, q, m.decode, pz, 64, eps=eps)
        chunked = iw_log_likelihood(x, q, m.decode, pz, 64, max_decoded=30 * 7, eps=eps)
        # the same images in another batch composition get the same noise, hence the same values
        q2, pz2 = m.posterior(x[10:]), m.prior(x, (20,))
        part = iw_log_likelihood(x[10:], q2, m.decode, pz2, 64, eps=index_noise(index[10:], (64, D), seed=3))
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(whole[10:], part, atol=1e-5)


def test_likelihood_metric_is_the_mean_and_independent_of_batching():
    torch.manual_seed(0)
    d, r, l = torch.rand(100) * 50, torch.rand(100), -torch.rand(100) * 60
    whole, one_by_one = LikelihoodBounds(), LikelihoodBounds()
    whole.update(d, r, l)
    for i in range(100):
        one_by_one.update(d[i:i + 1], r[i:i + 1], l[i:i + 1])
    for res in (whole.compute(), one_by_one.compute()):
        assert math.isclose(res["elbo"], float(-(d + r).mean()), rel_tol=1e-6)
        assert math.isclose(res["nll_iw"], float(-l.mean()), rel_tol=1e-6)
        assert math.isclose(res["rate"], float(r.mean()), rel_tol=1e-6)


def test_isotropic_normal_equals_independent_normal_in_value_gradient_and_moments():
    from torch.distributions import Independent, Normal

    from benchmark.likelihoods import IsotropicNormal

    torch.manual_seed(0)
    loc = torch.randn(5, 3, 1, 4, 4, requires_grad=True)
    log_scale = torch.tensor(-0.7, requires_grad=True)
    x = torch.randn(3, 1, 4, 4)
    ours = IsotropicNormal(loc, log_scale)
    ref = Independent(Normal(loc, log_scale.exp().expand_as(loc)), 3)
    assert ours.batch_shape == ref.batch_shape == (5, 3) and ours.event_shape == ref.event_shape
    lp, lp_ref = ours.log_prob(x), ref.log_prob(x)
    torch.testing.assert_close(lp, lp_ref)
    g = torch.autograd.grad(lp.sum(), (loc, log_scale))
    g_ref = torch.autograd.grad(lp_ref.sum(), (loc, log_scale))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.variance, ref.variance)
    draws = IsotropicNormal(torch.zeros(1, 8, 8), torch.tensor(math.log(2.0))).rsample((20_000,))
    assert draws.shape == (20_000, 1, 8, 8) and abs(draws.std().item() - 2.0) < 0.02
