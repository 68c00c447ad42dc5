"""The evaluation that runs after training: likelihood bounds, FID of samples, latent Gaussianity.

It is a ``LightningModule`` run by ``trainer.test`` on the test split, so the same strategy (one process,
DDP over GPUs or CPU processes) evaluates as it trained. Every metric is a torchmetrics ``Metric``: sums
are reduced over ranks, code buffers are gathered, and the prior / GMM samples are one global seeded set
of which each rank decodes its slice, so a 2-process evaluation equals a 1-process one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, MultivariateNormal

from benchmark.errors import UsageError
from benchmark.latents import Delta, lower_triangular, reparametrize
from benchmark.metrics import keys
from benchmark.metrics.extractors import FEATURE_EXTRACTORS, RUN_CONTEXT, build_feature_extractor, unmet_parameters
from benchmark.metrics.fid import features_to_reference_statistics, reference_features, reference_statistics
from benchmark.metrics.gaussianity import LatentGaussianity, fit_gmm
from benchmark.metrics.likelihood import (DISCRETE, LikelihoodBounds, bpd_metrics, elbo_terms, index_noise,
                                          iw_ladder, iw_log_weights, likelihood_kind)
from benchmark.metrics.sample_quality import SampleQuality
from benchmark.module import LatentVariableModel
from benchmark.nets import mlp
from benchmark.spec import EvaluationConfig


class PosthocPosterior(L.LightningModule):
    """q(z|x) = N(m(x), L(x) L(x)^T), fitted after training with the model frozen: the same posterior family
    for every decoder, so that their ELBOs and IWAE estimates compare decoders rather than encoders.

    m(x) = mu_enc(x) + dmu(x) and L(x) = L_enc(x) A(x), where mu_enc and L_enc are the mean and the Cholesky
    factor of the encoder's own posterior (a full-covariance Gaussian's ``scale_tril``, else diag of its
    standard deviations; a ``Delta`` has none and starts at a learned per-dimension scale, softplus(-2) ~ 0.13),
    and A(x) is lower-triangular with diagonal exp(ds(x)) and strictly lower part ``offdiag_scale`` * off(x).
    (dmu, ds, off) come from a small network on x whose last layer starts at zero, so at initialisation q *is*
    the encoder's own posterior, full covariance included, and the fit can only improve on it. A diagonal
    family started at a full-covariance encoder's marginals was 6 nats of ELBO short of that encoder's own.

    Only that network and the start are trained, on the ELBO of the training split (the amortised variational
    posterior of Kingma & Welling 2014, Eq. 10, fitted to a fixed decoder; cf. the "optimal encoder" of Cremer
    et al. 2018). Any q gives a lower bound on log p(x) of the decoder with the prior N(0, I), so this is a
    valid ELBO for every variant and the common proposal for importance sampling."""

    def __init__(self, model: LatentVariableModel, hidden: int = 256, lr: float = 1e-3, offdiag_scale: float = 0.01):
        super().__init__()
        self.model = model.requires_grad_(False)
        d = model.hparams.latent_dim
        n_out = 2 * d + d * (d - 1) // 2  # dmu, ds, the strictly lower entries of A
        self.correction = nn.Sequential(nn.Flatten(), mlp([math.prod(model.hparams.data_shape), hidden, n_out]))
        nn.init.zeros_(self.correction[-1][-1].weight)
        nn.init.zeros_(self.correction[-1][-1].bias)
        self.start_scale = nn.Parameter(torch.full((d,), -2.0))  # softplus(-2) ~ 0.13: start narrow
        self.lr, self.offdiag_scale = lr, offdiag_scale

    def forward(self, x: Tensor) -> Distribution:
        q_enc = self.model.posterior(x)
        d = q_enc.event_shape[-1]
        tril_enc = getattr(q_enc, "scale_tril", None)  # (B, D, D) where the encoder has correlations
        if tril_enc is None:
            s = q_enc.stddev  # (B, D)
            tril_enc = torch.diag_embed(torch.where(s > 0, s, F.softplus(self.start_scale)))
        h = self.correction(x)
        dmu, ds, off = h[..., :d], h[..., d: 2 * d], h[..., 2 * d:]
        a = lower_triangular(ds.exp(), self.offdiag_scale * off)  # (B, D, D), positive diagonal
        return MultivariateNormal(q_enc.mean + dmu, scale_tril=tril_enc @ a, validate_args=False)

    def on_train_epoch_start(self):
        self.model.eval()  # frozen: BatchNorm statistics must not move either

    def training_step(self, batch, batch_idx):
        x = batch[0]
        distortion, rate = elbo_terms(x, self(x), self.model.decode, self.model.prior(x, x.shape[:1]))
        return (distortion + rate).mean()  # not logged: a per-step log costs more than this small step

    def configure_optimizers(self):
        params = [*self.correction.parameters(), self.start_scale]
        return torch.optim.Adam(params, lr=self.lr)


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


class Evaluation(L.LightningModule):
    """Runs every metric over the test split (``test_step``) and the prior/GMM samples (at epoch end).

    The likelihood keys and the posterior behind each: ``elbo``, ``distortion``, ``rate`` of the encoder's
    own q(z|x) (``own_elbo``: stochastic encoders only); ``elbo_posthoc``, ``distortion_posthoc``,
    ``rate_posthoc`` of the post-hoc one (every variant); ``nll_iw`` (the largest K) and ``nll_iw_k{K}``
    (the ladder ``cfg.iw_ks``) by importance sampling with the post-hoc posterior as proposal."""

    def __init__(self, model: LatentVariableModel, cfg: EvaluationConfig, posthoc: PosthocPosterior,
                 own_elbo: bool = True, extractor=None, reference=None, gmm=None, likelihood_kind: str = DISCRETE,
                 levels: int | None = None, reference_features=None, battery: bool = True,
                 sources: tuple[str, ...] = (keys.FID_PRIOR, keys.FID_RECON, keys.FID_GMM)):
        super().__init__()
        self.model, self.cfg, self.posthoc, self.own_elbo, self.gmm = model, cfg, posthoc, own_elbo, gmm
        self.battery, self.sources = battery, sources  # the Gaussianity battery; the sample sets measured
        # what the likelihood values are of, and on how many levels: they set the bits/dim
        self.likelihood_kind, self.levels = likelihood_kind, levels or model.hparams.levels
        self.extractor, self.reference, self.reference_features = extractor, reference, reference_features
        self.results: dict[str, float] = {}

    def setup(self, stage: str):
        # The metrics are made here, in each process: tensors built before ``ddp_spawn`` reach the workers
        # in shared memory, and both ranks would then add into the same metric states.
        self.own = LikelihoodBounds() if self.own_elbo else None  # the encoder's own ELBO
        self.bounds = LikelihoodBounds(self.cfg.iw_ks, suffix=keys.POSTHOC)
        self.codes = LatentGaussianity(self.cfg.max_codes, self.cfg.seed) if self.battery else None
        self.fid = nn.ModuleDict()
        if self.extractor is not None and self.cfg.fid_samples > 0:
            names = [k for k in self.sources if k != keys.FID_GMM or self.gmm is not None]
            # FID, KID, precision and recall of each sample source from one feature pass; the reconstructions'
            # buffer keeps the first fid_samples test images, like the prior's and the GMM's sample sets.
            self.fid.update({k: SampleQuality(self.extractor, self.reference, self.reference_features,
                                              capacity=self.cfg.fid_samples, seed=self.cfg.seed) for k in names})

    def test_step(self, batch, batch_idx):
        x, _, index = batch
        d, ks, seed = self.model.hparams.latent_dim, self.cfg.iw_ks, self.cfg.seed
        eps = index_noise(index, (d,), seed)  # (B, D): tied to each image, so DDP == one process
        q_model, qz_x, pz = self.model.posterior(x), self.posthoc(x), self.model.prior(x, x.shape[:1])
        if self.own is not None:
            self.own.update(*elbo_terms(x, q_model, self.model.decode, pz, eps))
        distortion, rate = elbo_terms(x, qz_x, self.model.decode, pz, eps)
        log_px = None
        if ks:  # one set of K_max weights gives every L_K of the ladder
            k_max = ks[-1]
            log_w = iw_log_weights(x, qz_x, self.model.decode, pz, k_max, eps=index_noise(index, (k_max, d), seed + 1))
            log_px = iw_ladder(log_w, ks)  # (len(ks), B)
        self.bounds.update(distortion, rate, log_px)

        if self.codes is not None:
            z = reparametrize(q_model, eps)  # the codes the model itself would decode
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
        if self.own is not None:
            results.update({k: float(v) for k, v in self.own.compute().items()})
        dims = math.prod(self.model.hparams.data_shape)
        results.update(bpd_metrics(results, dims, self.levels, self.likelihood_kind))
        if self.codes is not None:
            results.update(self.codes.compute())
        for source, metric in self.fid.items():
            results.update({keys.SAMPLE_QUALITY[source][name]: v for name, v in metric.compute().items()})
        self.results = results
        self.log_dict({f"test/{k}": v for k, v in results.items() if np.isfinite(v)}, rank_zero_only=True)


def check_extractor(cfg: EvaluationConfig):
    """Called before a run trains, so that what would fail its evaluation fails now: the FID extractor is a
    registered one (the registry is torch-side, out of ``EvaluationConfig``'s reach) whose builder needs no
    more than a run gives it, and Inception's weights load (torch-fidelity downloads them the first time;
    offline without a local file, that is an error)."""
    if cfg.fid_samples <= 0:
        return
    if cfg.fid_extractor not in FEATURE_EXTRACTORS:
        raise UsageError(f"unknown evaluation.fid_extractor {cfg.fid_extractor!r}; "
                         f"choose one of {sorted(FEATURE_EXTRACTORS)}")
    if unmet := unmet_parameters(cfg.fid_extractor):
        raise UsageError(f"the builder of evaluation.fid_extractor {cfg.fid_extractor!r} requires {unmet}, which "
                         f"a run does not give: a run gives {list(RUN_CONTEXT)}; give the others defaults")
    if cfg.fid_extractor == "inception":
        build_feature_extractor("inception", weights_path=cfg.inception_weights)


def evaluate(model: LatentVariableModel, datamodule, cfg: EvaluationConfig, make_trainer) -> dict:
    """Fit what the evaluation needs (post-hoc posterior, GMM, FID extractor), then run it on the test split.

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

    posthoc = PosthocPosterior(model)
    # whole splits, whatever the run's limit_*_batches: the evaluation depends on the model alone
    make_trainer(max_epochs=cfg.expost_epochs, limit_train_batches=1.0, limit_val_batches=0,
                 num_sanity_val_steps=0).fit(posthoc, datamodule=datamodule)
    posthoc.eval()
    lap("posthoc_fit_s")
    model.eval()

    extractor = reference = features = gmm = None
    if cfg.fid_samples > 0:
        name = datamodule.hparams.dataset
        context = dict(dataset=name, train_images=x_train, train_labels=y_train, cache_dir=cfg.cache_dir,
                       weights_path=cfg.inception_weights)
        extractor = build_feature_extractor(cfg.fid_extractor, context)
        reference = reference_statistics(name, datamodule.grey["test"][0], extractor, cache_dir=cfg.cache_dir)
        features = reference_features(name, datamodule.grey["test"][0], extractor, cache_dir=cfg.cache_dir)
        lap("fid_reference_s")
        if cfg.gmm_components > 0:
            codes = training_codes(model, x_train, datamodule.binary, cfg.seed)
            gmm = fit_gmm(codes, cfg.gmm_components, cfg.seed)
            lap("gmm_fit_s")

    own_elbo = not is_deterministic(model, x_train[:1].to(model.device))  # a Delta's ELBO is -inf
    kind = likelihood_kind(model.likelihood.discrete, datamodule.hparams.dequantize)
    evaluation = Evaluation(model, cfg, posthoc, own_elbo, extractor, reference, gmm, likelihood_kind=kind,
                            levels=datamodule.levels, reference_features=features)
    results = _test(evaluation, datamodule, make_trainer)
    lap("test_pass_s")
    validation = validation_criteria(model, datamodule, cfg, posthoc, extractor, kind, make_trainer)
    lap("validation_pass_s")
    protocol = {**asdict(cfg), "fid_reference": "test", "fid_image": "decoder mean",
                "iw_ks": list(cfg.iw_ks), "elbo_posterior": "encoder",
                "posthoc_posterior": "amortised full-covariance Gaussian from x, initialised at the encoder's own",
                "nll_iw_proposal": "posthoc",
                "likelihood_kind": kind, "levels": datamodule.levels, "dequantize": datamodule.hparams.dequantize,
                "fid_extractor_meta": getattr(extractor, "meta", None) if extractor is not None else None,
                "gmm_reg_covar": gmm.reg_covar if gmm is not None else None}  # 1e-3 where EM had to be refit
    return {"metrics": results, "validation": validation, "protocol": protocol, "timings": timings}


