"""Likelihoods of the discrete data: the discretised heads are distributions over the grid's bins (they sum
to one, agree with CDF differences in float64, stay finite at any scale), bits/dim of a uniform model are
log2(levels), the ELBO of a decoder with known bin probabilities is their closed form, a density on
dequantised data bounds the discrete likelihood from below (Jensen), and the data states its levels and
refuses what a head cannot model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from benchmark.data import DATASETS, DatasetSpec, LatentDataModule, dequantize
from benchmark.errors import UsageError
from benchmark.likelihoods import (LIKELIHOODS, DiscretizedLogistic, DiscretizedNormal, IsotropicNormal, Likelihood,
                                   make_likelihood, on_grid, register_likelihood)
from benchmark.metrics import keys
from benchmark.metrics.likelihood import (DENSITY_ON_GRID, DEQUANTIZED, DISCRETE, bits_per_dim, bpd_metrics,
                                          elbo_terms, likelihood_kind)

pytestmark = pytest.mark.usefixtures("one_thread")

DISCRETIZED = [DiscretizedNormal, DiscretizedLogistic]
LOCS = [-3.0, -0.1, 0.0, 0.3, 0.5, 0.7, 1.0, 1.2, 5.0, 1e4]  # 0.3, 0.5, 0.7 lie on 256-level bin edges
LOG_SCALES = [-30.0, -20.0, -12.0, -7.0, -5.5, -3.0, 0.0, 3.0, 20.0]


def grid(levels: int) -> torch.Tensor:
    return (torch.arange(levels) / (levels - 1)).reshape(levels, 1, 1, 1)  # every value, as (L, 1, 1, 1) images


def cdf_differences(cls, loc: float, scale: float, levels: int) -> torch.Tensor:
    """log P(k), k = 0 .. L-1, in float64 straight from scipy's CDF F, the edge bins taking the tails; a bin
    above the mean as F(-a) - F(-b) (both laws are symmetric), so that no difference of two numbers near 1 is
    taken. (scipy's ``ndtr`` keeps its digits in the far tail, where torch's float64 one returns 0.)"""
    from scipy.special import expit, ndtr

    n = levels - 1
    k = np.arange(levels, dtype=np.float64)
    t = (np.concatenate([[-np.inf], (k[:-1] + 0.5) / n, [np.inf]]) - loc) / scale
    cdf = ndtr if cls is DiscretizedNormal else expit
    a, b = t[:-1], t[1:]
    with np.errstate(divide="ignore"):
        return torch.as_tensor(np.log(np.where(a > 0, cdf(-a) - cdf(-b), cdf(b) - cdf(a))))


# --- the discretised distributions --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", DISCRETIZED)
@pytest.mark.parametrize("levels", [256, 17, 2])
def test_bin_probabilities_sum_to_one_for_every_location_and_scale(cls, levels):
    x = grid(levels)
    for loc in LOCS:
        for log_scale in LOG_SCALES:
            lp = cls(torch.full((1, 1, 1), loc), torch.tensor(log_scale), levels).log_prob(x)  # (L,)
            assert torch.isfinite(lp).all(), (loc, log_scale)
            assert abs(torch.logsumexp(lp.double(), 0).item()) < 1e-5, (loc, log_scale)


@pytest.mark.parametrize("cls", DISCRETIZED)
def test_a_per_pixel_scale_gives_each_pixel_its_own_distribution(cls):
    loc = torch.tensor([0.2, 0.9]).reshape(1, 1, 2)
    log_scale = torch.tensor([-6.0, -1.0]).reshape(1, 1, 2)
    x = grid(256).expand(256, 1, 1, 2)
    pixels = cls(loc, log_scale, 256).pixel_log_prob(x)  # (L, 1, 1, 2)
    assert torch.allclose(torch.logsumexp(pixels, 0), torch.zeros(1, 1, 2), atol=1e-5)
    for i in range(2):
        alone = cls(loc[..., i:i + 1], log_scale[..., i:i + 1], 256).log_prob(x[..., i:i + 1])
        torch.testing.assert_close(pixels[..., i].flatten(), alone)


@pytest.mark.parametrize("cls", DISCRETIZED)
def test_log_probabilities_equal_cdf_differences(cls):
    for loc in [-0.5, 0.0, 0.123, 0.3, 1.0, 1.5]:
        for log_scale in [-9.0, -5.5, -4.0, -2.0, 0.0, 2.0, 5.0]:
            loc32, scale32 = float(torch.tensor(loc)), float(torch.tensor(log_scale).exp())  # the float32 inputs
            lp = cls(torch.full((1, 1, 1), loc), torch.tensor(log_scale), 256).log_prob(grid(256)).double()
            ref = cdf_differences(cls, loc32, scale32, 256)
            keep = ref > -600  # float64's CDF differences underflow past that; float32's log space does not
            err = ((lp - ref).abs() / (1 + ref.abs()))[keep].max().item()
            assert err < 1e-4, (loc, log_scale, err)


@pytest.mark.parametrize("cls", DISCRETIZED)
def test_tiny_scales_and_edge_bins_give_finite_values_and_gradients(cls):
    loc = torch.tensor([-2.0, 0.0, 0.3, 0.5, 1.0, 3.0]).reshape(6, 1, 1, 1).requires_grad_()
    x = grid(256).reshape(256, 1, 1, 1, 1)
    for log_scale in [-40.0, -20.0, -8.0, 0.0, 8.0, 40.0]:
        ls = torch.tensor(log_scale, requires_grad=True)
        lp = cls(loc, ls, 256).log_prob(x)  # (L, 6)
        grads = torch.autograd.grad(lp.sum(), (loc, ls))
        assert torch.isfinite(lp).all() and all(torch.isfinite(g).all() for g in grads), log_scale
    # a scale far below the bin width puts all the mass on the location's own bin, edge bins included
    for k in (0, 77, 255):
        lp = cls(torch.full((1, 1, 1), k / 255), torch.tensor(-20.0), 256).log_prob(grid(256))
        assert lp[k].abs() < 1e-6 and (lp[torch.arange(256) != k] < -1e3).all()


def test_float64_gradients_match_finite_differences():
    x = grid(256).double().reshape(256, 1, 1, 1, 1)
    for cls in DISCRETIZED:
        loc = torch.tensor([-0.3, 0.0, 0.2, 0.5013, 1.0, 1.4], dtype=torch.float64).reshape(6, 1, 1, 1)
        for log_scale in (-9.0, -5.0, -2.0, 1.0):
            ls = torch.tensor(log_scale, dtype=torch.float64)
            assert torch.autograd.gradcheck(lambda a, b: cls(a, b, 256).log_prob(x),
                                            (loc.requires_grad_(), ls.requires_grad_()), atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("cls", DISCRETIZED)
def test_samples_lie_on_the_grid_with_the_bin_frequencies(cls):
    torch.manual_seed(0)
    d = cls(torch.full((1, 1, 1), 0.5), torch.tensor(math.log(0.02)), 17)
    s = d.sample((20_000,))  # (N, 1, 1, 1)
    assert on_grid(s, 17) and s.shape == (20_000, 1, 1, 1)
    freq = torch.bincount((s.flatten() * 16).round().long(), minlength=17) / len(s)
    expected = d.log_prob(grid(17)).exp()
    assert (freq - expected).abs().max() < 0.015
    assert torch.equal(d.mean, torch.full((1, 1, 1), 0.5))


# --- bits per dimension -------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [256, 17, 2])
def test_a_uniform_model_gives_log2_levels_bits_per_dim(levels):
    d = 784
    # every bin equally likely: log P(x) = -D log L for any image
    assert bits_per_dim(-d * math.log(levels), d) == pytest.approx(math.log2(levels), rel=1e-12)
    # the uniform density on [0, 1]^D of dequantised data: log p = 0 everywhere
    assert bits_per_dim(0.0, d, levels) == pytest.approx(math.log2(levels), rel=1e-12)
    # a fair Bernoulli on binary images is the uniform model on 2 levels
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.5))
    log_px = make_likelihood("bernoulli")(torch.zeros(5, 1, 28, 28)).log_prob(x)
    assert torch.allclose(bits_per_dim(log_px, d), torch.ones(5, dtype=log_px.dtype))


def test_bpd_keys_follow_the_likelihood_kind():
    d, levels = 64, 17
    results = {keys.ELBO: -100.0, keys.NLL_IW: 90.0, keys.RATE: 3.0, "elbo_posthoc": -95.0}
    discrete = bpd_metrics(results, d, levels, DISCRETE)
    assert set(discrete) == {keys.ELBO_BPD, keys.NLL_IW_BPD, keys.ELBO_POSTHOC_BPD}
    assert discrete[keys.ELBO_BPD] == pytest.approx(100 / (d * math.log(2)))
    assert discrete[keys.NLL_IW_BPD] == pytest.approx(90 / (d * math.log(2)))  # nll_iw is -log p already
    dequantized = bpd_metrics(results, d, levels, DEQUANTIZED)
    for key, value in discrete.items():
        assert dequantized[key] == pytest.approx(value + math.log2(levels))
    assert bpd_metrics(results, d, levels, DENSITY_ON_GRID) == {}
    assert all(not keys.HIGHER_IS_BETTER[k] for k in discrete)  # lower is better, and known to the ranking
    assert likelihood_kind(True, False) == DISCRETE and likelihood_kind(False, True) == DEQUANTIZED
    assert likelihood_kind(False, False) == DENSITY_ON_GRID


def test_the_elbo_of_a_decoder_with_known_bin_probabilities_is_their_closed_form():
    """No-information posterior (q = p, rate 0) and a decoder that ignores z: the ELBO is sum_i log P(x_i)
    with P the logistic's CDF difference over x_i's bin, and its bits/dim are that over D ln 2."""
    from benchmark.variants import NoInfo

    torch.manual_seed(0)
    m = NoInfo(data_shape=(1, 4, 4), latent_dim=2, hidden=(), likelihood="discretized_logistic", sigma=0.05,
               levels=17)
    loc = torch.rand(16) * 1.4 - 0.2  # some locations off [0, 1]
    with torch.no_grad():
        m.decoder[0][0].weight.zero_()
        m.decoder[0][0].bias.copy_(loc)
    x = torch.randint(0, 17, (8, 1, 4, 4)) / 16
    with torch.no_grad():
        distortion, rate = elbo_terms(x, m.posterior(x), m.decode, m.prior(x, x.shape[:1]))
    elbo = -(distortion + rate)  # (B,)
    s = torch.tensor(0.05).double().item()
    k = (x.double().reshape(8, 16) * 16).round()
    upper = torch.where(k == 16, torch.tensor(math.inf, dtype=torch.float64), (k + 0.5) / 16)
    lower = torch.where(k == 0, torch.tensor(-math.inf, dtype=torch.float64), (k - 0.5) / 16)
    closed = (torch.sigmoid((upper - loc.double()) / s) - torch.sigmoid((lower - loc.double()) / s)).log().sum(1)
    assert torch.allclose(rate, torch.zeros(8))
    assert torch.allclose(elbo.double(), closed, rtol=1e-5)
    bpd = bpd_metrics({keys.ELBO: float(elbo.mean())}, 16, 17, DISCRETE)[keys.ELBO_BPD]
    assert bpd == pytest.approx(-closed.mean().item() / (16 * math.log(2)), rel=1e-5)


@pytest.mark.parametrize("scale", [0.004, 0.02, 0.1])
def test_the_dequantised_bound_is_below_the_discrete_log_likelihood(scale):
    """A Gaussian density p on dequantised pixels (k + u) / L against the discrete model P(k) = the mass p
    gives k's bin [k/L, (k+1)/L): E_u log p - D log L <= log P (Jensen), tight as the scale outgrows the bin.

    E_u log p is closed form (log p is quadratic, u has mean 1/2 and variance 1/12); the dequantised draws'
    Monte Carlo mean must agree with it."""
    torch.manual_seed(0)
    levels, b, d = 256, 4, 16
    x = torch.randint(0, levels, (b, 1, 4, 4)) / (levels - 1)
    loc = x + 0.01 * torch.randn_like(x)
    k, mu = (x * (levels - 1)).round().double(), loc.double()
    sq = ((k + 0.5) / levels - mu).square() + 1 / (12 * levels**2)  # E_u ((k + u) / L - loc)^2
    expected_log_p = (-0.5 * sq / scale**2 - math.log(scale) - 0.5 * math.log(2 * math.pi)).sum((-3, -2, -1))
    bound_bpd = bits_per_dim(expected_log_p, d, levels)  # (B,)
    normal = Normal(mu, scale)
    mass = normal.cdf((k + 1) / levels) - normal.cdf(k / levels)
    exact_bpd = bits_per_dim(mass.log().sum((-3, -2, -1)), d)
    assert (bound_bpd > exact_bpd).all()
    gap = (bound_bpd - exact_bpd).max().item()
    assert gap < {0.004: 1.0, 0.02: 2e-3, 0.1: 1e-5}[scale], gap  # the bin is 0.0039 wide

    density = IsotropicNormal(loc.double(), torch.tensor(math.log(scale), dtype=torch.float64))
    y = torch.stack([dequantize(x, levels) for _ in range(2000)]).double()  # (U, B, 1, 4, 4)
    mc_bpd = bits_per_dim(density.log_prob(y).mean(0), d, levels)
    spread = bits_per_dim(density.log_prob(y), d, levels).std(0) / math.sqrt(len(y))
    assert ((mc_bpd - bound_bpd).abs() < 5 * spread + 1e-9).all()


# --- the registry and the checks ---------------------------------------------------------------------------

def test_the_likelihood_registry_is_strict():
    assert set(LIKELIHOODS) >= {"bernoulli", "gaussian", "discretized_logistic", "discretized_gaussian"}
    with pytest.raises(KeyError, match="gaussian"):
        register_likelihood("gaussian")(type("Other", (Likelihood,), {}))
    with pytest.raises(TypeError, match="Likelihood"):
        register_likelihood("plain_module")(torch.nn.Identity)
    assert "plain_module" not in LIKELIHOODS
    with pytest.raises(UsageError, match="discretized_gaussian"):
        make_likelihood("discretised_gaussian")  # the valid names are listed
    head = make_likelihood("discretized_gaussian", sigma=0.1, learn_sigma=True, levels=17)
    assert head.discrete and head.levels == 17 and isinstance(head.log_sigma, torch.nn.Parameter)
    assert not make_likelihood("gaussian").discrete and make_likelihood("bernoulli").discrete


def test_the_data_states_its_levels_and_its_images_are_on_that_grid():
    assert DATASETS["digits"].levels == 17
    assert all(DATASETS[name].levels == 256 for name in ("mnist", "fashion_mnist", "cifar10", "celeba64"))
    grey = LatentDataModule("digits", on_device=False)
    grey.setup()
    assert grey.levels == 17
    x = torch.cat([s.x for s in grey.splits.values()])
    assert on_grid(x, 17) and not on_grid(x, 256) and x.max() == 1  # k/16, not k/255
    assert len(torch.unique(x)) == 17
    assert LatentDataModule("digits", binarize="dynamic").levels == 2


def test_dequantised_training_images_are_redrawn_in_their_bins_and_evaluation_images_fixed():
    a = LatentDataModule("digits", dequantize=True, on_device=False, seed=3)
    b = LatentDataModule("digits", dequantize=True, on_device=False, seed=3)
    a.setup(), b.setup()
    assert a.levels == 17
    idx = torch.arange(64)
    first, second = a.splits["train"].batch(idx)[0], a.splits["train"].batch(idx)[0]
    k = (a.splits["train"].x[idx] * 16).round()
    for draw in (first, second):
        assert ((draw * 17 >= k) & (draw * 17 < k + 1)).all()  # (k + u) / L, u in [0, 1)
    assert not torch.equal(first, second)
    for split in ("val", "test"):
        x = a.splits[split].x
        assert torch.equal(x, b.splits[split].x) and not on_grid(x, 17)  # one seeded draw
        assert torch.equal(a.splits[split].batch(torch.arange(10))[0], x[:10])
        k = (a.grey[split][0] * 16).round()  # the grid images FID is measured against stay grid images
        assert ((x * 17 >= k) & (x * 17 < k + 1)).all()
    with pytest.raises(UsageError, match="data.dequantize"):
        LatentDataModule("digits", dequantize=True, binarize="dynamic")


def test_data_off_its_declared_grid_is_refused(monkeypatch):
    def load(root, path):
        x = torch.rand(40, 1, 2, 2)  # continuous values: on no grid
        return x, torch.zeros(40, dtype=torch.long), x[:10], torch.zeros(10, dtype=torch.long)

    monkeypatch.setitem(DATASETS, "off_grid", DatasetSpec((1, 2, 2), load, 10, 256))
    with pytest.raises(UsageError, match="grid k/255"):
        LatentDataModule("off_grid", on_device=False).setup()


def test_the_discretised_head_refuses_images_off_its_grid():
    head = make_likelihood("discretized_logistic", levels=17)
    head.check(torch.arange(17.0) / 16)
    for bad in (torch.arange(17.0) / 17, torch.tensor([1.0 + 1 / 16]), torch.tensor([0.5 / 16])):
        with pytest.raises(UsageError, match="data.dequantize false"):
            head.check(bad)


@pytest.mark.parametrize("extra, named", [
    (["--data.dequantize", "true"], "data.dequantize false"),  # a discretised head on dequantised pixels
    (["--model.init_args.likelihood", "bernoulli"], "data.binarize"),
])
def test_the_cli_refuses_a_likelihood_the_data_does_not_fit(configs_dir, extra, named):
    from benchmark.lightning_cli import build_cli

    files = [configs_dir / "trainer" / "cpu.yaml", configs_dir / "model" / "vae.yaml",
             configs_dir / "data" / "digits.yaml"]
    argv = [a for f in files for a in ("--config", str(f))] + extra
    with pytest.raises(UsageError, match=named):
        build_cli(argv, run=False, save_config_callback=None)


def test_the_cli_links_the_data_levels_into_the_model(configs_dir):
    from benchmark.lightning_cli import build_cli

    files = [configs_dir / "trainer" / "cpu.yaml", configs_dir / "model" / "vae.yaml",
             configs_dir / "data" / "digits.yaml"]
    built = build_cli([a for f in files for a in ("--config", str(f))], run=False, save_config_callback=None)
    assert built.model.hparams.levels == 17 == built.model.likelihood.levels
    assert built.model.hparams.likelihood == "discretized_gaussian"


@pytest.mark.parametrize("likelihood, dequantize, kind", [
    ("discretized_gaussian", False, DISCRETE), ("gaussian", True, DEQUANTIZED), ("gaussian", False, DENSITY_ON_GRID),
])
def test_the_evaluation_reports_bits_per_dim_by_the_likelihood_kind(likelihood, dequantize, kind, tmp_path):
    import lightning as L

    from benchmark.evaluation import EvaluationConfig, evaluate
    from benchmark.variants import VAE

    L.seed_everything(0)
    data = LatentDataModule("digits", dequantize=dequantize, eval_batch_size=100, on_device=False)
    model = VAE(data_shape=data.shape, latent_dim=2, hidden=(16,), likelihood=likelihood, sigma=0.2,
                levels=data.levels)
    cfg = EvaluationConfig(iw_samples=4, fid_samples=0, max_codes=100, expost_epochs=0, gmm_components=0,
                           cache_dir=str(tmp_path))
    data.setup("fit")

    def make_trainer(**kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)

    out = evaluate(model, data, cfg, make_trainer)
    metrics = out["metrics"]
    assert out["protocol"]["likelihood_kind"] == kind and out["protocol"]["levels"] == 17
    if kind == DENSITY_ON_GRID:
        assert not any(k.endswith(keys.BPD_SUFFIX) for k in metrics)
        return
    shift = math.log2(17) if kind == DEQUANTIZED else 0.0
    assert metrics[keys.ELBO_BPD] == pytest.approx(-metrics[keys.ELBO] / (64 * math.log(2)) + shift)
    assert metrics[keys.NLL_IW_BPD] == pytest.approx(metrics[keys.NLL_IW] / (64 * math.log(2)) + shift)
    assert metrics[keys.NLL_IW_BPD] <= metrics[keys.ELBO_BPD] + 1e-6  # IWAE at K=4 is the tighter bound
