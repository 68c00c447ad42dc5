"""KID and precision/recall of generated images against a test split, in the features FID uses.

FID summarises each set by a Gaussian and mixes fidelity with diversity in one number. Beside it:

- KID (Binkowski et al. 2018, "Demystifying MMD GANs", ICLR, arXiv:1801.01401, Section 2.3 and Eq. 4): the
  unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
  subsets. Unbiased: its expectation is 0 when both sets come from one distribution (it can be negative).
- Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models", NeurIPS, arXiv:1904.06991, Eq. 1-2): each set's manifold is the union of balls around
  its points with radius the distance to the k-th nearest neighbour (k = 3); precision is the fraction of
  generated points inside the real manifold, recall the fraction of real points inside the generated one.

The maths is torch-fidelity's (``kid_features_to_metric``, ``prc_features_to_metric``); this module adds the
feature space (centred on the reference's mean and divided by one scale, the reference's root-mean-square
feature standard deviation: the polynomial kernel's argument x.y / d is then O(1) whatever the extractor's
activations; see ``standardize``) and a torchmetrics ``Metric`` whose buffer of generated features DDP
gathers. torchmetrics' own ``KernelInceptionDistance`` draws its subsets from the global RNG and keeps the
real features per process, so it is neither seeded nor placed against a fixed, cached reference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from benchmark.metrics.extractors import FeatureExtractor
from benchmark.metrics.fid import FrechetDistanceToReference, ReferenceStatistics

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3
PRC_BATCH_SIZE = 1000  # rows of a distance matrix at a time: (1000, N) floats instead of (N, N)

FID, KID, PRECISION, RECALL = "fid", "kid", "precision", "recall"  # keys of `SampleQuality.compute()`


def standardize(features: Tensor, reference: Tensor) -> Tensor:
    """(features - mean) / s (N, F): centred on the reference's per-feature mean and divided by one scale for
    every feature, s = sqrt(mean_f Var_ref(f)), so that the cubic kernel's x.y / d is O(1).

    One scale, not one per feature: the domain extractor has ReLU features that are nearly dead on real digits
    (one had a standard deviation of 0.003, active in 1 of 10,000 test images), and dividing by its own
    standard deviation multiplied it 350-fold, so that samples lighting it up dominated the cubed kernel
    (KID 77 for one set of prior samples, 5.3 with one scale) and every distance. The geometry is then that of
    the raw features, as FID's."""
    reference = reference.double()
    scale = reference.var(0).mean().sqrt().clamp_min(1e-30)
    return (features.double() - reference.mean(0)) / scale  # (N, F)


def kid_features_to_metric(fake: Tensor, real: Tensor, subsets: int = KID_SUBSETS,
                           subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> float:
    """Mean over `subsets` seeded random subsets of the unbiased MMD^2 (cubic polynomial kernel) between
    fake (N, F) and real (M, F) features; the subset size is capped at min(N, M)."""
    from threadpoolctl import threadpool_limits
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN
    from torch_fidelity.metric_kid import kid_features_to_metric as tf_kid

    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(fake)} and {len(real)}")
    # One BLAS thread: the (1000, 1000) kernel matrices are too small to share, and on a busy CPU a pool of
    # spinning threads made the 100 subsets 2.5x slower.
    with threadpool_limits(1):
        out = tf_kid(fake.double().cpu(), real.double().cpu(), kid_subsets=subsets, kid_subset_size=size,
                     kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                     kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN]


def prc_features_to_metric(fake: Tensor, real: Tensor, neighborhood: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """(precision, recall) of fake (N, F) against real (M, F) features with k-NN balls, k = `neighborhood`."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL
    from torch_fidelity.metric_prc import prc_features_to_metric as tf_prc

    if min(len(fake), len(real)) <= neighborhood:
        raise ValueError(f"precision/recall with k = {neighborhood} needs more than {neighborhood} samples "
                         f"on each side, got {len(fake)} and {len(real)}")
    out = tf_prc(fake.float().cpu(), real.float().cpu(), prc_neighborhood=neighborhood,
                 prc_batch_size=PRC_BATCH_SIZE, save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def sample_quality_from_features(fake: Tensor, real: Tensor, seed: int = 0,
                                 kid_subsets: int = KID_SUBSETS) -> dict[str, float]:
    """KID, precision and recall of fake (N, F) against real (M, F) features, both standardised by `real`.

    Precision/recall compare sets of equal size (the k-NN radii shrink as a set grows, which would tilt the
    two numbers): the real side is a seeded subset of min(N, M) of its rows."""
    f, r = standardize(fake, real), standardize(real, real)
    n = min(len(f), len(r))
    r_prc = r[torch.randperm(len(r), generator=torch.Generator().manual_seed(seed))[:n]]
    precision, recall = prc_features_to_metric(f, r_prc)
    return {KID: kid_features_to_metric(f, r, kid_subsets, seed=seed), PRECISION: precision, RECALL: recall}


class _PassThrough(FeatureExtractor):
    """Features (N, F) are their own features: the inner FID gets what `SampleQuality` extracted once."""

    tag = "features"

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


class SampleQuality(Metric):
    """FID, KID, precision and recall of generated images against a fixed real reference.

    ``update(images, index)`` extracts the features once: their sums go to the FID states (sum-reduced, see
    `FrechetDistanceToReference`), and the features of the samples with ``index < capacity`` to a buffer
    that DDP concatenates (``dist_reduce_fx="cat"``). The buffer is put back in index order before
    ``compute``, so a set split across processes gives the single-process values. `index` is the global
    number of each sample (its test image, or its draw from the prior), so the kept subset -- the first
    `capacity` samples -- does not depend on how the set was split either.
    """

    full_state_update = False

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStatistics | None,
                 reference_features: Tensor, capacity: int = 10_000, seed: int = 0,
                 kid_subsets: int = KID_SUBSETS, **kwargs):
        super().__init__(**kwargs)
        if reference_features.dim() != 2 or reference_features.shape[1] != extractor.num_features:
            raise ValueError(f"reference features must be (M, {extractor.num_features}), "
                             f"got {tuple(reference_features.shape)}")
        self.extractor = extractor
        self.fid = FrechetDistanceToReference(_PassThrough(extractor.num_features), reference)
        self.register_buffer("reference_features", reference_features.float(), persistent=False)
        self.capacity, self.seed, self.kid_subsets = capacity, seed, kid_subsets
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("index", [], dist_reduce_fx="cat")

    def update(self, images: Tensor, index: Tensor) -> None:
        features = self.extractor(images)  # (B, F)
        self.fid.update(features)
        keep = index < self.capacity
        self.features.append(features[keep].float())
        self.index.append(index[keep].long())

    def compute(self) -> dict[str, float]:
        features = torch.cat(self.features) if isinstance(self.features, list) else self.features  # (N, F)
        index = torch.cat(self.index) if isinstance(self.index, list) else self.index  # (N,)
        features = features[index.argsort()]
        out = {FID: float(self.fid.compute())}
        if min(len(features), len(self.reference_features)) <= PRC_NEIGHBORHOOD:  # a smoke-test sized set
            return {**out, KID: float("nan"), PRECISION: float("nan"), RECALL: float("nan")}
        out.update(sample_quality_from_features(features, self.reference_features, self.seed, self.kid_subsets))
        return out

    def reset(self) -> None:
        super().reset()
        self.fid.reset()
