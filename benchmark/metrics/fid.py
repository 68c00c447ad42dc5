"""Frechet distance of generated images to a dataset's test split (FID and a fast domain variant).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
NeurIPS, arXiv:1706.08500) fits a Gaussian to the features of real and of generated images and reports

    d^2 = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}),

with the 2048-d pool3 features of the TensorFlow Inception-v3 graph of 2015-12-05. The maths is torchmetrics'
`FrechetInceptionDistance`, fed by one of the extractors of ``benchmark.metrics.extractors`` (images in [0, 1],
shape (N, C, H, W), C = 1 or 3). torchmetrics' built-in `FrechetInceptionDistance(feature=2048)` is not this
protocol: it truncates to uint8 and, by default, resizes with torch's antialiased bilinear instead of
TensorFlow 1's, so its values differ from torch-fidelity's.

The metric keeps sums (sum f, sum f f^T, n), never a list of features, so fakes split across DDP ranks give the
single-process value; reference statistics of a test split are computed once and cached on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from benchmark.metrics.extractors import FeatureExtractor, atomic_save, fid_cache_dir, tensors_checksum


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics and the metric
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReferenceStatistics:
    """Sufficient statistics of the real images' features, as torchmetrics' FID states hold them."""

    features_sum: Tensor      # (F,) float64, sum_i f_i
    features_cov_sum: Tensor  # (F, F) float64, sum_i f_i f_i^T
    num_samples: int

    def save(self, path: str | Path, **meta) -> None:
        atomic_save({"features_sum": self.features_sum, "features_cov_sum": self.features_cov_sum,
                      "num_samples": self.num_samples, "meta": meta}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStatistics:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(saved["features_sum"], saved["features_cov_sum"], saved["num_samples"])


class FrechetDistanceToReference(FrechetInceptionDistance):
    """torchmetrics' FID whose real side is fixed reference statistics; `update` takes generated images.

    Under DDP, torchmetrics sums every state over ranks before `compute`. The reference is therefore placed in
    the real-feature states of rank 0 only (zeros elsewhere), so the sum restores it exactly and fakes split
    across ranks give the single-process value. Use `update`/`compute` (not `forward`, a per-batch FID).

    In a LightningModule: ``self.fid_prior = FrechetDistanceToReference(extractor, reference)`` in ``__init__``,
    ``self.fid_prior.update(x_samples)`` in ``test_step``, ``self.log(FID_PRIOR, self.fid_prior)``. The
    extractor is a submodule: its weights travel with the module's state_dict (87 MB for Inception).
    """

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStatistics | None = None, **kwargs):
        super().__init__(feature=extractor, normalize=True, reset_real_features=False, **kwargs)
        if reference is not None and reference.features_sum.shape != (extractor.num_features,):
            raise ValueError(f"reference has {reference.features_sum.shape[0]} features, "
                             f"the extractor {extractor.num_features}")
        self.reference = reference
        self._reference_placed = reference is None

    def _place_reference(self) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if not distributed or dist.get_rank(self.process_group) == 0:
            self.real_features_sum += self.reference.features_sum.to(self.real_features_sum)
            self.real_features_cov_sum += self.reference.features_cov_sum.to(self.real_features_cov_sum)
            self.real_features_num_samples += self.reference.num_samples
        self._reference_placed = True

    def update(self, imgs: Tensor, real: bool = False) -> None:
        if not self._reference_placed:  # placed lazily: the rank is known only once the process group exists
            self._place_reference()
        super().update(imgs, real)

    def real_statistics(self) -> ReferenceStatistics:
        """The real-side states of this process (before any DDP sum)."""
        return ReferenceStatistics(self.real_features_sum.detach().cpu().clone(),
                                   self.real_features_cov_sum.detach().cpu().clone(),
                                   int(self.real_features_num_samples))


@torch.no_grad()
def images_to_features(images: Tensor, extractor: FeatureExtractor, batch_size: int = 500) -> Tensor:
    """Features (N, F) of images (N, C, H, W) in [0, 1], a batch at a time."""
    return torch.cat([extractor(batch) for batch in images.split(batch_size)])


@torch.no_grad()
def images_to_reference_statistics(images: Tensor, extractor: FeatureExtractor,
                                   batch_size: int = 500) -> ReferenceStatistics:
    """Reference statistics of real images, accumulated by torchmetrics' FID a batch at a time.

    Runs on the images' device; the extractor is moved there.
    """
    metric = FrechetDistanceToReference(extractor).to(images.device)
    for batch in images.split(batch_size):
        metric.update(batch, real=True)
    return metric.real_statistics()


def features_to_reference_statistics(features: Tensor) -> ReferenceStatistics:
    """The FID states (sum f, sum f f^T, n) of features (N, F) already extracted, in float64."""
    f = features.double().cpu()
    return ReferenceStatistics(f.sum(0), f.T @ f, len(f))


def reference_statistics(dataset: str, test_images: Tensor, extractor: FeatureExtractor, *,
                         cache_dir: str | Path | None = None, batch_size: int = 500) -> ReferenceStatistics:
    """Reference statistics of a test split, cached on disk by (dataset, extractor tag, data checksum). They
    are summed from the split's cached features (``reference_features``), so the split is extracted once for
    FID, KID and precision/recall (10,000 Inception passes take about 40 minutes on a CPU)."""
    checksum = tensors_checksum(test_images)
    path = fid_cache_dir(cache_dir) / f"reference-{dataset}-{extractor.tag}-{checksum[:16]}.pt"
    if path.exists():
        return ReferenceStatistics.load(path)
    stats = features_to_reference_statistics(
        reference_features(dataset, test_images, extractor, cache_dir=cache_dir, batch_size=batch_size))
    stats.save(path, dataset=dataset, extractor=extractor.tag, data_checksum=checksum)
    return stats


def reference_features(dataset: str, test_images: Tensor, extractor: FeatureExtractor, *,
                       cache_dir: str | Path | None = None, batch_size: int = 500) -> Tensor:
    """Features (N, F) float32 of a test split, cached beside its reference statistics: KID and
    precision/recall need the points themselves, not sums."""
    checksum = tensors_checksum(test_images)
    path = fid_cache_dir(cache_dir) / f"features-{dataset}-{extractor.tag}-{checksum[:16]}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)["features"]
    features = images_to_features(test_images, extractor.to(test_images.device), batch_size).float().cpu()
    atomic_save({"features": features, "meta": {"dataset": dataset, "extractor": extractor.tag,
                                                 "data_checksum": checksum}}, path)
    return features


@torch.no_grad()
def frechet_distance(fake_images: Tensor, reference: ReferenceStatistics | Tensor, extractor: FeatureExtractor,
                     batch_size: int = 500) -> float:
    """FID of generated images (N, C, H, W) in [0, 1] against reference statistics or real images.

    Runs on the fake images' device; the extractor is moved there.
    """
    if isinstance(reference, Tensor):
        reference = images_to_reference_statistics(reference.to(fake_images.device), extractor, batch_size)
    metric = FrechetDistanceToReference(extractor, reference).to(fake_images.device)
    for batch in fake_images.split(batch_size):
        metric.update(batch)
    return float(metric.compute())
