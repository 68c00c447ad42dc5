"""ELBO and importance-weighted log-likelihood against a model whose log p(x) is closed form.

Probabilistic PCA: z ~ N(0, I), x | z ~ N(W z + b, s^2 I), so p(x) = N(b, W W^T + s^2 I) and the exact
posterior is N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I (Tipping & Bishop 1999).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import MultivariateNormal

from benchmark.metrics import keys
from benchmark.metrics.likelihood import (LikelihoodBounds, elbo_terms, index_noise, iw_ladder, iw_log_likelihood,
                                          iw_log_weights)
from benchmark.variants import VAE, VARIANTS, VAEFullCov

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
    d, r, l = torch.rand(100) * 50, torch.rand(100), -torch.rand(3, 100) * 60  # l: (len(ks), B)
    ks = (1, 10, 50)
    whole, one_by_one = LikelihoodBounds(ks, suffix=keys.POSTHOC), LikelihoodBounds(ks, suffix=keys.POSTHOC)
    whole.update(d, r, l)
    for i in range(100):
        one_by_one.update(d[i:i + 1], r[i:i + 1], l[:, i:i + 1])
    for res in (whole.compute(), one_by_one.compute()):
        assert set(res) == {"elbo_posthoc", "distortion_posthoc", "rate_posthoc", "nll_iw",
                            "nll_iw_k1", "nll_iw_k10", "nll_iw_k50"}
        assert math.isclose(res["elbo_posthoc"], float(-(d + r).mean()), rel_tol=1e-6)
        assert math.isclose(res["rate_posthoc"], float(r.mean()), rel_tol=1e-6)
        for j, k in enumerate(ks):
            assert math.isclose(res[f"nll_iw_k{k}"], float(-l[j].mean()), rel_tol=1e-6)
        assert res["nll_iw"] == res["nll_iw_k50"]  # the largest K
    own = LikelihoodBounds()  # the encoder's own ELBO: no ladder
    own.update(d, r)
    assert set(own.compute()) == {"elbo", "distortion", "rate"}


def test_the_iwae_ladder_rises_with_k_and_its_top_equals_the_single_k_bound():
    """L_K from the first K of one set of K_max weights: E[L_K] rises with K towards log p(x) (Burda et al.
    2016, Theorem 1), and at K_max it is the K_max bound computed sample by sample with the same noise."""
    m, px = ppca(VAE, 0.6)
    torch.manual_seed(2)
    x = px.sample((1000,)).reshape(-1, 1, 2, 2)
    index = torch.arange(len(x))
    ks = (1, 10, 100)
    eps = index_noise(index, (ks[-1], D), seed=5)  # (K, B, D)
    q, pz = m.posterior(x), m.prior(x, x.shape[:1])
    with torch.no_grad():
        ladder = iw_ladder(iw_log_weights(x, q, m.decode, pz, ks[-1], max_decoded=1000 * 7, eps=eps), ks)
        one_by_one = torch.stack([m.decode(z).log_prob(x) + pz.log_prob(z) - q.log_prob(z)
                                  for z in q.base_dist.loc + q.base_dist.scale * eps])  # (K, B)
        single = torch.logsumexp(one_by_one, dim=0) - math.log(ks[-1])
    assert ladder.shape == (3, 1000)
    torch.testing.assert_close(ladder[-1], single, atol=1e-5, rtol=0)
    torch.testing.assert_close(ladder[-1], iw_log_likelihood(x, q, m.decode, pz, ks[-1], eps=eps), atol=1e-5, rtol=0)
    torch.testing.assert_close(ladder[0], one_by_one[0], atol=1e-5, rtol=0)  # L_1: the first weight alone
    means = ladder.mean(-1)
    exact = px.log_prob(x.reshape(-1, P)).mean()
    assert means[0] + 0.05 < means[1] < means[2] < exact + 0.02, (means, exact)


# --- the post-hoc posterior ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ae", "mean_only", "vae", "vae_fullcov", "no_info"])
def test_the_posthoc_posterior_starts_at_the_encoders_own_posterior(name):
    from benchmark.evaluation import PosthocPosterior

    torch.manual_seed(0)
    model = VARIANTS[name](data_shape=(1, 4, 4), latent_dim=3, hidden=(8,)).eval()
    if name == "vae_fullcov":  # correlations in the encoder's own posterior, which the start must keep
        model.head.offdiag_scale = 1.0
        torch.nn.init.normal_(model.encoder[1][-1].weight)
    x = torch.rand(6, 1, 4, 4)
    q, q_enc = PosthocPosterior(model)(x), model.posterior(x)
    torch.testing.assert_close(q.mean, q_enc.mean)
    if name == "ae":  # a point mass: a narrow start, softplus(-2)
        start = F.softplus(torch.tensor(-2.0)).item() ** 2
        torch.testing.assert_close(q.covariance_matrix, torch.eye(3).expand(6, 3, 3) * start)
    else:  # the encoder's own covariance, correlations included
        cov_enc = getattr(q_enc, "covariance_matrix", None)
        cov_enc = torch.diag_embed(q_enc.variance) if cov_enc is None else cov_enc
        torch.testing.assert_close(q.covariance_matrix, cov_enc)
        if name == "vae_fullcov":
            off = cov_enc - torch.diag_embed(cov_enc.diagonal(dim1=-2, dim2=-1))
            assert off.abs().max() > 1e-2


def test_the_fitted_posthoc_elbo_rises_above_the_encoders_and_stays_below_log_px():
    """pPCA with a diagonal encoder narrowed to 0.5 of its marginals: the post-hoc fit, started there, can
    only improve the ELBO, and no q exceeds the exact log p(x)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from benchmark.evaluation import PosthocPosterior

    m, px = ppca(VAE, 0.5)
    torch.manual_seed(3)
    x = px.sample((500,)).reshape(-1, 1, 2, 2)
    posthoc = PosthocPosterior(m, hidden=16, lr=1e-2)
    L.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        posthoc, DataLoader(TensorDataset(x), batch_size=100, shuffle=True))
    x_test = px.sample((2000,))
    xi = x_test.reshape(-1, 1, 2, 2).repeat(20, 1, 1, 1)  # 20 draws per image: the bounds' noise is small
    pz = m.prior(xi, xi.shape[:1])
    with torch.no_grad():
        own = -sum(elbo_terms(xi, m.posterior(xi), m.decode, pz)).reshape(20, -1).mean(0)  # (N,)
        fitted = -sum(elbo_terms(xi, posthoc.eval()(xi), m.decode, pz)).reshape(20, -1).mean(0)
    exact = px.log_prob(x_test)
    gain, gap = fitted - own, exact - fitted  # per image
    assert gain.mean() > 0.3, gain.mean()  # the narrowed encoder costs ~0.6 nats
    assert gap.mean() > -3 * gap.std() / math.sqrt(len(gap)), (gap.mean(), gap.std())


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


