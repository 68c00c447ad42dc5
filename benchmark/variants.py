"""The latent variants. Each states its posterior head and its regulariser; the loop is ``module.py``.

Names in ``VARIANTS`` are the user-facing keys (studies, records, the leaderboard).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmark import regularizers as R
from benchmark.errors import UsageError
from benchmark.latents import Diagonal, FixedScale, FullCovariance, NoInformation, kl
from benchmark.module import LatentVariableModel
from benchmark.nets import mlp


class AE(LatentVariableModel):
    """Deterministic autoencoder z = f(x), no regulariser: nothing ties the codes to the prior."""


class AEMoments(LatentVariableModel):
    """Deterministic codes whose batch moments are pushed to N(0, I):
    KL(N(mean_B, cov_B) || N(0, I)), the literal proposal "make the empirical distribution of z Gaussian"."""

    def regularizer(self, z, qz_x, x_out, noise=()):
        return R.moment_kl(z)


class WAEMMD(LatentVariableModel):
    """WAE-MMD: MMD between the batch's codes and prior samples, multi-scale inverse multiquadratic kernel
    (Tolstikhin et al. 2018, Algorithm 2; lambda = 10 as in their MNIST experiments)."""

    def __init__(self, weight: float = 10.0, **kwargs):
        super().__init__(weight=weight, **kwargs)

    def regularizer_noise(self, like):
        return (torch.randn_like(like),)  # prior samples

    def regularizer(self, z, qz_x, x_out, noise=()):
        (z_prior,) = noise
        return R.imq_mmd(z, z_prior)


class SWAE(LatentVariableModel):
    """Sliced-Wasserstein autoencoder: SW_2^2 between the codes and N(0, I) over random directions
    (Kolouri et al. 2019, Eq. 9)."""

    def __init__(self, weight: float = 10.0, n_projections: int = 50, **kwargs):
        super().__init__(weight=weight, **kwargs)

    def regularizer_noise(self, like):
        return (R.projections(like.shape[-1], self.hparams.n_projections, like=like),)

    def regularizer(self, z, qz_x, x_out, noise=()):
        (theta,) = noise
        return R.sliced_wasserstein(z, theta=theta)


class AAE(LatentVariableModel):
    """Adversarial regularisation of the codes (Makhzani et al. 2016; WAE-GAN, Tolstikhin et al. 2018,
    Algorithm 1). A discriminator D(z) tells prior samples from codes; the encoder is trained to fool it.

    Both players share one optimiser: the encoder's term sees D through detached parameters, and D's term
    sees detached codes, so each gradient reaches only its own player.
    """

    def __init__(self, disc_hidden: Sequence[int] = (512, 512), **kwargs):
        super().__init__(**kwargs)
        self.discriminator = mlp([self.hparams.latent_dim, *disc_hidden, 1])

    def regularizer_noise(self, like):
        return (torch.randn_like(like),)  # prior samples, D's real class

    def regularizer(self, z, qz_x, x_out, noise=()):
        (z_prior,) = noise
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        fool = functional_call(self.discriminator, frozen, (z,))
        real, fake = self.discriminator(z_prior), self.discriminator(z.detach())
        bce = F.binary_cross_entropy_with_logits
        return (bce(fool, torch.ones_like(fool))
                + bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))


class RAE(LatentVariableModel):
    """Regularised autoencoder (Ghosh et al. 2020, Eq. 11): weight * 1/2 |z|^2 plus a decoder regulariser,
    ``l2`` (weight decay on the decoder), ``gp`` (|grad_z decoder|^2) or ``sn`` (spectral normalisation),
    with strength ``decoder_weight`` (unused by ``sn``)."""

    def __init__(self, decoder_reg: Literal["l2", "gp", "sn"] = "l2", decoder_weight: float = 1e-3, **kwargs):
        if decoder_reg not in ("l2", "gp", "sn"):
            raise UsageError(f"unknown decoder_reg {decoder_reg!r}; choose l2, gp or sn")
        if decoder_reg == "gp" and kwargs.get("compile"):
            raise UsageError("decoder_reg gp differentiates through the decoder twice, which a compiled decoder "
                             "cannot; set model.init_args.compile false or decoder_reg l2 or sn")
        super().__init__(**kwargs)
        if decoder_reg == "sn":
            for m in self.decoder.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    nn.utils.parametrizations.spectral_norm(m)

    def regularizer(self, z, qz_x, x_out, noise=()):
        return 0.5 * z.pow(2).sum(-1).mean()

    def why_not_members(self):
        reason = {"gp": "differentiates through the decoder inside the step",
                  "sn": "updates its power-iteration vectors in place"}.get(self.hparams.decoder_reg)
        if reason:
            return f"RAE's decoder_reg {self.hparams.decoder_reg} {reason}, which vmap cannot map over members"
        return super().why_not_members()

    def decoder_regularizer(self, z, x_out):
        if self.hparams.decoder_reg != "gp" or not z.requires_grad:
            # l2 is weight decay, sn a reparametrisation; the gradient penalty needs autograd, so validation
            # (run in inference mode) leaves it out of val/loss
            return super().decoder_regularizer(z, x_out)
        (grad,) = torch.autograd.grad(x_out.sum(), z, create_graph=True)
        return self.hparams.decoder_weight * grad.pow(2).sum(-1).mean()

    def configure_optimizers(self):
        if self.hparams.decoder_reg != "l2":
            return super().configure_optimizers()
        # Each group in the modules' own order: a checkpoint's optimizer state is matched to the parameters by
        # position, and a set's order (by object id) differs from one process to the next, so a resumed run
        # got another tensor's moments (a segfault in the fused step).
        dec = list(self.decoder.parameters())
        in_dec = {id(p) for p in dec}
        groups = [{"params": [p for p in self.parameters() if id(p) not in in_dec]},
                  {"params": dec, "weight_decay": self.hparams.decoder_weight}]
        return self.scheduled(torch.optim.Adam(groups, lr=self.hparams.lr, fused=True))


class KLRegularized(LatentVariableModel):
    """Stochastic encoders trained on the ELBO: regulariser KL(q(z|x) || N(0, I)) (closed form)."""

    def regularizer(self, z, qz_x, x_out, noise=()):
        return kl(qz_x, self.prior(z, z.shape[:-1]), z).mean()


class MeanOnly(KLRegularized):
    """z = mu(x) + sigma0 * eps with fixed sigma0: KL(N(mu, sigma0^2 I) || N(0, I)).
    sigma0 = 0.7 reproduces the constant-variance VAE of Ghosh et al. 2020."""

    def __init__(self, sigma0: float = 1.0, **kwargs):
        if sigma0 <= 0:
            raise UsageError(f"sigma0 must be positive, got {sigma0}")
        super().__init__(**kwargs)

    def make_posterior(self):
        return FixedScale(self.hparams.sigma0)


class VAE(KLRegularized):
    """The VAE (Kingma & Welling 2014, Eq. 10): diagonal Gaussian posterior, objective
    -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)) with beta = ``weight`` (1 gives the ELBO)."""

    def make_posterior(self):
        return Diagonal()


class VAEFullCov(KLRegularized):
    """The VAE with a full-covariance Gaussian posterior z = mu(x) + L(x) eps, L lower-triangular. It starts as
    the diagonal VAE; ``offdiag_scale`` is the rate at which L's off-diagonal entries learn (``FullCovariance``)."""

    def __init__(self, offdiag_scale: float = 0.01, **kwargs):
        if not offdiag_scale > 0:
            raise UsageError(f"offdiag_scale must be positive, got {offdiag_scale}")
        super().__init__(**kwargs)

    def make_posterior(self):
        return FullCovariance(self.hparams.offdiag_scale)


class NoInfo(KLRegularized):
    """z = eps independent of x (q(z|x) = p(z), KL = 0): the decoder can only learn the average image."""

    def make_posterior(self):
        return NoInformation(self.hparams.latent_dim)


VARIANTS: dict[str, type[LatentVariableModel]] = {
    "ae": AE, "ae_moments": AEMoments, "wae_mmd": WAEMMD, "swae": SWAE, "aae": AAE, "rae": RAE,
    "mean_only": MeanOnly, "vae": VAE, "vae_fullcov": VAEFullCov, "no_info": NoInfo,
}


def variant_name(model: LatentVariableModel) -> str:
    return next(k for k, v in VARIANTS.items() if type(model) is v)
