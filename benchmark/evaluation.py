"""The evaluation that runs after training: likelihood bounds, FID of samples, latent Gaussianity.

It is a ``LightningModule`` run by ``trainer.test`` on the test split, so the same strategy (one process,
DDP over GPUs or CPU processes) evaluates as it trained. Every metric is a torchmetrics ``Metric``: sums
are reduced over ranks, code buffers are gathered, and the prior / GMM samples are one global seeded set
of which each rank decodes its slice, so a 2-process evaluation equals a 1-process one.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal

from benchmark.errors import UsageError
from benchmark.latents import Delta, reparametrize
from benchmark.metrics import keys
from benchmark.metrics.fid import (FEATURE_EXTRACTORS, build_feature_extractor, reference_features,
                                   reference_statistics)
from benchmark.metrics.gaussianity import LatentGaussianity
from benchmark.metrics.likelihood import LikelihoodBounds, elbo_terms, index_noise, iw_log_likelihood
from benchmark.metrics.sample_quality import SampleQuality
from benchmark.module import LatentVariableModel
from benchmark.nets import mlp
from benchmark.spec import EvaluationConfig


class ExPostPosterior(L.LightningModule):
    """q(z|x) = N(f(x), diag s(f(x))^2) around a frozen deterministic encoder f.

    Only the small scale head s is trained, on the ELBO of the training split with the decoder frozen. The
    ELBO of any q is a lower bound on log p(x) of the decoder with the prior N(0, I), so this gives the
    deterministic variants a valid, comparable ELBO (and a proposal for importance sampling)."""

    def __init__(self, model: LatentVariableModel, hidden: int = 64, lr: float = 1e-3):
        super().__init__()
        self.model = model.requires_grad_(False)
        d = model.hparams.latent_dim
        self.scale = mlp([d, hidden, d])
        nn.init.constant_(self.scale[-1].bias, -2.0)  # start narrow: softplus(-2) ~ 0.13
        self.lr = lr

    def forward(self, x: Tensor) -> Distribution:
        code = self.model.posterior(x).mean  # (B, D)
        scale = F.softplus(self.scale(code)) + 1e-4
        return Independent(Normal(code, scale, validate_args=False), 1)

    def on_train_epoch_start(self):
        self.model.eval()  # frozen: BatchNorm statistics must not move either

    def training_step(self, batch, batch_idx):
        x = batch[0]
        distortion, rate = elbo_terms(x, self(x), self.model.decode, self.model.prior(x, x.shape[:1]))
        return (distortion + rate).mean()  # not logged: a per-step log costs more than this small step

    def configure_optimizers(self):
        return torch.optim.Adam(self.scale.parameters(), lr=self.lr)


def is_deterministic(model: LatentVariableModel, x: Tensor) -> bool:
    return isinstance(model.posterior(x[:1]), Delta)


@torch.no_grad()
def training_codes(model: LatentVariableModel, x: Tensor, binary: bool, seed: int) -> np.ndarray:
    """Posterior means of the training images (binarised once, seeded, for binary data), float64."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    codes = []
    for batch in x.split(1000):
        batch = torch.bernoulli(batch, generator=g) if binary else batch
        codes.append(model.posterior(batch.to(model.device)).mean.double().cpu())
    return torch.cat(codes).numpy()