@pytest.mark.parametrize("name, stochastic", [("ae", False), ("vae", True), ("vae_fullcov", True)])
def test_every_variant_gets_the_posthoc_elbo_and_only_stochastic_encoders_their_own(name, stochastic, one_thread):
    import lightning as L

    from benchmark.data import LatentDataModule
    from benchmark.evaluation import evaluate
    from benchmark.spec import EvaluationConfig

    L.seed_everything(0)
    data = LatentDataModule("digits", binarize="dynamic", batch_size=128, eval_batch_size=100)
    model = VARIANTS[name](data_shape=data.shape, latent_dim=3, hidden=(32,))
    cfg = EvaluationConfig(iw_samples=12, iw_ladder=[1, 10, 100], fid_samples=0, gmm_components=0,
                           max_codes=50, expost_epochs=1)

    def make_trainer(**kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **kw)

    data.setup("fit")
    out = evaluate(model, data, cfg, make_trainer)
    metrics = out["metrics"]
    posthoc = {"elbo_posthoc", "distortion_posthoc", "rate_posthoc", "nll_iw", "nll_iw_k1", "nll_iw_k10",
               "nll_iw_k12"}
    assert posthoc <= set(metrics) and all(math.isfinite(metrics[k]) for k in posthoc)
    assert "nll_iw_k100" not in metrics  # above iw_samples: dropped
    assert metrics["nll_iw"] == metrics["nll_iw_k12"]
    assert {k for k in ("elbo", "distortion", "rate") if k in metrics} == ({"elbo", "distortion", "rate"}
                                                                           if stochastic else set())
    assert "elbo_expost" not in metrics
    assert out["protocol"]["iw_ks"] == [1, 10, 12] and out["protocol"]["nll_iw_proposal"] == "posthoc"
    assert out["timings"]["posthoc_fit_s"] > 0
