"""Each variant is what its name says: tests that fail if one silently became another."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from benchmark import regularizers as R
from benchmark.latents import (Delta, Diagonal, FixedScale, FullCovariance, NoInformation, Posterior, kl, reparametrize,
                               standard_normal)
from benchmark.errors import UsageError
from benchmark.module import TermMeans
from benchmark.variants import VARIANTS

SHAPE = (1, 8, 8)


def make(name, **kw):
    torch.manual_seed(0)
    return VARIANTS[name](data_shape=SHAPE, latent_dim=4, hidden=(32,), **kw)


@pytest.fixture
def x():
    return torch.bernoulli(torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(1)))


DETERMINISTIC = ["ae", "ae_moments", "wae_mmd", "swae", "aae", "rae"]
STOCHASTIC = ["mean_only", "vae", "vae_fullcov"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_encoders_give_the_same_code_twice(name, x):
    m = make(name)
    q = m.posterior(x)
    assert isinstance(q, Delta)
    assert torch.equal(q.rsample(), m.posterior(x).rsample())
    assert torch.isinf(kl(q, m.prior(x, x.shape[:1]))).all()  # why they need an ex-post ELBO


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_encoders_sample_around_a_mean_that_depends_on_x(name, x):
    m = make(name)
    q = m.posterior(x)
    z1, z2 = q.rsample(), q.rsample()
    assert not torch.allclose(z1, z2)
    assert not torch.allclose(q.mean[0], q.mean[1])  # different images, different means
    assert z1.shape == (32, 4)


def test_mean_only_has_the_fixed_scale_and_vae_a_learned_one(x):
    q = make("mean_only", sigma0=0.7).posterior(x)
    assert torch.allclose(q.stddev, torch.full_like(q.stddev, 0.7))
    q = make("vae").posterior(x)
    assert q.stddev.std() > 0  # the scale depends on x and on the dimension
    q = FullCovariance(offdiag_scale=1.0)(torch.randn(32, 14))
    assert isinstance(q, MultivariateNormal)
    off_diag = q.covariance_matrix - torch.diag_embed(q.covariance_matrix.diagonal(dim1=-2, dim2=-1))
    assert off_diag.abs().max() > 1e-3  # correlated: the "third channel"


def test_full_covariance_starts_as_the_diagonal_posterior_and_learns_correlations_at_its_scale(x):
    m = make("vae_fullcov")
    h = m.encoder(x)  # (B, 4 + 4 + 6)
    q, q_diag = m.posterior(x), Diagonal()(h[:, :8])
    assert torch.equal(h[:, 8:], torch.zeros_like(h[:, 8:]))  # the off-diagonal outputs are zero-initialised
    assert torch.allclose(q.mean, q_diag.mean)
    assert torch.allclose(q.covariance_matrix, torch.diag_embed(q_diag.variance), atol=1e-6)
    pz = m.prior(x, x.shape[:1])
    assert torch.allclose(kl(q, pz), kl(q_diag, pz), atol=1e-4)

    h = torch.randn(3, 14)
    rows, cols = torch.tril_indices(4, 4, offset=-1)
    for scale in (0.01, 0.5):
        tril = FullCovariance(scale)(h).scale_tril
        assert torch.allclose(tril[:, rows, cols], scale * h[:, 8:])  # the rate: scale x the network's output
        assert torch.allclose(tril.diagonal(dim1=-2, dim2=-1), Diagonal()(h[:, :8]).stddev)


def test_no_info_codes_do_not_depend_on_x(x):
    m = make("no_info")
    q1, q2 = m.posterior(x), m.posterior(torch.zeros_like(x))
    for q in (q1, q2):
        assert torch.allclose(q.mean, torch.zeros_like(q.mean)) and torch.allclose(q.stddev, torch.ones(32, 4))
    assert m.regularizer(q1.rsample(), q1, None) == 0  # KL(p || p) = 0


@pytest.mark.parametrize("head,n_params", [(FixedScale(0.7), 4), (Diagonal(), 8), (FullCovariance(), 14),
                                           (NoInformation(4), 0)])
def test_analytic_kl_of_every_posterior_equals_its_monte_carlo_estimate(head, n_params):
    torch.manual_seed(0)
    h = torch.randn(5, n_params)
    if n_params == 0:
        h = torch.randn(5, 0)
    q = head(h)
    p = standard_normal(4, torch.zeros(1), (5,))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    exact = kl(q, p)
    assert torch.allclose(exact, mc, atol=0.03, rtol=0.01), (exact, mc)


def test_full_covariance_kl_is_the_multivariate_normal_one():
    q = FullCovariance()(torch.randn(3, 14))
    p = standard_normal(4, torch.zeros(1), (3,))
    ref = torch.distributions.kl_divergence(q, MultivariateNormal(torch.zeros(3, 4), torch.eye(4).expand(3, 4, 4)))
    assert torch.allclose(kl(q, p), ref, atol=1e-5)


# --- regularisers: minimal for codes from N(0, I), large for shifted or scaled codes ------------------------
N, D = 512, 8


def codes(kind, seed=0):
    z = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
    return {"prior": z, "shifted": z + 2.0, "scaled": 3.0 * z}[kind]


@pytest.mark.parametrize("penalty", [
    R.moment_kl,
    lambda z: R.imq_mmd(z, torch.randn_like(z)),
    lambda z: R.sliced_wasserstein(z, 100),
    lambda z: make("rae").regularizer(z, None, None) - 0.5 * D,  # RAE's |z|^2 term, centred on its prior value
], ids=["moments", "mmd", "swd", "rae"])
def test_regulariser_is_minimal_for_prior_codes_and_large_for_shifted_or_scaled(penalty):
    torch.manual_seed(0)
    at_prior = abs(float(penalty(codes("prior"))))
    for kind in ("shifted", "scaled"):
        assert float(penalty(codes(kind))) > 10 * max(at_prior, 1e-2), kind


def test_moment_kl_equals_the_closed_form_of_the_batch_gaussian():
    z = codes("prior") * torch.tensor([1.0, 2.0] * 4) + 0.5
    mean, cov = z.mean(0), torch.cov(z.T)
    ref = torch.distributions.kl_divergence(MultivariateNormal(mean, cov), MultivariateNormal(torch.zeros(D), torch.eye(D)))
    assert torch.allclose(R.moment_kl(z), ref, rtol=1e-3)


def test_moment_kl_is_finite_for_collapsed_codes():
    assert torch.isfinite(R.moment_kl(torch.zeros(N, D)))


def test_adversarial_regulariser_trains_each_player_only_on_its_own_term(x):
    m = make("aae")
    q = m.posterior(x)
    z = q.rsample()
    loss = m.regularizer(z, q, m.decoder(z), m.regularizer_noise(z))
    loss.backward()
    assert all(p.grad is not None for p in m.discriminator.parameters())
    assert all(p.grad is not None for p in m.encoder.parameters())
    # the encoder's gradient comes from fooling D only: it is the gradient of that term alone
    g_enc = [p.grad.clone() for p in m.encoder.parameters()]
    m.zero_grad()
    frozen = {k: v.detach() for k, v in m.discriminator.named_parameters()}
    fool = torch.func.functional_call(m.discriminator, frozen, (m.posterior(x).rsample(),))
    torch.nn.functional.binary_cross_entropy_with_logits(fool, torch.ones_like(fool)).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(g_enc, m.encoder.parameters()))


@pytest.mark.parametrize("reg", ["l2", "gp", "sn"])
def test_rae_decoder_regularisers(reg, x):
    m = make("rae", decoder_reg=reg)
    q = m.posterior(x)
    z = q.rsample()
    out = m.decoder(z)
    value = m.regularizer(z, q, out)
    assert torch.isfinite(value) and value > 0
    penalty = m.decoder_regularizer(z, out)
    assert (penalty > 0) if reg == "gp" else (penalty == 0)
    opt = m.configure_optimizers()
    decays = sorted(g.get("weight_decay", 0) for g in opt.param_groups)
    assert decays[-1] == (1e-3 if reg == "l2" else 0)
    if reg == "sn":
        assert any("parametrizations" in n for n, _ in m.decoder.named_parameters())


def test_term_means_weight_each_batch_by_its_images_and_keep_a_nan():
    means = TermMeans(2)
    means.update(torch.tensor([1.0, 10.0]), 3)
    means.update(torch.tensor([3.0, 20.0]), 1)
    assert means.compute().tolist() == pytest.approx([1.5, 12.5])  # (3 * 1 + 3) / 4, (3 * 10 + 20) / 4
    means.update(torch.tensor([float("nan"), 0.0]), 1)
    assert means.compute()[0].isnan() and means.compute()[1] == pytest.approx(10.0)


def train_step(m, opt, x) -> tuple[float, float]:
    """One step on the module's objective outside Lightning; returns (distortion, loss)."""
    loss, distortion, _ = m.objective(x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(distortion), float(loss)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_learns_to_reconstruct(name, x):
    m = make(name)
    opt = m.configure_optimizers()
    distortions = [train_step(m, opt, x)[0] for _ in range(30)]
    assert distortions[-1] < distortions[0] - 0.5, name


@pytest.mark.slow
@pytest.mark.parametrize("name, kw", [("vae", {}), ("ae", {}), ("rae", {"decoder_reg": "sn"})])
def test_a_compiled_model_trains_as_the_eager_one(name, kw, x):
    """``compile: true`` changes the speed only: the same losses step for step, the same parameter names
    (so checkpoints load either way). About 15 s of compilation a case on a CPU."""
    losses, names = {}, {}
    for compiled in (False, True):
        m = make(name, compile=compiled, **kw)
        opt = m.configure_optimizers()
        torch.manual_seed(1)
        losses[compiled] = [train_step(m, opt, x)[1] for _ in range(3)]
        names[compiled] = list(m.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert names[True] == names[False]


def test_a_compiled_rae_refuses_the_gradient_penalty_before_compiling():
    with pytest.raises(UsageError, match="compile false"):
        make("rae", decoder_reg="gp", compile=True)


def test_rae_gradient_penalty_does_not_depend_on_the_code_penalty_weight(x):
    m = make("rae", decoder_reg="gp", weight=0.0)
    z = m.posterior(x).rsample()
    assert m.decoder_regularizer(z, m.decoder(z)) > 0


# --- reparametrisation by type, and the objective's meaning ---------------------------------------------------

@pytest.mark.parametrize("head, n_params", [(Delta, 4), (FixedScale(0.7), 4), (Diagonal(), 8),
                                            (FullCovariance(), 4 + 10)], ids=["delta", "fixed", "diag", "full"])
def test_reparametrize_draws_from_the_law_of_q(head, n_params):
    """Standard-normal noise through ``reparametrize`` has q's mean and covariance, for every head."""
    torch.manual_seed(0)
    h = torch.randn(3, n_params)
    q = Delta(h) if head is Delta else head(h)
    n = 40_000
    z = reparametrize(q, torch.randn(n, 3, 4))  # (n, B, D)
    centred = z - z.mean(0)
    cov = torch.einsum("nbi,nbj->bij", centred, centred) / (n - 1)
    want = q.covariance_matrix if isinstance(q, MultivariateNormal) else torch.diag_embed(q.variance)
    scale = want.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(1e-3)
    assert torch.allclose(z.mean(0), q.mean, atol=float(5 * scale.max() / n ** 0.5) + 1e-6)
    assert torch.allclose(cov, want, atol=float(0.05 * scale.max() ** 2) + 1e-6)


def test_a_posterior_the_evaluation_cannot_sample_fails_when_the_model_is_built():
    class Laplacian(Posterior):
        def n_params(self, latent_dim):
            return 2 * latent_dim

        def forward(self, h):
            loc, scale = h.chunk(2, -1)
            return torch.distributions.Independent(torch.distributions.Laplace(loc, scale.exp()), 1)

    class LaplaceVAE(VARIANTS["vae"]):
        def make_posterior(self):
            return Laplacian()

    with pytest.raises(UsageError, match="LaplaceVAE's posterior Independent: no reparametrisation for Laplace"):
        LaplaceVAE(data_shape=SHAPE, latent_dim=4, hidden=(32,))


def test_the_vae_objective_at_weight_1_is_minus_the_elbo(x):
    """The loss trained on is -ELBO = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I)) on the same noise, written here
    with torch.distributions alone."""
    m = make("vae", weight=1.0)
    torch.manual_seed(3)
    loss = m.objective(x)[0]
    torch.manual_seed(3)
    q = m.posterior(x)
    z = q.rsample()
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(4), torch.ones(4)), 1)
    minus_elbo = (-m.decode(z).log_prob(x) + torch.distributions.kl_divergence(q, prior)).mean()
    assert torch.allclose(loss, minus_elbo, rtol=1e-6)


