"""The one training loop every latent variant shares.

encode -> posterior q(z|x) -> z ~ q (reparametrised) -> decode -> likelihood p(x|z) -> objective.
A variant states two things only (see ``variants.py``): its posterior head (``make_posterior``) and its
regulariser (``regularizer``). The objective it trains on and the ELBO it is evaluated on are kept apart:
the objective is ``distortion + weight * regularizer`` (+ a decoder regulariser, RAE's only); the ELBO is
``-(distortion + KL(q || p))``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torchmetrics import Metric

from benchmark.errors import UsageError
from benchmark.latents import Deterministic, Posterior, reparametrize, standard_normal
from benchmark.likelihoods import make_likelihood
from benchmark.nets import NETWORKS

TERMS = ("loss", "distortion", "regularizer")  # logged as {stage}/{term}, means over the epoch's images


class TermMeans(Metric):
    """Means over an epoch's images of the objective's terms: a (T,) sum and an image count, summed over
    processes. One update a step: a ``MeanMetric`` for each of the three terms cost 0.85-1.0 ms a training
    step on a CPU (3-4% of an MLP step), this one about 0.15 ms. A NaN term stays NaN: a diverged epoch
    must show it."""

    full_state_update = False

    def __init__(self, n_terms: int):
        super().__init__()
        self.add_state("sums", torch.zeros(n_terms), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, values: Tensor, n: int):
        self.sums += values * n  # values: (T,) batch means
        self.count += n

    def compute(self) -> Tensor:
        return self.sums / self.count


class LatentVariableModel(L.LightningModule):
    """Decoder p(x|z), prior p(z) = N(0, I), an encoder head q(z|x), and a regulariser.

    Args:
        data_shape: image shape (C, H, W); the CLI links it from the DataModule.
        latent_dim: D, the size of z.
        network: ``mlp`` or ``conv`` (same network for encoder and decoder, mirrored).
        hidden: hidden sizes (MLP widths, or conv channels, e.g. 128-256-512-1024).
        likelihood: a ``benchmark.likelihoods.LIKELIHOODS`` key: ``bernoulli`` (binary data),
            ``discretized_gaussian`` / ``discretized_logistic`` (a probability of each of the data's ``levels``
            pixel values), ``gaussian`` (a density: a likelihood of the discrete data once it is dequantised).
        sigma, learn_sigma: the likelihood's scalar scale, fixed or learned (Gaussian and discretised heads).
        levels: pixel values of the data; the CLI links it from the DataModule.
        weight: the regulariser's weight in the objective (beta for the VAE, lambda for the WAE, ...).
        lr: Adam's learning rate.
        lr_plateau: ``ReduceLROnPlateau``'s arguments (e.g. ``{factor: 0.5, patience: 4}``: Ghosh et al. 2020's Keras
            schedule, patience 5 there, where the cut comes one epoch sooner) to cut the rate when the validation
            objective stops falling; None keeps it constant.
        compile: ``torch.compile`` the encoder and decoder (in place, so checkpoints load either way). For
            GPUs, where these small networks are launch-bound; on a CPU it is slower (results/performance.md).
    """

    def __init__(self, data_shape: Sequence[int] = (1, 28, 28), latent_dim: int = 16, network: str = "mlp",
                 hidden: Sequence[int] = (500, 500), likelihood: str = "bernoulli", sigma: float = 1.0,
                 learn_sigma: bool = False, levels: int = 256, weight: float = 1.0, lr: float = 1e-3,
                 lr_plateau: Optional[dict] = None, compile: bool = False):
        super().__init__()
        if latent_dim < 1:
            raise UsageError(f"latent_dim must be a positive integer, got {latent_dim}")
        if network not in NETWORKS:
            raise UsageError(f"unknown network {network!r}; choose one of {sorted(NETWORKS)}")
        self.save_hyperparameters()
        data_shape, hidden = tuple(data_shape), tuple(hidden)
        make_encoder, make_decoder = NETWORKS[network]
        self.head = self.make_posterior()
        self.encoder = make_encoder(data_shape, self.head.n_params(latent_dim), hidden)
        self.decoder = make_decoder(latent_dim, data_shape, hidden)
        output = [m for m in self.encoder.modules() if isinstance(m, nn.Linear)][-1]  # every network ends in one
        self.head.init_output(output)
        _check_posterior(self.head, latent_dim, type(self).__name__)
        if compile:
            self.encoder.compile()
            self.decoder.compile()
        self.likelihood = make_likelihood(likelihood, sigma, learn_sigma, levels)
        # Epoch means of the objective's terms, kept on the device and reduced over processes by torchmetrics,
        # logged once an epoch: a per-step ``self.log`` costs milliseconds of Python, 10-15% of a CPU step.
        self.terms = nn.ModuleDict({f"{stage}_terms": TermMeans(len(TERMS)) for stage in ("train", "val", "test")})

    # --- what a variant states -----------------------------------------------------------------------
    def make_posterior(self) -> Posterior:
        """The encoder head q(z|x); deterministic unless a variant says otherwise."""
        return Deterministic()

    def regularizer(self, z: Tensor, qz_x: Distribution, x_out: Tensor, noise: tuple[Tensor, ...] = ()) -> Tensor:
        """The variant's penalty on the batch's codes z (B, D), scalar, given the draws ``regularizer_noise``
        made for it (passed only where it made some, so a variant that draws none may leave ``noise`` out).
        None for the plain autoencoder."""
        return z.new_zeros(())

    def regularizer_noise(self, like: Tensor) -> tuple[Tensor, ...]:
        """The random draws ``regularizer`` uses (prior samples, projection directions) for codes shaped like
        ``like`` (B, D). Drawn apart from the computation, so that a batch of runs trained as one model
        (``benchmark.members``) draws each run's from that run's own generator. None by default."""
        return ()

    def decoder_regularizer(self, z: Tensor, x_out: Tensor) -> Tensor:
        """A penalty on the decoder's smoothness (RAE's L_REG), already weighted. None by default."""
        return z.new_zeros(())

    def why_not_members(self) -> str | None:
        """Why runs of this model cannot train as one batched model (``benchmark.members``), or None."""
        if self.hparams.get("lr_plateau"):
            return "lr_plateau cuts each run's rate on its own validation loss, and members share one optimizer"
        if self.hparams.get("compile"):
            return "a compiled network is not mapped over members; set model.init_args.compile false"
        return None

    # --- the model ------------------------------------------------------------------------------------
    def prior(self, like: Tensor, batch_shape=()) -> Distribution:
        return standard_normal(self.hparams.latent_dim, like, batch_shape)

    def posterior(self, x: Tensor) -> Distribution:
        return self.head(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z (..., D); the distribution's mean is the image."""
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, z.shape[-1]))
        out = out.reshape(*lead, *out.shape[1:])
        return self.likelihood(out)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I): the decoder's mean (probabilities for Bernoulli)."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator, device=self.device)
        return self.decode(z).mean.clamp(0, 1)

    # --- the loop -------------------------------------------------------------------------------------
    def draw_noise(self, x: Tensor) -> tuple[Tensor | None, tuple[Tensor, ...]]:
        """A step's random draws for the batch x, in the order the step uses them: the posterior's
        standard-normal eps (B, D) (None for a deterministic head), then the regulariser's."""
        like = x.new_empty(len(x), self.hparams.latent_dim)
        eps = torch.randn_like(like) if self.head.stochastic else None
        return eps, self.regularizer_noise(like)

    def forward(self, x: Tensor, noise: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(distortion, regulariser, decoder regulariser) of a batch, each a scalar, with the step's random
        draws ``noise`` (``draw_noise``; drawn now when None). What a batch of runs maps over."""
        eps, reg_noise = self.draw_noise(x) if noise is None else noise
        qz_x = self.posterior(x)
        z = qz_x.rsample() if eps is None else reparametrize(qz_x, eps)  # (B, D)
        x_out = self.decoder(z)
        distortion = -self.likelihood(x_out).log_prob(x).mean()  # nats per image
        reg = self.regularizer(z, qz_x, x_out, reg_noise) if reg_noise else self.regularizer(z, qz_x, x_out)
        return distortion, reg, self.decoder_regularizer(z, x_out)

    def objective(self, x: Tensor, noise: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, distortion, regulariser) of a batch, each a scalar: the objective trained on, and its parts."""
        distortion, reg, decoder_reg = self(x, noise)
        return distortion + self.hparams.weight * reg + decoder_reg, distortion, reg

    def _common_step(self, batch, stage: str) -> Tensor:
        x = batch[0]
        terms = self.objective(x)  # in TERMS order
        self.terms[f"{stage}_terms"].update(torch.stack(terms).detach(), len(x))
        return terms[0]

    def _log_terms(self, stage: str):
        terms = self.terms[f"{stage}_terms"]
        means = terms.compute()  # (T,)
        terms.reset()
        self.log_dict({f"{stage}/{term}": mean for term, mean in zip(TERMS, means)}, prog_bar=stage != "train")

    def on_fit_start(self):
        data = getattr(self.trainer, "datamodule", None)
        # the validation split is prepared as training's draws are (binarised, dequantised) but fixed: no
        # random draw here, which would shift the generator a resumed run restores
        if data is not None and "val" in getattr(data, "splits", {}):
            self.likelihood.check(data.splits["val"].x[:256])

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._common_step(batch, "test")

    def on_train_epoch_end(self):
        self._log_terms("train")

    def on_validation_epoch_end(self):
        self._log_terms("val")

    def on_test_epoch_end(self):
        self._log_terms("test")

    def configure_optimizers(self):
        # fused: one kernel per step for all parameters; on a CPU the per-tensor loop took 4.5-5 ms of a
        # 20 ms MLP step, the fused step 1.6-2 ms. Same update up to float rounding.
        return self.scheduled(torch.optim.Adam(self.parameters(), lr=self.hparams.lr, fused=True))

    def scheduled(self, optimizer: torch.optim.Optimizer):
        """``optimizer`` with the ``lr_plateau`` schedule on the validation objective, where one is set."""
        if not self.hparams.get("lr_plateau"):
            return optimizer
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", **self.hparams.lr_plateau)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss",
                                                          "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["variant_class"] = f"{type(self).__module__}.{type(self).__qualname__}"


def _check_posterior(head: Posterior, latent_dim: int, variant: str):
    """A head whose posterior the evaluation cannot sample with given noise fails here, before training."""
    q = head(torch.zeros(1, head.n_params(latent_dim)))
    try:
        reparametrize(q, torch.zeros(1, latent_dim))
    except NotImplementedError as e:
        raise UsageError(f"{variant}'s posterior {type(q).__name__}: {e}") from None