def validation_criteria(model: LatentVariableModel, datamodule, cfg: EvaluationConfig, posthoc: PosthocPosterior,
                        extractor, kind: str, make_trainer) -> dict[str, float]:
    """What a study selects a variant's setting on, from the validation split alone: the post-hoc posterior's
    ELBO (``elbo_posthoc``, the likelihood criterion) and KID, FID, precision and recall of prior samples
    against the validation images (``kid_prior``, the sample criterion), from a sample set of its own
    (seed + 1). The tuned tables then report test metrics of a setting chosen without looking at them."""
    cfg = replace(cfg, iw_samples=0, seed=cfg.seed + 1)
    features = reference = None
    if extractor is not None:
        name = f"{datamodule.hparams.dataset}-val"
        images = datamodule.grey["val"][0]
        features = reference_features(name, images, extractor, cache_dir=cfg.cache_dir)
        reference = features_to_reference_statistics(features)
    criteria = Evaluation(model, cfg, posthoc, own_elbo=False, extractor=extractor, reference=reference,
                          likelihood_kind=kind, levels=datamodule.levels, reference_features=features,
                          battery=False, sources=(keys.FID_PRIOR,))
    datamodule.test_split = "val"
    try:
        return _test(criteria, datamodule, make_trainer)
    finally:
        datamodule.test_split = "test"


def _test(evaluation: Evaluation, datamodule, make_trainer) -> dict[str, float]:
    """``evaluation``'s results over the datamodule's test split (its ``test_split``). Spawned processes
    return only what was logged (the finite values)."""
    trainer = make_trainer(limit_test_batches=1.0)
    trainer.test(evaluation, datamodule=datamodule, verbose=False)
    return evaluation.results or {k[len("test/"):]: float(v) for k, v in trainer.callback_metrics.items()
                                  if k.startswith("test/")}