def test_the_rae_optimizer_state_of_a_checkpoint_fits_a_new_process_model(x):
    """RAE's decoder weight decay is a parameter group: both groups keep the modules' order, so the optimizer
    state a checkpoint holds (matched by position) lands on the same tensors in a resumed run."""
    trained = make("rae", decoder_reg="l2")
    opt = trained.configure_optimizers()
    assert opt.param_groups[1]["params"] == list(trained.decoder.parameters())
    assert opt.param_groups[0]["params"] == [p for n, p in trained.named_parameters() if not n.startswith("decoder.")]
    for _ in range(2):
        opt.zero_grad()
        trained.objective(x)[0].backward()
        opt.step()
    resumed = make("rae", decoder_reg="l2")
    resumed.load_state_dict(trained.state_dict())
    again = resumed.configure_optimizers()
    again.load_state_dict(opt.state_dict())
    for group in again.param_groups:
        for p in group["params"]:
            assert again.state[p]["exp_avg"].shape == p.shape
    again.zero_grad()
    resumed.objective(x)[0].backward()
    again.step()


@pytest.mark.parametrize("name, extra", [("vae", {}), ("rae", {"decoder_reg": "l2"})])
def test_the_plateau_schedule_cuts_the_rate_when_the_validation_objective_stops_falling(name, extra, x):
    """``lr_plateau`` hands Lightning a ReduceLROnPlateau on ``val/loss``; a threshold no epoch can beat makes
    every epoch after the first a plateau, so with patience 0 the rate halves at the end of each of them."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    plateau = {"factor": 0.5, "patience": 0, "threshold": 1e9, "threshold_mode": "abs"}
    model = make(name, lr=1e-3, lr_plateau=plateau, **extra)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x)), torch.arange(len(x))), batch_size=16)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    (config,) = trainer.lr_scheduler_configs
    assert config.monitor == "val/loss" and config.interval == "epoch"
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [2.5e-4] * len(trainer.optimizers[0].param_groups)
    assert make(name, **extra).configure_optimizers().__class__ is torch.optim.Adam  # no schedule by default


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_step_draws_nothing_but_its_noise(name, x):
    """Every random draw of a training step is made by ``draw_noise``: given the draws, the objective is a
    function of the batch, and drawing them first reproduces the step that draws as it goes. Runs trained as
    one batched model rely on it to give each run its own generator."""
    m = make(name)
    torch.manual_seed(3)
    drawn_inline = m.objective(x)
    torch.manual_seed(3)
    noise = m.draw_noise(x)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(m.objective(x, noise), drawn_inline))
    assert (noise[0] is None) == (name in DETERMINISTIC)