def fit_gmm(codes: np.ndarray, n_components: int, seed: int):
    """The RAE protocol's ex-post density: a full-covariance Gaussian mixture on the training codes
    (Ghosh et al. 2020, Section 4). Fitted in float64 (float32 gives spuriously non-PSD covariances)."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    # One BLAS thread: EM's products are (N, D) x (D, D) with D ~ 16, too small to share, and a second
    # pool beside torch's only contends (50k codes: 7.8 s -> 5.0 s on 2 cores, the same fit).
    with threadpool_limits(1):
        return GaussianMixture(n_components, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(codes)


class Evaluation(L.LightningModule):
    """Runs every metric over the test split (``test_step``) and the prior/GMM samples (at epoch end)."""

    def __init__(self, model: LatentVariableModel, cfg: EvaluationConfig, expost: ExPostPosterior | None = None,
                 extractor=None, reference=None, gmm=None, reference_features=None):
        super().__init__()
        self.model, self.cfg, self.expost, self.gmm = model, cfg, expost, gmm
        self.extractor, self.reference, self.reference_features = extractor, reference, reference_features
        self.results: dict[str, float] = {}

    def setup(self, stage: str):
        # The metrics are made here, in each process: tensors built before ``ddp_spawn`` reach the workers
        # in shared memory, and both ranks would then add into the same metric states.
        self.bounds = LikelihoodBounds()
        self.codes = LatentGaussianity(self.cfg.max_codes, self.cfg.seed)
        self.fid = nn.ModuleDict()
        if self.extractor is not None and self.cfg.fid_samples > 0:
            names = [keys.FID_PRIOR, keys.FID_RECON] + ([keys.FID_GMM] if self.gmm is not None else [])
            # FID, KID, precision and recall of each sample source from one feature pass; the reconstructions'
            # buffer keeps the first fid_samples test images, like the prior's and the GMM's sample sets.
            self.fid.update({k: SampleQuality(self.extractor, self.reference, self.reference_features,
                                              capacity=self.cfg.fid_samples, seed=self.cfg.seed) for k in names})

    def proposal(self, x: Tensor) -> Distribution:
        """q(z|x) for the likelihood bounds: the encoder's own posterior, or the ex-post one."""
        return self.expost(x) if self.expost is not None else self.model.posterior(x)

    def test_step(self, batch, batch_idx):
        x, _, index = batch
        d, k, seed = self.model.hparams.latent_dim, self.cfg.iw_samples, self.cfg.seed
        eps = index_noise(index, (d,), seed)  # (B, D): tied to each image, so DDP == one process
        qz_x, pz = self.proposal(x), self.model.prior(x, x.shape[:1])
        distortion, rate = elbo_terms(x, qz_x, self.model.decode, pz, eps)
        log_px = None
        if k > 0:
            log_px = iw_log_likelihood(x, qz_x, self.model.decode, pz, k, eps=index_noise(index, (k, d), seed + 1))
        self.bounds.update(distortion, rate, log_px)

        q_model = self.model.posterior(x)  # the codes the model itself would decode
        z = reparametrize(q_model, eps)
        self.codes.update(z, q_model.mean, index)  # a Delta's mean is its code
        if keys.FID_RECON in self.fid:
            self.fid[keys.FID_RECON].update(self.model.decode(q_model.mean).mean.clamp(0, 1), index)

    def _decode_slice(self, z: Tensor, metric):
        """Decode this rank's slice of a global sample set z (N, D) into the FID metric."""
        n, w, r = len(z), self.trainer.world_size, self.trainer.global_rank
        index = torch.arange(r * n // w, (r + 1) * n // w)  # (n / w,) global sample numbers
        for i in index.split(1000):
            metric.update(self.model.decode(z[i].to(self.device)).mean.clamp(0, 1), i.to(self.device))

    def on_test_epoch_end(self):
        n, d = self.cfg.fid_samples, self.model.hparams.latent_dim
        if keys.FID_PRIOR in self.fid:
            z = torch.randn(n, d, generator=torch.Generator().manual_seed(self.cfg.seed))
            self._decode_slice(z, self.fid[keys.FID_PRIOR])
        if keys.FID_GMM in self.fid:
            self.gmm.random_state = self.cfg.seed
            z = torch.as_tensor(self.gmm.sample(n)[0], dtype=torch.float32)
            self._decode_slice(z, self.fid[keys.FID_GMM])
        results = {k: float(v) for k, v in self.bounds.compute().items()}
        if self.cfg.iw_samples <= 0:
            results.pop(keys.NLL_IW)
        if self.expost is not None:
            results[keys.ELBO_EXPOST] = results[keys.ELBO]
        results.update(self.codes.compute())
        for source, metric in self.fid.items():
            results.update({keys.SAMPLE_QUALITY[source][name]: v for name, v in metric.compute().items()})
        self.results = results
        self.log_dict({f"test/{k}": v for k, v in results.items() if np.isfinite(v)}, rank_zero_only=True)


def check_extractor(cfg: EvaluationConfig):
    """Called before a run trains, so that what would fail its evaluation fails now: the FID extractor is a
    registered one (the registry is torch-side, out of ``EvaluationConfig``'s reach), and Inception's weights
    load (torch-fidelity downloads them the first time; offline without a local file, that is an error)."""
    if cfg.fid_samples <= 0:
        return
    if cfg.fid_extractor not in FEATURE_EXTRACTORS:
        raise UsageError(f"unknown evaluation.fid_extractor {cfg.fid_extractor!r}; "
                         f"choose one of {sorted(FEATURE_EXTRACTORS)}")
    if cfg.fid_extractor == "inception":
        build_feature_extractor("inception", weights_path=cfg.inception_weights)


def evaluate(model: LatentVariableModel, datamodule, cfg: EvaluationConfig, make_trainer) -> dict:
    """Fit what the evaluation needs (ex-post posterior, GMM, FID extractor), then run it on the test split.

    ``make_trainer(**overrides)`` builds a Trainer with the run's strategy and devices. Returns the metrics,
    a description of the protocol for the run record, and the seconds each phase took."""
    datamodule.setup("test")
    L.seed_everything(cfg.seed, verbose=False)  # the evaluation of a model is a function of the model alone
    model.eval()
    x_train, y_train = datamodule.grey["train"]
    timings, clock = {}, time.perf_counter()

    def lap(name: str):
        nonlocal clock
        now = time.perf_counter()
        timings[name], clock = now - clock, now

    expost = None
    if is_deterministic(model, x_train[:1].to(model.device)):
        expost = ExPostPosterior(model)
        # whole splits, whatever the run's limit_*_batches: the evaluation depends on the model alone
        make_trainer(max_epochs=cfg.expost_epochs, limit_train_batches=1.0, limit_val_batches=0,
                     num_sanity_val_steps=0).fit(expost, datamodule=datamodule)
        expost.eval()
        lap("expost_fit_s")
    model.eval()

    extractor = reference = features = gmm = None
    if cfg.fid_samples > 0:
        name = datamodule.hparams.dataset
        if cfg.fid_extractor == "domain":
            extractor = build_feature_extractor("domain", dataset=name, train_images=x_train, train_labels=y_train,
                                                cache_dir=cfg.cache_dir)
        else:
            extractor = build_feature_extractor(cfg.fid_extractor, weights_path=cfg.inception_weights)
        reference = reference_statistics(name, datamodule.grey["test"][0], extractor, cache_dir=cfg.cache_dir)
        features = reference_features(name, datamodule.grey["test"][0], extractor, cache_dir=cfg.cache_dir)
        lap("fid_reference_s")
        if cfg.gmm_components > 0:
            codes = training_codes(model, x_train, datamodule.binary, cfg.seed)
            gmm = fit_gmm(codes, cfg.gmm_components, cfg.seed)
            lap("gmm_fit_s")

    evaluation = Evaluation(model, cfg, expost, extractor, reference, gmm, reference_features=features)
    trainer = make_trainer(limit_test_batches=1.0)
    trainer.test(evaluation, datamodule=datamodule, verbose=False)
    lap("test_pass_s")
    results = evaluation.results or {k[len("test/"):]: float(v) for k, v in trainer.callback_metrics.items()
                                     if k.startswith("test/")}
    protocol = {**asdict(cfg), "fid_reference": "test", "fid_image": "decoder mean",
                "elbo_posterior": "ex-post Gaussian" if expost is not None else "encoder",
                "fid_extractor_meta": getattr(extractor, "meta", None) if extractor is not None else None}
    return {"metrics": results, "protocol": protocol, "timings": timings}
